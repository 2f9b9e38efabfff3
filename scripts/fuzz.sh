#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each). No panic may be found.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# Debian's librocksdb-dev, as everywhere else (README, "Build"): without it RocksDB compiles for
# twenty minutes.
export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
for target in rdb_decoder dump_payload command_stream redis_reply; do
  corpus="corpus/$target"
  mkdir -p "$corpus"
  if [ "$target" = rdb_decoder ]; then cp -n ../fixtures/rdb/*/*.rdb "$corpus"/ 2>/dev/null || true; fi
  echo "== $target for ${seconds}s"
  cargo fuzz run "$target" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
echo "no crash in any target"
