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

# The EXIT trap of a script whose service logs to "$work/writebehind.log": on a failure, the
# end of that log, then `cleanup_bench`. Set with `trap cleanup_bench_showing_log EXIT`.
cleanup_bench_showing_log() {
  local status=$?
  if [ "$status" != 0 ] && [ -f "$work/writebehind.log" ]; then
    echo "failed ($status); the service's log ends:"; tail -5 "$work/writebehind.log" | cut -c1-400
  fi
  cleanup_bench
}

# bench_start NAME: the set-up of a script measuring one service against a primary and
# MariaDB: a work directory and a scratch database named after NAME (`work`, `database`), `out`,
# a primary on a free port (`primary`), the release build (`bin`), and the EXIT trap that shows
# the end of the service's log on a failure and cleans up.
bench_start() {
  work="$(mktemp -d "/var/tmp/writebehind-$1-bench.XXXXXX")"
  database="wb_bench_$1_$$"
  bench_out "${OUT:-}"
  primary=$(free_port)
  service_pid=""
  trap cleanup_bench_showing_log EXIT
  build_release
  sql "CREATE DATABASE $database"
  start_primary "$primary" "$work"
}

# bench_out DIR: the directory a script writes its CSV timelines and PNG plots into (created;
# `bench-out` by default, which git ignores); sets `out`.
bench_out() {
  out="$(realpath -m "${1:-bench-out}")"
  mkdir -p "$out"
}

# sample_positions ADMIN_PORT SERVICE_PID CSV [PRIMARY_PORT] [REPLICA_PORT]: every 0.2 s until
# killed, one CSV line from the admin endpoint's metrics and the service's RSS: the positions,
# the lag, the changes captured (`changes_total`, all mappings), the rows the sinks wrote
# (`sink_batch_rows_sum`) and, with REPLICA_PORT, a real replica's offset (time in seconds from
# the first sample). With PRIMARY_PORT the primary's offset is read from the primary itself (the
# service samples it about once a second) and the lag is computed from it: primary minus
# applied (buffered without a backend). Run it in the background (`&`; kill it when done).
sample_positions() {
  # Kept connections, one process (scripts/sample-positions.py says why).
  exec python3 scripts/sample-positions.py "$@"
}

# plot_positions CSV PNG TITLE: from a sample_positions CSV, the positions (MB of stream; a real
# replica's too when sampled) over time, and below them the lag and the RSS, with gnuplot when it
# is installed (apt-get install gnuplot-nox).
plot_positions() {
  command -v gnuplot >/dev/null || { echo "(gnuplot not installed: no plot)"; return 0; }
  local replica_line=""
  if awk -F, 'NR > 1 && $11 != "" { found = 1 } END { exit !found }' "$1"; then
    replica_line=', "" using 1:($11/1e6) skip 1 with lines dt 3 lw 2 title "real replica"'
  fi
  gnuplot <<GP
set terminal pngcairo size 900,640
set output "$2"
set datafile separator ","
set multiplot layout 2,1 title "$3"
set key top left
set ylabel "stream position (MB)"
plot "$1" using 1:(\$2/1e6) skip 1 with lines lw 2 title "primary", \
     "" using 1:(\$3/1e6) skip 1 with lines title "received", \
     "" using 1:(\$4/1e6) skip 1 with lines title "buffered", \
     "" using 1:(\$5/1e6) skip 1 with lines lw 2 title "applied", \
     "" using 1:(\$6/1e6) skip 1 with lines title "acked"$replica_line
set xlabel "seconds"
set ylabel "lag (MB of stream)"
set y2label "RSS (MB)"
set y2tics
set ytics nomirror
plot "$1" using 1:(\$7/1e6) skip 1 with lines lw 2 title "lag (primary - applied)", \
     "" using 1:8 skip 1 axes x1y2 with lines dt 2 title "RSS (right)"
unset multiplot
GP
}

# plot_progress CSV PNG TITLE: from a sample_positions CSV, the changes captured and the rows
# written over time (thousands), with the RSS on the right axis.
plot_progress() {
  command -v gnuplot >/dev/null || { echo "(gnuplot not installed: no plot)"; return 0; }
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$2"
set datafile separator ","
set key top left
set xlabel "seconds"
set ylabel "thousands"
set y2label "RSS (MB)"
set y2tics
set ytics nomirror
set title "$3"
plot "$1" using 1:(\$9/1e3) skip 1 with lines lw 2 title "changes captured", \
     "" using 1:(\$10/1e3) skip 1 with lines lw 2 title "rows written", \
     "" using 1:8 skip 1 axes x1y2 with lines dt 2 title "RSS (right)"
GP
}

# plot_bars DATA PNG TITLE YLABEL: a bar chart of "label value" lines (one bar each).
plot_bars() {
  command -v gnuplot >/dev/null || { echo "(gnuplot not installed: no plot)"; return 0; }
  gnuplot <<GP
set terminal pngcairo size 900,480
set output "$2"
set title "$3"
set ylabel "$4"
set style fill solid 0.6
set boxwidth 0.6
set yrange [0:*]
set offsets 0, 0, graph 0.12, 0
set xtics rotate by -25
set bmargin 7
set rmargin 10
set grid ytics
plot "$1" using 0:2:xtic(1) with boxes notitle, \
     "" using 0:2:(sprintf("%.2f", \$2)) with labels offset 0,0.7 notitle
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

# load_data_reference KEYS: the rows `<i>\tJohn\tDoe\t42` (i from 1 to KEYS) written to
# `$work/rows.tsv` and loaded by LOAD DATA LOCAL INFILE into `$database.reference`, shaped as
# create_table makes `person1`; sets `load_start` and `load_end` (seconds).
load_data_reference() {
  python3 - "$1" >"$work/rows.tsv" <<'PY'
import sys
out = sys.stdout
for i in range(1, int(sys.argv[1]) + 1):
    out.write(f"{i}\tJohn\tDoe\t42\n")
PY
  load_rows reference "$work/rows.tsv"
  load_start=$loaded_start load_end=$loaded_end
}

# load_rows TABLE FILE: creates `$database.TABLE`, shaped as create_table makes `person1`, and
# loads FILE into it by LOAD DATA LOCAL INFILE; sets `loaded_start` and `loaded_end` (seconds).
load_rows() {
  sql "CREATE TABLE $database.$1 (id VARCHAR(255) NOT NULL PRIMARY KEY, first TEXT, last TEXT, age TEXT) ENGINE=InnoDB"
  loaded_start=$(date +%s.%N)
  mariadb --protocol=tcp -h127.0.0.1 -uroot --local-infile=1 -e \
    "LOAD DATA LOCAL INFILE '$2' INTO TABLE $database.$1 (id, first, last, age)"
  loaded_end=$(date +%s.%N)
}

# fill_primary PORT KEYS: the hashes `person2:<i>` (first_name John, last_name Doe, age 42), i
# from 1 to KEYS, written by scripts of 100,000 keys.
fill_primary() {
  local port=$1 keys=$2 from to
  for ((from = 1; from <= keys; from += 100000)); do
    to=$((from + 99999 < keys ? from + 99999 : keys))
    redis-cli -p "$port" eval "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('HSET', 'person2:' .. i, 'first_name', 'John', 'last_name', 'Doe', 'age', '42') end" 0 "$from" "$to" >/dev/null
  done
}

# sink_batch_summary ADMIN_PORT: the sink's batches, their mean size and the mean time of a
# batch's transaction, from the service's metrics.
sink_batch_summary() {
  curl -s "http://127.0.0.1:$1/metrics" | awk '/^writebehind_sink_batches_total/ {b += $2} /^writebehind_sink_batch_rows_sum/ {r += $2} /^writebehind_sink_commit_seconds_sum/ {s += $2} END {if (b > 0) printf "sink_batches=%d mean_rows_per_batch=%.0f mean_commit_ms=%.1f\n", b, r / b, 1000 * s / b}'
}

# poll_service LOG CMD...: runs CMD every 50 ms until it succeeds; ends the script (with LOG's
# last lines) if the service ($service_pid) stops first.
poll_service() {
  local log=$1
  shift
  until "$@"; do
    kill -0 "$service_pid" 2>/dev/null || { echo "the service stopped"; tail -5 "$log"; exit 1; }
    sleep 0.05
  done
}

# has_row ID: whether `$database.person1` holds the row ID.
has_row() { [ "$(sql "SELECT COUNT(*) FROM $database.person1 WHERE id = '$1'" 2>/dev/null || echo 0)" = 1 ]; }

# replica_online PORT: whether the primary on PORT has a replica online.
replica_online() { redis-cli -p "$1" info replication | grep -q '^slave0:.*state=online'; }

# load_data_shuffled_reference: the same rows as load_data_reference's, shuffled (a fixed seed)
# as a snapshot delivers them (Redis's hash order, not key order), by LOAD DATA into a table of
# the same shape; sets shuffled_start and shuffled_end. Run after load_data_reference.
load_data_shuffled_reference() {
  python3 - "$work/rows.tsv" >"$work/rows-shuffled.tsv" <<'PY'
import random, sys
rows = open(sys.argv[1]).readlines()
random.Random(13).shuffle(rows)
sys.stdout.writelines(rows)
PY
  load_rows reference_shuffled "$work/rows-shuffled.tsv"
  shuffled_start=$loaded_start shuffled_end=$loaded_end
}

# load_bench_setup KEYS PARTITIONS: the scratch database, the `LOAD DATA` reference of KEYS
# rows, a primary ($primary, no diskless-sync delay: a load is timed from the service's start)
# holding the same KEYS hashes, and the service's configuration with its admin port ($admin).
load_bench_setup() {
  sql "CREATE DATABASE $database"
  load_data_reference "$1"
  start_primary "$primary" "$work" --repl-diskless-sync-delay 0
  fill_primary "$primary" "$1"
  write_config "$work/writebehind.toml" "$primary" "$work/buffer" "mysql://root@127.0.0.1:3306/$database" "$2"
  printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$work/writebehind.toml"
}
