"""The node: listens on every in_route, dials every out_route, and keeps the link table.

Each link is a sans-IO `core.link.Link` driven by a `LinkRunner`: datagrams in, timers fired,
datagrams out, events logged. UDP uses non-blocking sockets drained in batches on each
wake-up (the hot path reads many datagrams per await); TCP uses anyio streams with a u16
length prefix per message and a bounded outgoing queue per connection.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from anyio.streams.stapled import MultiListener

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
    frame_for_stream,
    message_type,
    onion_frame,
)
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    DockMessage,
    decode_control,
    encode_control,
)
from earendil_py.core.neighbor import Neighbor
from earendil_py.core.packet import build_packet
from earendil_py.core.relay import Datagram, Peeler, encode_datagram
from earendil_py.runtime.chat import Chat
from earendil_py.runtime.config import Config, InRoute, OutRoute, PriceConfig, parse_address
from earendil_py.runtime.control import build_router
from earendil_py.runtime.gossip import Gossip
from earendil_py.runtime.http import HttpServer
from earendil_py.runtime.neighbors import Neighbors
from earendil_py.runtime.peeling import ParallelPeeler, usable_cpus
from earendil_py.runtime.rpc import GlobalRpc
from earendil_py.runtime.store import AsyncLedger
from earendil_py.runtime.udp import (
    UdpTransport,
    datagram_reader,
    new_udp_socket,
    read_batch,
    udp_socket,
)

log = structlog.get_logger("earendil_py.node")

UDP_BATCH = 64  # datagrams drained per wake-up before yielding (a coalesced read may pass it)
DEFAULT_HOPS = 3  # peelers per route, the destination included
MAX_DOCKS = 256  # docks holding undelivered datagrams
DOCK_QUEUE = 4096  # undelivered datagrams kept per dock; more are dropped and counted
TCP_QUEUE = 256  # messages queued per TCP connection before new ones are dropped
TIMER_SLACK = 0.1  # a link's timer task re-checks at least this often (s)
SHUTDOWN_GRACE = 1.0  # seconds to flush CLOSE frames on shutdown

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


@dataclass(frozen=True, slots=True)
class RouteInfo:
    name: str
    protocol: str
    direction: str  # "in" or "out"


class Transport(Protocol):
    """Where a link's outgoing messages go. `send` never blocks: it returns False on a drop."""

    def send(self, message: bytes) -> bool: ...

    def close(self) -> None: ...


class TcpTransport:
    def __init__(self, queue: MemoryObjectSendStream[bytes]) -> None:
        self._queue = queue

    def send(self, message: bytes) -> bool:
        try:
            self._queue.send_nowait(frame_for_stream(message))
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        self._queue.close()


class LinkRunner:
    """Drives one `Link`: feeds it input, fires its timers, sends its output, logs events."""

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
        self.closed = anyio.Event()
        self._log = log.bind(route=route.name, protocol=route.protocol)

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
        """Feed messages to the link; returns the onion frames among them."""
        frames = self.link.receive_datagrams(messages, now)
        if self.link.wants_service:
            self.service(now)
        return frames

    def send(self, message: bytes) -> bool:
        if self.transport.send(message):
            return True
        self.link.statistics().drops["send_failed"] += 1
        return False

    def send_control(self, payload: bytes) -> bool:
        """Send one CONTROL frame on this (established) link now; False if it is not up."""
        if self.link.state is not LinkState.ESTABLISHED:
            return False
        self.link.send_control(payload)
        self.service(anyio.current_time())
        return True

    def take(self, frames: list[bytes]) -> list[bytes]:
        """The batch of onion frames that arrived from this neighbour, less what its price
        agreement and debt limit refuse (dropped and counted, and the neighbour told in
        time); what is taken is counted in its account."""
        neighbor = self.neighbor
        allowed = neighbor.allowance().inbound if neighbor is not None else 0
        if allowed < len(frames):
            self._refused(neighbor, len(frames) - allowed, outbound=False)
            frames = frames[:allowed]
        if neighbor is not None:
            neighbor.counters.packets_in += len(frames)
        return frames

    def send_onions(self, frames: list[bytes]) -> None:
        """Send a batch of encrypted onion frames and count them once, in the neighbour's
        account. Frames beyond what its price agreement, its debt limit and our outbound
        lease allow are dropped and counted."""
        neighbor = self.neighbor
        allowed = neighbor.allowance().outbound if neighbor is not None else 0
        if allowed < len(frames):
            self._refused(neighbor, len(frames) - allowed, outbound=True)
            frames = frames[:allowed]
        transport = self.transport
        if type(transport) is UdpTransport:
            sent = transport.send_many(frames)
        else:
            send = transport.send
            sent = 0
            for frame in frames:
                if send(frame):
                    sent += 1
        if neighbor is not None and sent:
            counters = neighbor.counters
            counters.packets_out += sent
            if counters.packets_out >= neighbor.wake_mark:  # settle, or raise the lease
                self.node.accounts.wake(neighbor.fingerprint)
        if sent != len(frames):
            self.link.statistics().drops["queue_full"] += len(frames) - sent

    def _refused(self, neighbor: Neighbor | None, count: int, *, outbound: bool) -> None:
        reason = neighbor.refusal(outbound=outbound) if neighbor is not None else "not_priced"
        self.link.statistics().drops[reason + "_out" if outbound else reason] += count
        if neighbor is not None and not outbound and not neighbor.refusing:
            neighbor.refusing = True  # it is told, at most every so often
            self.node.accounts.wake(neighbor.fingerprint)

    def service(self, now: float) -> None:
        """Send what the link queued and act on its events."""
        for message in self.link.datagrams_to_send():
            self.send(message)
        while (event := self.link.next_event()) is not None:
            match event:
                case LinkEstablished(peer_fingerprint=fingerprint):
                    self.was_established = True
                    self._log = self._log.bind(link=short_hex(fingerprint))
                    self.node.add_link(self)
                    self._log.info("link_up", peer=f"{self.peer_address[0]}:{self.peer_address[1]}")
                case LinkClosed(reason=reason, by_peer=by_peer):
                    self._finish(reason, by_peer)
                case ControlReceived(payload=payload):
                    self.node.on_control(self, payload)

    def fail(self, reason: str) -> None:
        """The transport under the link is gone (EOF, reset)."""
        if self.link.state is not LinkState.CLOSED:
            self.link.close(reason, anyio.current_time())
            self.service(anyio.current_time())

    def _finish(self, reason: str, by_peer: bool) -> None:
        if self.closed.is_set():
            return
        if self.link.peer_fingerprint is not None and reason == "wrong_fingerprint":
            self._log.warning(
                "link_refused",
                reason=reason,
                proven=self.link.peer_fingerprint.hex(),
            )
        elif self.link.state is LinkState.CLOSED and self.node.remove_link(self):
            self._log.info("link_down", reason=reason, by_peer=by_peer)
        else:
            self._log.info("handshake_failed", reason=reason)
        self.closed.set()

    async def run_timers(self) -> None:
        """Fire the link's timers until it closes. Cancelled, it closes the link (telling
        the peer, best effort) so the neighbour need not wait for a keepalive timeout."""
        try:
            while not self.closed.is_set():
                now = anyio.current_time()
                deadline = self.link.get_timer()
                if deadline is None:
                    return
                if now >= deadline:
                    self.link.handle_timer(now)
                    self.service(now)
                    continue
                with anyio.move_on_after(min(deadline - now, TIMER_SLACK)):
                    await self.closed.wait()
        finally:
            self.fail("shutdown")


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
        self.links: dict[bytes, list[LinkRunner]] = {}
        self.drops: Counter[str] = Counter()
        self.relay = RelayStatistics()
        self.graph = RelayGraph()
        self.peeler = Peeler(identity.onion_secret)
        self.peeling = ParallelPeeler(self.peeler.peel_layer, threads=usable_cpus())
        self.hops = DEFAULT_HOPS
        self._docks: dict[int, deque[Datagram]] = {}
        self._delivered = anyio.Event()
        self.gossip = Gossip(identity, self.graph, self._peers)
        self.rpc = GlobalRpc(self._send_rpc)
        # Every neighbour's prices, claims, limits and settlements (runtime/neighbors.py).
        self.accounts = Neighbors(identity, config, self.rpc)
        self.chat = Chat(self.rpc, self.links.__contains__)
        self.ledger: AsyncLedger | None = None
        self.listening: dict[str, Address] = {}
        self._links_changed = anyio.Event()
        self._log = log.bind(node=short_hex(self.fingerprint))
        self._endpoints: list[Endpoint] = []
        self._bound: dict[str, socket.socket | MultiListener[SocketStream]] = {}
        self._control_listener: MultiListener[SocketStream] | None = None
        self.control_address: Address | None = None
        self.started_at = time.monotonic()
        self._task_group: TaskGroup | None = None

    # --- link table ---------------------------------------------------------------------

    def add_link(self, runner: LinkRunner) -> None:
        fingerprint, public = runner.peer_fingerprint, runner.peer_identity_public
        assert fingerprint is not None and public is not None
        self.links.setdefault(fingerprint, []).append(runner)
        self._notify()
        self.gossip.on_link_up(runner)
        self.accounts.on_link_up(
            fingerprint, public, self._route_price(runner.route), runner.attach
        )

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
        """Run `function(*args)` in the node's task group (for work started by upcalls)."""
        assert self._task_group is not None, "Node.run() is running"
        self._task_group.start_soon(function, *args)

    # --- upcalls from links -------------------------------------------------------------

    def on_control(self, runner: LinkRunner, payload: bytes) -> None:
        try:
            message = decode_control(payload)
        except RemoteProtocolError as exc:
            runner.statistics().drops[exc.reason] += 1
            return
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
        re-encrypted for the next link. The layers to peel are peeled together (on two
        threads when there are two CPUs), so they leave after the batch's plain forwards.
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
        if to_peel:
            leaving += self._peel_batch(to_peel, now)
        outgoing: dict[LinkRunner, list[bytes]] = {}
        lanes: dict[bytes, list[bytes] | None] = {}  # next peeler -> its link's frames
        no_route = 0
        for frame in leaving:
            next_peeler = frame[1:_NEXT_PEELER_END]
            lane = lanes.get(next_peeler, _NO_LANE)
            if lane is _NO_LANE:
                lane = lanes[next_peeler] = self._lane(next_peeler, outgoing)
            if lane is None:
                no_route += 1
                continue
            lane.append(frame)
        # Every link's frames are encrypted before any is sent (an error then sends nothing).
        encrypted = [
            (runner, runner.link.encrypt_onions(frames)) for runner, frames in outgoing.items()
        ]
        for runner, frames in encrypted:
            runner.send_onions(frames)
        self.relay.forwarded += forwarded
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
            if isinstance(result, Datagram):
                self._deliver(result)
                stats.delivered += 1
            else:
                leaving.append(onion_frame(*result))
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
                await tg.start(self.accounts.run)
                for name, in_route in self.config.in_routes.items():
                    tg.start_soon(self._listen, name, in_route)
                for name, out_route in self.config.out_routes.items():
                    tg.start_soon(self._dial_forever, name, out_route)
                tg.start_soon(self.gossip.run)
                tg.start_soon(self._serve_control)
                self._log.info("node_started", fingerprint=self.fingerprint.hex())
                task_status.started()
        finally:
            self.peeling.close()
            if self.ledger is not None:
                with anyio.CancelScope(shield=True):
                    await self.accounts.aclose()
                    await self.ledger.aclose()
                self.ledger = None

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
        for name, route in self.config.in_routes.items():
            if name in self._bound:
                continue
            host, port = parse_address(route.listen)
            try:
                if route.protocol == "udp":
                    sock = udp_socket(host)
                    try:
                        sock.bind((host, port))
                    except OSError:
                        sock.close()
                        raise
                    self._bound[name] = sock
                    self.listening[name] = _as_address(sock.getsockname())
                else:
                    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
                    self._bound[name] = listener
                    local = listener.listeners[0].extra(SocketAttribute.local_address)
                    self.listening[name] = _as_address(local)
            except OSError as exc:
                raise ConfigError(
                    f"{self.config.source}: in_routes.{name}.listen: cannot listen on "
                    f"{route.listen}: {exc.strerror or exc}"
                ) from None
        if self.ledger is None:
            self.ledger = await AsyncLedger.open(self.config.db_path)
            self.accounts.start(self.ledger)
            self.chat.start(self.ledger)

    async def _serve_control(self) -> None:
        assert self._control_listener is not None
        server = HttpServer(build_router(self))
        async with self._control_listener:
            await self._control_listener.serve(server.serve_connection)

    async def _listen(self, name: str, route: InRoute) -> None:
        info = RouteInfo(name, route.protocol, "in")
        bound = self._bound[name]
        if isinstance(bound, socket.socket):
            with bound:
                await self._serve_udp(bound, route, info)
        else:
            async with bound:
                await bound.serve(lambda stream: self._serve_tcp(stream, route, info))

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
        assert self._task_group is not None
        task_group = self._task_group

        async def run_session(runner: LinkRunner) -> None:
            try:
                await runner.run_timers()
            finally:
                endpoint.remove(runner.link)
                runners.pop(runner.link.local_index, None)

        read, find_session, find_runner = datagram_reader(sock), endpoint.route, runners.get
        unpack_index = U32.unpack_from
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            arrived: dict[LinkRunner, list[bytes]] = {}
            last: LinkRunner | None = None
            messages: list[bytes] = []
            count = 0
            while count < UDP_BATCH:
                try:
                    datagrams, address = read()
                except BlockingIOError:
                    break
                except OSError:
                    self.drops["udp_error"] += 1
                    continue
                count += len(datagrams)
                address = address[:2]
                for data in datagrams:
                    runner = None
                    # DATA for a known session from the address that opened it: what
                    # `endpoint.route` would find (runners and sessions come and go together).
                    # Anything else takes the full route, which counts the drops.
                    if len(data) >= _DATA_MIN_SIZE and data[0] == DATA:
                        runner = find_runner(unpack_index(data, 1)[0])
                        if runner is not None and runner.peer_address != address:
                            runner = None
                    if runner is None:
                        link = find_session(data, address, now)
                        if link is None:
                            continue
                        runner = find_runner(link.local_index)
                        if runner is None:
                            transport = UdpTransport(sock, address)
                            runner = LinkRunner(self, link, transport, info, address)
                            runners[link.local_index] = runner
                            task_group.start_soon(run_session, runner)
                    if runner is not last:  # a wake-up's datagrams mostly come from one link
                        last = runner
                        messages = arrived.setdefault(runner, [])
                    messages.append(data)
            # Each link takes its messages at once: the hot path runs per link, not per frame.
            batch = [
                (runner, runner.receive(messages, now)) for runner, messages in arrived.items()
            ]
            if batch:
                self.relay_batch(batch, now)
            await anyio.lowlevel.checkpoint()

    async def _serve_tcp(self, stream: SocketStream, route: InRoute, info: RouteInfo) -> None:
        async with stream:
            decoder = StreamDecoder()
            first: bytes | None = None
            mac_key = derive_cookie_keys(route.secret)[1]
            with anyio.move_on_after(self.timers.dead_after):
                while first is None:
                    decoder.receive_bytes(await stream.receive())
                    first = decoder.next_message()
            # Without the cookie MAC the connection is closed without a single byte back.
            if first is None or message_type(first) != HS_INIT or not check_mac1(mac_key, first):
                self.drops["tcp_probe"] += 1
                return
            link = self._new_link(initiator=False, secret=route.secret, reliable=True)
            address = _as_address(stream.extra(SocketAttribute.remote_address))
            runner = LinkRunner(self, link, _NO_TRANSPORT, info, address)
            await self._run_stream_link(stream, decoder, runner, first)

    # --- out_routes ---------------------------------------------------------------------

    async def _dial_forever(self, name: str, route: OutRoute) -> None:
        """Keep one link up on this route: dial, run, and re-dial with jittered backoff."""
        info = RouteInfo(name, route.protocol, "out")
        host, port = parse_address(route.connect)
        expected = parse_fingerprint(route.fingerprint)
        timing = self.config.links
        delay = timing.redial_min_secs
        dial_log = self._log.bind(route=name, protocol=route.protocol)
        while True:
            established = False
            try:
                established = await self._dial_once(route, info, host, port, expected)
            except OSError as exc:
                dial_log.info("dial_failed", error=exc.strerror or str(exc))
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
                stream = await anyio.connect_tcp(host, port)
            async with stream:
                runner = LinkRunner(self, link, _NO_TRANSPORT, info, (host, port))
                await self._run_stream_link(stream, StreamDecoder(), runner, None)
        else:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, address = infos[0]
            with new_udp_socket(family) as sock:
                sock.connect(address)
                runner = LinkRunner(self, link, UdpTransport(sock, None), info, (host, port))
                runner.service(anyio.current_time())
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_connected_udp, sock, runner)
                    await runner.run_timers()
                    tg.cancel_scope.cancel()
        return runner.was_established

    async def _read_connected_udp(self, sock: socket.socket, runner: LinkRunner) -> None:
        read = datagram_reader(sock)
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            messages = read_batch(read, UDP_BATCH)
            if frames := runner.receive(messages, now):
                self.relay_batch([(runner, frames)], now)
            await anyio.lowlevel.checkpoint()

    # --- shared stream (TCP) plumbing ---------------------------------------------------

    async def _run_stream_link(
        self,
        stream: SocketStream,
        decoder: StreamDecoder,
        runner: LinkRunner,
        first: bytes | None,
    ) -> None:
        """Run `runner` over a TCP stream until its link closes or the stream ends."""
        send_queue, receive_queue = anyio.create_memory_object_stream[bytes](TCP_QUEUE)
        runner.transport = TcpTransport(send_queue)
        flushed = anyio.Event()

        async def write() -> None:
            try:
                async with receive_queue:
                    async for frame in receive_queue:
                        # Everything queued meanwhile goes in the same write: one syscall
                        # per wake-up, so the writer keeps up with a batch of relayed frames.
                        frames = [frame]
                        while len(frames) < TCP_QUEUE:
                            try:
                                frames.append(receive_queue.receive_nowait())
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                        await stream.send(b"".join(frames))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                runner.fail("connection_closed")
            finally:
                flushed.set()  # also when cancelled, so shutdown never waits for a dead writer

        async def read() -> None:
            try:
                if first is not None:
                    runner.receive([first], anyio.current_time())
                while True:
                    decoder.receive_bytes(await stream.receive())
                    now = anyio.current_time()
                    messages: list[bytes] = []
                    while (message := decoder.next_message()) is not None:
                        messages.append(message)
                    if frames := runner.receive(messages, now):
                        self.relay_batch([(runner, frames)], now)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                runner.fail("connection_closed")
            except RemoteProtocolError as exc:
                runner.statistics().drops[exc.reason] += 1
                runner.fail(exc.reason)

        with send_queue:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                tg.start_soon(read)
                runner.service(anyio.current_time())
                try:
                    await runner.run_timers()
                finally:
                    send_queue.close()
                    with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
                        await flushed.wait()  # a CLOSE frame may still be queued
                tg.cancel_scope.cancel()


class _NoTransport:
    """Placeholder until a stream link's queue exists; nothing is sent before that."""

    def send(self, message: bytes) -> bool:
        return False

    def close(self) -> None:
        """Nothing to close."""


_NO_TRANSPORT = _NoTransport()


def _as_address(value: object) -> Address:
    assert isinstance(value, tuple), "an IP socket address"
    return (str(value[0]), int(value[1]))
