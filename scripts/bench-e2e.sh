#!/usr/bin/env bash
# End-to-end benchmark: a pipelined HSET burst on the primary until its effect is committed in
# MariaDB. After the burst a marker hash is written; the run ends when the marker's row is in
# the table (everything before it is then applied: changes are applied in order). Reports the
# primary's burst rate (the reference), the end-to-end rate (commands over the time from the
# start of the burst to the marker's row), the lag after the burst and the ratio.
# Not a test: it measures.
#
# Positions and RSS are sampled every 0.2 s (e2e-positions.csv) and plotted (e2e-positions.png,
# with gnuplot) into the output directory.
#
# Usage: scripts/bench-e2e.sh [commands] [partitions] [output-dir]
#        (default 1000000 HSETs over 100000 keys, pipeline 32; 1 partition; ./bench-out)
#        AGE=changing: every HSET changes its row; PERF_OUT=file: a perf profile of the service
set -euo pipefail
cd "$(dirname "$0")/.."
commands="${1:-1000000}"
partitions="${2:-1}"
work="$(mktemp -d /var/tmp/writebehind-e2e-bench.XXXXXX)"
database="wb_bench_e2e_$$"
. scripts/bench-common.sh
bench_out "${3:-${OUT:-}}"
primary=$(free_port)
service_pid=""
trap cleanup_bench EXIT
build_release
sql "CREATE DATABASE $database"

start_primary "$primary" "$work" --repl-backlog-size 512mb
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database" "$partitions"
admin=$(free_port)
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
# Attached and writing: a first marker's row is in the table.
redis-cli -p "$primary" hset person2:ready first_name ready >/dev/null
poll_service "$work/writebehind.log" has_row ready

# AGE=changing: every HSET gives the key a new age (a row change each time); by default the
# values are always the same, so only a key's first HSET changes its row.
age=42; [ "${AGE:-}" = changing ] && age=__rand_int__
echo "== burst: $commands HSETs (3 fields, age ${AGE:-42}) over 100000 keys, pipeline 32, into MariaDB, $partitions partition(s)"
sample_positions "$admin" "$service_pid" "$out/e2e-positions.csv" "$primary" &
sampler=$!
perf_pid=""
if [ -n "${PERF_OUT:-}" ]; then  # PERF_OUT=file: profile the service through the burst and lag
  perf record -F 499 --call-graph dwarf,16384 -o "$PERF_OUT" -p "$service_pid" >/dev/null 2>&1 &
  perf_pid=$!
fi
start=$(date +%s.%N)
redis-benchmark -p "$primary" -q -n "$commands" -P 32 -r 100000 \
  HSET person2:__rand_int__ first_name John last_name Doe age "$age" >/dev/null
burst_end=$(date +%s.%N)
redis-cli -p "$primary" hset person2:marker first_name marker >/dev/null
poll_service "$work/writebehind.log" has_row marker
done_at=$(date +%s.%N)
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
sleep 0.5
kill "$sampler" 2>/dev/null || true
plot_positions "$out/e2e-positions.csv" "$out/e2e-positions.png" "bench-e2e: $commands HSETs into MariaDB, $partitions partition(s)"
read -r utime stime < <(awk '{print $14, $15}' "/proc/$service_pid/stat")
python3 - "$start" "$burst_end" "$done_at" "$commands" "$utime" "$stime" "$(getconf CLK_TCK)" <<'PY'
import sys
start, burst_end, done_at, n, utime, stime, tck = map(float, sys.argv[1:])
print(f"burst_seconds={burst_end - start:.3f}")
print(f"lag_after_burst_seconds={done_at - burst_end:.3f}")
print(f"primary_burst_commands_per_second={n / (burst_end - start):.0f}")
print(f"end_to_end_commands_per_second={n / (done_at - start):.0f}")
print(f"writebehind_cpu_seconds={(utime + stime) / tck:.2f}")
print(f"ratio_end_to_end_to_primary={(n / (done_at - start)) / (n / (burst_end - start)):.2f}")
PY
grep -i error "$work/writebehind.log" | head -5 || true
