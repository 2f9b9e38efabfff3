#!/usr/bin/env bash
# Sink benchmark against the local MariaDB (a scratch database it creates and drops): upserts by
# the MySQL sink at batch sizes 100, 1,000 and 5,000 rows, next to LOAD DATA LOCAL INFILE of the
# same rows into the same table, with the ratios. Not a test: it measures.
# OUT=dir: where the output and a bar chart of the ratios go (default bench-out).
# ROUNDS=n: goal 4's figures (LOAD DATA, LOAD DATA in 1,000-row transactions, the sink at 1,000
# rows per batch in 1 and 2 partitions) taken in turn n times, then each ratio's median: steadier
# on a machine whose speed moves from minute to minute (rows is then the rows of each round).
#
# Usage: scripts/bench-sink.sh [rows] [mysql-url-of-server]   (default 200000, root@127.0.0.1:3306)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-200000}"
server="${2:-mysql://root@127.0.0.1:3306}"
database="wb_bench_$$"
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
mariadb --protocol=tcp -h127.0.0.1 -uroot -e "CREATE DATABASE $database"
trap 'mariadb --protocol=tcp -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $database"' EXIT
cargo build --release --example sink_bench >/dev/null 2>&1
. scripts/bench-common.sh
bench_out "${OUT:-}"
"${CARGO_TARGET_DIR:-target}/release/examples/sink_bench" "$server/$database" "$rows" | tee "$out/sink-ratios.txt"
# The ratios as bars: each `<what>_ratio_to_<reference>=R` line is one bar.
sed -n 's/^\([a-z0-9_]*\)_ratio_to_[a-z_]*=\([0-9.]*\).*$/"\1" \2/p' "$out/sink-ratios.txt" | tr '_' ' ' >"$out/sink-ratios.dat"
plot_bars "$out/sink-ratios.dat" "$out/sink-ratios.png" "bench-sink.sh: $rows rows, rate as a ratio to one LOAD DATA of the same rows" "ratio"
