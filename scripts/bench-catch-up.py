#!/usr/bin/env python3
"""Waits until a real replica and writebehind have both reached a primary's offset, and prints
when each did (epoch seconds): `replica_done=...` and `writebehind_done=...`, and, when the
service's admin port is given, `writebehind_heard_done=...`.

Used by bench-capture.sh. It polls every 10 ms over one kept connection to each server: the
shell loop it replaces started about ten processes (redis-cli, sed, grep, tr, date) per poll,
which took about a fifth of this 2-core machine away from the processes being measured
(`perf record -a` during the catch-up, docs/benchmarks.md, session 15).

Usage: bench-catch-up.py PRIMARY_PORT REPLICA_PORT TARGET_OFFSET [TIMEOUT_SECONDS] [ADMIN_PORT]
- TARGET_OFFSET may be `@FILE`: polling starts at once and the target is read from FILE when
  it is written (bench-capture.sh starts it before the burst and writes the primary's offset
  when the burst ends, so that a server that reaches it before the script would otherwise
  start is timed when it did, not when the first poll saw it);
- the replica's offset is its own `slave_repl_offset` (the primary hears it only once a
  second);
- writebehind's, with ADMIN_PORT, is its own durable offset (`writebehind_position_buffered_
  bytes` on /metrics: what is synced to RocksDB, which its next `REPLCONF ACK` reports), read
  the same way as the replica's; and `writebehind_heard_done` is when the primary heard it,
  the offset of its `REPLCONF ACK` as the primary reports it (the replica listed with
  `port=1`, writebehind's listening port). That ACK goes once a second, as a real replica's
  does, so the time the primary hears it falls up to a second after the offset is durable
  (docs/benchmarks.md, session 25). Without ADMIN_PORT, `writebehind_done` is the primary's.
Exits 1, saying which, when either has not caught up within the timeout (default 600 s).
"""
import http.client
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


class Durable:
    """The service's durable offset from its /metrics, over a kept connection."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def offset(self):
        self.conn.request("GET", "/metrics")
        for line in self.conn.getresponse().read().decode().splitlines():
            if line.startswith("writebehind_position_buffered_bytes "):
                return int(float(line.split()[1]))
        return 0


def read_target(arg):
    """TARGET_OFFSET, or `@FILE`: the offset written to FILE, None until it is there."""
    if not arg.startswith("@"):
        return int(arg)
    try:
        with open(arg[1:]) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text else None


def main():
    primary, replica = int(sys.argv[1]), int(sys.argv[2])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 600.0
    durable = Durable(int(sys.argv[5])) if len(sys.argv) > 5 else None
    primary, replica = Redis(primary), Redis(replica)
    deadline = time.time() + timeout
    replica_done = writebehind_done = heard_done = None
    # Until the target is known (`@FILE`: started before the burst), every sample is kept, and
    # the first one at or past the target decides each time once it is.
    history = []
    target = None
    while time.time() < deadline:
        if target is None:
            target = read_target(sys.argv[3])
        # Each time is read once its answer is in.
        rep = int(replica.info_replication().get("slave_repl_offset", 0)) if replica_done is None else None
        rep_at = time.time()
        wb = durable.offset() if durable is not None and writebehind_done is None else None
        wb_at = time.time()
        heard = writebehind_offset(primary.info_replication()) if heard_done is None else None
        heard_at = time.time()
        history.append((rep, rep_at, wb, wb_at, heard, heard_at))
        if target is not None:
            for rep, rep_at, wb, wb_at, heard, heard_at in history:
                if replica_done is None and rep is not None and rep >= target:
                    replica_done = rep_at
                if writebehind_done is None and wb is not None and wb >= target:
                    writebehind_done = wb_at
                if heard_done is None and heard is not None and heard >= target:
                    heard_done = heard_at
            history.clear()
            if durable is None:
                writebehind_done = heard_done
            if None not in (replica_done, writebehind_done, heard_done):
                break
        time.sleep(0.01)
    print(f"replica_done={replica_done or ''}")
    print(f"writebehind_done={writebehind_done or ''}")
    if durable is not None:
        print(f"writebehind_heard_done={heard_done or ''}")
    late = [name for name, done in (("writebehind", heard_done), ("the replica", replica_done)) if done is None]
    if late:
        print(f"{' and '.join(late)} did not catch up within {timeout:.0f} s", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
