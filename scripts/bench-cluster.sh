#!/usr/bin/env bash
# Redis Cluster end to end: a pipelined HSET burst spread over the shards of a local cluster of
# three primaries (no replicas), until its effect is committed in MariaDB. The burst is
# `redis-benchmark --cluster` (each node's share from its own clients, at once), so its rate is
# the sum of the primaries' burst rates in this run: the reference. After the burst a marker hash
# is written into every shard; the run ends when the three markers' rows are in the table
# (changes are applied in order per shard, so everything before them is applied). Reports the
# primaries' burst rate, the end-to-end rate (commands over the time from the start of the burst
# to the last marker's row) and the ratio. Not a test: it measures.
#
# Usage: scripts/bench-cluster.sh [commands] [output-dir]   (default 1000000 HSETs over 100000
#        keys per node, pipeline 32)
set -euo pipefail
cd "$(dirname "$0")/.."
commands="${1:-1000000}"
work="$(mktemp -d /var/tmp/writebehind-cluster-bench.XXXXXX)"
database="wb_bench_cluster_$$"
. scripts/bench-common.sh
bench_out "${2:-${OUT:-}}"
# A port below 55536 whose bus port (+10000) is free too.
cluster_port() {
  python3 -c '
import random, socket
while True:
    port = random.randint(20000, 45000)
    try:
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
        print(port); break
    except OSError:
        pass'
}
ports=("$(cluster_port)" "$(cluster_port)" "$(cluster_port)")
primary=${ports[0]}
service_pid=""
cleanup_cluster() {
  for port in "${ports[@]}"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
  cleanup_bench
}
trap cleanup_cluster EXIT
build_release
sql "CREATE DATABASE $database"
for i in 0 1 2; do
  mkdir -p "$work/node$i"
  start_primary "${ports[$i]}" "$work/node$i" --cluster-enabled yes --repl-backlog-size 512mb
done
redis-cli -p "${ports[0]}" cluster addslotsrange 0 5460 >/dev/null
redis-cli -p "${ports[1]}" cluster addslotsrange 5461 10922 >/dev/null
redis-cli -p "${ports[2]}" cluster addslotsrange 10923 16383 >/dev/null
redis-cli -p "${ports[0]}" cluster meet 127.0.0.1 "${ports[1]}" >/dev/null
redis-cli -p "${ports[0]}" cluster meet 127.0.0.1 "${ports[2]}" >/dev/null
formed() { for port in "${ports[@]}"; do redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || return 1; done; }
until formed; do sleep 0.1; done

write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database"
seeds=$(printf '"127.0.0.1:%s", ' "${ports[@]}")
sed -i "s|^url = \"redis://127.0.0.1:$primary\"|cluster = [${seeds%, }]|" "$work/writebehind.toml"
printf '[admin]\nlisten = ""\n' >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!

# A key of each shard (by its slot and the ranges above): markers go to every shard.
marker_keys=("" "" "")
n=0
while [ -z "${marker_keys[0]}" ] || [ -z "${marker_keys[1]}" ] || [ -z "${marker_keys[2]}" ]; do
  key="person2:marker$n"
  slot=$(redis-cli -p "$primary" cluster keyslot "$key")
  shard=$(( slot <= 5460 ? 0 : (slot <= 10922 ? 1 : 2) ))
  [ -z "${marker_keys[$shard]}" ] && marker_keys[$shard]=$key
  n=$((n + 1))
done
mark() {  # mark NAME: writes NAME-<shard> on every shard
  for i in 0 1 2; do redis-cli -p "${ports[$i]}" hset "${marker_keys[$i]}" first_name "$1" >/dev/null; done
}
all_marked() {  # all_marked NAME: the three marker rows hold NAME
  [ "$(sql "SELECT COUNT(*) FROM $database.person1 WHERE first = '$1'" 2>/dev/null || echo 0)" = 3 ]
}
mark ready
poll_service "$work/writebehind.log" all_marked ready

echo "== burst: $commands HSETs (3 fields) spread over 3 primaries (redis-benchmark --cluster, pipeline 32), into MariaDB"
start=$(date +%s.%N)
redis-benchmark -p "$primary" --cluster -q -n "$commands" -P 32 -r 100000 \
  HSET 'person2:{tag}:__rand_int__' first_name John last_name Doe age 42 >/dev/null
burst_end=$(date +%s.%N)
mark done
poll_service "$work/writebehind.log" all_marked done
done_at=$(date +%s.%N)
keys=0
for port in "${ports[@]}"; do keys=$((keys + $(redis-cli -p "$port" dbsize))); done
rows=$(sql "SELECT COUNT(*) FROM $database.person1")
read -r utime stime < <(awk '{print $14, $15}' "/proc/$service_pid/stat")
python3 - "$start" "$burst_end" "$done_at" "$commands" "$utime" "$stime" "$(getconf CLK_TCK)" "$keys" "$rows" <<'PY'
import sys
start, burst_end, done_at, n, utime, stime, tck, keys, rows = map(float, sys.argv[1:])
print(f"burst_seconds={burst_end - start:.3f}")
print(f"lag_after_burst_seconds={done_at - burst_end:.3f}")
print(f"primaries_burst_commands_per_second={n / (burst_end - start):.0f}")
print(f"end_to_end_commands_per_second={n / (done_at - start):.0f}")
print(f"writebehind_cpu_seconds={(utime + stime) / tck:.2f}")
print(f"keys_in_redis={keys:.0f} rows={rows:.0f}")
print(f"ratio_end_to_end_to_primaries={(n / (done_at - start)) / (n / (burst_end - start)):.2f}")
PY
grep -i error "$work/writebehind.log" | head -5 || true
