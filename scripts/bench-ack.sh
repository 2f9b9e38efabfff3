#!/usr/bin/env bash
# Acknowledgement latency benchmark: a redis-server, a scratch MariaDB database and
# `writebehind run`; `=` writes at a fixed rate, each waiting for its ack with XREAD BLOCK as a
# recipe client does; p50/p99 next to a synchronous write-through reference (HSET + an
# autocommitted upsert into the same database) at the same rate, with the ratio; and the floor
# of any design that applies only what its buffer has synced: the write-through with a synced
# RocksDB write between the HSET and the upsert. Not a test: it measures.
#
# Usage: scripts/bench-ack.sh [writes-per-second] [seconds]   (default 1000 for 10 s)
#        OUT=dir: where ack-latency.csv and ack-latency.png go (default bench-out): the three
#        latency distributions, by percentile.
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-1000}"
seconds="${2:-10}"
work="$(mktemp -d /var/tmp/writebehind-ack-bench.XXXXXX)"
database="wb_ack_bench_$$"
. scripts/bench-common.sh
bench_out "${OUT:-}"
port=$(free_port); admin=$(free_port)
service_pid=""
cleanup() {
  if [ -n "$service_pid" ]; then kill "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; fi || true
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  mariadb --protocol=tcp -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $database" || true
  [ -n "${KEEP_WORK:-}" ] && cp "$work/service.log" /tmp/bench-service.log; rm -rf "$work"
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
[admin]
listen = "127.0.0.1:$admin"
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
"${BIN:-$target/writebehind}" run --config "$work/writebehind.toml" 2>"$work/service.log" &  # BIN: another build
service_pid=$!
# Measure from the moment the service is ready (the first full sync waits for the primary's
# repl-diskless-sync-delay, 5 s by default).
ready() { python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$admin/ready').status == 200 else 1)" 2>/dev/null; }
for _ in $(seq 1 300); do ready && break; sleep 0.1; done
ready || { echo "the service did not become ready"; cat "$work/service.log"; exit 1; }
# FLOOR_DIR: a third client, two syncs in series (examples/ack_latency.rs): the least any
# acknowledgement that waits for the buffer's sync and then the database's commit can take.
FLOOR_DIR="$work/floor" LATENCY_CSV="$out/ack-latency.csv" "$target/examples/ack_latency" "redis://127.0.0.1:$port" "mysql://root@127.0.0.1:3306/$database" "$rate" "$seconds"
sink_batch_summary "$admin"
if command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$out/ack-latency.png"
set datafile separator ","
set title "bench-ack: latency at $rate writes/s for $seconds s, by percentile"
set xlabel "percentile"
set ylabel "ms (log scale)"
set logscale y
set key top left
set grid
plot "$out/ack-latency.csv" using (\$1/10):2 skip 1 with lines lw 2 title "ack (HSET # =uuid until XREAD sees the ack)", \
     "" using (\$1/10):3 skip 1 with lines lw 2 title "synchronous write-through (HSET, then INSERT)", \
     "" using (\$1/10):4 skip 1 with lines lw 2 dt 2 title "floor: HSET, a synced RocksDB write, then INSERT"
GP
fi
echo "rows written by the service: $(mariadb --protocol=tcp -h127.0.0.1 -uroot -N -e "SELECT COUNT(*) FROM $database.persons")"
