"""Keeps the relay graph converged with the neighbours'.

At link-up each side pushes its whole graph and asks the neighbour to countersign an
adjacency descriptor for the link. Whatever changes our graph is forwarded to the
neighbours (an unchanged descriptor stops the flood) within FLOOD_DELAY_SECS, so a fresh
node routes within seconds: the changes of that delay share their frames, so a node that
many neighbours join at once sends each of them a few frames per delay, not three per
neighbour that joined. They go to every neighbour, the ones they came from too (to which
they are no change): encoded once, whatever the number of sources. Periodically we re-sign
our own descriptors, pull each neighbour's graph as a backstop, and expire stale entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import anyio
import structlog

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.graph import (
    RESIGN_INTERVAL_SECS,
    AdjacencyDescriptor,
    RelayGraph,
    adjacency_unsigned,
    decode_dump,
    encode_dumps,
    sign_adjacency,
)
from earendil_py.core.identity import Identity, IdentityDescriptor, short_hex
from earendil_py.core.link import LinkStatistics
from earendil_py.core.messages import (
    AdjacencyGrant,
    AdjacencyRequest,
    ControlMessage,
    GraphPull,
    GraphPush,
    encode_control,
)


class Peer(Protocol):
    """What gossip needs of a link to a neighbour."""

    @property
    def peer_fingerprint(self) -> bytes | None: ...

    @property
    def peer_identity_public(self) -> bytes | None: ...

    def statistics(self) -> LinkStatistics: ...

    def send_control(self, payload: bytes) -> bool: ...


log = structlog.get_logger("earendil_py.gossip")

PULL_INTERVAL_SECS = 60.0
# Control frames may be lost (UDP): until a neighbour's adjacency with us is in our graph we
# ask again this often, and push and pull whole graphs, so a lossy link joins in seconds.
REPAIR_INTERVAL_SECS = 1.0
# Changes to our graph wait this long to be flooded together.
FLOOD_DELAY_SECS = 0.05


def unix_now() -> int:
    return int(time.time())


class Gossip:
    def __init__(
        self, identity: Identity, graph: RelayGraph, peers: Callable[[], Sequence[Peer]]
    ) -> None:
        """`peers()`: one link to each neighbour, now."""
        self.identity = identity
        self.fingerprint = identity.fingerprint
        self.graph = graph
        self.peers = peers
        self.own_descriptor = identity.descriptor(unix_now())
        graph.insert_identity(self.own_descriptor, unix_now(), source=None)
        # Changes waiting to be flooded: the newest descriptor of each relay and link.
        self._identities: dict[bytes, IdentityDescriptor] = {}
        self._adjacencies: dict[tuple[bytes, bytes], AdjacencyDescriptor] = {}
        self._flood_wanted = anyio.Event()

    async def run(self, boundary: AbstractContextManager[object]) -> None:
        """Flood, re-sign, pull and expire on their intervals, until cancelled; each round
        inside `boundary` (a fault there loses that round, not the node)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._repair, boundary)
            tg.start_soon(self._flood_loop, boundary)
            await self._refresh(boundary)

    async def _flood_loop(self, boundary: AbstractContextManager[object]) -> None:
        while True:
            await self._flood_wanted.wait()
            await anyio.sleep(FLOOD_DELAY_SECS)
            self._flood_wanted = anyio.Event()
            with boundary:
                self.flood_now()

    async def _repair(self, boundary: AbstractContextManager[object]) -> None:
        while True:
            await anyio.sleep(REPAIR_INTERVAL_SECS)
            with boundary:
                self._repair_now()

    def _repair_now(self) -> None:
        adjacent = set(self.graph.neighbors(self.fingerprint))
        for runner in self._runners():
            if runner.peer_fingerprint not in adjacent:
                self.on_link_up(runner)
                runner.send_control(encode_control(GraphPull()))

    async def _refresh(self, boundary: AbstractContextManager[object]) -> None:
        next_resign = time.monotonic() + RESIGN_INTERVAL_SECS
        while True:
            await anyio.sleep(PULL_INTERVAL_SECS)
            with boundary:
                next_resign = self._refresh_now(next_resign)

    def _refresh_now(self, next_resign: float) -> float:
        """Re-sign if due, expire, pull; returns when the next re-signing is due."""
        now = unix_now()
        if time.monotonic() >= next_resign:
            next_resign = time.monotonic() + RESIGN_INTERVAL_SECS
            self.own_descriptor = self.identity.descriptor(now)
            self.graph.insert_identity(self.own_descriptor, now, source=None)
            for runner in self._runners():
                self._request_adjacency(runner)
        self.graph.expire(now)
        for runner in self._runners():
            runner.send_control(encode_control(GraphPull()))
        return next_resign

    def on_link_up(self, runner: Peer) -> None:
        self._push(runner, self._pushes(self.graph.identities(), self.graph.adjacencies()))
        self._request_adjacency(runner)

    def on_message(self, runner: Peer, message: ControlMessage) -> None:
        # What a neighbour tells us counts against its share of the graph; None would make
        # it ours, so a link without a proven peer (our bug: control frames need one) stops.
        peer = runner.peer_fingerprint
        if peer is None:
            raise LocalProtocolError("gossip from a link whose peer is not proven")
        try:
            match message:
                case GraphPush(dump=dump):
                    graph = self.graph
                    report = graph.insert_dump(decode_dump(dump), unix_now(), source=peer)
                    runner.statistics().drops.update(report.rejected)
                    self._flood(report.identities, report.adjacencies)
                case GraphPull():
                    graph = self.graph
                    self._push(runner, self._pushes(graph.identities(), graph.adjacencies()))
                case AdjacencyRequest():
                    self._grant_adjacency(runner, message)
                case AdjacencyGrant(descriptor=descriptor):
                    if {descriptor.left, descriptor.right} != {self.fingerprint, peer}:
                        raise RemoteProtocolError("grant for another link", "bad_adjacency")
                    # Our own link: it is ours, whoever co-signed it.
                    if self.graph.insert_adjacency(descriptor, unix_now(), source=None):
                        self._flood([], [descriptor])
        except RemoteProtocolError as exc:
            runner.statistics().drops[exc.reason] += 1

    def _grant_adjacency(self, runner: Peer, request: AdjacencyRequest) -> None:
        peer = runner.peer_fingerprint
        if request.identity.identity_public != runner.peer_identity_public or peer is None:
            raise RemoteProtocolError("adjacency request from another identity", "bad_adjacency")
        now = unix_now()
        graph = self.graph
        if graph.insert_identity(request.identity, now, source=peer):
            self._flood([request.identity], [])
        left, right, _ = adjacency_unsigned(self.fingerprint, peer, request.timestamp)
        mine = sign_adjacency(self.identity, left, right, request.timestamp)
        ours_left = left == self.fingerprint
        descriptor = AdjacencyDescriptor(
            left=left,
            right=right,
            timestamp=request.timestamp,
            left_signature=mine if ours_left else request.signature,
            right_signature=request.signature if ours_left else mine,
        )
        # Verifies the peer's signature; a link of ours, so ours in the graph.
        if graph.insert_adjacency(descriptor, now, source=None):
            self._flood([], [descriptor])
        runner.send_control(encode_control(AdjacencyGrant(descriptor)))

    def _request_adjacency(self, runner: Peer) -> None:
        peer = runner.peer_fingerprint
        assert peer is not None
        now = unix_now()
        left, right, _ = adjacency_unsigned(self.fingerprint, peer, now)
        signature = sign_adjacency(self.identity, left, right, now)
        runner.send_control(encode_control(AdjacencyRequest(self.own_descriptor, now, signature)))

    @staticmethod
    def _pushes(
        identities: Iterable[IdentityDescriptor], adjacencies: Iterable[AdjacencyDescriptor]
    ) -> list[bytes]:
        """The control messages that carry these descriptors."""
        return [encode_control(GraphPush(dump)) for dump in encode_dumps(identities, adjacencies)]

    def _push(self, runner: Peer, pushes: list[bytes]) -> None:
        for payload in pushes:
            runner.send_control(payload)
        if runner.peer_fingerprint is not None:
            log.debug(
                "gossip_pushed", neighbor=short_hex(runner.peer_fingerprint), pushes=len(pushes)
            )

    def _flood(
        self, identities: list[IdentityDescriptor], adjacencies: list[AdjacencyDescriptor]
    ) -> None:
        """Flood these changes within FLOOD_DELAY_SECS; a newer descriptor of the same relay
        or link replaces one still waiting."""
        for identity in identities:
            self._identities[identity.identity_public] = identity
        for adjacency in adjacencies:
            self._adjacencies[adjacency.left, adjacency.right] = adjacency
        if identities or adjacencies:
            self._flood_wanted.set()

    def flood_now(self) -> None:
        """Send every neighbour the changes waiting."""
        identities, self._identities = self._identities, {}
        adjacencies, self._adjacencies = self._adjacencies, {}
        if identities or adjacencies:
            pushes = self._pushes(identities.values(), adjacencies.values())
            for runner in self._runners():
                self._push(runner, pushes)

    def _runners(self) -> Sequence[Peer]:
        return self.peers()
