"""Gossip floods: the changes that arrive within one delay share their frames."""

from __future__ import annotations

import contextlib
import random
from collections import Counter

import anyio
import pytest
import structlog

from earendil_py.core.graph import RelayGraph, adjacency_unsigned, decode_dump, sign_adjacency
from earendil_py.core.identity import Identity
from earendil_py.core.link import LinkStatistics
from earendil_py.core.messages import AdjacencyRequest, GraphPush, decode_control
from earendil_py.runtime import gossip as gossip_module
from earendil_py.runtime.faults import INTERNAL_ERROR, Faults
from earendil_py.runtime.gossip import Gossip


def identity(seed: int) -> Identity:
    return Identity.generate(random.Random(seed).randbytes)


class Peer:
    """A link to a neighbour that keeps the control frames sent on it."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.frames: list[bytes] = []
        self.stats = LinkStatistics()

    @property
    def peer_fingerprint(self) -> bytes:
        return self.identity.fingerprint

    @property
    def peer_identity_public(self) -> bytes:
        return self.identity.identity_public

    def statistics(self) -> LinkStatistics:
        return self.stats

    def send_control(self, payload: bytes) -> bool:
        self.frames.append(payload)
        return True

    def pushed(self) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
        """The identities and adjacencies of the graph pushes sent since the last call."""
        identities, adjacencies = [], []
        for frame in self.frames:
            message = decode_control(frame)
            if isinstance(message, GraphPush):
                dump = decode_dump(message.dump)
                identities += [d.fingerprint for d in dump.identities]
                adjacencies += [(d.left, d.right) for d in dump.adjacencies]
        self.frames.clear()
        return identities, adjacencies


def request_from(peer: Peer, me: bytes, now: int) -> AdjacencyRequest:
    left, right, _ = adjacency_unsigned(peer.identity.fingerprint, me, now)
    signature = sign_adjacency(peer.identity, left, right, now)
    return AdjacencyRequest(peer.identity.descriptor(now), now, signature)


def test_joins_within_one_delay_share_one_frame() -> None:
    me = identity(1)
    peers = [Peer(identity(seed)) for seed in (2, 3, 4)]
    gossip = Gossip(me, RelayGraph(), lambda: peers)
    joining = peers[:2]
    now = gossip_module.unix_now()
    for peer in joining:  # each join changes the graph twice: its identity, our adjacency
        gossip.on_message(peer, request_from(peer, me.fingerprint, now))
    for peer in joining:
        peer.frames.clear()  # the grants of their adjacencies
    assert all(p.frames == [] for p in peers)  # not yet: the flood waits for the delay
    gossip.flood_now()
    for peer in peers:  # the joining ones too: to them it is no change, and stops there
        assert len(peer.frames) == 1
        identities, adjacencies = peer.pushed()
        assert sorted(identities) == sorted(p.identity.fingerprint for p in joining)
        assert sorted(adjacencies) == sorted((a.left, a.right) for a in gossip.graph.adjacencies())
    gossip.flood_now()  # nothing is left waiting
    assert all(p.frames == [] for p in peers)


@pytest.mark.anyio
async def test_the_flood_goes_out_by_itself_after_the_delay() -> None:
    me = identity(1)
    peers = [Peer(identity(seed)) for seed in (2, 3)]
    gossip = Gossip(me, RelayGraph(), lambda: peers)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gossip.run, contextlib.nullcontext())
            now = gossip_module.unix_now()
            gossip.on_message(peers[0], request_from(peers[0], me.fingerprint, now))
            while not peers[1].frames:
                await anyio.sleep(gossip_module.FLOOD_DELAY_SECS / 5)
            assert peers[1].pushed()[0] == [peers[0].identity.fingerprint]
            tg.cancel_scope.cancel()


class FailingPeer(Peer):
    def send_control(self, payload: bytes) -> bool:
        raise RuntimeError("a bug in a link's send path")


@pytest.mark.anyio
async def test_a_fault_in_a_flood_loses_that_flood_not_the_gossip() -> None:
    me = identity(1)
    peers = [Peer(identity(seed)) for seed in (2, 3)]
    failing = FailingPeer(identity(4))
    drops: Counter[str] = Counter()
    boundary = Faults(structlog.get_logger()).boundary(drops, "gossip")
    gossip = Gossip(me, RelayGraph(), lambda: [failing, *peers])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gossip.run, boundary)
            now = gossip_module.unix_now()
            gossip.on_message(peers[0], request_from(peers[0], me.fingerprint, now))
            while not drops:
                await anyio.sleep(gossip_module.FLOOD_DELAY_SECS / 5)
            assert drops == {INTERNAL_ERROR: 1}
            peers[1].frames.clear()
            gossip.on_message(peers[1], request_from(peers[1], me.fingerprint, now))
            while drops[INTERNAL_ERROR] < 2:  # the next flood ran, and failed the same way
                await anyio.sleep(gossip_module.FLOOD_DELAY_SECS / 5)
            tg.cancel_scope.cancel()
