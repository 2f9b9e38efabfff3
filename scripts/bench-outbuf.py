#!/usr/bin/env python3
"""Samples, every 50 ms until SIGTERM, what a primary holds for each of its replicas: the output
buffer (`CLIENT LIST TYPE replica`, `omem`) and what waits unread in the replica's own kernel
socket (`ss` receive queue). On SIGTERM prints the peaks, for the real replica (the
`redis-server` owning the replica's end of the connection) and for the service (any other).

Usage: bench-outbuf.py PRIMARY_PORT   (run it in the background; kill it with SIGTERM)
"""
import re
import signal
import socket
import subprocess
import sys
import time

port = int(sys.argv[1])
peaks = {}  # process name -> [peak omem, peak receive queue]
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def command(sock, *args):
    sock.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]))
    data = b""
    while b"\r\n" not in data:
        data += sock.recv(65536)
    header, rest = data.split(b"\r\n", 1)
    if not header.startswith(b"$"):
        return b""
    length = int(header[1:])
    while len(rest) < length + 2:
        rest += sock.recv(65536)
    return rest[:length]


def owners():
    """Local port -> (process name, receive queue) for connections to the primary."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        recv_q, local = int(fields[0]), fields[2]
        name = re.search(r'\(\("([^"]+)"', line)
        found[int(local.rsplit(":", 1)[1])] = (name.group(1) if name else "?", recv_q)
    return found


sock = socket.create_connection(("127.0.0.1", port), timeout=10)
while not stop:
    try:
        clients = command(sock, b"CLIENT", b"LIST", b"TYPE", b"replica").decode()
        local = owners()
    except (OSError, ValueError):
        break
    for line in clients.splitlines():
        addr = re.search(r"\baddr=[^ ]*:(\d+)", line)
        omem = re.search(r"\bomem=(\d+)", line)
        if not addr or not omem:
            continue
        name, recv_q = local.get(int(addr.group(1)), ("?", 0))
        peak = peaks.setdefault(name, [0, 0])
        peak[0] = max(peak[0], int(omem.group(1)))
        peak[1] = max(peak[1], recv_q)
    time.sleep(0.05)
for name, (omem, recv_q) in sorted(peaks.items()):
    # The service's binary may be a copy under another name (BIN=): anything but Redis is it.
    key = "replica" if name.startswith("redis") else "writebehind"
    print(f"peak_output_buffer_{key}_bytes={omem}")
    print(f"peak_receive_queue_{key}_bytes={recv_q}")
