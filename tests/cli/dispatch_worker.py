#!/usr/bin/env python3
"""A dispatch-mode worker in Python's standard library alone, speaking the worker protocol of
docs/DISPATCH.md over the channel named by SOCKSHARE_CHANNEL_FD (framing from
examples/python/sockshare_channel.py).

    sockshare serve --listen 127.0.0.1:8080 --workers 2 -- python3 dispatch_worker.py

hello -> (connections -> ack -> serve)* -> drain -> bye. Each connection is answered with
"python dispatch worker <index> pid <pid> listener <name> peer <address>" and closed; bytes
the dispatcher already read (--peek-bytes) are taken as the start of the request.
"""

import os
import socket
import struct
import sys

sys.dont_write_bytecode = True  # run from the source tree: leave no __pycache__ in it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "examples", "python"))
from sockshare_channel import Channel, PeerGone  # noqa: E402

HELLO, CONNECTIONS, ACK, LOAD, DRAIN, BYE = 0x8201, 0x8202, 0x8203, 0x8204, 0x8205, 0x8206
INFO = struct.Struct("<BBHHHQqI")  # version, flags, listener_len, peer_len, reserved, id,
                                    # accepted_at_ns, initial_len: 28 bytes


def decode_info(meta):
    version, flags, listener_len, peer_len, reserved, conn_id, _, initial_len = \
        INFO.unpack_from(meta)
    if version != 1 or flags or reserved or \
            len(meta) != INFO.size + listener_len + peer_len + initial_len:
        raise ValueError("malformed connection metadata")
    at = INFO.size
    listener = meta[at:at + listener_len].decode()
    at += listener_len
    peer = meta[at:at + peer_len].decode()
    at += peer_len
    return conn_id, listener, peer, meta[at:at + initial_len]


def serve(fd, index, listener, peer, initial):
    with socket.socket(fileno=fd) as conn:
        conn.settimeout(5)
        data = bytes(initial)
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            body = (f"python dispatch worker {index} pid {os.getpid()} listener {listener} "
                    f"peer {peer}\n").encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass


def main():
    index = int(os.environ.get("SOCKSHARE_WORKER_INDEX", "0"))
    sock = socket.socket(fileno=int(os.environ["SOCKSHARE_CHANNEL_FD"]))
    sock.setblocking(True)  # this end is ours alone: blocking receives are simplest here
    channel = Channel(sock)
    channel.send(HELLO, struct.pack("<II", index, os.getpid()))
    while True:
        try:
            # Connections from a unix listener are unix sockets themselves.
            message = channel.receive(allow_unix_sockets=True)
        except PeerGone:
            return 0
        if message.type == CONNECTIONS:
            infos = [decode_info(meta) for meta in message.fd_meta]
            # Ack first: from here on these connections are ours, the dispatcher lets go.
            channel.send(ACK, b"".join(struct.pack("<Q", info[0]) for info in infos))
            fds, message.fds = message.fds, []
            for fd, (_, listener, peer, initial) in zip(fds, infos):
                serve(fd, index, listener, peer, initial)
        elif message.type == DRAIN:
            channel.send(BYE)
            return 0
        else:
            message.close()
            sys.exit(f"dispatch_worker: unexpected message type {message.type:#x}")


if __name__ == "__main__":
    sys.exit(main())
