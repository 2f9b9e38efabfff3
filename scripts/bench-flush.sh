#!/usr/bin/env bash
# Memory benchmark: FLUSHALL of many watched keys end to end (capture and the MariaDB sink).
# Fills a primary with N hashes, lets `writebehind run` load them into a scratch MariaDB
# database, then sends FLUSHALL and samples the service's RSS every 0.1 s until the table is
# empty. Reports the peak RSS during the flush (the limit to hold: bounded whatever N), the
# memory by part at that peak (`memory_bytes{part}`: heap allocated and resident, RocksDB's
# memtables, table readers and block caches), the peak over the whole run (the initial load
# included) and the seconds to an empty table.
# Not a test: it measures.
#
# Usage: scripts/bench-flush.sh [keys]   (default 1000000)
#        OUT=dir: where flush-progress.csv and flush-progress.png go (default bench-out): changes
#        captured, rows written and RSS every 0.2 s through the load and the flush.
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-1000000}"
work="$(mktemp -d /var/tmp/writebehind-flush-bench.XXXXXX)"
database="wb_bench_flush_$$"
. scripts/bench-common.sh
bench_out "${OUT:-}"
primary=$(free_port)
service_pid=""
trap cleanup_bench EXIT
build_release
sql "CREATE DATABASE $database"

start_primary "$primary" "$work"
# Filled by a script, 100,000 keys per call.
for ((from = 1; from <= keys; from += 100000)); do
  to=$((from + 99999 < keys ? from + 99999 : keys))
  redis-cli -p "$primary" eval "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('HSET', 'person2:' .. i, 'first_name', 'John', 'last_name', 'Doe', 'age', '42') end" 0 "$from" "$to" >/dev/null
done
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database"
admin=$(free_port)
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
sample_positions "$admin" "$service_pid" "$out/flush-progress.csv" "$primary" &
sampler=$!
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$service_pid/status"; }
rows() { sql "SELECT COUNT(*) FROM $database.person1" 2>/dev/null || echo 0; }

load_start=$(date +%s.%N)
until [ "$(rows)" = "$keys" ]; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  sleep 0.5
done
load_end=$(date +%s.%N)
rss_before=$(rss_kb)

# memory_parts: the memory_bytes{part} gauges (MB), one "part=MB" per part, on one line.
memory_parts() {
  curl -sf "http://127.0.0.1:$admin/metrics" | awk -F'[{}" ]+' '
    $1 == "writebehind_memory_bytes" { printf "%s=%.0f ", $3, $4 / 1e6 }' || true
}
redis-cli -p "$primary" flushall >/dev/null
flush_start=$(date +%s.%N)
peak=$rss_before
at_peak=""
[ -n "${FLUSH_CSV:-}" ] && echo "seconds,rows,rss_mb,parts" >"$FLUSH_CSV"  # FLUSH_CSV=file: a timeline
while :; do
  rss=$(rss_kb)
  if [ "$rss" -gt "$peak" ]; then peak=$rss; at_peak=$(memory_parts); fi
  if [ -n "${FLUSH_CSV:-}" ]; then
    echo "$(python3 -c "print(round($(date +%s.%N) - $flush_start, 1))"),$(rows),$((rss / 1024)),$(memory_parts)" >>"$FLUSH_CSV"
  fi
  [ "$(rows)" = 0 ] && break
  sleep 0.1
done
# The gauges are sampled once a second: at the peak they are at most a second old.
echo "memory_at_peak_mb: $at_peak"
echo "sink_batch_rows: $(curl -sf "http://127.0.0.1:$admin/metrics" | grep -E "^writebehind_sink_batch_rows_(count|sum|bucket.*le=.(5000|\\+Inf))" | tr '\n' ' ')"
flush_end=$(date +%s.%N)
sleep 0.3
kill "$sampler" 2>/dev/null || true
plot_progress "$out/flush-progress.csv" "$out/flush-progress.png" "bench-flush: $keys hashes loaded into MariaDB, then FLUSHALL"
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$service_pid/status")
python3 - "$keys" "$load_start" "$load_end" "$flush_start" "$flush_end" "$rss_before" "$peak" "$hwm" <<'PY'
import sys
keys = int(sys.argv[1])
load_start, load_end, flush_start, flush_end = map(float, sys.argv[2:6])
rss_before, peak, hwm = map(int, sys.argv[6:9])
print(f"keys={keys}")
print(f"initial_load_seconds={load_end - load_start:.1f} (polled every 0.5 s)")
print(f"rss_before_flush_mb={rss_before / 1024:.0f}")
print(f"peak_rss_during_flush_mb={peak / 1024:.0f}")
print(f"peak_rss_whole_run_mb={hwm / 1024:.0f}")
print(f"flush_to_empty_table_seconds={flush_end - flush_start:.1f}")
PY
grep -i error "$work/writebehind.log" | head -5 || true
