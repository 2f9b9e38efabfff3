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
sql "CREATE DATABASE $database"

python3 - "$keys" >"$work/rows.tsv" <<'PY'
import sys
out = sys.stdout
for i in range(1, int(sys.argv[1]) + 1):
    out.write(f"{i}\tJohn\tDoe\t42\n")
PY
sql "CREATE TABLE $database.reference (id VARCHAR(255) NOT NULL PRIMARY KEY, first TEXT, last TEXT, age TEXT) ENGINE=InnoDB"
load_start=$(date +%s.%N)
mariadb --protocol=tcp -h127.0.0.1 -uroot --local-infile=1 -e \
  "LOAD DATA LOCAL INFILE '$work/rows.tsv' INTO TABLE $database.reference (id, first, last, age)"
load_end=$(date +%s.%N)

start_primary "$primary" "$work" --repl-diskless-sync-delay 0
for ((from = 1; from <= keys; from += 100000)); do
  to=$((from + 99999 < keys ? from + 99999 : keys))
  redis-cli -p "$primary" eval "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('HSET', 'person2:' .. i, 'first_name', 'John', 'last_name', 'Doe', 'age', '42') end" 0 "$from" "$to" >/dev/null
done
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database" 1
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --capture-only --config "$work/writebehind.toml" 2>"$work/capture.log" &
service_pid=$!
until redis-cli -p "$primary" info replication | grep -q '^slave0:.*state=online'; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/capture.log"; exit 1; }
  sleep 0.05
done
redis-cli -p "$primary" hset person2:marker first_name marker >/dev/null
target=$(redis-cli -p "$primary" info replication | awk -F: '/^master_repl_offset/ {print $2 + 0}')
# Captured once the service acknowledges the primary's offset (it acknowledges what is synced).
until redis-cli -p "$primary" info replication | grep -q "^slave0:.*offset=$target,"; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/capture.log"; exit 1; }
  sleep 0.05
done
kill -TERM "$service_pid"
wait "$service_pid" || true
start=$(date +%s.%N)
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
has_row() { [ "$(sql "SELECT COUNT(*) FROM $database.person1 WHERE id = '$1'" 2>/dev/null || echo 0)" = 1 ]; }
until has_row marker; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  sleep 0.05
done
done_at=$(date +%s.%N)
# The sink's batches, their mean size and the mean time of a batch's transaction.
curl -s "http://127.0.0.1:$admin/metrics" | awk '/^writebehind_sink_batches_total/ {b += $2} /^writebehind_sink_batch_rows_sum/ {r += $2} /^writebehind_sink_commit_seconds_sum/ {s += $2} END {if (b > 0) printf "sink_batches=%d mean_rows_per_batch=%.0f mean_commit_ms=%.1f\n", b, r / b, 1000 * s / b}'
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
