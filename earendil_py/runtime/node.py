"""The node: listens on every in_route, dials every out_route, and keeps the link table.

Each link is a sans-IO `core.link.Link` driven by a `LinkRunner`: datagrams in, timers fired,
datagrams out, events logged. UDP uses non-blocking sockets drained in batches on each
wake-up (the hot path reads many datagrams per await); TCP uses non-blocking sockets too
(`runtime/tcp.py`), with a u16 length prefix per message and a bounded outgoing queue per
connection.

Fault boundaries (`runtime/faults.py`): whatever a peer's input makes fail ends at most its
connection or link. A link's entry points (`LinkRunner.receive`, its timers, `send_control`)
close that link on any exception; one control message, one relay batch, one accepted
connection, one dial and one task started for a neighbour are boundaries of their own. What
has not proven itself is bounded: TCP connections before their handshake completes (globally,
per source, and in time), UDP sessions (`core.link.Endpoint`), and neighbours.
"""

from __future__ import annotations

import errno
import math
import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.stapled import MultiListener

from earendil_py import __version__
from earendil_py.core.errors import ConfigError, RemoteProtocolError
from earendil_py.core.graph import RelayGraph
from earendil_py.core.identity import Identity, parse_fingerprint, short_hex
from earendil_py.core.link import (
    DATA,
    DATA_HEADER,
    FINGERPRINT_SIZE,
    HS_INIT,
    TAG_SIZE,
    U32,
    ControlReceived,
    Endpoint,
    Link,
    LinkClosed,
    LinkEstablished,
    LinkState,
    LinkStatistics,
    LinkTimers,
    StreamDecoder,
    check_mac1,
    derive_cookie_keys,
    message_type,
    onion_frame,
    source_key,
)
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    DockMessage,
    decode_control,
    encode_control,
)
from earendil_py.core.neighbor import Neighbor
from earendil_py.core.packet import ReplyArrived, build_packet
from earendil_py.core.relay import Datagram, Peeler, encode_datagram
from earendil_py.core.rpc import DEFAULT_MAX_NEIGHBORS
from earendil_py.runtime.apps import Apps
from earendil_py.runtime.chat import Chat
from earendil_py.runtime.config import (
    RESTART_FIELDS,
    Config,
    InRoute,
    OutRoute,
    PriceConfig,
    diff_configs,
    parse_address,
    route_keys,
)
from earendil_py.runtime.control import build_router
from earendil_py.runtime.faults import Faults
from earendil_py.runtime.gossip import Gossip
from earendil_py.runtime.history import History
from earendil_py.runtime.http import ControlAuth, HttpServer, token_path, write_token_file
from earendil_py.runtime.neighbors import Neighbors
from earendil_py.runtime.peeling import ParallelPeeler, usable_cpus
from earendil_py.runtime.routes import NO_REPLY, RouteInfo, RouteTable
from earendil_py.runtime.rpc import GlobalRpc
from earendil_py.runtime.store import AsyncLedger
from earendil_py.runtime.tcp import READ_SIZE, TcpTransport, accept_tcp, connect_tcp
from earendil_py.runtime.timers import TimerQueue
from earendil_py.runtime.udp import (
    SOCKET_GONE,
    UdpTransport,
    call_when_readable,
    datagram_reader,
    new_udp_socket,
    read_batch,
    read_runs,
    udp_socket,
)

log = structlog.get_logger("earendil_py.node")

T = TypeVar("T")

UDP_BATCH = 64  # datagrams drained per wake-up before yielding (a coalesced read may pass it)
PEEL_CHUNK = 16  # layers peeled before they are sent on (relay_batch)
DEFAULT_HOPS = 3  # peelers per route, the destination included
MAX_DOCKS = 256  # docks holding undelivered datagrams
DOCK_QUEUE = 4096  # undelivered datagrams kept per dock; more are dropped and counted
SHUTDOWN_GRACE = 1.0  # seconds to flush CLOSE frames on shutdown
# TCP connections that have not completed a handshake, in all and from one source
# (`source_key`); one more is closed at once and counted (`tcp_pending_full`).
MAX_PENDING_TCP = 256
MAX_PENDING_TCP_PER_SOURCE = 16
# A TCP connection is closed unless its link is established this long after accept (or after
# the configured `dead_after_secs`, if that is shorter).
TCP_HANDSHAKE_SECS = 10.0
# Distinct neighbours with a link up; a link-up beyond is refused. The RPC cache derives its
# total bound from this (core/rpc.py), so it is the one number to change.
MAX_NEIGHBORS = DEFAULT_MAX_NEIGHBORS
# accept() failing for want of a resource (descriptors, buffers, memory): wait this long,
# doubling up to ACCEPT_BACKOFF_MAX, rather than spin; a success resets it.
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
# Onion frames held from a neighbour that is being priced (`Neighbor.pricing`), from one link
# and in all: its first packets may overtake our acceptance's commit. More are dropped.
HELD_PER_LINK = 64
HELD_FRAMES = 512

Address = tuple[str, int]
_NEXT_PEELER_END = 1 + FINGERPRINT_SIZE  # an onion frame: kind byte, next peeler, packet
# `relay_batch`'s "not looked up yet": a list of its own, never appended to.
_NO_LANE: list[bytes] = []
_DATA_MIN_SIZE = DATA_HEADER.size + TAG_SIZE  # what `receiver_index` needs to read a DATA index


@dataclass(slots=True)
class RelayStatistics:
    originated: int = 0  # onion packets we built
    forwarded: int = 0  # packets relayed toward another peeler without onion crypto
    peeled: int = 0  # layers we peeled (packets addressed to us as next peeler)
    delivered: int = 0  # datagrams that ended here


class Transport(Protocol):
    """Where a link's outgoing messages go. Sending never blocks: `send` returns False on a
    drop, `send_many` how many of its messages, in order, were not dropped."""

    def send(self, message: bytes) -> bool: ...

    def send_many(self, messages: list[bytes]) -> int: ...

    def close(self) -> None: ...


class PendingHandshakes:
    """TCP connections whose link is not established yet, bounded in all and per source.

    `admit` gives a slot, or None when a bound is reached; a slot is released once, when its
    link is established or its connection ends, whichever comes first.
    """

    def __init__(self, limit: int, per_source: int) -> None:
        self._limit = limit
        self._per_source = per_source
        self._count = 0
        self._by_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._count

    def admit(self, host: str) -> PendingSlot | None:
        source = source_key(host)
        if self._count >= self._limit or self._by_source[source] >= self._per_source:
            return None
        self._count += 1
        self._by_source[source] += 1
        return PendingSlot(self, source)

    def _release(self, source: str) -> None:
        self._count -= 1
        self._by_source[source] -= 1
        if not self._by_source[source]:
            del self._by_source[source]


class PendingSlot:
    """One admitted connection's place in `PendingHandshakes`; `release` is idempotent."""

    def __init__(self, owner: PendingHandshakes, source: str) -> None:
        self._owner: PendingHandshakes | None = owner
        self._source = source

    def release(self) -> None:
        if self._owner is not None:
            self._owner._release(self._source)
            self._owner = None


class LinkRunner:
    """Drives one `Link`: feeds it input, fires its timers, sends its output, logs events.

    Its entry points (`receive`, its timer, `send_control`) are the link's fault boundary:
    any exception in them, or in what they call up into (link-up, control messages), closes
    this link with the reason counted (`internal_error` for a bug) and nothing else.

    The link's timers are served by the node's `TimerQueue`, not by a task of the link's own:
    a UDP session costs no task at all (docs/benchmarks.md, bench/links.py).
    """

    __slots__ = (
        "_closed",
        "_closed_event",
        "_ending",
        "_refused",
        "_state",
        "boundary",
        "handshake_deadline",
        "link",
        "neighbor",
        "node",
        "on_finish",
        "peer_address",
        "pending",
        "route",
        "timer",
        "transport",
        "unanswered",
        "was_established",
    )

    def __init__(
        self,
        node: Node,
        link: Link,
        transport: Transport,
        route: RouteInfo,
        peer_address: Address,
    ) -> None:
        self.node = node
        self.link = link
        self.transport = transport
        self.route = route
        self.peer_address = peer_address
        self.was_established = False
        # The neighbour's state machine: its counters are the relay loop's, bumped once per
        # batch, and its allowance gates every batch. Set once the link is up and the
        # neighbour restored; until then nothing passes either way.
        self.neighbor: Neighbor | None = None
        self._closed = False
        self._closed_event: anyio.Event | None = None  # made for whoever waits on `closed`
        # Set by a listener for a link it accepted (`limit_handshake`): closed unless
        # established by then, and its place among the connections still handshaking,
        # freed at link-up.
        self.handshake_deadline = math.inf
        self.pending: PendingSlot | None = None
        # Called once when the link is finished (a UDP listener forgets its session).
        self.on_finish: Callable[[LinkRunner], None] | None = None
        self._ending = False
        # A UDP dial's handshake unanswered so far: why (`NO_REPLY`, or `connection_refused`
        # when the neighbour's host said its port is closed since the last retransmission).
        self.unanswered: str | None = None
        self._refused = False
        self._state = link.state
        self.boundary = node.faults.boundary(link.statistics().drops, "link", self.fail)
        self.timer = node.timer_queue.add(self._deadline, self._on_timer)
        self._logger().debug(
            "handshake_started",
            peer=f"{peer_address[0]}:{peer_address[1]}",
            initiator=link.initiator,
        )

    @property
    def closed(self) -> anyio.Event:
        """Set once the link is finished."""
        if self._closed_event is None:
            self._closed_event = anyio.Event()
            if self._closed:
                self._closed_event.set()
        return self._closed_event

    def limit_handshake(self, deadline: float, slot: PendingSlot) -> None:
        """Close the link unless it is established by `deadline`; `slot` is released at
        link-up or close."""
        self.handshake_deadline, self.pending = deadline, slot
        self.timer.update()

    @property
    def peer_fingerprint(self) -> bytes | None:
        return self.link.peer_fingerprint

    @property
    def peer_identity_public(self) -> bytes | None:
        return self.link.peer_identity_public

    @property
    def packets_sent(self) -> int:
        """Onion packets sent to this neighbour (its account's count, on every link to it)."""
        return self.neighbor.counters.packets_out if self.neighbor is not None else 0

    @property
    def packets_received(self) -> int:
        return self.neighbor.counters.packets_in if self.neighbor is not None else 0

    def attach(self, neighbor: Neighbor) -> None:
        self.neighbor = neighbor

    def statistics(self) -> LinkStatistics:
        return self.link.statistics()

    def receive(self, messages: list[bytes], now: float) -> list[bytes]:
        """Feed messages to the link; returns the onion frames among them (none if the
        link failed on them: then it is closed)."""
        with self.boundary:
            frames = self.link.receive_datagrams(messages, now)
            if self.link.wants_service:
                self.service(now)
            return frames
        return []

    def send(self, message: bytes) -> bool:
        if self.transport.send(message):
            return True
        self.link.statistics().drops["send_failed"] += 1
        return False

    def send_control(self, payload: bytes) -> bool:
        """Send one CONTROL frame on this (established) link now; False if it is not up."""
        if self.link.state is not LinkState.ESTABLISHED:
            return False
        with self.boundary:
            self.link.send_control(payload)
            self.service(anyio.current_time())
            return True
        return False

    def take(self, frames: list[bytes]) -> list[bytes]:
        """The batch of onion frames that arrived from this neighbour, less what its price
        agreement and debt limit refuse (dropped and counted, and the neighbour told in
        time); what is taken is counted in its account."""
        neighbor = self.neighbor
        allowed = neighbor.inbound_allowance() if neighbor is not None else 0
        if allowed < len(frames):
            refused = len(frames) - allowed
            if neighbor is not None and neighbor.pricing:  # priced within milliseconds
                refused -= self.node.hold(self, frames[allowed:])
            if refused:
                self._refuse(neighbor, refused, outbound=False)
            frames = frames[:allowed]
        if neighbor is not None:
            neighbor.counters.packets_in += len(frames)
        return frames

    def send_onions(self, frames: list[bytes]) -> None:
        """Send a batch of encrypted onion frames and count them once, in the neighbour's
        account. Frames beyond what its price agreement, its debt limit and our outbound
        lease allow are dropped and counted."""
        neighbor = self.neighbor
        allowed = neighbor.outbound_allowance() if neighbor is not None else 0
        if allowed < len(frames):
            self._refuse(neighbor, len(frames) - allowed, outbound=True)
            frames = frames[:allowed]
        sent = self.transport.send_many(frames)
        if neighbor is not None and sent:
            counters = neighbor.counters
            counters.packets_out += sent
            if counters.packets_out >= neighbor.wake_mark:  # settle, or raise the lease
                self.node.accounts.wake(neighbor.fingerprint)
        if sent != len(frames):
            self.link.statistics().drops["queue_full"] += len(frames) - sent

    def _refuse(self, neighbor: Neighbor | None, count: int, *, outbound: bool) -> None:
        reason = neighbor.refusal(outbound=outbound) if neighbor is not None else "not_priced"
        self.link.statistics().drops[reason + "_out" if outbound else reason] += count
        if neighbor is not None and not outbound and not neighbor.refusing:
            neighbor.refusing = True  # it is told, at most every so often
            self.node.accounts.wake(neighbor.fingerprint)

    def service(self, now: float) -> None:
        """Send what the link queued and act on its events. Its timer may have moved
        earlier only then (a handshake flight armed a retransmission, the link came up and
        keeps alive from now on), so it is looked at here."""
        for message in self.link.datagrams_to_send():
            self.send(message)
        self.timer.update()
        if self.link.state is not self._state:
            self._state = self.link.state
            if self._state is LinkState.PROVING:  # Noise done; identities are proven next
                self._logger().debug("handshake_keys_agreed")
        while (event := self.link.next_event()) is not None:
            match event:
                case LinkEstablished():
                    if self.pending is not None:
                        self.pending.release()
                    if not self.node.add_link(self):
                        self.link.close("too_many_neighbors", now)
                        continue
                    self.was_established = True
                    self.node.routes.link_up(self.route)
                    peer = f"{self.peer_address[0]}:{self.peer_address[1]}"
                    self._logger().info("link_up", peer=peer)
                case LinkClosed(reason=reason, by_peer=by_peer):
                    self._finish(reason, by_peer)
                case ControlReceived(payload=payload):
                    self.node.on_control(self, payload)

    def fail(self, reason: str) -> None:
        """Close the link: its transport is gone (EOF, reset), the node stops, or a fault in
        its path. Tells the peer if the link still can. Never raises: a fault while closing
        (the one that ended it, recurring) is counted and the link is forgotten all the same."""
        if self._ending or self._closed:
            return
        self._ending = True
        with self.node.faults.boundary(self.link.statistics().drops, "link"):
            if self.link.state is not LinkState.CLOSED:
                self.link.close(reason, anyio.current_time())
            self.service(anyio.current_time())
        self._finish(reason, False)

    def _finish(self, reason: str, by_peer: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._closed_event is not None:
            self._closed_event.set()
        self.timer.cancel()
        if held := self.node.release_held(self):  # its neighbour was never priced
            self.link.statistics().drops["not_priced"] += len(held)
        if self.pending is not None:
            self.pending.release()
        if self.on_finish is not None:
            self.on_finish(self)
        routes = self.node.routes
        if self.node.remove_link(self):
            self._logger().info("link_down", reason=reason, by_peer=by_peer)
            routes.link_down(self.route, *self._failure(reason, by_peer))
        elif self.link.peer_fingerprint is not None and reason in _REFUSALS:
            proven = self.link.peer_fingerprint.hex()
            self._logger().warning("link_refused", reason=reason, proven=proven)
            routes.failed(self.route, reason, proven)
        else:
            self._logger().info("handshake_failed", reason=reason)
            routes.failed(self.route, *self._failure(reason, by_peer))

    def _failure(self, reason: str, by_peer: bool) -> tuple[str, str]:
        """The route status's failure code (and its detail) for a link closed for `reason`."""
        if by_peer:
            return "closed_by_peer", reason
        if not self.was_established and self.link.initiator:
            if self.unanswered is not None:
                return self.unanswered, ""
            if reason == "connection_closed" and self.route.protocol == "tcp":
                return "handshake_closed", ""
        return reason, ""

    def check_reply(self) -> None:
        """Over UDP a dialer resends its first handshake message when no reply came in
        time: say so at each resend (a wrong secret gets no reply at all), not only when the
        handshake times out. Over TCP nothing is resent; a wrong secret closes the
        connection."""
        link = self.link
        if link.remote_index is not None or link.statistics().frames_out < 2:
            return
        self._dial_failing("connection_refused" if self._refused else NO_REPLY)
        self._refused = False

    def connection_refused(self) -> None:
        """The neighbour's host says nothing listens on its port (ICMP, on a UDP dial)."""
        if not self.was_established:
            self._refused = True
            self._dial_failing("connection_refused")

    def _dial_failing(self, code: str) -> None:
        """Put a dial's failure in its route's status before the handshake gives up; logged
        when the route's failure changes, not at every resend or re-dial."""
        self.unanswered = code
        routes = self.node.routes
        before = routes.failure_of(self.route)
        routes.failed(self.route, code)
        after = routes.failure_of(self.route)
        if after is not None and (before is None or before.code != code):
            self._logger().warning("dial_failing", failure=after.message)

    def _logger(self) -> Any:
        """The link's logger, bound when something is logged: a bound logger kept per link
        would cost ~300 bytes for the few lines a link ever logs."""
        bound = log.bind(route=self.route.name, protocol=self.route.protocol)
        if self.link.peer_identity_public is None:  # not established (yet)
            return bound
        assert self.link.peer_fingerprint is not None
        return bound.bind(link=short_hex(self.link.peer_fingerprint))

    def _deadline(self) -> float | None:
        deadline = self.link.get_timer()
        if deadline is None or self.was_established:
            return deadline
        return min(deadline, self.handshake_deadline)

    def _on_timer(self, now: float) -> None:
        if not self.was_established and now >= self.handshake_deadline:
            self.fail("handshake_timeout")
            return
        with self.boundary:
            self.link.handle_timer(now)
            self.service(now)
        if self.link.initiator and not self.was_established:
            self.check_reply()

    async def wait_closed(self) -> None:
        """Return once the link is finished. Cancelled, it closes the link (telling the
        peer, best effort) so the neighbour need not wait for a keepalive timeout."""
        try:
            await self.closed.wait()
        finally:
            self.fail("shutdown")


# Closing reasons that refuse a peer which proved an identity (logged as `link_refused`).
_REFUSALS = frozenset({"wrong_fingerprint", "too_many_neighbors"})


class Node:
    """A relay node. `run()` serves until cancelled; raises OSError if a listen port is taken."""

    def __init__(self, config: Config, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.fingerprint = identity.fingerprint
        # The Noise static key is per process: identity is proven by signature, not by it.
        self._static_private = os.urandom(32)
        timing = config.links
        self.timers = LinkTimers(
            handshake_rto=timing.handshake_retry_secs,
            keepalive_interval=timing.keepalive_secs,
            dead_after=timing.dead_after_secs,
        )
        self.timer_queue = TimerQueue()
        self.links: dict[bytes, list[LinkRunner]] = {}
        self.drops: Counter[str] = Counter()
        self.relay = RelayStatistics()
        self.graph = RelayGraph()
        self.peeler = Peeler(identity.onion_secret)
        self.peeling = ParallelPeeler(self.peeler.peel_layer, threads=usable_cpus())
        self.hops = DEFAULT_HOPS
        self._docks: dict[int, deque[Datagram]] = {}
        self._delivered = anyio.Event()
        self._log = log.bind(node=short_hex(self.fingerprint))
        self.faults = Faults(self._log)
        self._relay_boundary = self.faults.boundary(self.drops, "relay")
        self._pending_tcp = PendingHandshakes(MAX_PENDING_TCP, MAX_PENDING_TCP_PER_SOURCE)
        self._tcp_handshake_secs = min(TCP_HANDSHAKE_SECS, timing.dead_after_secs)
        self.max_neighbors = MAX_NEIGHBORS
        self.gossip = Gossip(identity, self.graph, self._peers)
        self.rpc = GlobalRpc(self._send_rpc, max_neighbors=self.max_neighbors)
        # Every neighbour's prices, claims, limits and settlements (runtime/neighbors.py).
        self.accounts = Neighbors(identity, config, self.rpc)
        self.accounts.on_applied = self._on_neighbor_applied
        self._held: dict[LinkRunner, list[bytes]] = {}  # `hold`
        self._held_count = 0
        self.chat = Chat(self.rpc, self.links.__contains__)
        self.history = History()  # the dashboard's charts
        self.ledger: AsyncLedger | None = None
        self.apps = Apps(
            config.apps,
            fingerprint=self.fingerprint,
            graph=self.graph,
            originate=self._originate,
            offload=self.peeling.map_all,
            faults=self.faults,
            source=config.source,
        )
        self.listening: dict[str, Address] = {}
        self._links_changed = anyio.Event()
        self._endpoints: list[Endpoint] = []
        self._bound: dict[str, socket.socket | MultiListener[SocketStream]] = {}
        self._control_listener: MultiListener[SocketStream] | None = None
        self.control_address: Address | None = None
        self.control_auth: ControlAuth | None = None  # its token is written at bind()
        self.started_at = time.monotonic()
        self._task_group: TaskGroup | None = None
        # Every configured route, its status, and once running the task serving it.
        self.routes = RouteTable()
        self._route_infos: dict[tuple[str, str], RouteInfo] = {}
        self._route_tasks: dict[RouteInfo, _RouteTask] = {}
        self._track_routes(config, route_keys(config))

    # --- link table ---------------------------------------------------------------------

    def add_link(self, runner: LinkRunner) -> bool:
        """Put a link that just came up in the table. Returns False, counted
        (`too_many_neighbors`), if it would add a neighbour beyond `max_neighbors`."""
        fingerprint, public = runner.peer_fingerprint, runner.peer_identity_public
        assert fingerprint is not None and public is not None
        runners = self.links.get(fingerprint)
        if runners is None:
            if len(self.links) >= self.max_neighbors:
                self.drops["too_many_neighbors"] += 1
                return False
            runners = self.links[fingerprint] = []
        runners.append(runner)
        self._notify()
        self.gossip.on_link_up(runner)
        self.accounts.on_link_up(
            fingerprint, public, self._route_price(runner.route), runner.attach
        )
        return True

    def remove_link(self, runner: LinkRunner) -> bool:
        fingerprint = runner.peer_fingerprint
        runners = self.links.get(fingerprint, []) if fingerprint else []
        if runner not in runners or fingerprint is None:
            return False
        runners.remove(runner)
        if not runners:
            del self.links[fingerprint]
        self._notify()
        self.accounts.on_link_down(fingerprint)
        return True

    def _route_price(self, route: RouteInfo) -> PriceConfig:
        routes = self.config.in_routes if route.direction == "in" else self.config.out_routes
        price: PriceConfig = routes[route.name].price
        return price

    def _peers(self) -> list[LinkRunner]:
        """One link to each neighbour (gossip's view)."""
        return [runners[0] for runners in self.links.values()]

    def drop_counts(self) -> Counter[str]:
        """Drops not attributable to a link: probes, unknown sessions, socket errors."""
        total = Counter(self.drops)
        for endpoint in self._endpoints:
            total.update(endpoint.statistics().drops)
        total.update(self.apps.drop_counts())
        return total

    def neighbors(self) -> set[bytes]:
        return set(self.links)

    async def wait_neighbors(self, fingerprints: set[bytes]) -> None:
        """Return once links to exactly these neighbours are up."""
        while self.neighbors() != fingerprints:
            await self._links_changed.wait()

    def _notify(self) -> None:
        self._links_changed.set()
        self._links_changed = anyio.Event()

    async def wait_priced(self, fingerprints: set[bytes]) -> None:
        """Return once links to these neighbours are up with both prices accepted."""
        await self.accounts.wait_priced(fingerprints)

    def spawn(self, function: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        """Run `function(*args)` in the node's task group (for work started by upcalls), as
        a fault boundary: an exception ends that task alone, counted in `drops`."""
        assert self._task_group is not None, "Node.run() is running"
        self._task_group.start_soon(self._contained, self.drops, "task", function, *args)

    async def _contained(
        self,
        drops: Counter[str],
        where: str,
        function: Callable[..., Awaitable[object]],
        *args: object,
    ) -> None:
        with self.faults.boundary(drops, where):
            await function(*args)

    # --- upcalls from links -------------------------------------------------------------

    def on_control(self, runner: LinkRunner, payload: bytes) -> None:
        """One control message is a fault boundary: whatever it makes fail (its decoding,
        gossip, RPC dispatch) drops that message alone, counted on its link."""
        with self.faults.boundary(runner.statistics().drops, "control"):
            message = decode_control(payload)
            if isinstance(message, DockMessage):
                if message.dock == GLOBAL_RPC_DOCK and runner.peer_fingerprint is not None:
                    self.rpc.receive(runner.peer_fingerprint, message.data)
                else:
                    runner.statistics().drops["unknown_dock"] += 1
                return
            self.gossip.on_message(runner, message)

    def _send_rpc(self, neighbor: bytes, payload: bytes) -> bool:
        runners = self.links.get(neighbor)
        if not runners:
            return False
        return runners[0].send_control(encode_control(DockMessage(GLOBAL_RPC_DOCK, payload)))

    # --- the relay loop: the hot path ---------------------------------------------------

    def relay_batch(
        self, batch: Sequence[tuple[LinkRunner | None, list[bytes]]], now: float
    ) -> None:
        """Peel or forward a batch of onion frames (`onion_frame`'s layout), then send them
        grouped by link.

        Each item is (the link the frames came in on, or None for our own, the frames).
        Each link's allowance is read, and its count bumped, once per item, never per packet
        (`LinkRunner.take`, `LinkRunner.send_onions`). A forwarded frame leaves as it came,
        re-encrypted for the next link, before any layer is peeled. The layers to peel are
        peeled PEEL_CHUNK at a time (on two threads when there are two CPUs), and each chunk
        leaves as soon as it is peeled: a busy link still sends in batches, but a frame does
        not wait for the peels of a whole batch (~1.5 ms for 64 on two threads here).
        """
        me = self.fingerprint
        leaving: list[bytes] = []
        to_peel: list[bytes] = []
        forwarded = 0
        for source, frames in batch:
            if source is not None:
                frames = source.take(frames)
                forwarded += len(frames)
            for frame in frames:
                if frame.startswith(me, 1):  # we are its next peeler
                    to_peel.append(frame)
                    if source is not None:
                        forwarded -= 1
                else:
                    leaving.append(frame)
        self.relay.forwarded += forwarded
        if leaving:
            self._send_frames(leaving)
        for start in range(0, len(to_peel), PEEL_CHUNK):
            if leaving := self._peel_batch(to_peel[start : start + PEEL_CHUNK], now):
                self._send_frames(leaving)

    def hold(self, runner: LinkRunner, frames: list[bytes]) -> int:
        """Keep frames from a neighbour being priced, until that ends (`_on_neighbor_applied`
        or the link's end); returns how many were kept (HELD_PER_LINK, HELD_FRAMES)."""
        held = self._held.setdefault(runner, [])
        room = min(len(frames), HELD_PER_LINK - len(held), HELD_FRAMES - self._held_count)
        held += frames[:room]
        self._held_count += room
        if not held:
            del self._held[runner]
        return room

    def release_held(self, runner: LinkRunner) -> list[bytes]:
        """Forget the frames held from this link; returns them."""
        frames = self._held.pop(runner, [])
        self._held_count -= len(frames)
        return frames

    def _on_neighbor_applied(self, fingerprint: bytes) -> None:
        """A step of the neighbour's is applied: once it is no longer being priced, the
        frames held from it go through the relay path again (taken if priced, else dropped
        and counted as any refused frame)."""
        if not self._held:
            return
        runners = [r for r in self.links.get(fingerprint, ()) if r in self._held]
        neighbor = self.accounts.get(fingerprint)
        if not runners or (neighbor is not None and neighbor.pricing):
            return
        batch = [(runner, self.release_held(runner)) for runner in runners]
        with self._relay_boundary:
            self.relay_batch(batch, anyio.current_time())

    def _send_frames(self, frames: list[bytes]) -> None:
        """Send onion frames, each on the link toward its next peeler, grouped by link."""
        outgoing: dict[LinkRunner, list[bytes]] = {}
        lanes: dict[bytes, list[bytes] | None] = {}  # next peeler -> its link's frames
        no_route = 0
        for frame in frames:
            next_peeler = frame[1:_NEXT_PEELER_END]
            lane = lanes.get(next_peeler, _NO_LANE)
            if lane is _NO_LANE:
                lane = lanes[next_peeler] = self._lane(next_peeler, outgoing)
            if lane is None:
                no_route += 1
                continue
            lane.append(frame)
        # Every link's frames are encrypted before any is sent (an error then sends nothing).
        encrypted = [(runner, runner.link.encrypt_onions(out)) for runner, out in outgoing.items()]
        for runner, sealed in encrypted:
            runner.send_onions(sealed)
        if no_route:
            self.drops["no_route"] += no_route

    def _peel_batch(self, frames: list[bytes], now: float) -> list[bytes]:
        """Peel the frames addressed to us: deliver what is ours, return the rest's frames."""
        stats, accept = self.relay, self.peeler.accept
        leaving: list[bytes] = []
        packets = [frame[_NEXT_PEELER_END:] for frame in frames]
        for layer in self.peeling.peel_all(packets):
            result = accept(layer, now)
            if result is None:
                continue
            stats.peeled += 1
            if isinstance(result, tuple):
                leaving.append(onion_frame(*result))
                continue
            if isinstance(result, ReplyArrived):
                self.apps.on_reply(result, now)
            elif self.apps.serves(result.dock):
                self.apps.deliver(result, now)
            elif isinstance(result, Datagram):
                self._deliver(result)
            else:  # reply blocks for a dock no application serves: no one could use them
                self.drops["no_endpoint"] += 1
                continue
            stats.delivered += 1
        return leaving

    def _lane(
        self, next_peeler: bytes, outgoing: dict[LinkRunner, list[bytes]]
    ) -> list[bytes] | None:
        """This batch's frames for the link toward `next_peeler` (None: no route)."""
        target = self._route_to(next_peeler)
        return None if target is None else outgoing.setdefault(target, [])

    def _route_to(self, fingerprint: bytes) -> LinkRunner | None:
        """The link toward `fingerprint`: direct if it is a neighbour, else by the graph."""
        runners = self.links.get(fingerprint)
        if runners is None:
            hop = self.graph.next_hop(self.fingerprint, fingerprint)
            runners = self.links.get(hop) if hop is not None else None
            if runners is None:
                return None
        return runners[0]

    def _deliver(self, datagram: Datagram) -> None:
        queue = self._docks.get(datagram.dock)
        if queue is None:
            if len(self._docks) >= MAX_DOCKS:
                self.drops["too_many_docks"] += 1
                return
            queue = self._docks[datagram.dock] = deque()
        if len(queue) >= DOCK_QUEUE:
            self.drops["dock_full"] += 1
            return
        queue.append(datagram)
        self._delivered.set()

    # --- sending and receiving datagrams ------------------------------------------------

    def _originate(self, frames: list[bytes], now: float) -> None:
        """Send onion frames we built (for an application) through the relay path, so that
        they are counted and priced per link like all traffic."""
        self.relay.originated += len(frames)
        with self._relay_boundary:
            self.relay_batch([(None, frames)], now)

    def send_datagram(
        self, destination: bytes, dock: int, data: bytes, hops: int | None = None
    ) -> None:
        """Send `data` to `dock` on `destination` through `hops` peelers (the last being the
        destination). Raises LocalProtocolError if there is no route or `data` is too big."""
        if destination == self.fingerprint:
            self._deliver(Datagram(dock, data))
            return
        route = self.graph.choose_route(
            self.fingerprint, destination, hops or self.hops, os.urandom
        )
        first_peeler, packet = build_packet(route, encode_datagram(dock, data), os.urandom)
        self.relay.originated += 1
        self.relay_batch([(None, [onion_frame(first_peeler, packet)])], anyio.current_time())

    def receive_datagrams_nowait(self, dock: int, limit: int = 1000) -> list[Datagram]:
        """Up to `limit` datagrams that arrived for `dock`, oldest first."""
        queue = self._docks.get(dock)
        out: list[Datagram] = []
        while queue and len(out) < limit:
            out.append(queue.popleft())
        return out

    def datagrams_waiting(self, dock: int) -> int:
        """How many datagrams for `dock` are waiting to be received."""
        return len(self._docks.get(dock, ()))

    async def receive_datagram(self, dock: int) -> Datagram:
        """Wait for the next datagram to `dock`."""
        while True:
            queue = self._docks.get(dock)
            if queue:
                return queue.popleft()
            await self._delivered.wait()
            self._delivered = anyio.Event()

    # --- running ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Signals `task_status` once every listener is bound.

        On cancellation every link sends its peer a CLOSE frame (best effort) and every
        account's counts are written (a clean stop). Raises ConfigError or LedgerCorrupt from
        `bind()`.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                await self.bind()
                self.peeling.start()
                await tg.start(self.rpc.run)
                tg.start_soon(self.timer_queue.run)
                await tg.start(self.accounts.run)
                for info in self._route_infos.values():
                    self._start_route(info)
                tg.start_soon(self.gossip.run, self.faults.boundary(self.drops, "gossip"))
                tg.start_soon(
                    self.history.run,
                    self.accounts.debts,
                    self.links,
                    self.faults.boundary(self.drops, "history"),
                )
                tg.start_soon(self._serve_control)
                tg.start_soon(self.apps.run)
                self._log_start()
                task_status.started()
        finally:
            self.peeling.close()
            if self.ledger is not None:
                with anyio.CancelScope(shield=True):
                    await self.accounts.aclose()
                    await self.ledger.aclose()
                self.ledger = None

    def _log_start(self) -> None:
        """Where the node can be reached, one line each, then that it started."""
        for name, (host, port) in self.listening.items():
            protocol = self.config.in_routes[name].protocol
            self._log.info("listening", route=name, protocol=protocol, address=_url(host, port))
        self._log_dashboard_link()
        self._log.info(
            "node_started",
            version=__version__,
            fingerprint=self.fingerprint.hex(),
            in_routes=len(self.config.in_routes),
            out_routes=len(self.config.out_routes),
        )

    # --- routes: started, stopped, reloaded ---------------------------------------------

    def _track_routes(self, config: Config, keys: Iterable[tuple[str, str]]) -> None:
        """Put these routes of `config`, as ("in" or "out", name), in the route table."""
        for direction, name in keys:
            if direction == "in":
                in_route = config.in_routes[name]
                info = self.routes.add("in", name, in_route.protocol, in_route.listen)
            else:
                out = config.out_routes[name]
                info = self.routes.add(
                    "out", name, out.protocol, out.connect, parse_fingerprint(out.fingerprint)
                )
            self._route_infos[direction, name] = info

    def _start_route(self, info: RouteInfo) -> None:
        """Listen on an in_route (already bound) or dial an out_route, in a task of its own
        that `_stop_route` can end alone."""
        assert self._task_group is not None, "Node.run() is running"
        task = self._route_tasks[info] = _RouteTask()
        if info.direction == "in":
            self._task_group.start_soon(task.run, self._listen, info)
        else:
            self._task_group.start_soon(task.run, self._dial_forever, info)

    async def _stop_route(self, info: RouteInfo) -> None:
        """Close the route's links, each telling its neighbour (`route_removed`), stop
        listening on it or dialling it, and wait until its sockets are closed."""
        self.routes.remove(info)
        del self._route_infos[info.direction, info.name]
        for runner in [r for runners in self.links.values() for r in runners]:
            if runner.route is info:
                runner.fail("route_removed")
        task = self._route_tasks.pop(info, None)
        if task is not None:
            task.scope.cancel()
            await task.done.wait()
        if info.direction == "in":
            self.listening.pop(info.name, None)
            if (bound := self._bound.pop(info.name, None)) is not None:
                await _close_bound(bound)

    async def reload(self, config: Config) -> None:
        """Apply a changed config while running (SIGHUP): routes removed are stopped (their
        links closed with a CLOSE), routes added are listened on or dialled, a route whose
        protocol, address, secret or fingerprint changed is both, and neighbours on a route
        whose price changed are offered the new terms. Links on unchanged routes stay up.
        What cannot change while running keeps its running value and is logged
        (`reload_skipped`, one line per field).

        Raises ConfigError, with nothing changed, if an added in_route cannot listen on an
        address that no removed route frees. One that can only be bound once its removed
        predecessor is closed and then fails is left down, with the reason in its status.
        """
        old = self.config
        changes = diff_configs(old, config)
        removed = [self._route_infos[key] for key in changes.removed]
        freed = {
            (old.in_routes[info.name].protocol, old.in_routes[info.name].listen)
            for info in removed
            if info.direction == "in"
        }
        bound: dict[str, tuple[socket.socket | MultiListener[SocketStream], Address]] = {}
        try:  # what no removed route holds is bound first: if that fails nothing changed
            for kind, name in changes.added:
                route = config.in_routes.get(name)
                if kind == "in" and route and (route.protocol, route.listen) not in freed:
                    bound[name] = await _bind_route(route)
        except OSError as exc:
            for held, _ in bound.values():
                await _close_bound(held)
            raise ConfigError(_listen_error(config, name, exc)) from None
        for field in changes.skipped:
            self._log.warning("reload_skipped", field=field, reason="restart to apply")
        for info in removed:
            await self._stop_route(info)
        self.config = msgspec.structs.replace(
            config, **{field: getattr(old, field) for field in RESTART_FIELDS}
        )
        self._track_routes(self.config, changes.added)
        for kind, name in changes.added:
            info = self._route_infos[kind, name]
            if kind == "in" and not await self._bind_added(info, bound.get(name)):
                continue
            self._start_route(info)
        for key in changes.repriced:  # each neighbour on it is offered the new terms once
            info = self._route_infos[key]
            for runners in self.links.values():
                runner = next((r for r in runners if r.route is info), None)
                if runner is not None and runner.peer_fingerprint is not None:
                    self.accounts.set_price(runner.peer_fingerprint, self._route_price(info))
        self._log.info(
            "reloaded",
            added=[f"{kind}_routes.{name}" for kind, name in changes.added],
            removed=[f"{kind}_routes.{name}" for kind, name in changes.removed],
            repriced=[f"{kind}_routes.{name}" for kind, name in changes.repriced],
        )

    async def _bind_added(
        self,
        info: RouteInfo,
        bound: tuple[socket.socket | MultiListener[SocketStream], Address] | None,
    ) -> bool:
        """Take an added in_route's socket (binding it now if it was not bound before the
        routes it replaces were closed); False, logged and in its status, if it fails."""
        route = self.config.in_routes[info.name]
        try:
            self._bound[info.name], self.listening[info.name] = bound or await _bind_route(route)
        except OSError as exc:
            self.routes.cannot_listen(info, exc.strerror or str(exc))
            self._log.error("reload_failed", error=_listen_error(self.config, info.name, exc))
            return False
        host, port = self.listening[info.name]
        self._log.info(
            "listening", route=info.name, protocol=route.protocol, address=_url(host, port)
        )
        return True

    def _log_dashboard_link(self) -> None:
        """Log where the control API is and a one-time dashboard link (it expires soon;
        `earendil-py dashboard` prints a new one)."""
        assert self.control_address is not None and self.control_auth is not None
        origin = f"http://{_url(*self.control_address)}"
        code = self.control_auth.mint_login_code()
        self._log.info("control_api", url=f"{origin}/", dashboard=f"{origin}/login?code={code}")

    def _new_link(self, *, initiator: bool, secret: str, reliable: bool, **kw: object) -> Link:
        return Link(
            initiator=initiator,
            identity=self.identity,
            static_private=self._static_private,
            secret=secret,
            local_index=int.from_bytes(os.urandom(4), "big"),
            now=anyio.current_time(),
            rng=os.urandom,
            reliable=reliable,
            timers=self.timers,
            **kw,  # type: ignore[arg-type]
        )

    # --- in_routes ----------------------------------------------------------------------

    async def bind(self) -> None:
        """Bind every in_route and the control API, and open the ledger. Raises ConfigError
        naming the field if an address is unusable, LedgerCorrupt if the ledger fails its
        checks."""
        if self._control_listener is None:
            host, port = self.config.control_listen
            try:
                self._control_listener = await anyio.create_tcp_listener(
                    local_host=host, local_port=port
                )
            except OSError as exc:
                raise ConfigError(
                    f"{self.config.source}: control_listen: cannot listen on {host}:{port}: "
                    f"{exc.strerror or exc}"
                ) from None
            local = self._control_listener.listeners[0].extra(SocketAttribute.local_address)
            self.control_address = _as_address(local)
            self.control_auth = ControlAuth.generate()
            write_token_file(token_path(self.config), self.control_auth.token)
        for name, route in self.config.in_routes.items():
            if name in self._bound:
                continue
            try:
                self._bound[name], self.listening[name] = await _bind_route(route)
            except OSError as exc:
                raise ConfigError(_listen_error(self.config, name, exc)) from None
        self.apps.bind()
        if self.ledger is None:
            self.ledger = await AsyncLedger.open(self.config.db_path)
            self.accounts.start(self.ledger)
            self.chat.start(self.ledger)

    async def _serve_control(self) -> None:
        assert self._control_listener is not None and self.control_auth is not None
        server = HttpServer(
            build_router(self, self.control_auth),
            self.control_auth,
            allow_remote=self.config.control_allow_remote,
        )
        listener = self._control_listener

        async def serve(stream: SocketStream) -> None:
            async with stream:
                await server.serve_connection(stream)

        await self._serve_listener(
            [one.accept for one in _socket_listeners(listener)],
            serve,
            "control",
            listener,
        )

    async def _listen(self, info: RouteInfo) -> None:
        route = self.config.in_routes[info.name]
        bound = self._bound[info.name]
        if isinstance(bound, socket.socket):
            await self._serve_udp(bound, route, info)
            return
        # Links read and write their sockets themselves (`runtime/tcp.py`): accepted raw.
        listening = [
            partial(accept_tcp, one.extra(SocketAttribute.raw_socket))
            for one in _socket_listeners(bound)
        ]

        async def serve(connection: tuple[socket.socket, Address]) -> None:
            with connection[0]:
                await self._serve_tcp(*connection, route, info)

        await self._serve_listener(listening, serve, "tcp", bound)

    async def _serve_listener(
        self,
        accepts: Sequence[Callable[[], Awaitable[T]]],
        handle: Callable[[T], Awaitable[None]],
        where: str,
        listener: MultiListener[SocketStream],
    ) -> None:
        """Accept connections with each of `accepts` (one per listening socket of `listener`)
        until cancelled, and close `listener` after the connections they accepted ended.
        Each connection is handled in a task of its own, as a fault boundary (`where` names
        it in the log); `handle` closes it. Raises OSError if a listening socket is gone."""
        async with listener, anyio.create_task_group() as connections:
            for accept in accepts:
                connections.start_soon(self._accept, accept, handle, where, connections)

    async def _accept(
        self,
        accept: Callable[[], Awaitable[T]],
        handle: Callable[[T], Awaitable[None]],
        where: str,
        connections: TaskGroup,
    ) -> None:
        # anyio's `Listener.serve` ends on the first accept() error, and with it the node;
        # here an error only delays the next accept (as trio's serve_listeners does). Out of
        # descriptors (EMFILE/ENFILE) or memory (ENOBUFS/ENOMEM), accepting again at once would
        # spin: pending connections wait in the kernel's backlog until something frees up.
        backoff = ACCEPT_BACKOFF_MIN
        while True:
            try:
                connection = await accept()
            except OSError as exc:
                if exc.errno in SOCKET_GONE:
                    raise
                self.drops["accept_failed"] += 1
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.faults.log_limited(
                    "warning", "accept_failed", (where, name), listener=where, error=name
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_MIN
            connections.start_soon(self._contained, self.drops, where, handle, connection)

    async def _serve_udp(self, sock: socket.socket, route: InRoute, info: RouteInfo) -> None:
        endpoint = Endpoint(
            identity=self.identity,
            static_private=self._static_private,
            secret=route.secret,
            rng=os.urandom,
            timers=self.timers,
        )
        self._endpoints.append(endpoint)
        runners: dict[int, LinkRunner] = {}
        # Opening a session runs core code on a stranger's datagram: a boundary of its own.
        opening = self.faults.boundary(self.drops, "udp_session")

        def open_session(data: bytes, address: Address, now: float) -> LinkRunner | None:
            link = find_session(data, address, now)
            if link is None:
                return None
            runner = find_runner(link.local_index)
            if runner is None:
                runner = LinkRunner(self, link, UdpTransport(sock, address), info, address)
                runner.on_finish = forget
                runners[link.local_index] = runner
            return runner

        def forget(runner: LinkRunner) -> None:
            endpoint.remove(runner.link)
            runners.pop(runner.link.local_index, None)

        read, find_session, find_runner = datagram_reader(sock), endpoint.route, runners.get
        unpack_index = U32.unpack_from

        def on_readable() -> bool:
            now = anyio.current_time()
            arrived: dict[LinkRunner, list[bytes]] = {}
            last: LinkRunner | None = None
            messages: list[bytes] = []
            for address, datagrams in read_runs(read, UDP_BATCH, self.drops, "udp_error"):
                for data in datagrams:
                    runner = None
                    # DATA for a known session from the address that opened it: what
                    # `endpoint.route` would find (runners and sessions come and go
                    # together). Anything else takes the full route, which counts the drops.
                    if len(data) >= _DATA_MIN_SIZE and data[0] == DATA:
                        runner = find_runner(unpack_index(data, 1)[0])
                        if runner is not None and runner.peer_address != address:
                            runner = None
                    if runner is None:
                        with opening:
                            runner = open_session(data, address, now)
                        if runner is None:
                            continue
                    if runner is not last:  # a wake-up's datagrams mostly share a link
                        last = runner
                        messages = arrived.setdefault(runner, [])
                    messages.append(data)
            # Each link takes its messages at once: the hot path runs per link, not per
            # frame. A link that fails on them is closed; the others' go on.
            batch = [
                (runner, runner.receive(messages, now)) for runner, messages in arrived.items()
            ]
            if batch:
                with self._relay_boundary:
                    self.relay_batch(batch, now)
            return True

        # Stopping, every session sends its CLOSE before the socket closes.
        with sock:
            try:
                await call_when_readable(sock, on_readable)
            finally:
                for runner in list(runners.values()):
                    runner.fail("shutdown")

    async def _serve_tcp(
        self, sock: socket.socket, address: Address, route: InRoute, info: RouteInfo
    ) -> None:
        """One accepted connection: admitted among those still handshaking (or closed at
        once, `tcp_pending_full`), closed unless a valid HS_INIT comes (`tcp_probe`, without a
        byte sent) and the link is established within the handshake deadline."""
        slot = self._pending_tcp.admit(address[0])
        if slot is None:
            self.drops["tcp_pending_full"] += 1
            return
        try:
            deadline = anyio.current_time() + self._tcp_handshake_secs
            decoder = StreamDecoder()
            first: bytes | None = None
            mac_key = derive_cookie_keys(route.secret)[1]
            with anyio.CancelScope(deadline=deadline):
                while first is None:
                    await anyio.wait_readable(sock)
                    try:
                        data = sock.recv(READ_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:
                        break  # reset before a handshake: a probe
                    if not data:
                        break  # closed before a handshake: a probe
                    decoder.receive_bytes(data)
                    first = decoder.next_message()
            # Without the cookie MAC the connection is closed without a single byte back.
            if first is None or message_type(first) != HS_INIT or not check_mac1(mac_key, first):
                self.drops["tcp_probe"] += 1
                return
            link = self._new_link(initiator=False, secret=route.secret, reliable=True)
            runner = LinkRunner(self, link, _NO_TRANSPORT, info, address)
            runner.limit_handshake(deadline, slot)
            await self._run_stream_link(sock, decoder, runner, first)
        finally:
            slot.release()

    # --- out_routes ---------------------------------------------------------------------

    async def _dial_forever(self, info: RouteInfo) -> None:
        """Keep one link up on this route: dial, run, and re-dial with jittered backoff. Each
        dial is a fault boundary: whatever makes it fail, the next one follows."""
        route = self.config.out_routes[info.name]
        host, port = parse_address(route.connect)
        expected = parse_fingerprint(route.fingerprint)
        timing = self.config.links
        delay = timing.redial_min_secs
        dial_log = self._log.bind(route=info.name, protocol=route.protocol)
        while True:
            established = False
            dial_log.debug("dial", address=route.connect)
            with self.faults.boundary(self.drops, "dial"):
                try:
                    established = await self._dial_once(route, info, host, port, expected)
                except OSError as exc:
                    code, detail = _dial_failure(exc)
                    self.routes.failed(info, code, detail)
                    failure = self.routes.failure_of(info)
                    dial_log.info(
                        "dial_failed",
                        error=detail or code,
                        failure=failure.message if failure else code,
                    )
            delay = (
                timing.redial_min_secs if established else min(delay * 2, timing.redial_max_secs)
            )
            # Full jitter spreads re-dials of many nodes after a shared outage.
            await anyio.sleep(random.uniform(delay / 2, delay))

    async def _dial_once(
        self, route: OutRoute, info: RouteInfo, host: str, port: int, expected: bytes
    ) -> bool:
        """One dial; returns whether the link got established before it ended."""
        link = self._new_link(
            initiator=True,
            secret=route.secret,
            reliable=route.protocol == "tcp",
            expected_fingerprint=expected,
        )
        if route.protocol == "tcp":
            with anyio.fail_after(self.timers.dead_after):
                sock = await connect_tcp(host, port)
            with sock:
                runner = LinkRunner(self, link, _NO_TRANSPORT, info, (host, port))
                await self._run_stream_link(sock, StreamDecoder(), runner, None)
        else:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, address = infos[0]
            with new_udp_socket(family) as sock:
                sock.connect(address)
                runner = LinkRunner(self, link, UdpTransport(sock, None), info, (host, port))
                runner.service(anyio.current_time())
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_connected_udp, sock, runner)
                    await runner.wait_closed()
                    tg.cancel_scope.cancel()
        return runner.was_established

    async def _read_connected_udp(self, sock: socket.socket, runner: LinkRunner) -> None:
        read = datagram_reader(sock)

        def read_refused() -> tuple[Sequence[bytes], Address]:
            try:
                return read()
            except ConnectionRefusedError:  # read_batch skips it; the route's status tells
                runner.connection_refused()
                raise

        def on_readable() -> bool:
            now = anyio.current_time()
            try:
                messages = read_batch(read_refused, UDP_BATCH)
            except OSError:  # an ICMP error other than a closed port: the path is gone
                runner.fail("connection_closed")
                return False
            if frames := runner.receive(messages, now):
                with self._relay_boundary:
                    self.relay_batch([(runner, frames)], now)
            return True

        await call_when_readable(sock, on_readable)

    # --- shared stream (TCP) plumbing ---------------------------------------------------

    async def _run_stream_link(
        self,
        sock: socket.socket,
        decoder: StreamDecoder,
        runner: LinkRunner,
        first: bytes | None,
    ) -> None:
        """Run `runner` over a TCP socket until its link closes or the connection ends."""
        transport = runner.transport = TcpTransport(sock)

        def read(messages: list[bytes]) -> bool:
            """Take `messages` and what the decoder holds; False once the link is over."""
            now = anyio.current_time()
            try:
                while (message := decoder.next_message()) is not None:
                    messages.append(message)
            except RemoteProtocolError as exc:  # a bad length: the stream is out of step
                runner.statistics().drops[exc.reason] += 1
                runner.fail(exc.reason)
                return False
            if frames := runner.receive(messages, now):
                with self._relay_boundary:
                    self.relay_batch([(runner, frames)], now)
            return not runner.closed.is_set()

        def on_readable() -> bool:
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                runner.fail("connection_closed")
                return False
            decoder.receive_bytes(data)
            return read([])

        # The writer outlives a shutdown's cancellation until it has sent what waits (the
        # CLOSE frame last), for at most SHUTDOWN_GRACE.
        writing = anyio.CancelScope(shield=True)
        written = anyio.Event()

        async def write() -> None:
            try:
                with writing:
                    await transport.run()
            except OSError:
                runner.fail("connection_closed")
            finally:
                written.set()  # also when cancelled, so shutdown never waits for a dead writer

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            # What came in the same read as the first message is taken with it: a peer may
            # pipeline its handshake, and nothing more may arrive to wake us.
            runner.service(anyio.current_time())
            if read([] if first is None else [first]):
                tg.start_soon(call_when_readable, sock, on_readable)
            try:
                await runner.wait_closed()
            finally:
                transport.close()
                with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
                    await written.wait()
                writing.cancel()
                tg.cancel_scope.cancel()


class _NoTransport:
    """Placeholder until a stream link's transport exists; nothing is sent before that."""

    def send(self, message: bytes) -> bool:
        return False

    def send_many(self, messages: list[bytes]) -> int:
        return 0

    def close(self) -> None:
        """Nothing to close."""


_NO_TRANSPORT = _NoTransport()


def _socket_listeners(listener: MultiListener[SocketStream]) -> list[SocketListener]:
    found = []
    for one in listener.listeners:
        assert isinstance(one, SocketListener), "anyio.create_tcp_listener makes these"
        found.append(one)
    return found


def _as_address(value: object) -> Address:
    assert isinstance(value, tuple), "an IP socket address"
    return (str(value[0]), int(value[1]))


def _url(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_error(config: Config, name: str, exc: OSError) -> str:
    route = config.in_routes[name]
    return (
        f"{config.source}: in_routes.{name}.listen: cannot listen on {route.listen}: "
        f"{exc.strerror or exc}"
    )


async def _bind_route(
    route: InRoute,
) -> tuple[socket.socket | MultiListener[SocketStream], Address]:
    """Bind an in_route's socket; returns it and its address. Raises OSError."""
    host, port = parse_address(route.listen)
    if route.protocol == "udp":
        sock = udp_socket(host)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock, _as_address(sock.getsockname())
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    return listener, _as_address(listener.listeners[0].extra(SocketAttribute.local_address))


async def _close_bound(bound: socket.socket | MultiListener[SocketStream]) -> None:
    if isinstance(bound, socket.socket):
        bound.close()
    else:
        await bound.aclose()


class _RouteTask:
    """The task serving one route, which can be cancelled alone and waited for."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def run(self, serve: Callable[[RouteInfo], Awaitable[None]], info: RouteInfo) -> None:
        try:
            with self.scope:
                await serve(info)
        finally:
            self.done.set()


def _dial_failure(exc: OSError) -> tuple[str, str]:
    """A failed connect as a route failure: its code and detail. anyio's connect_tcp raises
    a plain OSError whose cause is the error of the (last) attempt."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection_refused", ""
    if isinstance(cause, TimeoutError):
        return "connect_failed", "timed out"
    return "connect_failed", cause.strerror or str(cause) or type(cause).__name__
