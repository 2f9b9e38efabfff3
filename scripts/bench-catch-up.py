#!/usr/bin/env python3
"""Waits until a real replica and writebehind have both reached a primary's offset, and prints
when each did (epoch seconds): `replica_done=...` and `writebehind_done=...`.

Used by bench-capture.sh. It polls every 10 ms over one kept connection to each server: the
shell loop it replaces started about ten processes (redis-cli, sed, grep, tr, date) per poll,
which took about a fifth of this 2-core machine away from the processes being measured
(`perf record -a` during the catch-up, docs/benchmarks.md, session 15).

Usage: bench-catch-up.py PRIMARY_PORT REPLICA_PORT TARGET_OFFSET [TIMEOUT_SECONDS]
- the replica's offset is its own `slave_repl_offset` (the primary hears it only once a
  second);
- writebehind's is the offset of its `REPLCONF ACK` as the primary reports it (the replica the
  primary lists with `port=1`, writebehind's listening port), which it sends only once synced.
Exits 1, saying which, when either has not caught up within the timeout (default 600 s).
"""
import sys
import time

from bench_redis import Redis


def writebehind_offset(info):
    """The offset the primary has from writebehind (`slaveN:...,port=1,...,offset=N,...`)."""
    for name, value in info.items():
        if name.startswith("slave") and name[5:].isdigit():
            parts = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
            if parts.get("port") == "1":
                return int(parts.get("offset", 0))
    return 0


def main():
    primary, replica, target = (int(a) for a in sys.argv[1:4])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 600.0
    primary, replica = Redis(primary), Redis(replica)
    deadline = time.time() + timeout
    replica_done = writebehind_done = None
    while time.time() < deadline:
        # Each time is read once its answer is in, as the shell loop did.
        if replica_done is None:
            if int(replica.info_replication().get("slave_repl_offset", 0)) >= target:
                replica_done = time.time()
        if writebehind_done is None:
            if writebehind_offset(primary.info_replication()) >= target:
                writebehind_done = time.time()
        if replica_done is not None and writebehind_done is not None:
            break
        time.sleep(0.01)
    print(f"replica_done={replica_done or ''}")
    print(f"writebehind_done={writebehind_done or ''}")
    late = [name for name, done in (("writebehind", writebehind_done), ("the replica", replica_done)) if done is None]
    if late:
        print(f"{' and '.join(late)} did not catch up within {timeout:.0f} s", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
