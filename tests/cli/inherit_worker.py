#!/usr/bin/env python3
"""A socket-activated HTTP worker written with Python's standard library alone.

It knows nothing about sockshare: it follows the systemd convention (LISTEN_PID, LISTEN_FDS,
LISTEN_FDNAMES, listeners from descriptor 3 on), which is what `sockshare serve --mode
inherit -- python3 inherit_worker.py` hands it. Every answer closes the connection and
says which worker and process served it: "python worker <index> pid <pid> listener <name>".
SIGTERM ends it with status 0.
"""

import os
import select
import signal
import socket
import sys


def take_listeners():
    pid = os.environ.get("LISTEN_PID")
    if pid != str(os.getpid()):
        sys.exit(f"inherit_worker: LISTEN_PID={pid} is not this process (pid {os.getpid()})")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        sys.exit("inherit_worker: no listeners in LISTEN_FDS")
    listeners = []
    for i in range(count):
        sock = socket.socket(fileno=3 + i)
        name = names[i] if i < len(names) else "unknown"
        listeners.append((sock, name))
    return listeners


def serve_one(conn, body):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    conn.sendall(head + body)


def main():
    listeners = take_listeners()
    index = os.environ.get("SOCKSHARE_WORKER_INDEX", "?")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    by_fd = {sock.fileno(): (sock, name) for sock, name in listeners}
    while True:
        ready, _, _ = select.select(list(by_fd), [], [])
        for fd in ready:
            sock, name = by_fd[fd]
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            body = f"python worker {index} pid {os.getpid()} listener {name}\n".encode()
            with conn:
                try:
                    serve_one(conn, body)
                except OSError:
                    pass


if __name__ == "__main__":
    main()
