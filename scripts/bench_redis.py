"""A kept connection to a local Redis for the benchmark helpers (bench-catch-up.py,
sample-positions.py, bench-outbuf.py): polling over one connection instead of starting
`redis-cli` per sample, which took a fifth of this machine from what was being measured
(docs/benchmarks.md, sessions 15 and 16)."""
import socket


class Redis:
    """One connection to 127.0.0.1:`port`, for commands that answer a bulk string."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def bulk(self, *args):
        """Sends `args` (bytes) and returns the bulk-string reply, decoded."""
        self.sock.sendall(b"".join([b"*%d\r\n" % len(args)]
                                   + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]))
        header = self.file.readline()
        if not header.startswith(b"$"):
            raise OSError(f"unexpected reply to {args[0]!r}: {header!r}")
        return self.file.read(int(header[1:]) + 2)[:-2].decode()

    def info_replication(self):
        """`INFO replication` as a dict."""
        body = self.bulk(b"INFO", b"replication")
        return dict(line.split(":", 1) for line in body.split("\r\n") if ":" in line)
