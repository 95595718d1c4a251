"""UDP sockets and the link transport over them, with segmentation offload where Linux has it.

Sending: a relay's batch usually holds many onion frames for one link, all of one size. Linux
(4.18+) sends such a run in one `sendmsg` call with the UDP_SEGMENT option (UDP GSO): the
kernel cuts the buffers into one datagram per segment, the same datagrams `sendto` would have
sent one by one, for a fraction of the per-packet system-call cost. Any receiver sees ordinary
datagrams. Where the option is missing (another OS, an older kernel) frames go out one
`sendto` at a time. Where the kernel refuses it on a path (a device without checksum offload,
a segment over the path MTU), the transport says so in the log once and sends one at a time
from then on.

Receiving: with the UDP_GRO option (Linux 5.0+) the kernel may hand over a run of datagrams
from one sender, of one size, as one buffer, with the size in a control message;
`datagram_reader` cuts it back into the datagrams. Elsewhere each call reads one datagram.

Waking up: `call_when_readable` runs the reading code straight from the event loop's poll
(see there); each wake-up of a relay is on the path of every packet it forwards alone.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

import anyio
import structlog

from earendil_py.core.link import MAX_MESSAGE_SIZE

log = structlog.get_logger("earendil_py.udp")

UDP_SOCKET_BUFFER = 4 << 20  # bytes asked of the kernel per UDP socket, each way
# Segmentation offload both ways (GSO sending, GRO receiving) where the kernel has it. Only
# benchmarks turn this off, to measure what it brings.
UDP_OFFLOAD = True
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # <linux/udp.h>; Python 3.11 lacks the name
UDP_GRO = getattr(socket, "UDP_GRO", 104)  # ditto
GRO_BUFFER = 65_535  # what the kernel coalesces into one read, at most
MAX_DATAGRAM = MAX_MESSAGE_SIZE + 1  # read size without GRO: one more byte shows an oversize
_GRO_ANCILLARY = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_GRO_SIZE = struct.Struct("=i")
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS (64 on every kernel that has GSO)
GSO_MAX_BYTES = 65_000  # one call's payload, under IPv4's 65,507-byte datagram limit
# What the kernel answers when it will not segment on this path: disable and send one by one.
_GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT})
_SEGMENT_SIZE = struct.Struct("=H")

Address = tuple[str, int]
# Errors that say the socket itself is gone or unusable: the node's own failure, which stops
# it. Every other accept()/recvfrom() error concerns one connection or datagram, or a
# resource that frees up again.
SOCKET_GONE = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})


@cache
def gso_available() -> bool:
    """Whether this kernel knows UDP_SEGMENT (asked once, of a throwaway socket)."""
    if sys.platform != "linux":
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
        except OSError:
            return False
    return True


def datagram_reader(sock: socket.socket) -> Callable[[], tuple[Sequence[bytes], Address]]:
    """A function that reads what one receive call returns from `sock`: the datagrams (one,
    or a coalesced run cut back into its datagrams) and the address they came from. It raises
    what `recvfrom` raises (BlockingIOError when there is nothing to read). Asks the kernel
    to coalesce (UDP_GRO) where it can."""
    if _enable_gro(sock):
        recvmsg = sock.recvmsg

        def read_runs() -> tuple[Sequence[bytes], Address]:
            data, ancillary, _flags, address = recvmsg(GRO_BUFFER, _GRO_ANCILLARY)
            for level, kind, value in ancillary:
                if level == socket.SOL_UDP and kind == UDP_GRO:
                    size = _GRO_SIZE.unpack(value)[0]
                    return [data[i : i + size] for i in range(0, len(data), size)], address
            return (data,), address

        return read_runs
    recvfrom = sock.recvfrom

    def read_one() -> tuple[Sequence[bytes], Address]:
        data, address = recvfrom(MAX_DATAGRAM)
        return (data,), address

    return read_one


async def call_when_readable(sock: socket.socket, callback: Callable[[], bool]) -> None:
    """Call `callback()` whenever `sock` has something to read, until it returns False (then
    return) or raises (then raise that), or until cancelled. It should read what is there.

    On asyncio, the node's loop, `callback` is the loop's reader for `sock`, registered
    once: the loop calls it from its poll, in the same iteration. `anyio.wait_readable`
    instead registers the socket with epoll and removes it again on every wake-up, and
    resumes the waiting task one loop iteration after the poll: 2 system calls and ~30 us
    more per wake-up on the development VM (bench/latency.py). Reading in bursts stays fair
    to the other tasks: the loop runs them between two calls. Elsewhere, `wait_readable`.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another event loop than asyncio
        while True:
            await anyio.wait_readable(sock)
            if not callback():
                return
    ended: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            keep = callback()
        except Exception as exc:
            keep = False
            if not ended.done():
                ended.set_exception(exc)
        if not keep:
            loop.remove_reader(sock)
            if not ended.done():
                ended.set_result(None)

    loop.add_reader(sock, on_readable)
    try:
        await ended
    finally:
        loop.remove_reader(sock)


def read_runs(
    read: Callable[[], tuple[Sequence[bytes], Address]],
    limit: int,
    drops: Counter[str],
    reason: str,
) -> list[tuple[Address, Sequence[bytes]]]:
    """What `read` (a `datagram_reader` of an unconnected socket) returns, run by run with
    the (host, port) it came from, until there is nothing left to read or at least `limit`
    datagrams came. A failed read counts toward `limit` and as a drop of `reason`; a socket
    that is gone raises."""
    runs: list[tuple[Address, Sequence[bytes]]] = []
    count = 0
    while count < limit:
        try:
            datagrams, address = read()
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno in SOCKET_GONE:
                raise
            drops[reason] += 1
            count += 1
            continue
        runs.append(((address[0], address[1]), datagrams))
        count += len(datagrams)
    return runs


def read_batch(read: Callable[[], tuple[Sequence[bytes], Address]], limit: int) -> list[bytes]:
    """What `read` (a `datagram_reader`) returns until there is nothing left to read or at
    least `limit` datagrams came. An ICMP error reported on a connected socket (the peer's
    port is closed, for now) is skipped."""
    datagrams: list[bytes] = []
    while len(datagrams) < limit:
        try:
            datagrams += read()[0]
        except BlockingIOError:
            break
        except ConnectionRefusedError:
            continue
    return datagrams


def _enable_gro(sock: socket.socket) -> bool:
    """Whether `sock` now hands over coalesced runs (Linux 5.0+; 4.18 and 4.19 have GSO only)."""
    if not (UDP_OFFLOAD and gso_available()):
        return False
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def udp_socket(host: str) -> socket.socket:
    """A socket of the family `host` (an IP literal) belongs to; see `new_udp_socket`."""
    return new_udp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def new_udp_socket(family: int) -> socket.socket:
    """A non-blocking UDP socket with large buffers: a burst that arrives while the loop is
    busy waits in the kernel instead of being dropped (Linux caps the size at
    net.core.rmem_max / wmem_max; raise those for high-rate relays)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_SOCKET_BUFFER)
    sock.setblocking(False)
    return sock


class UdpTransport:
    """A link's way out over a UDP socket, to `address` (None: the socket is connected).

    `send` never blocks: it returns False on a drop. A failed send is a lost datagram, as on
    the wire (a full buffer, an ICMP error, a closed socket); the link's counters say so.
    """

    __slots__ = ("_address", "_gso", "_sock")  # one per link

    def __init__(self, sock: socket.socket, address: Address | None) -> None:
        self._sock = sock
        self._address = address
        self._gso = UDP_OFFLOAD and gso_available()

    @property
    def segments(self) -> bool:
        """Whether runs of equal-size frames go out as one segmented send."""
        return self._gso

    def send(self, message: bytes) -> bool:
        try:
            if self._address is None:
                self._sock.send(message)
            else:
                self._sock.sendto(message, self._address)
        except OSError:
            return False
        return True

    def send_many(self, messages: list[bytes]) -> int:
        """`send` for each message in order; returns how many were sent."""
        if self._gso and len(messages) > 1:
            return self._send_runs(messages)
        return self._send_each(messages)

    def close(self) -> None:
        """The socket belongs to the listener or dialer that created it."""

    def _send_each(self, messages: list[bytes]) -> int:
        sent = len(messages)
        if self._address is None:
            send = self._sock.send
            for message in messages:
                try:
                    send(message)
                except OSError:
                    sent -= 1
        else:
            sendto, address = self._sock.sendto, self._address
            for message in messages:
                try:
                    sendto(message, address)
                except OSError:
                    sent -= 1
        return sent

    def _send_runs(self, messages: list[bytes]) -> int:
        """Each run of equal-size messages in one segmented `sendmsg`; a failed call loses
        its whole run, as a full buffer would have lost its datagrams one by one."""
        sendmsg = self._sock.sendmsg
        where = () if self._address is None else (self._address,)
        count = len(messages)
        sent = start = 0
        while start < count:
            size = len(messages[start])
            end = start + 1
            limit = min(count, start + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
            while end < limit and len(messages[end]) == size:
                end += 1
            if end - start == 1:
                sent += self._send_each(messages[start:end])
                start = end
                continue
            segment = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
            try:
                sendmsg(messages[start:end], segment, 0, *where)
            except OSError as error:
                if error.errno in _GSO_REFUSED:
                    self._gso = False
                    log.warning("udp_gso_refused", error=str(error), to=self._address)
                    return sent + self._send_each(messages[start:])
            else:
                sent += end - start
            start = end
        return sent
