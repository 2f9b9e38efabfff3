# Shared by the bench scripts (sourced, not run): free ports, the release build, a scratch
# primary, the People mapping, a scratch MariaDB database.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Builds the release binary (system RocksDB) and sets `bin` to it.
build_release() {
  export ROCKSDB_LIB_DIR="${ROCKSDB_LIB_DIR:-/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)}"
  cargo build --release --bin writebehind >/dev/null 2>&1
  bin="${BIN:-${CARGO_TARGET_DIR:-target}/release/writebehind}"  # BIN: another build to compare
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

# sample_positions ADMIN_PORT SERVICE_PID CSV: every 0.2 s until killed, the positions from the
# admin endpoint's metrics and the service's RSS, one CSV line each (time in seconds from the
# first sample). Run it in the background.
sample_positions() {
  local admin=$1 pid=$2 csv=$3 started
  started=$(date +%s.%N)
  echo "seconds,primary,received,buffered,applied,acked,lag_bytes,rss_mb" >"$csv"
  while kill -0 "$pid" 2>/dev/null; do
    curl -sf "http://127.0.0.1:$admin/metrics" | awk -v t="$(date +%s.%N)" -v s="$started" \
      -v rss="$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null)" '
      $1 == "writebehind_primary_offset_bytes" { p = $2 }
      $1 == "writebehind_position_received_bytes" { r = $2 }
      $1 == "writebehind_position_buffered_bytes" { b = $2 }
      $1 ~ /^writebehind_position_applied_bytes/ { a = $2 }
      $1 == "writebehind_position_acked_bytes" { k = $2 }
      $1 == "writebehind_lag_bytes" { l = $2 }
      END { printf "%.2f,%s,%s,%s,%s,%s,%s,%.1f\n", t - s, p, r, b, a, k, l, rss / 1024 }' >>"$csv" || true
    sleep 0.2
  done
}

# plot_positions CSV PNG TITLE: positions (MB of stream) and RSS over time, with gnuplot when
# it is installed (apt-get install gnuplot-nox).
plot_positions() {
  command -v gnuplot >/dev/null || { echo "(gnuplot not installed: no plot)"; return 0; }
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$2"
set datafile separator ","
set key top left
set xlabel "seconds"
set ylabel "stream position (MB)"
set y2label "RSS (MB)"
set y2tics
set title "$3"
plot "$1" using 1:(\$2/1e6) skip 1 with lines lw 2 title "primary", \
     "" using 1:(\$3/1e6) skip 1 with lines title "received", \
     "" using 1:(\$4/1e6) skip 1 with lines title "buffered", \
     "" using 1:(\$5/1e6) skip 1 with lines lw 2 title "applied", \
     "" using 1:(\$6/1e6) skip 1 with lines title "acked", \
     "" using 1:8 skip 1 axes x1y2 with lines dt 2 title "RSS (right)"
GP
}

# steady_load PORT RATE SECONDS: RATE pipelined HSETs over 100,000 person2 keys in one burst at
# the start of every second, for SECONDS (run it in the background).
steady_load() {
  local port=$1 rate=$2 end=$(($(date +%s) + $3)) next
  while [ "$(date +%s)" -lt "$end" ]; do
    next=$(($(date +%s) + 1))
    redis-benchmark -p "$port" -q -n "$rate" -P 16 -r 100000 \
      HSET person2:__rand_int__ first_name John last_name Doe age __rand_int__ >/dev/null
    while [ "$(date +%s)" -lt "$next" ]; do sleep 0.05; done
  done
}
