"""Local dock sockets: applications on this host use the overlay through UDP sockets.

Each `[[apps]]` entry of the config binds a UDP socket (loopback unless allowed otherwise)
for one dock. An application sends datagrams to it, each with a small header, and receives
datagrams from it with the header of where to answer (docs/apps.md has the layout):

    to the node    HELLO 0 |                           deliver this dock's datagrams to me
                   SEND  1 | fingerprint (32) | dock u32 | data
                   REPLY 2 | endpoint (16) | data      answer an anonymous endpoint
    from the node  0 | data                            a datagram with no way to answer
                   1 | fingerprint (32) | dock u32 | data    a reply to what we sent there
                   2 | endpoint (16) | data           from an anonymous endpoint: REPLY to it

Every application address gets an anonymous endpoint of its own (a random id): what it sends
comes from that id, with reply blocks (core/packet.py) while the receiver needs them, and the
replies come back to it alone. The bookkeeping of blocks is core/endpoints.py.

The fast path: a wake-up reads a batch of datagrams from an app socket (the reader of
runtime/udp.py), the onions and reply blocks are built on two threads as peeling is
(`offload`, the node's `ParallelPeeler.map_all`), and the frames go out through the node's
relay path (`originate`), so they are counted per link and priced like all traffic. Drops
are counted by reason: an unknown destination (`no_route`), no reply block left for an
endpoint (`no_reply_block`), no application listening (`no_app`), an application's socket
buffer full (`app_queue_full`), a bad header (`app_bad_header`), oversize data
(`app_too_big`), a reply through a block we do not know or no longer hold (`unknown_reply`).

Only the node's own user may use an app socket: on Linux, the owner of the socket a new
application address sends from is looked up in /proc/net/udp (and udp6), and datagrams from
another user's socket are dropped (`app_other_user`), HELLO included, so that another account
on the host can neither send as this node, spending its money, nor read a dock's datagrams.
The verdict is kept OWNER_CHECK_SECS per address. Elsewhere, and with `allow_remote` (whose
senders are not on this host), being able to reach the address is all it takes.

This service knows the node only through the callables it is given; it imports no `Node`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
import structlog

from earendil_py.core.endpoints import (
    Conversation,
    HeldBlocks,
    Holder,
    SentBlocks,
    WaitingAnswers,
)
from earendil_py.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from earendil_py.core.graph import RelayGraph
from earendil_py.core.link import onion_frame
from earendil_py.core.packet import (
    ReplyArrived,
    ReplyOpener,
    build_packet,
    build_reply_block,
    open_reply,
    use_reply_block,
)
from earendil_py.core.relay import (
    ENDPOINT_SIZE,
    MAX_ANONYMOUS_DATA,
    MAX_ANONYMOUS_DATA_WITH_BLOCK,
    MAX_REPLY_DATA,
    Datagram,
    ReplyBlocks,
    decode_reply,
    encode_anonymous,
    encode_reply,
)
from earendil_py.runtime.config import AppConfig, parse_address
from earendil_py.runtime.faults import Faults
from earendil_py.runtime.udp import datagram_reader, read_runs, udp_socket

log = structlog.get_logger("earendil_py.apps")

HELLO, SEND, REPLY = 0, 1, 2  # what an application sends
NO_REPLY, FROM_DESTINATION, FROM_ANONYMOUS = 0, 1, 2  # what it receives
DESTINATION = struct.Struct(">B32sI")  # kind, fingerprint, dock
ANONYMOUS = struct.Struct(f">B{ENDPOINT_SIZE}s")  # kind, endpoint
APP_BATCH = 64  # datagrams read from an app socket per wake-up
MAX_CLIENTS = 64  # application addresses per app socket, each with its own endpoint (LRU)
RANDOM_DRAW = 4096  # bytes read from the OS's CSPRNG at a time, per thread
# How long the owner found for an application address holds: a port closed and bound again
# by someone else gets looked up again within this time.
OWNER_CHECK_SECS = 10.0
_PROC_TABLES = {socket.AF_INET: Path("/proc/net/udp"), socket.AF_INET6: Path("/proc/net/udp6")}

Address = tuple[str, int]
Route = list[tuple[bytes, bytes]]
# Routes chosen for one batch: (from, to, hops) -> route, or None when there is none.
Routes = dict[tuple[bytes, bytes, int], Route | None]
# A message to build (`_build_message`): route, reply route, dock, endpoint, data.
_Job = tuple[Route, Route | None, int, bytes, bytes | None]
T = TypeVar("T")
R = TypeVar("R")


class Offload(Protocol):
    """Runs `function` over `items`, possibly on two threads; results in order."""

    def __call__(self, function: Callable[[T], R], items: list[T], /) -> list[R]: ...


@dataclass(slots=True)
class AppSocket:
    """One `[[apps]]` entry, bound."""

    config: AppConfig
    sock: socket.socket
    address: Address
    receiver: Address | None = None  # the application that said HELLO last
    clients: OrderedDict[Address, bytes] = field(default_factory=OrderedDict)  # LRU
    # Application address -> (sends from a socket of ours, when that was looked up); LRU.
    owners: OrderedDict[Address, tuple[bool, float]] = field(default_factory=OrderedDict)


class _Sent(msgspec.Struct, frozen=True, gc=False):
    """What came back from building one message: its frame, and its block's opener."""

    frame: bytes
    opener: ReplyOpener | None


class Apps:
    """The node's app sockets. `originate(frames, now)` sends onion frames we built through
    the node's relay path; `offload` builds them (see the module docstring)."""

    def __init__(
        self,
        configs: Sequence[AppConfig],
        *,
        fingerprint: bytes,
        graph: RelayGraph,
        originate: Callable[[list[bytes], float], None],
        offload: Offload,
        faults: Faults,
        source: Path,
    ) -> None:
        self._configs = list(configs)
        self._fingerprint = fingerprint
        self._graph = graph
        self._originate = originate
        self._offload = offload
        self._source = source
        self.sockets: dict[int, AppSocket] = {}  # by dock
        self._endpoints: dict[bytes, tuple[AppSocket, Address]] = {}
        self.sent = SentBlocks()
        self.held = HeldBlocks()
        self.drops: Counter[str] = Counter()
        # Replies' reports of what their senders still hold: (app, conversation, remaining).
        self._reports: list[tuple[AppSocket, Conversation, int]] = []
        self.waiting = WaitingAnswers()
        self._unblocked: set[Holder] = set()  # holders with answers waiting that got blocks
        self._work_due = anyio.Event()
        self._boundary = faults.boundary(self.drops, "apps")

    def serves(self, dock: int) -> bool:
        """Whether datagrams to `dock` go to an app socket (else to the control API)."""
        return dock in self.sockets

    def bind(self) -> None:
        """Bind every app socket. Raises ConfigError naming the entry if one cannot be."""
        for index, config in enumerate(self._configs):
            if config.dock in self.sockets:
                continue
            host, port = parse_address(config.listen)
            sock = udp_socket(host)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise ConfigError(
                    f"{self._source}: apps[{index}].listen: cannot listen on {config.listen}: "
                    f"{exc.strerror or exc}"
                ) from None
            bound = sock.getsockname()
            self.sockets[config.dock] = AppSocket(config, sock, (bound[0], bound[1]))

    async def run(self) -> None:
        """Serve every bound app socket until cancelled; closes them at the end. Raises
        OSError if a socket is gone."""
        try:
            async with anyio.create_task_group() as tg:
                for app in self.sockets.values():
                    tg.start_soon(self._serve, app)
                    log.info(
                        "app_socket",
                        listen=f"{app.address[0]}:{app.address[1]}",
                        dock=app.config.dock,
                    )
                tg.start_soon(self._work_forever)
        finally:
            for app in self.sockets.values():
                app.sock.close()

    # --- from the overlay ------------------------------------------------------------------

    def deliver(self, message: Datagram | ReplyBlocks, now: float) -> None:
        """A datagram or reply blocks that arrived for one of our docks (`serves`)."""
        app = self.sockets[message.dock]
        if message.endpoint is not None and message.reply_blocks:
            holder = (message.dock, message.endpoint)
            self.held.add(holder, message.reply_blocks, now)
            if holder in self.waiting:
                self._unblocked.add(holder)
                self._work_due.set()
        if isinstance(message, ReplyBlocks):
            return
        if app.receiver is None:
            self.drops["no_app"] += 1
            return
        if message.endpoint is None:
            head = bytes([NO_REPLY])
        else:
            head = ANONYMOUS.pack(FROM_ANONYMOUS, message.endpoint)
        self._send_to_app(app, app.receiver, head + message.data)

    def on_reply(self, reply: ReplyArrived, now: float) -> None:
        """A reply that came back through one of our reply blocks."""
        found = self.sent.pop(reply.replay_tag, now)
        if found is None:
            self.drops["unknown_reply"] += 1
            return
        conversation, opener = found
        try:
            remaining, data = decode_reply(open_reply(opener, reply.body))
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return
        endpoint, fingerprint, dock = conversation
        client = self._endpoints.get(endpoint)
        if client is None:
            self.drops["app_gone"] += 1
            return
        app, address = client
        self._send_to_app(
            app, address, DESTINATION.pack(FROM_DESTINATION, fingerprint, dock) + data
        )
        self._reports.append((app, conversation, remaining))
        self._work_due.set()

    # --- from applications ---------------------------------------------------------------

    async def _serve(self, app: AppSocket) -> None:
        read = datagram_reader(app.sock)
        while True:
            await anyio.wait_readable(app.sock)
            now = anyio.current_time()
            runs = read_runs(read, APP_BATCH, self.drops, "app_error")
            # One application's bad batch (a bug it triggers) costs that batch alone.
            with self._boundary:
                self._receive(app, runs, now)
            await anyio.lowlevel.checkpoint()

    def _receive(
        self, app: AppSocket, runs: list[tuple[Address, Sequence[bytes]]], now: float
    ) -> None:
        jobs: list[_Job] = []
        conversations: list[Conversation] = []
        frames: list[bytes] = []
        # Blocks each conversation still wants, counted down as this batch ships them: the
        # estimate only changes when one is added.
        wanted: dict[Conversation, int] = {}
        routes: Routes = {}
        for address, datagrams in runs:
            # The sender's verdict and endpoint hold for its whole run.
            if not self._ours(app, address, now):
                self.drops["app_other_user"] += len(datagrams)
                continue
            endpoint = None  # made at the run's first SEND
            for data in datagrams:
                kind = data[0] if data else -1
                if kind == SEND and len(data) >= DESTINATION.size:
                    _, fingerprint, dock = DESTINATION.unpack_from(data)
                    if endpoint is None:
                        endpoint = self._endpoint(app, address)
                    conversation = (endpoint, fingerprint, dock)
                    data = data[DESTINATION.size :]
                    job = self._send_job(
                        app, conversation, data, wanted=wanted, routes=routes, now=now
                    )
                    if job is not None:
                        jobs.append(job)
                        conversations.append(conversation)
                elif kind == REPLY and len(data) >= ANONYMOUS.size:
                    frame = self._reply(app, data[1 : ANONYMOUS.size], data[ANONYMOUS.size :], now)
                    if frame is not None:
                        frames.append(frame)
                elif kind == HELLO:
                    app.receiver = address
                else:
                    self.drops["app_bad_header"] += 1
        if jobs:
            built = self._offload(_build_message, jobs)
            for sent, conversation in zip(built, conversations, strict=True):
                frames.append(sent.frame)
                if sent.opener is not None:
                    self.sent.add(conversation, sent.opener, now)
        if frames:
            self._originate(frames, now)

    def _send_job(
        self,
        app: AppSocket,
        conversation: Conversation,
        data: bytes,
        *,
        wanted: dict[Conversation, int],
        routes: Routes,
        now: float,
    ) -> _Job | None:
        endpoint, fingerprint, dock = conversation
        if len(data) > MAX_ANONYMOUS_DATA:
            self.drops["app_too_big"] += 1
            return None
        route = self._route(self._fingerprint, fingerprint, app.config.hops, routes)
        if route is None:
            self.drops["no_route"] += 1
            return None
        reply_route = None
        if len(data) <= MAX_ANONYMOUS_DATA_WITH_BLOCK:
            blocks = wanted.get(conversation)
            if blocks is None:
                blocks = wanted[conversation] = self.sent.wanted(conversation, now)
            if blocks:
                reply_route = self._reply_route(fingerprint, app.config.hops, routes)
                if reply_route is not None:
                    wanted[conversation] = blocks - 1
        return route, reply_route, dock, endpoint, data

    def _route(self, source: bytes, destination: bytes, hops: int, routes: Routes) -> Route | None:
        """A route of `hops` peelers, chosen once per batch: the datagrams of one wake-up
        leave together, so routes of their own would hide nothing from timing, and would
        show the sender to more relays. None if the graph knows none."""
        key = (source, destination, hops)
        if key not in routes:
            try:
                routes[key] = self._graph.choose_route(source, destination, hops, _urandom)
            except LocalProtocolError:
                routes[key] = None
        return routes[key]

    def _reply_route(self, fingerprint: bytes, hops: int, routes: Routes) -> Route | None:
        """A return route from `fingerprint` to us with at least one relay before us: with
        none, the block's first peeler would be this node, named to the replier."""
        route = self._route(fingerprint, self._fingerprint, hops, routes)
        return route if route is not None and len(route) >= 2 else None

    def _reply(self, app: AppSocket, endpoint: bytes, data: bytes, now: float) -> bytes | None:
        """The frame that answers `endpoint` with `data`, or None: too big (dropped), or no
        block for it yet (waiting for one, or dropped if too many wait)."""
        if len(data) > MAX_REPLY_DATA:
            self.drops["app_too_big"] += 1
            return None
        holder = (app.config.dock, endpoint)
        if holder in self.waiting:  # answers leave in the order they were given
            self.waiting.add(holder, data, now)
            return None
        return self._answer(holder, data, now)

    def _answer(self, holder: Holder, data: bytes, now: float) -> bytes | None:
        taken = self.held.pop(holder, now)
        if taken is None:
            self.waiting.add(holder, data, now)
            return None
        block, remaining = taken
        # Answers still waiting: say we hold none, so that the sender sends more.
        remaining = 0 if holder in self.waiting else remaining
        return onion_frame(*use_reply_block(block, encode_reply(remaining, data)))

    def _release_waiting(self, now: float) -> list[bytes]:
        """Frames for the answers whose endpoints got blocks since."""
        frames: list[bytes] = []
        unblocked, self._unblocked = self._unblocked, set()
        for holder in unblocked:
            while self.held.count(holder, now):
                data = self.waiting.take(holder, now)
                if data is None:
                    break
                frame = self._answer(holder, data, now)
                assert frame is not None  # a block was there
                frames.append(frame)
        return frames

    async def _work_forever(self) -> None:
        """What replies and reply blocks that arrived ask for, done outside the relay loop
        that delivered them: send the blocks replies asked for (building one costs as much
        as a message), and the answers that were waiting for blocks."""
        while True:
            await self._work_due.wait()
            self._work_due = anyio.Event()
            now = anyio.current_time()
            with self._boundary:
                frames = self._release_waiting(now)
                if frames:
                    self._originate(frames, now)
            reports, self._reports = self._reports, []
            jobs: list[_Job] = []
            conversations: list[Conversation] = []
            pending: Counter[Conversation] = Counter()
            routes: Routes = {}
            for app, conversation, remaining in reports:
                endpoint, fingerprint, dock = conversation
                route = self._route(self._fingerprint, fingerprint, app.config.hops, routes)
                reply_route = self._reply_route(fingerprint, app.config.hops, routes)
                if route is None or reply_route is None:
                    self.drops["no_route"] += 1
                    continue
                count = self.sent.refills(conversation, remaining, now, pending[conversation])
                pending[conversation] += count
                jobs += [(route, reply_route, dock, endpoint, None)] * count
                conversations += [conversation] * count
            with self._boundary:
                sent = self._offload(_build_message, jobs)
                for built, conversation in zip(sent, conversations, strict=True):
                    assert built.opener is not None
                    self.sent.add(conversation, built.opener, now)
                if sent:
                    self._originate([built.frame for built in sent], now)

    # --- applications' addresses -----------------------------------------------------------

    def _ours(self, app: AppSocket, address: Address, now: float) -> bool:
        """Whether `address` sends from a socket of the node's own user (see the module
        docstring); looked up at most once per OWNER_CHECK_SECS per address."""
        if app.config.allow_remote:
            return True
        known = app.owners.get(address)
        if known is not None and now - known[1] < OWNER_CHECK_SECS:
            return known[0]
        owner = socket_owner(address)
        unknowable = owner is None and not _PROC_TABLES[socket.AF_INET].exists()
        ours = unknowable or owner == os.getuid()
        if len(app.owners) >= MAX_CLIENTS and address not in app.owners:
            app.owners.popitem(last=False)
        app.owners[address] = (ours, now)
        app.owners.move_to_end(address)
        return ours

    def _endpoint(self, app: AppSocket, address: Address) -> bytes:
        """The anonymous endpoint of the application at `address`: made on first use, the
        least recently used forgotten beyond MAX_CLIENTS (its replies then find no one)."""
        endpoint = app.clients.get(address)
        if endpoint is not None:
            app.clients.move_to_end(address)
            return endpoint
        if len(app.clients) >= MAX_CLIENTS:
            _, old = app.clients.popitem(last=False)
            del self._endpoints[old]
        endpoint = _urandom(ENDPOINT_SIZE)
        app.clients[address] = endpoint
        self._endpoints[endpoint] = (app, address)
        return endpoint

    def _send_to_app(self, app: AppSocket, address: Address, datagram: bytes) -> None:
        try:
            app.sock.sendto(datagram, address)
        except (BlockingIOError, InterruptedError):
            self.drops["app_queue_full"] += 1
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.drops["app_queue_full"] += 1
            else:
                self.drops["app_send_failed"] += 1

    def drop_counts(self) -> Counter[str]:
        return self.drops + self.waiting.drops

    def statistics(self) -> dict[str, Any]:
        sent, held = self.sent.statistics(), self.held.statistics()
        return {
            "sockets": {
                str(dock): {
                    "listen": _show_address(app.address),
                    "clients": len(app.clients),
                    "receiver": _show_address(app.receiver),
                }
                for dock, app in self.sockets.items()
            },
            "reply_blocks_given": sent.openers,
            "reply_blocks_held": held.blocks,
        }


class _RandomBuffer(threading.local):
    data: bytes = b""
    used: int = 0


_random_buffer = _RandomBuffer()


def _urandom(size: int) -> bytes:
    """`os.urandom(size)`, read from the OS RANDOM_DRAW bytes at a time by each thread.

    A datagram needs randomness five times or more (the route's shuffle, an ephemeral key
    per hop, padding), and each `os.urandom` call lets go of the GIL: with two threads
    building onions, each of those is a hand-over of the GIL, which cost more than the
    onion's own X25519 work in the profile. The bytes are the OS's, each used once, by the
    thread that read them; until then they wait in this process's memory, where the keys made
    of them live anyway. (The node does not fork, so no two processes share a buffer.)"""
    buffer = _random_buffer
    if buffer.used + size > len(buffer.data):
        if size > RANDOM_DRAW:
            return os.urandom(size)
        buffer.data, buffer.used = os.urandom(RANDOM_DRAW), 0
    start = buffer.used
    buffer.used = start + size
    return buffer.data[start : buffer.used]


def socket_owner(address: Address) -> int | None:
    """The user id owning the UDP socket bound to `address` on this host, from Linux's
    /proc/net/udp and udp6 (a socket bound to the wildcard address counts, and an IPv6 one
    taking IPv4); None if there is none, or the system does not say."""
    host, port = address
    if ":" in host:
        tables = [(socket.AF_INET6, {_proc_hex(socket.AF_INET6, host), "0" * 32})]
    else:
        v4 = {_proc_hex(socket.AF_INET, host), "0" * 8}
        v6 = {_proc_hex(socket.AF_INET6, "::ffff:" + host), "0" * 32}
        tables = [(socket.AF_INET, v4), (socket.AF_INET6, v6)]
    for family, addresses in tables:
        try:
            lines = _PROC_TABLES[family].read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            local, _, local_port = fields[1].partition(":")
            if local in addresses and int(local_port or "0", 16) == port:
                return int(fields[7])
    return None


def _proc_hex(family: int, host: str) -> str:
    """`host` as /proc/net prints it: 32-bit words in host byte order, in hex."""
    packed = socket.inet_pton(family, host)
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    if sys.byteorder == "little":
        words = [word[::-1] for word in words]
    return b"".join(words).hex().upper()


def _show_address(address: Address | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _build_message(job: _Job) -> _Sent:
    """One message from an anonymous endpoint (`data` None: reply blocks alone), with a reply
    block for `reply_route` if given. Runs on either of two threads: pure but for urandom."""
    route, reply_route, dock, endpoint, data = job
    opener = None
    blocks = []
    if reply_route is not None:
        block, opener = build_reply_block(reply_route, _urandom)
        blocks.append(block)
    payload = encode_anonymous(dock, endpoint, blocks, data)
    return _Sent(onion_frame(*build_packet(route, payload, _urandom)), opener)
