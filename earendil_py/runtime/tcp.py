"""TCP sockets for links: messages read from the event loop's poll and sent straight away.

A stream link's messages are length-prefixed (`core.link.frame_for_stream`). Reading, the
link's code runs from the loop's poll (`udp.call_when_readable`), as a UDP socket's does.
Sending, the relay's code writes to the socket itself; only what the kernel does not take at
once waits in the transport, for its own task (`TcpTransport.run`), bounded in bytes.

anyio's socket streams cost a relayed message more than the relaying: a task woken to read,
with the socket taken out of epoll and put back on every read (`resume_reading` and
`pause_reading` of asyncio's transport), a task woken through a queue to write, and a
checkpoint in the write: three loop iterations and four system calls more per hop. Behind
each of them the message waits for whatever else the loop has to do, and on a loaded machine
those waits were most of a network's latency (bench/network.py).
"""

from __future__ import annotations

import errno
import os
import socket

import anyio

from earendil_py.core.link import frame_for_stream

Address = tuple[str, int]

TCP_QUEUE_BYTES = 1 << 20  # held per connection beyond what the kernel took; more is dropped
READ_SIZE = 1 << 16  # bytes read per wake-up


def _stream_socket(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a message is a packet
    return sock


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking socket connected to (host, port), each address tried in turn. Raises
    the last address's OSError (ConnectionRefusedError when nothing listens)."""
    failure: OSError | None = None
    for family, _, _, _, address in await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _stream_socket(socket.socket(family, socket.SOCK_STREAM))
        try:
            code = sock.connect_ex(address)
            if code == errno.EINPROGRESS:
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure or OSError(errno.EADDRNOTAVAIL, f"no address for {host}")


async def accept_tcp(listening: socket.socket) -> tuple[socket.socket, Address]:
    """The next connection on a listening socket. Raises what `accept` raises but
    BlockingIOError."""
    while True:
        await anyio.wait_readable(listening)
        try:
            sock, address = listening.accept()
        except BlockingIOError:
            continue  # another waiter took it, or the peer reset it meanwhile
        return _stream_socket(sock), (str(address[0]), int(address[1]))


class TcpTransport:
    """A stream link's way out. `send_many` writes to the socket at once; what the kernel does
    not take waits here for `run`, and while anything waits, new messages join it, up to
    TCP_QUEUE_BYTES (beyond, they are dropped: `send_many` says how many it took). A message
    is never cut short: the stream would not resynchronise."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._wake = anyio.Event()
        self._closing = False
        self._error: OSError | None = None

    def send(self, message: bytes) -> bool:
        return self.send_many([message]) == 1

    def send_many(self, messages: list[bytes]) -> int:
        """Send each message in order; returns how many were sent or queued."""
        if self._closing or self._error is not None:
            return 0
        framed = [frame_for_stream(message) for message in messages]
        if self._waiting:
            taken = 0
            for piece in framed:
                if self._waiting_bytes + len(piece) > TCP_QUEUE_BYTES:
                    break
                self._waiting.append(piece)
                self._waiting_bytes += len(piece)
                taken += 1
            return taken
        self._waiting = framed
        self._send_waiting()
        if self._error is not None:
            return 0
        if self._waiting:
            self._wake.set()
        return len(messages)

    def close(self) -> None:
        """No more messages: `run` returns once what waits is sent."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Send what waits whenever something does, until closed and all of it is sent.
        Raises the OSError that broke the connection."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._error is None and self._waiting:
                await anyio.wait_writable(self._sock)
                self._send_waiting()
            if self._error is not None:
                raise self._error
            if self._closing:
                return

    def _send_waiting(self) -> None:
        data = self._waiting[0] if len(self._waiting) == 1 else b"".join(self._waiting)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # reset: the reader sees it too
            self._error = exc
            self._wake.set()
            sent = len(data)
        self._waiting = [data[sent:]] if sent < len(data) else []
        self._waiting_bytes = len(data) - sent
