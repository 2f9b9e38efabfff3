#!/usr/bin/env bash
# Database outage under load: the service writes into its own MariaDB server (started here in a
# temporary directory) while a scratch primary receives RATE HSETs per second over 100,000 keys;
# the database is stopped from second FROM for DOWN seconds, then started again. Every 5 s the
# service's RSS, the buffer's size on disk and the positions go to outage.csv; the summary gives
# the RSS before, during and after the outage, the buffer's growth, and how long the sink took to
# catch up. With gnuplot, outage.png is drawn too. Not a test: it measures.
#
# Usage: scripts/soak-outage.sh [seconds] [writes_per_second] [from] [down] [output-dir]
#        (default 900 10000 120 600 ./soak-out)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-900}"
rate="${2:-10000}"
from="${3:-120}"
down="${4:-600}"
out="$(realpath -m "${5:-soak-out}")"
mkdir -p "$out"
work="$(mktemp -d /var/tmp/writebehind-outage.XXXXXX)"
database=""
. scripts/bench-common.sh
primary=$(free_port)
admin=$(free_port)
dbport=$(free_port)
service_pid=""
load_pid=""
db_pid=""
start_db() {
  mariadbd --no-defaults --user=root --bind-address=127.0.0.1 --skip-name-resolve --port="$dbport" \
    --datadir="$work/db" --tmpdir="$work/dbtmp" --socket="$work/db.sock" --pid-file="$work/db.pid" \
    --log-error="$work/db.log" >/dev/null 2>&1 &
  db_pid=$!
  until mariadb-admin --protocol=tcp -h127.0.0.1 -P"$dbport" -uroot ping >/dev/null 2>&1; do sleep 0.1; done
}
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$db_pid" ] && kill -9 "$db_pid" 2>/dev/null || true
  cleanup_bench
}
trap cleanup EXIT
build_release
# A tmpdir of its own: a starting mariadbd deletes the `#sql*` files of its tmpdir, which in a
# shared /tmp are another server's temporary tables in use (MariaDB 10.11 crashed on that).
mkdir -p "$work/dbtmp"
mariadb-install-db --no-defaults --user=root --auth-root-authentication-method=normal \
  --skip-test-db --datadir="$work/db" --tmpdir="$work/dbtmp" >/dev/null 2>&1
start_db
mariadb --protocol=tcp -h127.0.0.1 -P"$dbport" -uroot -e "CREATE DATABASE soak"
start_primary "$primary" "$work" --repl-backlog-size 256mb
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:$dbport/soak"
printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
RUST_LOG=warn "$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!
until curl -sf "http://127.0.0.1:$admin/metrics" >/dev/null; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  sleep 0.1
done
steady_load "$primary" "$rate" "$seconds" &
load_pid=$!
metric() { awk -v name="$1" '$1 == name {print $2; exit}' "$work/metrics"; }
echo "elapsed_s,rss_mb,buffer_mb,primary_offset,buffered,applied,lag_bytes,db_up" >"$out/outage.csv"
started=$(date +%s)
state=up
while kill -0 "$load_pid" 2>/dev/null || [ "$(metric writebehind_lag_bytes)" != 0 ]; do
  kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$work/writebehind.log"; exit 1; }
  t=$(($(date +%s) - started))
  if [ "$state" = up ] && [ "$t" -ge "$from" ] && [ "$t" -lt $((from + down)) ]; then
    kill -9 "$db_pid"; wait "$db_pid" 2>/dev/null || true; state=down
  elif [ "$state" = down ] && [ "$t" -ge $((from + down)) ]; then
    start_db; state=up
  fi
  curl -sf "http://127.0.0.1:$admin/metrics" >"$work/metrics" || true
  applied=$(awk '$1 ~ /^writebehind_position_applied_bytes/ {print $2; exit}' "$work/metrics")
  awk -v t="$t" -v rss="$(awk '/^VmRSS/ {print $2}' "/proc/$service_pid/status")" \
    -v buf="$(metric writebehind_buffer_size_bytes)" -v p="$(metric writebehind_primary_offset_bytes)" \
    -v b="$(metric writebehind_position_buffered_bytes)" -v a="${applied:-0}" \
    -v lag="$(metric writebehind_lag_bytes)" -v up="$([ "$state" = up ] && echo 1 || echo 0)" \
    'BEGIN { printf "%d,%.1f,%.1f,%s,%s,%s,%s,%s\n", t, rss / 1024, buf / 1048576, p, b, a, lag, up }' >>"$out/outage.csv"
  [ "$t" -gt $((seconds + 1800)) ] && { echo "no catch-up within 30 minutes after the load"; break; }
  sleep 5
done
cp "$work/writebehind.log" "$out/outage-writebehind.log"
python3 - "$out/outage.csv" "$from" "$down" "$seconds" "$rate" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
start, down, seconds, rate = map(int, sys.argv[2:])
def avg(rs, k):
    return sum(float(r[k]) for r in rs) / max(1, len(rs))
before = [r for r in rows if 60 <= int(r["elapsed_s"]) < start]
during = [r for r in rows if r["db_up"] == "0"]
after = [r for r in rows if int(r["elapsed_s"]) >= start + down]
caught = next((int(r["elapsed_s"]) for r in after if r["lag_bytes"] == "0"), None)
print(f"writes_per_second={rate} seconds={seconds} outage_from={start} outage_seconds={down}")
print(f"rss_mb before={avg(before, 'rss_mb'):.0f} during={avg(during, 'rss_mb'):.0f} after={avg(after, 'rss_mb'):.0f} peak={max(float(r['rss_mb']) for r in rows):.0f}")
print(f"buffer_mb at_outage_start={during[0]['buffer_mb'] if during else '?'} at_outage_end={during[-1]['buffer_mb'] if during else '?'} end={rows[-1]['buffer_mb']}")
print(f"caught_up_seconds_after_restart={caught - (start + down) if caught is not None else 'not within the run'}")
PY
if command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$out/outage.png"
set datafile separator ","
set key top left
set xlabel "seconds"
set ylabel "MB"
set y2label "lag (MB of stream)"
set y2tics
set title "writebehind, $rate HSET/s, database down from ${from} s for ${down} s"
plot "$out/outage.csv" using 1:2 skip 1 with lines lw 2 title "RSS", \
     "" using 1:3 skip 1 with lines title "buffer on disk", \
     "" using 1:(\$7/1e6) skip 1 axes x1y2 with lines dt 2 title "lag (right)"
GP
fi
