# Shared by the bench scripts (sourced, not run): free ports, the release build, a scratch
# primary, the People mapping, a scratch MariaDB database.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Builds the release binary (system RocksDB) and sets `bin` to it.
build_release() {
  export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
  cargo build --release --bin writebehind >/dev/null 2>&1
  bin="${CARGO_TARGET_DIR:-target}/release/writebehind"
}

# start_primary PORT DIR [redis-server options...]: a primary keeping nothing on disk, up once
# it answers PING.
start_primary() {
  local port=$1 dir=$2
  shift 2
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
    --daemonize yes --logfile "$dir/primary-$port.log" "$@"
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.05; done
}

# sql STATEMENT: runs it on the local MariaDB as root, without column names.
sql() { mariadb --protocol=tcp -h127.0.0.1 -uroot -N -e "$1"; }

# write_config FILE PRIMARY_PORT BUFFER BACKEND_URL [PARTITIONS]: the People mapping of the
# benchmarks (person2:<id> hashes, first_name, last_name and age to table person1).
write_config() {
  cat > "$1" <<TOML
[source]
url = "redis://127.0.0.1:$2"
[buffer]
path = "$3"
[backends.db]
url = "$4"
partitions = ${5:-1}
[[mappings]]
name = "People"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
create_table = true
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
TOML
}

# The EXIT trap of a script with a service (`service_pid`), a primary (`primary`), a scratch
# database (`database`, may be empty) and a work directory (`work`).
cleanup_bench() {
  if [ -n "${service_pid:-}" ]; then kill -9 "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; fi || true
  redis-cli -p "$primary" shutdown nosave >/dev/null 2>&1 || true
  if [ -n "${database:-}" ]; then sql "DROP DATABASE IF EXISTS $database" || true; fi
  rm -rf "$work"
}
