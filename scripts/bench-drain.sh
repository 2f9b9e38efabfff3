#!/usr/bin/env bash
# Sink-alone benchmark: a primary holding N hashes is captured with `--capture-only` (the change
# log then holds N changes and the marker written after the snapshot), the service is stopped,
# and started again without it: the time until the marker row is in a scratch MariaDB table is
# the sink draining the log with nothing else running (no capture). The reference, in the same
# run: LOAD DATA LOCAL INFILE of the same N rows into a table of the same shape.
# Not a test: it measures.
#
# Usage: scripts/bench-drain.sh [keys]   (default 500000)
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-500000}"
work="$(mktemp -d /var/tmp/writebehind-drain-bench.XXXXXX)"
database="wb_bench_drain_$$"
. scripts/bench-common.sh
primary=$(free_port); admin=$(free_port)
service_pid=""
trap cleanup_bench EXIT
build_release
load_bench_setup "$keys" 1
RUST_LOG=warn "$bin" run --capture-only --config "$work/writebehind.toml" 2>"$work/capture.log" &
service_pid=$!
poll_service "$work/capture.log" replica_online "$primary"
redis-cli -p "$primary" hset person2:marker first_name marker >/dev/null
target=$(redis-cli -p "$primary" info replication | awk -F: '/^master_repl_offset/ {print $2 + 0}')
# Captured once the service acknowledges the primary's offset (it acknowledges what is synced).
acknowledged() { redis-cli -p "$primary" info replication | grep -q "^slave0:.*offset=$target,"; }
poll_service "$work/capture.log" acknowledged
kill -TERM "$service_pid"
wait "$service_pid" || true
start=$(date +%s.%N)
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
poll_service "$work/writebehind.log" has_row marker
done_at=$(date +%s.%N)
sink_batch_summary "$admin"
read -r utime stime < <(awk '{print $14, $15}' "/proc/$service_pid/stat")
python3 - "$keys" "$load_start" "$load_end" "$start" "$done_at" "$utime" "$stime" "$(getconf CLK_TCK)" <<'PY'
import sys
keys = int(sys.argv[1])
load_start, load_end, start, done = map(float, sys.argv[2:6])
utime, stime, tck = map(float, sys.argv[6:9])
reference = keys / (load_end - load_start)
rate = keys / (done - start)
print(f"load_data_rows_per_second={reference:.0f}")
print(f"drain_rows_per_second={rate:.0f} (start of the sink-only service to the marker row, {done - start:.1f} s)")
print(f"writebehind_cpu_seconds={(utime + stime) / tck:.2f}")
print(f"ratio_drain_to_load_data={rate / reference:.2f}")
PY
