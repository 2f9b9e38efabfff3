#!/usr/bin/env bash
# The README's quick start in one command, on a Debian or Ubuntu machine with a Rust toolchain:
# installs what is missing (libclang and Debian's RocksDB for the build, redis-server when no
# Redis answers on 127.0.0.1:6379, sqlite3 to show the rows), builds the release binary, writes
# the example configuration (SQLite, the recipe's two mappings) into ./quickstart/, checks it,
# runs the service, writes two hashes to Redis and prints the rows they became. The service and
# a Redis it started stop at the end; ./quickstart/ keeps the configuration, the buffer and the
# database for a second look.
#
# Usage: bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
redis_answers() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
dpkg -s librocksdb-dev >/dev/null 2>&1 || missing+=(librocksdb-dev)
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
if ! redis_answers 2>/dev/null && ! command -v redis-server >/dev/null 2>&1; then
  missing+=(redis-server)
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work="$PWD/quickstart"
mkdir -p "$work"
redis_pid=""
service_pid=""
cleanup() {
  if [ -n "$service_pid" ]; then kill "$service_pid" 2>/dev/null || true; wait "$service_pid" 2>/dev/null || true; fi
  if [ -n "$redis_pid" ]; then redis-cli -p 6379 shutdown nosave >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if ! redis_answers; then
  say "no Redis answers on 127.0.0.1:6379: starting one for the quick start (stopped at the end)"
  redis-server --port 6379 --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
    --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
  redis_pid=started
  for _ in $(seq 1 100); do redis_answers && break; sleep 0.1; done
  redis_answers || { echo "error: the Redis started for the quick start does not answer; see $work/redis.log"; exit 1; }
fi

say "building (release)"
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
cargo build --release --locked --bin writebehind 2>&1 | tail -1
bin="${CARGO_TARGET_DIR:-target}/release/writebehind"

cat >"$work/writebehind.toml" <<EOF
[source]
url = "redis://127.0.0.1:6379"

[buffer]
path = "$work/writebehind-data"

[backends.db]
url = "sqlite://$work/writebehind.db"

[[mappings]]
name = "PersonWriteBehind"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
create_table = true
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"

[[mappings]]
name = "CarsWriteBehind"
prefix = "car"
backend = "db"
table = "car"
key_column = "id"
create_table = true
[mappings.columns]
id = "id"
color = "color"
EOF

say "writebehind check --config quickstart/writebehind.toml"
"$bin" check --config "$work/writebehind.toml"

say "writebehind run --config quickstart/writebehind.toml (log: quickstart/writebehind.log)"
"$bin" run --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!

say "redis-cli hset person2:1 first_name Ann last_name Lee age 30; redis-cli hset car:1 color red"
redis-cli -p 6379 hset person2:1 first_name Ann last_name Lee age 30
redis-cli -p 6379 hset car:1 color red

rows() { sqlite3 "$work/writebehind.db" 'select * from person1; select * from car' 2>/dev/null || true; }
for _ in $(seq 1 600); do
  [ "$(rows | wc -l)" -ge 2 ] && break
  kill -0 "$service_pid" 2>/dev/null || { echo "error: the service stopped; its log:"; cat "$work/writebehind.log"; exit 1; }
  sleep 0.1
done
say "sqlite3 quickstart/writebehind.db 'select * from person1; select * from car'"
rows
[ "$(rows | wc -l)" -ge 2 ] || { echo "error: the rows did not appear within 60 s; the service's log:"; cat "$work/writebehind.log"; exit 1; }
say "done: the service stops now; quickstart/ keeps the configuration, buffer and database"
