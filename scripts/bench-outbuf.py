#!/usr/bin/env python3
"""Samples, every 100 ms until SIGTERM, what a primary holds for each of its replicas: the output
buffer (`CLIENT LIST TYPE replica`, `omem`: one round trip on a kept connection). On SIGTERM
prints the peaks, for the real replica (the `redis-server` owning the replica's end of the
connection, found with `ss` once per connection) and for the service (any other).

Usage: bench-outbuf.py PRIMARY_PORT [CSV]   (run it in the background; kill it with SIGTERM)
CSV: also writes every sample there (`seconds,replica_mb,writebehind_mb`), for a plot.
"""
import re
import signal
import subprocess
import sys
import time

from bench_redis import Redis

port = int(sys.argv[1])
csv = open(sys.argv[2], "w") if len(sys.argv) > 2 else None
if csv:
    csv.write("seconds,replica_mb,writebehind_mb\n")
started = time.time()
peaks = {}  # "replica" or "writebehind" -> the largest omem seen
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def owner(local_port):
    """The process name at the replica's end of the connection from `local_port` (one `ss`)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{local_port} )"],
                         capture_output=True, text=True).stdout
    name = re.search(r'\(\("([^"]+)"', out)
    return name.group(1) if name else "?"


names = {}  # the replica's local port -> process name
redis = Redis(port)
while not stop:
    try:
        clients = redis.bulk(b"CLIENT", b"LIST", b"TYPE", b"replica")
    except (OSError, ValueError):
        break
    sample = {}
    for line in clients.splitlines():
        addr = re.search(r"\baddr=[^ ]*:(\d+)", line)
        omem = re.search(r"\bomem=(\d+)", line)
        if not addr or not omem:
            continue
        local = int(addr.group(1))
        if local not in names:
            names[local] = owner(local)
        # The service's binary may be a copy under another name (BIN=): anything but Redis is it.
        key = "replica" if names[local].startswith("redis") else "writebehind"
        peaks[key] = max(peaks.get(key, 0), int(omem.group(1)))
        sample[key] = int(omem.group(1))
    if csv:
        csv.write(f"{time.time() - started:.2f},{sample.get('replica', 0) / 1e6:.3f},"
                  f"{sample.get('writebehind', 0) / 1e6:.3f}\n")
    time.sleep(0.1)
if csv:
    csv.close()
for key, omem in sorted(peaks.items()):
    print(f"peak_output_buffer_{key}_bytes={omem}")
