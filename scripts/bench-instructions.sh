#!/usr/bin/env bash
# Instruction counts of capture against a real replica: both run under valgrind's callgrind,
# attached to the same primary, and are fed the same pipelined HSET burst (bench-capture.sh's
# workload); their counters are zeroed just before the burst and dumped once both have caught
# up. Prints the instructions each spent per command and the ratio, and the service's
# instructions by thread (capture's own thread, the committer, the rest).
#
# Why: wall-clock benchmarks on this 2-core machine vary by ±15% from run to run (the primary,
# the replica, redis-benchmark and the service share the cores, and the disk stalls), so a
# change worth a few percent of capture's thread cannot be seen in bench-capture.sh. Callgrind
# counts instructions, which are the same for the same binary and input whatever else the
# machine does. The batches under valgrind are always full (the service is slowed about fifty
# times, so it is always behind): the count is that of capture catching up, which is what
# bench-capture.sh's ratio measures. Instructions are not time (cache misses and atomic
# operations cost more than their count): use it to compare builds, and bench-capture.sh for
# the rate.
#
# Usage: scripts/bench-instructions.sh [commands]   (default 200000; AGE=same for a constant age)
#        BIN=path: another build of writebehind to count.
#        CG_OUT=dir: keep the callgrind files there (callgrind_annotate reads them).
#        CACHE_SIM=1: also simulate the caches (valgrind's model: a first-level data cache and
#        a last level of 32 MiB, each process alone in it) and print the data misses per
#        command in each level. Capture is bound by memory latency more than by instructions
#        (docs/benchmarks.md, session 23): misses at the last level are what a change to the
#        layout of its data moves, and they too are the same from run to run.
# Not a test: it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
commands="${1:-200000}"
work="$(mktemp -d /var/tmp/writebehind-instructions.XXXXXX)"
. scripts/bench-common.sh
primary=$(free_port); replica=$(free_port)
service_pid=""; replica_pid=""
cleanup() {
  if [ -n "$service_pid" ]; then kill -9 "$service_pid" 2>/dev/null; wait "$service_pid" 2>/dev/null; fi || true
  if [ -n "$replica_pid" ]; then kill -9 "$replica_pid" 2>/dev/null; wait "$replica_pid" 2>/dev/null; fi || true
  redis-cli -p "$primary" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
command -v valgrind >/dev/null || { echo "bench-instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
build_release

# The slowed replicas must never be cut for their output buffer.
start_primary "$primary" "$work" --repl-backlog-size 512mb
redis-cli -p "$primary" config set client-output-buffer-limit "replica 0 0 0" >/dev/null
mkdir -p "$work/replica"
cache_sim=(); [ -n "${CACHE_SIM:-}" ] && cache_sim=(--cache-sim=yes --LL=33554432,16,64)
valgrind --tool=callgrind --separate-threads=yes "${cache_sim[@]}" --callgrind-out-file="$work/replica.cg" \
  redis-server --port "$replica" --bind 127.0.0.1 --dir "$work/replica" --save '' --appendonly no \
  --replicaof 127.0.0.1 "$primary" --logfile "$work/replica.log" 2>"$work/replica.valgrind" &
replica_pid=$!
write_config "$work/writebehind.toml" "$primary" "$work/buffer" "sqlite://$work/unused.db"
RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes "${cache_sim[@]}" --callgrind-out-file="$work/wb.cg" \
  "$bin" run --capture-only --config "$work/writebehind.toml" 2>"$work/writebehind.log" &
service_pid=$!

master_offset() { redis-cli -p "$primary" info replication | tr -d '\r' | sed -n 's/^master_repl_offset://p'; }
synced() {  # both replicas listed, online, at the primary's offset
  local info; info=$(redis-cli -p "$primary" info replication | tr -d '\r')
  local master; master=$(echo "$info" | sed -n 's/^master_repl_offset://p')
  [ "$(echo "$info" | grep -c '^slave[0-9]*:.*state=online')" = 2 ] || return 1
  ! echo "$info" | grep '^slave[0-9]*:' | sed -n 's/.*offset=\([0-9]*\).*/\1/p' | awk -v m="$master" '$1 < m {bad=1} END {exit !bad}'
}
for _ in $(seq 1 1200); do synced && break; sleep 0.1; done
synced || { echo "bench-instructions: the replicas did not sync within 120 s" >&2; tail -5 "$work/writebehind.log" >&2; exit 1; }

callgrind_control -z "$replica_pid" >/dev/null 2>&1
callgrind_control -z "$service_pid" >/dev/null 2>&1
age=__rand_int__; [ "${AGE:-changing}" = same ] && age=42
echo "== burst: $commands HSETs (3 fields, age ${AGE:-changing}) over 100000 keys, pipeline 32"
redis-benchmark -p "$primary" -q -n "$commands" -P 32 -r 100000 \
  HSET person2:__rand_int__ first_name John last_name Doe age "$age" >/dev/null
target=$(master_offset)
python3 scripts/bench-catch-up.py "$primary" "$replica" "$target" 3600 >/dev/null
callgrind_control -d "$replica_pid" >/dev/null 2>&1
callgrind_control -d "$service_pid" >/dev/null 2>&1
if [ -n "${CG_OUT:-}" ]; then mkdir -p "$CG_OUT" && cp "$work"/*.cg.* "$CG_OUT"/; fi

# Each thread's dump is its own file, `<out>.<pid>.<part>-<thread>` (the first dump of each
# thread is part 1); its `summary:` line holds the instructions.
instructions() { awk '/^summary:/ {s += $2} END {print s + 0}' "$@"; }
threads_of() { ls "$work/$1".*.1-* 2>/dev/null || ls "$work/$1".*-* ; }
# shellcheck disable=SC2046
replica_total=$(instructions $(threads_of replica.cg))
wb_total=$(instructions $(threads_of wb.cg))
capture=0; committer=0
for f in $(threads_of wb.cg); do
  n=$(instructions "$f")
  if grep -q 'StreamBatch::apply_commands' "$f"; then capture=$((capture + n))
  elif grep -q 'committer::write_jobs' "$f" && [ "$n" -gt "$committer" ]; then committer=$n
  fi
done
python3 - "$commands" "$replica_total" "$wb_total" "$capture" "$committer" <<'PY'
import sys
n, rep, wb, cap, com = map(int, sys.argv[1:])
print(f"replica_instructions_per_command={rep / n:.0f}")
print(f"writebehind_instructions_per_command={wb / n:.0f}")
print(f"writebehind_capture_thread_per_command={cap / n:.0f}")
print(f"writebehind_committer_thread_per_command={com / n:.0f}")
print(f"writebehind_other_threads_per_command={(wb - cap - com) / n:.0f}")
print(f"ratio_writebehind_to_replica_instructions={wb / rep:.2f}")
print(f"ratio_capture_thread_to_replica_instructions={cap / rep:.2f}")
PY
if [ -n "${CACHE_SIM:-}" ]; then
  # With the cache simulated, `events:` names the columns of `summary:`.
  misses() {  # files -> "first-level last-level" data misses (reads and writes)
    awk '/^events:/ {for (i = 2; i <= NF; i++) col[$i] = i}
         /^summary:/ {d1 += $col["D1mr"] + $col["D1mw"]; ll += $col["DLmr"] + $col["DLmw"]}
         END {print d1 + 0, ll + 0}' "$@"
  }
  capture_files=$(for f in $(threads_of wb.cg); do if grep -q 'StreamBatch::apply_commands' "$f"; then echo "$f"; fi; done)
  # shellcheck disable=SC2046
  read -r replica_d1 replica_ll < <(misses $(threads_of replica.cg))
  # shellcheck disable=SC2086
  read -r capture_d1 capture_ll < <(misses $capture_files)
  python3 - "$commands" "$replica_d1" "$replica_ll" "$capture_d1" "$capture_ll" <<'PY'
import sys
n, rd1, rll, cd1, cll = map(int, sys.argv[1:])
print(f"replica_d1_misses_per_command={rd1 / n:.1f}")
print(f"replica_ll_misses_per_command={rll / n:.2f}")
print(f"writebehind_capture_thread_d1_misses_per_command={cd1 / n:.1f}")
print(f"writebehind_capture_thread_ll_misses_per_command={cll / n:.2f}")
PY
fi
