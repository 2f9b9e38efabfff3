#!/usr/bin/env bash
# RDB decode benchmark: builds a snapshot of more than 1 GB with a real redis-server, times
# redis-server loading it (its own "DB loaded from disk" figure), then times writebehind's decoder
# over the same file, and prints both with the ratio. Not a test: it measures.
#
# Usage: scripts/bench-rdb.sh [hashes]   (default 4500000 hashes of 10 fields, about 1.1 GB)
#        OUT=dir: where a bar chart of the two times goes (default bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
hashes="${1:-4500000}"
work="$(mktemp -d /var/tmp/writebehind-bench.XXXXXX)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --example rdb_decode >/dev/null

start_redis() {
  redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --dbfilename dump.rdb --save '' \
    --appendonly no --daemonize yes --logfile "$work/redis.log" "$@"
  for _ in $(seq 1 600); do
    if [ "$(redis-cli -p "$port" info persistence 2>/dev/null | tr -d '\r' | grep -c '^loading:0')" = 1 ]; then return; fi
    sleep 0.1
  done
  echo "redis-server did not become ready"; exit 1
}

echo "== writing $hashes hashes (10 fields each) plus strings and big hashes"
start_redis
python3 - "$hashes" <<'PY' | redis-cli -p "$port" --pipe >/dev/null
import sys
n = int(sys.argv[1])
out = sys.stdout.buffer
def cmd(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)
buf = []
for i in range(n):
    fields = []
    for f in range(10):
        fields += [b"field%d" % f, b"value-%d-%d-padding" % (i, f)]
    buf.append(cmd(b"HSET", b"person2:%d" % i, *fields))
    if i % 100 == 0:
        buf.append(cmd(b"SET", b"string:%d" % i, b"x" * 100))
    if i % 10000 == 0:
        big = []
        for f in range(1000):
            big += [b"f%d" % f, b"%d" % (f * 7)]
        buf.append(cmd(b"HSET", b"bighash:%d" % i, *big))
    if len(buf) >= 10000:
        out.write(b"".join(buf)); buf = []
out.write(b"".join(buf))
PY
redis-cli -p "$port" save >/dev/null
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
sleep 0.5
size=$(stat -c %s "$work/dump.rdb")
echo "rdb_bytes=$size"

echo "== redis-server loading it"
: > "$work/redis.log"
start_redis
redis_seconds=$(grep -o 'DB loaded from disk: [0-9.]* seconds' "$work/redis.log" | grep -o '[0-9.]*' | head -1)
redis_rss=$(redis-cli -p "$port" info memory | tr -d '\r' | grep '^used_memory_rss:' | cut -d: -f2)
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
echo "redis_load_seconds=$redis_seconds"
echo "redis_rss_bytes=$redis_rss"

echo "== writebehind decoder over the same file"
result=$("${CARGO_TARGET_DIR:-target}/release/examples/rdb_decode" "$work/dump.rdb")
echo "$result"
ours=$(echo "$result" | grep '^seconds=' | cut -d= -f2)
python3 -c "
ours=$ours; redis=$redis_seconds
print(f'ratio_decode_time_to_redis_load={ours/redis:.2f} (below 1: faster than redis-server loading the file)')
"
. scripts/bench-common.sh
bench_out "${OUT:-}"
printf '"redis-server loads the file" %s\n"writebehind decodes it" %s\n' "$redis_seconds" "$ours" >"$out/rdb-decode.dat"
plot_bars "$out/rdb-decode.dat" "$out/rdb-decode.png" "bench-rdb: $hashes hashes, $((size / 1000000)) MB of RDB" "seconds"
