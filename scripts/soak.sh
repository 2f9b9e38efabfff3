#!/usr/bin/env bash
# Soak: the service under a steady write rate for a long time, to see whether its memory grows.
# A scratch primary receives RATE HSETs per second (pipelined bursts once a second, over 100,000
# keys) for SECONDS; the service runs with `--capture-only` (default) or into a scratch MariaDB
# database (`sink`). Every 10 s the service's RSS, the buffer's size on disk and the positions
# (from the admin endpoint's metrics) and the memory by part (`memory_bytes{part}`) go to soak.csv; the summary compares the RSS of the first
# and last tenth of the run after a warm-up minute. With gnuplot, soak-rss.png is drawn too.
# Not a test: it measures.
#
# Usage: scripts/soak.sh [seconds] [writes_per_second] [capture-only|sink] [output-dir]
#        (default 3600 10000 capture-only ./soak-out)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-3600}"
rate="${2:-10000}"
mode="${3:-capture-only}"
out="$(realpath -m "${4:-soak-out}")"
mkdir -p "$out"
work="$(mktemp -d /var/tmp/writebehind-soak.XXXXXX)"
database=""
. scripts/bench-common.sh
primary=$(free_port)
admin=$(free_port)
service_pid=""
load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  cleanup_bench
}
trap cleanup EXIT
build_release
start_primary "$primary" "$work" --repl-backlog-size 256mb
if [ "$mode" = sink ]; then
  database="wb_soak_$$"
  sql "CREATE DATABASE $database"
  backend="mysql://root@127.0.0.1:3306/$database"
  flags=()
else
  backend="sqlite://$work/unused.db"
  flags=(--capture-only)
fi
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "$backend"
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run "${flags[@]}" --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
until curl -sf "http://127.0.0.1:$admin/metrics" >/dev/null; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  sleep 0.1
done

steady_load "$primary" "$rate" "$seconds" &
load_pid=$!

metric() { awk -v name="$1" '$1 == name {print $2; exit}' "$work/metrics"; }
part() { awk -v name="writebehind_memory_bytes{part=\"$1\"}" '$1 == name {printf "%.1f", $2 / 1048576; exit}' "$work/metrics"; }
echo "elapsed_s,rss_mb,buffer_mb,primary_offset,buffered,applied,lag_bytes,heap_allocated_mb,heap_resident_mb,memtables_mb,table_readers_mb,block_cache_mb" >"$out/soak.csv"
started=$(date +%s)
while kill -0 "$load_pid" 2>/dev/null; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  curl -sf "http://127.0.0.1:$admin/metrics" >"$work/metrics" || true
  rss_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$service_pid/status")
  buffer=$(metric writebehind_buffer_size_bytes)
  applied=$(awk '$1 ~ /^writebehind_position_applied_bytes/ {print $2; exit}' "$work/metrics")
  awk -v t="$(($(date +%s) - started))" -v rss="$rss_kb" -v buf="${buffer:-0}" \
    -v p="$(metric writebehind_primary_offset_bytes)" -v b="$(metric writebehind_position_buffered_bytes)" \
    -v a="${applied:-}" -v lag="$(metric writebehind_lag_bytes)" \
    -v parts="$(part heap_allocated),$(part heap_resident),$(part rocksdb_memtables),$(part rocksdb_table_readers),$(part rocksdb_block_cache)" \
    'BEGIN { printf "%d,%.1f,%.1f,%s,%s,%s,%s,%s\n", t, rss / 1024, buf / 1048576, p, b, a, lag, parts }' >>"$out/soak.csv"
  sleep 10
done
cp "$work/writebehind.log" "$out/writebehind.log"
python3 - "$out/soak.csv" "$seconds" "$rate" "$mode" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]))]
seconds, rate, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
warm = [r for r in rows if int(r["elapsed_s"]) >= 60] or rows
tenth = max(1, len(warm) // 10)
first = sum(float(r["rss_mb"]) for r in warm[:tenth]) / tenth
last = sum(float(r["rss_mb"]) for r in warm[-tenth:]) / tenth
print(f"mode={mode} seconds={seconds} writes_per_second={rate} samples={len(rows)}")
print(f"rss_first_tenth_mb={first:.1f} rss_last_tenth_mb={last:.1f} rss_growth_mb={last - first:.1f}")
print(f"rss_peak_mb={max(float(r['rss_mb']) for r in rows):.1f}")
print(f"buffer_mb_first={rows[0]['buffer_mb']} buffer_mb_last={rows[-1]['buffer_mb']}")
PY
if command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,420
set output "$out/soak-rss.png"
set datafile separator ","
set key top left
set xlabel "seconds"
set ylabel "MB"
set title "writebehind $mode, $rate HSET/s: RSS and buffer size"
plot "$out/soak.csv" using 1:2 skip 1 with lines title "RSS", "" using 1:3 skip 1 with lines title "buffer on disk"
GP
fi
