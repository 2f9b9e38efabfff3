#!/usr/bin/env bash
# Acknowledgement latency benchmark: a redis-server, a scratch MariaDB database and
# `writebehind run`; `=` writes at a fixed rate, each waiting for its ack with XREAD BLOCK as a
# recipe client does; p50/p99 next to a synchronous write-through reference (HSET + an
# autocommitted upsert into the same database) at the same rate, with the ratio.
# Not a test: it measures.
#
# Usage: scripts/bench-ack.sh [writes-per-second] [seconds]   (default 1000 for 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-1000}"
seconds="${2:-10}"
work="$(mktemp -d /var/tmp/writebehind-ack-bench.XXXXXX)"
database="wb_ack_bench_$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
service_pid=""
cleanup() {
  if [ -n "$service_pid" ]; then kill "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; fi || true
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  mariadb --protocol=tcp -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $database" || true
  rm -rf "$work"
}
trap cleanup EXIT
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
cargo build --release --bin writebehind --example ack_latency >/dev/null 2>&1
target="${CARGO_TARGET_DIR:-target}/release"

redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
  --maxclients 2000 --daemonize yes --logfile "$work/redis.log"
mariadb --protocol=tcp -h127.0.0.1 -uroot -e "CREATE DATABASE $database;
  CREATE TABLE $database.persons (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), age INT);
  CREATE TABLE $database.through_persons (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), age INT);"
cat > "$work/writebehind.toml" <<TOML
[source]
url = "redis://127.0.0.1:$port"
[buffer]
path = "$work/buffer"
[backends.db]
url = "mysql://root@127.0.0.1:3306/$database"
[[mappings]]
name = "Persons"
prefix = "person"
backend = "db"
table = "persons"
key_column = "person_id"
[mappings.columns]
first_name = "first"
age = "age"
TOML
"$target/writebehind" run --config "$work/writebehind.toml" 2>"$work/service.log" &
service_pid=$!
for _ in $(seq 1 100); do
  [ "$(redis-cli -p "$port" FCALL writebehind_version 0 2>/dev/null)" = "1" ] && break
  sleep 0.1
done
"$target/examples/ack_latency" "redis://127.0.0.1:$port" "mysql://root@127.0.0.1:3306/$database" "$rate" "$seconds"
echo "rows written by the service: $(mariadb --protocol=tcp -h127.0.0.1 -uroot -N -e "SELECT COUNT(*) FROM $database.persons")"
