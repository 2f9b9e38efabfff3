#!/usr/bin/env python3
"""Every 0.2 s until the service exits (or SIGTERM), one CSV line of its positions: what
`sample_positions` in bench-common.sh documents, with the same columns.

It reads the admin endpoint's /metrics and the servers' `INFO replication` over kept
connections: the shell loop it replaces started about ten processes a sample (curl, redis-cli,
awk, sed, tr, date), about a tenth of this 2-core machine during a benchmark's burst
(`perf record -a`, docs/benchmarks.md, session 16), taken from the processes being measured.

Usage: sample-positions.py ADMIN_PORT SERVICE_PID CSV [PRIMARY_PORT] [REPLICA_PORT]
"""
import http.client
import os
import signal
import sys
import time

from bench_redis import Redis

stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


class Reconnecting:
    """INFO replication over a kept connection, opened again after a failure; {} meanwhile."""

    def __init__(self, port):
        self.port = port
        self.redis = None

    def info_replication(self):
        try:
            if self.redis is None:
                self.redis = Redis(self.port, timeout=5)
            return self.redis.info_replication()
        except (OSError, ValueError):
            self.redis = None
            return {}


class Admin:
    """/metrics over a kept HTTP/1.1 connection: the sums of the named series."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def metrics(self):
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.conn.request("GET", "/metrics")
            text = self.conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            self.conn = None
            return None
        values = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            try:
                values.setdefault(name, []).append((series, float(value)))
            except ValueError:
                pass
        return values


def first(values, name):
    found = values.get(name)
    return found[0][1] if found else None


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fmt(value):
    return "" if value is None else str(int(value))


def main():
    admin, pid, csv = Admin(int(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
    primary = Reconnecting(int(sys.argv[4])) if len(sys.argv) > 4 and sys.argv[4] else None
    replica = Reconnecting(int(sys.argv[5])) if len(sys.argv) > 5 and sys.argv[5] else None
    started = time.time()
    with open(csv, "w") as out:
        out.write("seconds,primary,received,buffered,applied,acked,lag_bytes,rss_mb,changes,"
                  "rows_written,replica\n")
        while not stop and os.path.exists(f"/proc/{pid}"):
            now = time.time()
            primary_offset = replica_offset = None
            if primary:
                primary_offset = primary.info_replication().get("master_repl_offset")
            if replica:
                replica_offset = replica.info_replication().get("slave_repl_offset")
            values = admin.metrics()
            if values is not None:
                p = first(values, "writebehind_primary_offset_bytes")
                b = first(values, "writebehind_position_buffered_bytes")
                a = first(values, "writebehind_position_applied_bytes")
                lag = first(values, "writebehind_lag_bytes")
                if primary_offset is not None:
                    p = float(primary_offset)
                    lag = max(0.0, p - (a if a is not None else (b or 0.0)))
                changes = sum(v for _, v in values.get("writebehind_changes_total", []))
                rows = sum(v for _, v in values.get("writebehind_sink_batch_rows_sum", []))
                out.write(",".join([
                    f"{now - started:.2f}", fmt(p),
                    fmt(first(values, "writebehind_position_received_bytes")), fmt(b), fmt(a),
                    fmt(first(values, "writebehind_position_acked_bytes")), fmt(lag),
                    f"{rss_mb(pid):.1f}", str(int(changes)), str(int(rows)),
                    replica_offset or "",
                ]) + "\n")
                out.flush()
            time.sleep(max(0.0, 0.2 - (time.time() - now)))


if __name__ == "__main__":
    main()
