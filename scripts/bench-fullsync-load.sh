#!/usr/bin/env bash
# A long full sync under write load: a primary holding a snapshot of about KEYS x VALUE bytes
# (1 GB by default) takes a steady stream of writes while the service attaches (capture only)
# and, once the service is measured and stopped, while a real `--replicaof` replica attaches:
# the reference. The primary keeps
# the defaults that decide whether a slow full sync survives the writes: `client-output-buffer-
# limit replica 256mb 64mb 60` (the writes queued for a replica while it loads the snapshot; past
# the limit the primary drops the replica, which must start over) and a 1 MB backlog.
# Reports, for both, whether the sync completed (the replica acknowledged the primary's offset
# as of the end of the transfer), in how many full syncs, how long it took, and the largest
# output buffer the primary held for it. Not a test: it measures.
#
# Usage: scripts/bench-fullsync-load.sh [keys] [value-bytes] [writes-per-second]
#        (default 1000000 1000 20000)
#        OUT=dir: where the output buffers over time go, as CSV and fullsync-load.png (default bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-1000000}"
size="${2:-1000}"
rate="${3:-20000}"
work="$(mktemp -d /var/tmp/writebehind-fullsync-bench.XXXXXX)"
database=""
. scripts/bench-common.sh
bench_out "${OUT:-}"
primary=$(free_port)
replica=$(free_port)
service_pid=""
load_pid=""
cleanup() {
  local status=$?
  if [ "$status" != 0 ]; then
    echo "failed ($status); the primary's log ends:"; tail -5 "$work"/primary-*.log 2>/dev/null || true
  fi
  if [ -n "$load_pid" ]; then kill "$load_pid" 2>/dev/null || true; fi
  redis-cli -p "$replica" shutdown nosave >/dev/null 2>&1 || true
  cleanup_bench
}
trap cleanup EXIT
build_release

start_primary "$primary" "$work"
for ((from = 1; from <= keys; from += 100000)); do
  to=$((from + 99999 < keys ? from + 99999 : keys))
  redis-cli -p "$primary" eval "local v = string.rep('x', tonumber(ARGV[3])) for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('HSET', 'person2:' .. i, 'first_name', v, 'age', '42') end" 0 "$from" "$to" "$size" >/dev/null
done
used=$(redis-cli -p "$primary" info memory | tr -d '\r' | sed -n 's/^used_memory://p')
echo "== snapshot: $keys hashes of ${size}-byte values, primary memory $((used / 1000000)) MB; writes: $rate HSETs/s"

steady_load "$primary" "$rate" 100000 &
load_pid=$!

full_syncs() { redis-cli -p "$primary" info stats | tr -d '\r' | sed -n 's/^sync_full://p'; }
# follow NAME PORT-PATTERN START SYNCS: polls until the replica whose INFO line matches is
# online (the primary sent it the whole snapshot), then until the offset it acknowledges reaches
# the primary's offset at that moment (it has loaded the snapshot and applied every write made
# during the transfer); prints completed (yes/no), seconds since START to each, full syncs since
# SYNCS, peak output buffer (MB).
follow() {
  local name=$1 pattern=$2 start=$3 syncs_before=$4 limit=600 peak=0 omem line target="" acked
  echo "seconds,output_buffer_mb" >"$out/fullsync-$name.csv"
  while :; do
    line=$(redis-cli -p "$primary" info replication | tr -d '\r' | grep "^slave" | grep "$pattern" || true)
    omem=$(redis-cli -p "$primary" client list type replica | { grep -o 'omem=[0-9]*' || true; } | cut -d= -f2 | sort -n | tail -1)
    [ -n "$omem" ] && [ "$omem" -gt "$peak" ] && peak=$omem
    echo "$(python3 -c "print(round($(date +%s.%N) - $start, 1))"),$(( ${omem:-0} / 1000000 ))" >>"$out/fullsync-$name.csv"
    if [ -z "$target" ] && [[ "$line" == *state=online* ]]; then
      target=$(redis-cli -p "$primary" info replication | tr -d '\r' | sed -n 's/^master_repl_offset://p')
      echo "${name}_online_seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")"
    fi
    if [ -n "$target" ]; then
      acked=$(sed -n 's/.*,offset=\([0-9]*\),.*/\1/p' <<<"$line")
      if [ -n "$acked" ] && [ "$acked" -ge "$target" ]; then
        echo "${name}_completed=yes"
        break
      fi
    fi
    if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $start > $limit else 1)"; then
      echo "${name}_completed=no (not caught up after ${limit} s)"
      break
    fi
    sleep 0.2
  done
  echo "${name}_seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")"
  echo "${name}_full_syncs=$(($(full_syncs) - syncs_before))"
  echo "${name}_peak_output_buffer_mb=$((peak / 1000000))"
}

write_config "$work/writebehind.toml" "$primary" "$work/buffer" "sqlite://$work/unused.db"
start=$(date +%s.%N); syncs=$(full_syncs)
RUST_LOG=warn "$bin" run --capture-only --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
follow writebehind "port=1," "$start" "$syncs"  # the service announces port 1 (src/replication)
grep -i "error\|closed\|limit" "$work/writebehind.log" | head -3 || true
# The reference runs alone: the service's catch-up would take CPU from it.
kill "$service_pid"; wait "$service_pid" 2>/dev/null || true; service_pid=""

mkdir -p "$work/replica"
start=$(date +%s.%N); syncs=$(full_syncs)
redis-server --port "$replica" --bind 127.0.0.1 --dir "$work/replica" --save '' --appendonly no \
  --replicaof 127.0.0.1 "$primary" --daemonize yes --logfile "$work/replica.log"
follow replica "port=$replica," "$start" "$syncs"
echo "primary_dropped_replicas=$(grep -c 'scheduled to be closed ASAP for overcoming of output buffer limits' "$work/primary-$primary.log" || true)"
if command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$out/fullsync-load.png"
set datafile separator ","
set title "bench-fullsync-load: the primary's output buffer for each replica through its full sync ($keys keys, $rate writes/s)"
set xlabel "seconds from the replica's start"
set ylabel "output buffer (MB)"
set key top left
plot "$out/fullsync-writebehind.csv" using 1:2 skip 1 with lines lw 2 title "writebehind", \\
     "$out/fullsync-replica.csv" using 1:2 skip 1 with lines lw 2 title "real replica", \\
     268.4 with lines dt 2 title "client-output-buffer-limit replica: 256mb hard"
GP
fi
