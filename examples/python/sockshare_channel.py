"""The sockshare channel wire format in Python's standard library alone.

One channel message is one AF_UNIX SOCK_SEQPACKET datagram:

    header (32 bytes) | descriptor metadata (optional) | payload

with the descriptors in a single SCM_RIGHTS control message. Every header field is
little-endian:

    off  0  u32 magic       0x48534B53 ("SKSH" as bytes on the wire)
    off  4  u8  version     1
    off  5  u8  flags       0x01 = a descriptor metadata section follows; other bits zero
    off  6  u8  fd_count    0-253, must equal the descriptors that arrive
    off  7  u8  reserved    0
    off  8  u16 type        application types 0x0000-0x7FFF, 0x8000-0xFFFF are sockshare's
    off 10  u16 reserved    0
    off 12  u32 meta_len    bytes of the metadata section (0 without flag 0x01)
    off 16  u64 seq         sender's sequence number: 1, 2, 3, ... per direction, never 0
    off 24  u32 payload_len
    off 28  u32 reserved    0

The metadata section (only with flag 0x01, only when fd_count > 0) holds fd_count u32
lengths, then each descriptor's bytes in order, nothing after. header + meta_len +
payload_len must equal the datagram's size, which is at most 65536 bytes.

This module mirrors include/sockshare/wire.hpp and src/wire.cpp; docs/WIRE.md is the
normative description.
"""

import array
import errno
import os
import select
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

MAGIC = 0x48534B53
VERSION = 1
HEADER_SIZE = 32
MAX_FDS = 253
MAX_MESSAGE = 65536
FLAG_FD_META = 0x01
KNOWN_FLAGS = FLAG_FD_META

# magic, version, flags, fd_count, reserved0, type, reserved1, meta_len, seq, payload_len,
# reserved2
_HEADER = struct.Struct("<IBBBBHHIQII")
assert _HEADER.size == HEADER_SIZE
_LENGTH = struct.Struct("<I")
_INT_SIZE = array.array("i").itemsize


class ProtocolError(Exception):
    """The peer sent something malformed; the descriptors that came with it are closed."""


class PeerGone(Exception):
    """The peer closed the channel."""


class Overloaded(Exception):
    """Descriptors were lost because this process has no free descriptor slot (EMFILE)."""


@dataclass
class Header:
    flags: int = 0
    fd_count: int = 0
    type: int = 0
    meta_len: int = 0
    seq: int = 0
    payload_len: int = 0


def encode_header(header: Header, magic: int = MAGIC, version: int = VERSION) -> bytes:
    # magic and version are parameters only so that tests can build broken headers.
    return _HEADER.pack(magic, version, header.flags, header.fd_count, 0, header.type, 0,
                        header.meta_len, header.seq, header.payload_len, 0)


def decode_header(data: bytes, message_size: int) -> Header:
    """Validates a header exactly as the C++ decoder does; raises ProtocolError."""
    if len(data) < HEADER_SIZE or message_size < HEADER_SIZE:
        raise ProtocolError(f"message of {message_size} bytes is shorter than the "
                            f"{HEADER_SIZE}-byte header")
    if message_size > MAX_MESSAGE:
        raise ProtocolError(f"message of {message_size} bytes exceeds the "
                            f"{MAX_MESSAGE}-byte limit")
    (magic, version, flags, fd_count, reserved0, type_, reserved1, meta_len, seq,
     payload_len, reserved2) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version} (this side speaks {VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {flags}")
    if reserved0 or reserved1 or reserved2:
        raise ProtocolError("non-zero reserved field")
    if fd_count > MAX_FDS:
        raise ProtocolError(f"fd_count {fd_count} > {MAX_FDS}")
    if seq == 0:
        raise ProtocolError("sequence number 0")
    has_meta = bool(flags & FLAG_FD_META)
    if not has_meta and meta_len != 0:
        raise ProtocolError("metadata length without the metadata flag")
    if has_meta and fd_count == 0:
        raise ProtocolError("metadata flag on a message without descriptors")
    if has_meta and meta_len < 4 * fd_count:
        raise ProtocolError("metadata section too short")
    expected = HEADER_SIZE + meta_len + payload_len
    if expected != message_size:
        raise ProtocolError(f"lengths announce {expected} bytes but the message has "
                            f"{message_size}")
    return Header(flags, fd_count, type_, meta_len, seq, payload_len)


def encode_metadata(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) for item in items) + b"".join(items)


def decode_metadata(section: bytes, fd_count: int) -> List[bytes]:
    if len(section) < 4 * fd_count:
        raise ProtocolError("metadata section too short for its table")
    offset = 4 * fd_count
    items = []
    for i in range(fd_count):
        (length,) = _LENGTH.unpack_from(section, 4 * i)
        if length > len(section) - offset:
            raise ProtocolError("metadata entry overruns its section")
        items.append(bytes(section[offset:offset + length]))
        offset += length
    if offset != len(section):
        raise ProtocolError("trailing bytes after descriptor metadata")
    return items


@dataclass
class Message:
    type: int
    seq: int
    payload: bytes
    fds: List[int] = field(default_factory=list)  # owned by the caller: close them
    fd_meta: List[bytes] = field(default_factory=list)  # empty, or one entry per fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _peer_finished(sock: socket.socket) -> bool:
    """A zero-length read is the end of the stream only once the peer has shut down;
    otherwise it was a zero-length message, which no valid sender produces."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    events = dict(poller.poll(0)).get(sock.fileno(), 0)
    return bool(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR))


def _descriptor_table_full() -> bool:
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        return False
    except OSError as e:
        return e.errno in (errno.EMFILE, errno.ENFILE)


def _is_unix_socket(fd: int) -> bool:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    probe = socket.socket(fileno=fd)  # reads the family from the kernel (SO_DOMAIN)
    try:
        return probe.family == socket.AF_UNIX
    finally:
        probe.detach()  # the descriptor stays open and owned by the message


class Channel:
    """A sockshare channel end over a connected AF_UNIX SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket):
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("a channel needs a connected AF_UNIX SOCK_SEQPACKET socket")
        self.sock = sock
        self._seq = 0

    @classmethod
    def connect(cls, path: str, timeout: Optional[float] = None) -> "Channel":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, type_: int, payload: bytes = b"", fds: Sequence[int] = (),
             fd_meta: Optional[Sequence[bytes]] = None) -> int:
        """Sends one message; the caller keeps its descriptors. Returns the sequence number."""
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one message; the kernel takes at "
                             f"most {MAX_FDS}")
        if fd_meta is not None and len(fd_meta) != len(fds):
            raise ValueError("descriptor metadata needs exactly one entry per descriptor")
        meta = encode_metadata(fd_meta) if fd_meta and fds else b""
        if HEADER_SIZE + len(meta) + len(payload) > MAX_MESSAGE:
            raise ValueError(f"message exceeds the {MAX_MESSAGE}-byte limit")
        header = Header(flags=FLAG_FD_META if meta else 0, fd_count=len(fds), type=type_,
                        meta_len=len(meta), seq=self._seq + 1, payload_len=len(payload))
        self.send_raw(encode_header(header) + meta + payload, fds)
        # Counted only once sent, so numbers on the wire have no gaps.
        self._seq += 1
        return self._seq

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Sends bytes as they are: for talking to a peer that must reject them."""
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        # socket.send_fds would do, but drops its flags argument: MSG_NOSIGNAL turns a dead
        # peer into an exception instead of SIGPIPE, also where SIGPIPE is not ignored.
        sent = self.sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
        if sent != len(data):
            raise OSError(f"sendmsg sent {sent} of {len(data)} bytes")

    def receive(self, max_fds: int = MAX_FDS, allow_unix_sockets: bool = False) -> Message:
        """Receives one message. Every received descriptor is close-on-exec and owned by the
        returned Message; on any error they have all been closed already. Unix socket
        descriptors are refused unless allowed: passing them can build reference cycles only
        the kernel's garbage collector frees."""
        # Not socket.recv_fds: it drops its flags argument, and MSG_CMSG_CLOEXEC is what keeps
        # a received descriptor from leaking into a child spawned at the wrong moment. One
        # byte more than the largest valid message makes an oversized one show as MSG_TRUNC.
        data, ancdata, msg_flags, _ = self.sock.recvmsg(
            MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * _INT_SIZE), socket.MSG_CMSG_CLOEXEC)
        fds = array.array("i")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % _INT_SIZE])
        fds = list(fds)
        # Own every descriptor before looking at anything else, so every failure closes them.
        try:
            if not data:
                if fds:
                    raise ProtocolError("zero-length message carrying descriptors")
                if _peer_finished(self.sock):
                    raise PeerGone("the peer closed the channel")
                raise ProtocolError("zero-length message")
            if msg_flags & socket.MSG_TRUNC:
                raise ProtocolError("oversized message truncated")
            header = decode_header(data, len(data))
            if msg_flags & socket.MSG_CTRUNC:
                why = (f"descriptors lost in transit (MSG_CTRUNC): {len(fds)} of "
                       f"{header.fd_count} arrived")
                if _descriptor_table_full():
                    raise Overloaded(why + "; this process is at RLIMIT_NOFILE")
                raise ProtocolError(why)
            if len(fds) != header.fd_count:
                raise ProtocolError(f"header announces {header.fd_count} descriptors but "
                                    f"{len(fds)} arrived")
            if len(fds) > max_fds:
                raise ProtocolError(f"{len(fds)} descriptors where at most {max_fds} are "
                                    f"accepted")
            if not allow_unix_sockets:
                for i, fd in enumerate(fds):
                    if _is_unix_socket(fd):
                        raise ProtocolError(f"descriptor {i}: unix socket descriptors are not "
                                            f"allowed")
            meta_end = HEADER_SIZE + header.meta_len
            fd_meta = []
            if header.flags & FLAG_FD_META:
                fd_meta = decode_metadata(data[HEADER_SIZE:meta_end], header.fd_count)
            return Message(header.type, header.seq, bytes(data[meta_end:]), fds, fd_meta)
        except BaseException:
            _close_all(fds)
            raise
