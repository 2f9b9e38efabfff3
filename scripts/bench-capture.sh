#!/usr/bin/env bash
# Capture benchmark: a real `redis-server --replicaof` and `writebehind run` attached to the same
# primary, fed the same pipelined HSET burst by redis-benchmark. Reports, for both, the lag in
# bytes when the burst ends and the time to catch up (the service runs --capture-only: capture
# alone, no database writes), then the throughput in commands per second
# durably applied (writebehind acknowledges only what is synced to RocksDB; timed when its own
# durable offset reaches the burst's end, as the replica is by its own offset), and the ratio,
# also as the primary heard it (the ACK of each goes once a second); and
# the most the primary held in its output buffer for each of them (bench-outbuf.py), which is
# what `client-output-buffer-limit replica` cuts a slow replica on.
# Not a test: it measures.
#
# Usage: scripts/bench-capture.sh [commands]   (default 1000000 HSETs, pipeline 32)
#        TLS=1 scripts/bench-capture.sh ...     (the replica and the service replicate over TLS:
#        a CA and a server certificate made with openssl, the primary's --tls-port)
#        OUTPUT_LIMIT="64mb 64mb 0": the primary's `client-output-buffer-limit replica` (default
#        Redis's, 256mb 64mb 60); the script then also counts the replicas the primary cut for it
#        and the resyncs that followed.
#        OUT=dir: where capture-positions.csv and capture-positions.png go (default bench-out):
#        the positions of the service and the replica's offset every 0.2 s through the burst;
#        and capture-outbuf.csv / .png: the primary's output buffer for each replica, every 0.1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
commands="${1:-1000000}"
work="$(mktemp -d /var/tmp/writebehind-capture-bench.XXXXXX)"
. scripts/bench-common.sh
bench_out "${OUT:-}"
primary=$(free_port); replica=$(free_port); admin=$(free_port)
service_pid=""
cleanup() {
  if [ -n "$service_pid" ]; then kill -9 "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; fi || true
  redis-cli -p "$primary" shutdown nosave >/dev/null 2>&1 || true
  redis-cli -p "$replica" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
cargo build --release --bin writebehind >/dev/null 2>&1
bin="${BIN:-${CARGO_TARGET_DIR:-target}/release/writebehind}"  # BIN: another build to compare

tls_args=(); upstream=$primary; source="url = \"redis://127.0.0.1:$primary\""
if [ -n "${TLS:-}" ]; then
  upstream=$(free_port)
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 1 -subj "/CN=writebehind bench CA" \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
  openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$work/server.ext"
  openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 1 -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null
  tls_args=(--tls-cert-file "$work/server.pem" --tls-key-file "$work/server.key"
    --tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no --tls-replication yes)
  source=$(printf 'url = "rediss://localhost:%s"\n[source.tls]\nca_file = "%s"' "$upstream" "$work/ca.pem")
fi
redis-server --port "$primary" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
  --repl-backlog-size "${BACKLOG:-512mb}" --daemonize yes --logfile "$work/primary.log" \
  ${TLS:+--tls-port "$upstream"} "${tls_args[@]}"
if [ -n "${OUTPUT_LIMIT:-}" ]; then
  redis-cli -p "$primary" config set client-output-buffer-limit "replica $OUTPUT_LIMIT" >/dev/null
fi
mkdir -p "$work/replica"
redis-server --port "$replica" --bind 127.0.0.1 --dir "$work/replica" --save '' --appendonly no \
  --replicaof 127.0.0.1 "$upstream" --daemonize yes --logfile "$work/replica.log" "${tls_args[@]}"
cat > "$work/writebehind.toml" <<TOML
[source]
$source
[buffer]
path = "$work/buffer"
mirror_cache_mb = ${MIRROR_CACHE_MB:-128}
[admin]
listen = "127.0.0.1:$admin"
[backends.db]
url = "sqlite://$work/unused.db"
[[mappings]]
name = "People"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
TOML
RUST_LOG=warn "$bin" run --capture-only --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!

offsets() {
  # master offset, the replica's processed offset, writebehind's acknowledged (durable) offset
  local info; info=$(redis-cli -p "$primary" info replication | tr -d '\r')
  local master; master=$(echo "$info" | sed -n 's/^master_repl_offset://p')
  local rep; rep=$(redis-cli -p "$replica" info replication | tr -d '\r' | sed -n 's/^slave_repl_offset://p')
  local wb; wb=$(echo "$info" | { grep '^slave' || true; } | { grep 'port=1,' || true; } | sed -n 's/.*offset=\([0-9]*\).*/\1/p')
  echo "${master:-0} ${rep:-0} ${wb:-0}"
}
# writebehind's own durable offset (what its next REPLCONF ACK reports; the primary hears one
# a second, so the offset in `offsets` is up to a second old).
durable_offset() {
  curl -s "http://127.0.0.1:$admin/metrics" | awk '/^writebehind_position_buffered_bytes / {printf "%d\n", $2}'
}
for _ in $(seq 1 300); do
  read -r m r w < <(offsets)
  [ "$(redis-cli -p "$primary" info replication | tr -d '\r' | sed -n 's/^connected_slaves://p')" = 2 ] && [ "$w" -ge "$m" ] && [ "$r" -ge "$m" ] && break
  sleep 0.1
done

# AGE=changing: every HSET gives the key a new age (a row change each time); by default the
# values are always the same, so only a key's first HSET changes its row.
age=42; [ "${AGE:-}" = changing ] && age=__rand_int__
echo "== burst: $commands HSETs (3 fields, age ${AGE:-42}) over 100000 keys, pipeline 32"
perf_pid=""
if [ -n "${PERF_OUT:-}" ]; then  # PERF_OUT=file: profile the service through the burst and catch-up
  perf record -F 499 --call-graph dwarf,16384 -o "$PERF_OUT" -p "$service_pid" >/dev/null 2>&1 &
  perf_pid=$!
fi
sample_positions "$admin" "$service_pid" "$out/capture-positions.csv" "$primary" "$replica" &
sampler=$!
python3 scripts/bench-outbuf.py "$primary" "$out/capture-outbuf.csv" >"$work/outbuf.txt" &
outbuf=$!
# Polled from before the burst, every 10 ms: each is timed when it reaches the burst's end.
python3 scripts/bench-catch-up.py "$primary" "$replica" "@$work/target" 600 "$admin" >"$work/catch-up.txt" &
catch_up_pid=$!
start=$(date +%s.%N)
redis-benchmark -p "$primary" -q -n "$commands" -P 32 -r 100000 \
  HSET person2:__rand_int__ first_name John last_name Doe age "$age" >/dev/null
burst_end=$(date +%s.%N)
read -r target r _ < <(offsets)
w=$(durable_offset); w=${w:-0}
echo "burst_seconds=$(python3 -c "print(round($burst_end-$start,3))")"
echo "lag_at_burst_end_replica_bytes=$((target - r))"
echo "lag_at_burst_end_writebehind_bytes=$((target - w))"
# Polled by one process over kept connections (a shell loop here took about a fifth of the
# machine: bench-catch-up.py says how).
# The service's time is when its own durable offset reaches the target, read as the replica's
# own offset is (its REPLCONF ACK, once a second, tells the primary up to a second later).
echo "$target" >"$work/target"
wait "$catch_up_pid" || exit 1
catch_up=$(cat "$work/catch-up.txt")
replica_done=$(echo "$catch_up" | sed -n 's/^replica_done=//p')
wb_done=$(echo "$catch_up" | sed -n 's/^writebehind_done=//p')
wb_heard=$(echo "$catch_up" | sed -n 's/^writebehind_heard_done=//p')
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
kill "$outbuf" && wait "$outbuf" || true
cat "$work/outbuf.txt"
if command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,360
set output "$out/capture-outbuf.png"
set datafile separator ","
set key top right
set xlabel "seconds from the burst's start"
set ylabel "primary's output buffer (MB)"
set title "bench-capture: $commands HSETs, what the primary held for each replica"
plot "$out/capture-outbuf.csv" using 1:3 skip 1 with lines lw 2 title "writebehind", \
     "" using 1:2 skip 1 with lines dt 2 lw 2 title "real replica"
GP
fi
# Replicas the primary dropped past its output-buffer limit, and the syncs it served (the two
# initial full syncs included).
echo "primary_cut_replicas=$(grep -c 'output buffer limits' "$work/primary.log" || true)"
redis-cli -p "$primary" info stats | tr -d '\r' | grep -E '^sync_(full|partial_ok):' | sed 's/:/=/' 
sleep 0.3
kill "$sampler" 2>/dev/null || true
plot_positions "$out/capture-positions.csv" "$out/capture-positions.png" "bench-capture: $commands HSETs, capture only (received/buffered) and a real replica"
# CPU the service used (user + system), from its start: the cost per command, whatever the
# machine's contention.
read -r utime stime < <(awk '{print $14, $15}' "/proc/$service_pid/stat")
echo "writebehind_cpu_seconds=$(python3 -c "print(round(($utime + $stime) / $(getconf CLK_TCK), 2))")"
# By thread name (threads of one name summed): which of them is near a whole core.
python3 - "$service_pid" "$(getconf CLK_TCK)" <<'PY'
import collections, os, sys
pid, tck = sys.argv[1], int(sys.argv[2])
cpu = collections.Counter()
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
    except OSError:
        continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    cpu[name] += (int(fields[11]) + int(fields[12])) / tck
print("writebehind_cpu_seconds_by_thread=" + ",".join(f"{n}:{s:.2f}" for n, s in cpu.most_common() if s >= 0.01))
PY
# And the real replica's, from its start (its full sync of an empty primary costs nothing).
replica_pid=$(redis-cli -p "$replica" info server | tr -d '\r' | sed -n 's/^process_id://p')
read -r utime stime < <(awk '{print $14, $15}' "/proc/$replica_pid/stat")
echo "replica_cpu_seconds=$(python3 -c "print(round(($utime + $stime) / $(getconf CLK_TCK), 2))")"

python3 - "$start" "$burst_end" "$replica_done" "$wb_done" "$commands" "$wb_heard" <<'PY'
import sys
start, burst_end, replica_done, wb_done, n, wb_heard = map(float, sys.argv[1:])
rep = replica_done - start
wb = wb_done - start
print(f"replica_caught_up_after_burst_seconds={replica_done - burst_end:.3f}")
print(f"writebehind_caught_up_after_burst_seconds={wb_done - burst_end:.3f}")
print(f"replica_commands_per_second={n / rep:.0f}")
print(f"writebehind_durable_commands_per_second={n / wb:.0f}")
print(f"ratio_writebehind_to_replica={(n / wb) / (n / rep):.2f}")
# The same, timed when the primary heard the service's ACK (the script's measure until session
# 25): up to a second later.
print(f"writebehind_heard_after_durable_seconds={wb_heard - wb_done:.3f}")
print(f"ratio_heard_by_primary={(n / (wb_heard - start)) / (n / rep):.2f}")
PY
grep -i error "$work/writebehind.log" | head -5 || true
