#!/usr/bin/env bash
# Sink benchmark against the local PostgreSQL (a scratch database it creates and drops): upserts
# by the PostgreSQL sink at batch sizes 100, 1,000 and 5,000 rows, next to COPY of the same rows
# into the same table, with the ratios. Not a test: it measures.
# OUT=dir: where the output and a bar chart of the ratios go (default bench-out).
#
# Usage: scripts/bench-sink-postgres.sh [rows] [postgres-url-of-server]
#        (default 200000, postgres://postgres@127.0.0.1:5432)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-200000}"
server="${2:-postgres://postgres@127.0.0.1:5432}"
database="wb_bench_$$"
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
psql "$server/postgres" -qc "CREATE DATABASE $database"
trap 'psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)"' EXIT
cargo build --release --example sink_bench_postgres >/dev/null 2>&1
. scripts/bench-common.sh
bench_out "${OUT:-}"
"${CARGO_TARGET_DIR:-target}/release/examples/sink_bench_postgres" "$server/$database" "$rows" | tee "$out/sink-postgres-ratios.txt"
# The ratios as bars: each `<what>_ratio_to_<reference>=R` line is one bar.
sed -n 's/^\(.*\)_ratio_to_[a-z_]*=\(.*\)$/"\1" \2/p' "$out/sink-postgres-ratios.txt" | tr '_' ' ' >"$out/sink-postgres-ratios.dat"
plot_bars "$out/sink-postgres-ratios.dat" "$out/sink-postgres-ratios.png" "bench-sink-postgres.sh: $rows rows, rate as a ratio to one COPY of the same rows" "ratio"
