#!/usr/bin/env python3
"""Passes sockets between Python and a C++ sockshare program over a sockshare channel.

    python3 pass_socket.py path/to/channel_peer

Starts channel_peer (examples/channel_peer.cpp) on a fresh unix socket path and proves:
  1. Python -> C++: a TCP connection accepted here is handed over with metadata and a
     payload; the C++ side writes a greeting through it that names both.
  2. C++ -> Python: C++ sends back a pipe carrying text and the same TCP socket, each with
     its own metadata; both arrive close-on-exec and the socket is the very same one.
  3. A malformed header (bad magic) and a descriptor of the wrong kind are refused by the
     C++ side with a protocol error, and it closes the descriptors that came with them.
Exits 0 when all of it holds. Standard library only.
"""

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile

from sockshare_channel import (FLAG_FD_META, Channel, Header, ProtocolError, encode_header,
                               encode_metadata)

HANDOFF, RETURNED, BYE, BYE_ACK, REJECTED = 1, 2, 3, 4, 5
TIMEOUT = 10.0


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"ok: {what}")


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def read_until_eof(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def wait_for_line(stream, timeout):
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError("channel_peer did not say it is listening")
    return stream.readline().decode().strip()


def closed_by_peer(read_end):
    """True when no write end of the pipe is open any more: a read sees end of file."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


def refused_with_closed_descriptor(channel, send, expected_error):
    """Sends a pipe's write end with a message the peer must refuse; the peer must answer
    with a protocol error and must have closed the descriptor before answering."""
    read_end, write_end = os.pipe()
    try:
        send(write_end)
        os.close(write_end)
        write_end = -1
        reply = channel.receive()
        reply.close()
        text = reply.payload.decode()
        check(reply.type == REJECTED and expected_error in text,
              f"C++ refused it with a protocol error: {text!r}")
        check(closed_by_peer(read_end), "C++ closed the refused descriptor")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def check_local():
    """What the Python side alone must get right, before talking to C++."""
    # docs/WIRE.md section 10: type 7, seq 1, one descriptor with metadata "tcp", payload "hi".
    encoded = (encode_header(Header(flags=FLAG_FD_META, fd_count=1, type=7, meta_len=7, seq=1,
                                    payload_len=2)) + encode_metadata([b"tcp"]) + b"hi")
    expected = bytes.fromhex("534b5348 01 01 01 00 0700 0000 07000000 0100000000000000"
                             "02000000 00000000 03000000 746370 6869")
    check(encoded == expected, "the encoder produces the worked example of docs/WIRE.md")

    # R11 on the Python receiver: a unix socket descriptor is refused and closed.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    x, y = socket.socketpair()
    with a, b, x, y:
        sender, receiver = Channel(a), Channel(b)
        sender.send(HANDOFF, fds=[x.fileno()])
        try:
            receiver.receive().close()
            refused = False
        except ProtocolError as e:
            refused = "unix socket" in str(e)
        x.close()  # the receiver's copy is gone too if it was closed, so y sees end of file
        y.settimeout(TIMEOUT)
        check(refused and y.recv(1) == b"", "the Python receiver refuses and closes a unix socket")


def exercise(channel):
    # 1. Python -> C++: a real TCP connection on loopback, the server side handed over.
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
        server_side, client_address = listener.accept()
        with server_side:
            meta = f"client={client_address[0]}:{client_address[1]}".encode()
            seq = channel.send(HANDOFF, payload=b"greeting-please", fds=[server_side.fileno()],
                               fd_meta=[meta])
            check(seq == 1, "first message carries sequence number 1")
            greeting = read_line(client)
            check(greeting.startswith("hello from C++ pid="), f"C++ wrote through the socket: "
                                                              f"{greeting.strip()!r}")
            check(f"meta={meta.decode()}" in greeting, "C++ saw the descriptor's metadata")
            check("payload=greeting-please" in greeting, "C++ saw the payload")
            check("seq=1" in greeting and "kind=tcp4" in greeting,
                  "C++ saw the sequence number and identified a tcp4 socket")

            # 2. C++ -> Python: a pipe and the same socket come back, each with metadata.
            reply = channel.receive()
            try:
                check(reply.type == RETURNED and reply.payload == b"handoff 1 served",
                      f"C++ answered: {reply.payload!r}")
                check(len(reply.fds) == 2 and reply.fd_meta == [b"pipe", b""],
                      "two descriptors with per-descriptor metadata [b'pipe', b'']")
                check(all(not os.get_inheritable(fd) for fd in reply.fds),
                      "received descriptors are close-on-exec")
                text = read_until_eof(reply.fds[0])
                check(text.startswith(b"piped text from C++"), f"the pipe carried {text!r}")
                check(os.fstat(reply.fds[1]).st_ino == os.fstat(server_side.fileno()).st_ino,
                      "the returned socket is the very socket Python sent")
                returned = socket.socket(fileno=os.dup(reply.fds[1]))
                with returned:
                    returned.setblocking(True)
                    returned.sendall(b"back in python\n")
                check(read_line(client) == "back in python\n",
                      "the returned socket still reaches the client")
            finally:
                reply.close()

    # 3. Negative checks: the C++ side reports a protocol error and closes the descriptor.
    bad_magic = encode_header(Header(fd_count=1, type=HANDOFF, seq=99), magic=0xDEADBEEF)
    refused_with_closed_descriptor(channel, lambda fd: channel.send_raw(bad_magic, [fd]),
                                   "bad magic")
    refused_with_closed_descriptor(channel,
                                   lambda fd: channel.send(HANDOFF, payload=b"a pipe",
                                                           fds=[fd], fd_meta=[b"pipe"]),
                                   "expected a TCP stream socket")

    channel.send(BYE)
    reply = channel.receive()
    reply.close()
    check(reply.type == BYE_ACK, "C++ acknowledged bye")


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} path/to/channel_peer", file=sys.stderr)
        return 2
    check_local()
    workdir = tempfile.mkdtemp(prefix="sockshare-py-")
    path = os.path.join(workdir, "peer.sock")
    peer = subprocess.Popen([argv[1], "unix:" + path], stdout=subprocess.PIPE)
    try:
        line = wait_for_line(peer.stdout, TIMEOUT)
        check(line == f"listening unix:{path}", f"channel_peer is {line!r}")
        channel = Channel.connect(path, timeout=TIMEOUT)
        try:
            exercise(channel)
        finally:
            channel.close()
        status = peer.wait(timeout=TIMEOUT)
        check(status == 0, "channel_peer exited 0")
        print("PASS: Python <-> C++ descriptor passing over the sockshare wire format")
        return 0
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        peer.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
