#!/usr/bin/env bash
# Large-hash benchmark (issue 13 goal 6): one watched hash of FIELDS fields (default 1,000,000)
# created before the service starts (it arrives in the snapshot), then RATE HSETs a second
# (default 1,000) on it for SECONDS (default 30), each setting the mapped `first_name` and one
# random unmapped field, so each is a row change. Reports how much of the primary's stream the
# service durably captured during the writes (the offset it acknowledges, `REPLCONF ACK`,
# against the primary's offset: 1.0 keeps up), the lag when the writes end and the seconds to
# catch up after them, the RSS peak and the service's CPU seconds. Not a test: it measures.
#
# Usage: scripts/bench-bighash.sh [fields] [rate] [seconds]
#        OUT=dir: where bighash-positions.csv and bighash-positions.png go (default bench-out).
#        BIN=path: another build of writebehind to measure.
set -euo pipefail
cd "$(dirname "$0")/.."
fields="${1:-1000000}"
rate="${2:-1000}"
seconds="${3:-30}"
. scripts/bench-common.sh
bench_start bighash

# The hash, in commands of 1,000 fields.
python3 - "$fields" >"$work/create.resp" <<'PY'
import sys
out = sys.stdout.buffer
total, per = int(sys.argv[1]), 1000
key = b"person2:big"
for start in range(0, total, per):
    n = min(per, total - start)
    out.write(b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 + 2 * n, len(key), key))
    for i in range(start, start + n):
        f = b"f%d" % i
        out.write(b"$%d\r\n%s\r\n$8\r\nvalue%03d\r\n" % (len(f), f, i % 1000))
PY
redis-cli -p "$primary" --pipe <"$work/create.resp" >/dev/null
redis-cli -p "$primary" hset person2:big first_name John >/dev/null
echo "hash_fields=$(redis-cli -p "$primary" hlen person2:big)"

write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database"
admin=$(free_port)
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
started=$(date +%s.%N)
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
sample_positions "$admin" "$service_pid" "$out/bighash-positions.csv" "$primary" &
sampler=$!

master_offset() { redis-cli -p "$primary" info replication | tr -d '\r' | sed -n 's/^master_repl_offset://p'; }
# The offset the service acknowledged as durably captured (0 before it is a replica).
acked_offset() {
  redis-cli -p "$primary" info replication | tr -d '\r' | sed -n 's/^slave0:.*offset=\([0-9]*\).*/\1/p' | grep . || echo 0
}
cpu_seconds() { awk '{ printf "%.1f", ($14 + $15) / 100 }' "/proc/$service_pid/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$service_pid/status"; }
peak=0
track_rss() { local rss; rss=$(rss_kb); if [ "$rss" -gt "$peak" ]; then peak=$rss; fi; }
# until_acked TARGET LIMIT_SECONDS: polls until the service acknowledged TARGET; prints the
# seconds taken, or "never" after LIMIT_SECONDS.
until_acked() {
  local target=$1 limit=$2 from
  from=$(date +%s.%N)
  while [ "$(acked_offset)" -lt "$target" ]; do
    kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped" >&2; exit 1; }
    track_rss
    if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $from > $limit else 1)"; then
      echo never; return
    fi
    sleep 0.1
  done
  python3 -c "print(round($(date +%s.%N) - $from, 1))"
}

# From the start until the snapshot is loaded and the stream since acknowledged (the primary
# has no offset before a replica attaches).
until curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && [ "$(acked_offset)" -gt 0 ]; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; exit 1; }
  track_rss
  sleep 0.1
done
until_acked "$(master_offset)" 600 >/dev/null
echo "snapshot_seconds=$(python3 -c "print(round($(date +%s.%N) - $started, 1))")"
echo "rss_after_snapshot_mb=$(($(rss_kb) / 1024))"
cpu_before=$(cpu_seconds)
peak_writes=0
primary_start=$(master_offset); acked_start=$(acked_offset)
end=$(($(date +%s) + seconds))
while [ "$(date +%s)" -lt "$end" ]; do
  next=$(($(date +%s) + 1))
  redis-benchmark -p "$primary" -q -n "$rate" -P 10 -r "$fields" \
    HSET person2:big first_name __rand_int__ f__rand_int__ __rand_int__ >/dev/null
  track_rss
  rss=$(rss_kb); if [ "$rss" -gt "$peak_writes" ]; then peak_writes=$rss; fi
  while [ "$(date +%s)" -lt "$next" ]; do sleep 0.05; done
done
primary_end=$(master_offset); acked_end=$(acked_offset)
echo "writes=$((rate * seconds)) rate=$rate seconds=$seconds"
echo "lag_at_end_bytes=$((primary_end - acked_end))"
python3 -c "print(f'ratio_captured_to_primary={($acked_end - $acked_start) / max($primary_end - $primary_start, 1):.2f}')"
echo "catch_up_seconds=$(until_acked "$primary_end" 600)"
echo "cpu_seconds_for_the_writes=$(python3 -c "print(round($(cpu_seconds) - $cpu_before, 1))")"
echo "peak_rss_mb=$((peak / 1024))"
echo "peak_rss_during_writes_mb=$((peak_writes / 1024))"
sleep 0.3
kill "$sampler" 2>/dev/null || true
plot_positions "$out/bighash-positions.csv" "$out/bighash-positions.png" "bench-bighash: a hash of $fields fields, $rate HSETs/s on it for $seconds s"
grep -i error "$work/writebehind.log" | head -5 || true
