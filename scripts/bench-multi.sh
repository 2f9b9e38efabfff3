#!/usr/bin/env bash
# Memory benchmark: one transaction of N commands end to end (capture and the MariaDB sink),
# against the same N commands outside a transaction. First N `HSET`s on N new keys are piped
# to the primary one by one (the reference), then N more arrive as one script, whose effects a
# primary replicates as one `MULTI ... EXEC` (Redis 7). For each, the service's RSS is sampled
# every 0.1 s until the table holds the rows: reports the peak RSS above the level before, the
# memory by part at that peak, the seconds to the last row, and the ratio of the two peaks.
# Not a test: it measures.
#
# Usage: scripts/bench-multi.sh [commands]   (default 1000000)
#        OUT=dir: where multi-progress.csv and multi-progress.png go (default bench-out): changes
#        captured, rows written and RSS every 0.2 s through both phases.
set -euo pipefail
cd "$(dirname "$0")/.."
commands="${1:-1000000}"
. scripts/bench-common.sh
bench_start multi
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database"
admin=$(free_port)
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
sample_positions "$admin" "$service_pid" "$out/multi-progress.csv" "$primary" &
sampler=$!
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$service_pid/status"; }
rows() { sql "SELECT COUNT(*) FROM $database.person1" 2>/dev/null || echo 0; }
memory_parts() {
  curl -sf "http://127.0.0.1:$admin/metrics" | awk -F'[{}" ]+' '
    $1 == "writebehind_memory_bytes" { printf "%s=%.0f ", $3, $4 / 1e6 }' || true
}
until curl -sf "http://127.0.0.1:$admin/ready" >/dev/null; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  sleep 0.2
done

# measure NAME EXPECTED_ROWS: samples the RSS from now until the table holds EXPECTED_ROWS.
measure() {
  local name=$1 expected=$2 before peak rss at_peak="" start
  before=$(rss_kb); peak=$before; start=$(date +%s.%N)
  while [ "$(rows)" -lt "$expected" ]; do
    kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
    rss=$(rss_kb)
    if [ "$rss" -gt "$peak" ]; then peak=$rss; at_peak=$(memory_parts); fi
    sleep 0.1
  done
  echo "${name}_seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")"
  echo "${name}_rss_before_mb=$((before / 1024)) ${name}_peak_rss_mb=$((peak / 1024)) ${name}_growth_mb=$(((peak - before) / 1024))"
  echo "${name}_memory_at_peak_mb: $at_peak"
  eval "${name}_growth_kb=$((peak - before))"
}

python3 - "$commands" >"$work/hsets.resp" <<'PY'
import sys
out = sys.stdout.buffer
for i in range(1, int(sys.argv[1]) + 1):
    key = b"person2:%d" % i
    out.write(b"*4\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$10\r\nfirst_name\r\n$4\r\nJohn\r\n" % (len(key), key))
PY
redis-cli -p "$primary" --pipe <"$work/hsets.resp" >/dev/null &
writer=$!
measure separate "$commands"
wait "$writer"

redis-cli -p "$primary" eval "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('HSET', 'person2:' .. i, 'first_name', 'John') end" 0 "$((commands + 1))" "$((2 * commands))" >/dev/null &
writer=$!
measure transaction "$((2 * commands))"
wait "$writer"
sleep 0.3
kill "$sampler" 2>/dev/null || true
plot_progress "$out/multi-progress.csv" "$out/multi-progress.png" "bench-multi: $commands HSETs one by one, then $commands in one script (one MULTI)"
echo "commands=$commands"
python3 -c "print(f'ratio_transaction_to_separate_growth={max($transaction_growth_kb, 1) / max($separate_growth_kb, 1):.1f}')"
grep -i error "$work/writebehind.log" | head -5 || true
