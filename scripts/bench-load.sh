#!/usr/bin/env bash
# Initial-load benchmark: a primary holding N hashes, `writebehind run` started against it, until
# every row is in a scratch MariaDB table (a marker written right after the start comes after
# the snapshot in the stream: its row means the snapshot is applied). The reference, in the same
# run: LOAD DATA LOCAL INFILE of the same N rows into a table of the same shape, in key order;
# and a second one, the same rows shuffled, as a snapshot delivers them in Redis's hash order
# (InnoDB inserts rows in key order faster: docs/benchmarks.md, session 25).
# Not a test: it measures.
#
# Usage: scripts/bench-load.sh [keys] [partitions]   (default 500000 1)
#        OUT=dir: where load-progress.csv and load-progress.png go (default bench-out): changes
#        captured, rows written and RSS every 0.2 s. PERF_OUT=file: a perf profile of the whole
#        machine from the service's start to the marker row; PERF_STACKS=1: with call stacks
#        (DWARF unwinding: large files).
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-500000}"
partitions="${2:-1}"
work="$(mktemp -d /var/tmp/writebehind-load-bench.XXXXXX)"
database="wb_bench_load_$$"
. scripts/bench-common.sh
bench_out "${OUT:-}"
primary=$(free_port); admin=$(free_port)
service_pid=""
trap cleanup_bench EXIT
build_release
# The reference: the same rows by LOAD DATA into a table shaped as create_table makes it.
load_bench_setup "$keys" "$partitions"
load_data_shuffled_reference
start=$(date +%s.%N)
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
if [ -n "${PERF_OUT:-}" ]; then  # PERF_OUT=file: profile the load (see the usage)
  if [ -n "${PERF_STACKS:-}" ]; then
    perf record -a --call-graph dwarf,16384 -F 499 -o "$PERF_OUT" >/dev/null 2>&1 &
  else
    perf record -a -g -F 499 -o "$PERF_OUT" >/dev/null 2>&1 &
  fi
  perf_pid=$!
fi
sample_positions "$admin" "$service_pid" "$out/load-progress.csv" "$primary" &
sampler=$!
# Written once the snapshot is delivered (the replica is `online`): it is then in the stream,
# after the snapshot, not in it.
poll_service "$work/writebehind.log" replica_online "$primary"
redis-cli -p "$primary" hset person2:marker first_name marker >/dev/null
poll_service "$work/writebehind.log" has_row marker
done_at=$(date +%s.%N)
if [ -n "${PERF_OUT:-}" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
sink_batch_summary "$admin"
sleep 0.3
kill "$sampler" 2>/dev/null || true
plot_progress "$out/load-progress.csv" "$out/load-progress.png" "bench-load: initial load of $keys hashes into MariaDB, $partitions partition(s)"
rows=$(sql "SELECT COUNT(*) FROM $database.person1")
read -r utime stime < <(awk '{print $14, $15}' "/proc/$service_pid/stat")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$service_pid/status")
python3 - "$keys" "$rows" "$load_start" "$load_end" "$start" "$done_at" "$utime" "$stime" "$(getconf CLK_TCK)" "$hwm" "$partitions" "$shuffled_start" "$shuffled_end" <<'PY'
import sys
keys, rows = int(sys.argv[1]), int(sys.argv[2])
load_start, load_end, start, done = map(float, sys.argv[3:7])
utime, stime, tck, hwm = map(float, sys.argv[7:11])
shuffled_start, shuffled_end = map(float, sys.argv[12:14])
reference = keys / (load_end - load_start)
shuffled = keys / (shuffled_end - shuffled_start)
rate = keys / (done - start)
print(f"keys={keys} partitions={sys.argv[11]} rows_in_table={rows}")
print(f"load_data_rows_per_second={reference:.0f}")
# The same rows in a snapshot's order (shuffled): a second reference, printed beside the first.
print(f"load_data_shuffled_rows_per_second={shuffled:.0f}")
print(f"ratio_initial_load_to_shuffled_load_data={rate / shuffled:.2f}")
print(f"initial_load_rows_per_second={rate:.0f} (start of the service to the marker row, {done - start:.1f} s)")
print(f"writebehind_cpu_seconds={(utime + stime) / tck:.2f} peak_rss_mb={hwm / 1024:.0f}")
print(f"ratio_initial_load_to_load_data={rate / reference:.2f}")
PY
grep -i error "$work/writebehind.log" | head -5 || true
