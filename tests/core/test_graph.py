"""The relay graph: signed descriptors, freshness, bounds, paths, routes and convergence."""

from __future__ import annotations

import contextlib
import random
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core import graph as graph_module
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.graph import (
    DESCRIPTOR_TTL_SECS,
    EVICTION_BATCH_DIVISOR,
    MAX_CLOCK_SKEW_SECS,
    MAX_IDENTITIES,
    RESIGN_INTERVAL_SECS,
    AdjacencyDescriptor,
    GraphDump,
    RelayGraph,
    Share,
    adjacency_unsigned,
    decode_dump,
    encode_dumps,
    sign_adjacency,
)
from earendil_py.core.identity import Identity, IdentityDescriptor, fingerprint_of
from earendil_py.core.packet import MAX_HOPS, Delivered, Forward, build_packet, peel_packet
from tests.helpers import seeded_rng

NOW = 1_800_000_000

Descriptor = IdentityDescriptor | AdjacencyDescriptor


def _identities(count: int, seed: int = 0) -> list[Identity]:
    rng = seeded_rng(seed)
    return [Identity.generate(rng) for _ in range(count)]


def _adjacency(a: Identity, b: Identity, timestamp: int = NOW) -> AdjacencyDescriptor:
    """The two-step signing: one endpoint proposes, the other countersigns."""
    left, right, _message = adjacency_unsigned(a.fingerprint, b.fingerprint, timestamp)
    by_fp = {a.fingerprint: a, b.fingerprint: b}
    return AdjacencyDescriptor(
        left=left,
        right=right,
        timestamp=timestamp,
        left_signature=sign_adjacency(by_fp[left], left, right, timestamp),
        right_signature=sign_adjacency(by_fp[right], left, right, timestamp),
    )


def _graph(
    nodes: list[Identity], edges: list[tuple[int, int]], now: int = NOW, **bounds: int
) -> RelayGraph:
    """A graph of our own entries (source None)."""
    graph = RelayGraph(**bounds)
    for node in nodes:
        assert graph.insert_identity(node.descriptor(now), now, source=None)
    for a, b in edges:
        assert graph.insert_adjacency(_adjacency(nodes[a], nodes[b], now), now, source=None)
    return graph


def _fps(nodes: list[Identity], indices: list[int]) -> list[bytes]:
    return [nodes[i].fingerprint for i in indices]


def _reason(excinfo: pytest.ExceptionInfo[RemoteProtocolError]) -> str:
    return excinfo.value.reason


def _insert(
    graph: RelayGraph, descriptor: Descriptor, now: int, source: bytes | None = None
) -> bool:
    if isinstance(descriptor, AdjacencyDescriptor):
        return graph.insert_adjacency(descriptor, now, source=source)
    return graph.insert_identity(descriptor, now, source=source)


# --- paths ---------------------------------------------------------------------------------


def test_line_topology_paths_and_next_hops() -> None:
    nodes = _identities(5)
    graph = _graph(nodes, [(0, 1), (1, 2), (2, 3), (3, 4)])
    fp = [n.fingerprint for n in nodes]
    assert graph.shortest_path(fp[0], fp[4]) == fp
    assert graph.shortest_path(fp[4], fp[1]) == fp[1:][::-1]
    assert graph.shortest_path(fp[2], fp[2]) == [fp[2]]
    assert graph.next_hop(fp[0], fp[4]) == fp[1]
    assert graph.next_hop(fp[3], fp[0]) == fp[2]
    assert graph.next_hop(fp[2], fp[2]) is None
    assert graph.neighbors(fp[2]) == sorted([fp[1], fp[3]])
    assert graph.onion_key(fp[3]) == nodes[3].onion_public
    stats = graph.statistics()
    assert (stats.identities, stats.adjacencies) == (5, 4)


def test_unknown_or_disconnected_nodes_have_no_path() -> None:
    nodes = _identities(4)
    graph = _graph(nodes, [(0, 1), (2, 3)])
    fp = [n.fingerprint for n in nodes]
    assert graph.shortest_path(fp[0], fp[3]) is None
    assert graph.next_hop(fp[0], fp[3]) is None
    stranger = _identities(1, seed=99)[0].fingerprint
    assert graph.shortest_path(fp[0], stranger) is None
    assert graph.shortest_path(stranger, stranger) is None
    assert graph.neighbors(stranger) == []
    assert graph.onion_key(stranger) is None


def test_ring_breaks_ties_by_fingerprint_whatever_the_insertion_order() -> None:
    nodes = _identities(6, seed=1)
    ring = [(i, (i + 1) % 6) for i in range(6)]
    fp = [n.fingerprint for n in nodes]
    # 0 -> 3 has two shortest paths; BFS visits 0's neighbours in fingerprint order, so the
    # side of the smaller of fp[1] and fp[5] wins.
    expected = _fps(nodes, [0, 1, 2, 3] if fp[1] < fp[5] else [0, 5, 4, 3])
    for order_seed in range(4):
        edges = ring[:]
        random.Random(order_seed).shuffle(edges)
        graph = _graph(nodes, edges)
        assert graph.shortest_path(fp[0], fp[3]) == expected
        assert graph.next_hop(fp[0], fp[3]) == expected[1]
        assert graph.shortest_path(fp[0], fp[2]) == _fps(nodes, [0, 1, 2])
        assert graph.next_hop(fp[0], fp[4]) == fp[5]


def test_next_hop_cache_follows_topology_changes() -> None:
    nodes = _identities(5, seed=2)
    graph = _graph(nodes, [(0, 1), (1, 2), (2, 3), (3, 4)])
    fp = [n.fingerprint for n in nodes]
    assert graph.next_hop(fp[0], fp[4]) == fp[1]
    assert graph.statistics().cached_sources == 1
    # A refresh of a known edge is not a topology change: the table stays.
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[1], NOW + 1), NOW + 1, source=None)
    assert graph.statistics().cached_sources == 1
    # A shortcut is.
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[4], NOW + 1), NOW + 1, source=None)
    assert graph.statistics().cached_sources == 0
    assert graph.next_hop(fp[0], fp[4]) == fp[4]
    assert graph.shortest_path(fp[0], fp[3]) == _fps(nodes, [0, 4, 3])


# --- signatures and freshness --------------------------------------------------------------


def test_adjacency_with_one_forged_signature_is_rejected() -> None:
    a, b, mallory = _identities(3, seed=3)
    graph = _graph([a, b, mallory], [])
    genuine = _adjacency(a, b)
    left_is_a = genuine.left == a.fingerprint
    # Mallory cannot sign as a or b, so whichever half she fills fails.
    forged_sig = mallory.sign(graph_module.ADJACENCY_DOMAIN, b"anything")
    for forged in (
        msgspec.structs.replace(genuine, left_signature=forged_sig),
        msgspec.structs.replace(genuine, right_signature=forged_sig),
        msgspec.structs.replace(genuine, right_signature=genuine.left_signature),
        msgspec.structs.replace(genuine, timestamp=NOW + 1),
    ):
        with pytest.raises(RemoteProtocolError) as excinfo:
            graph.insert_adjacency(forged, NOW, source=None)
        assert _reason(excinfo) == "bad_signature"
    assert list(graph.adjacencies()) == []
    assert graph.insert_adjacency(genuine, NOW, source=None)
    assert graph.neighbors(a.fingerprint) == [b.fingerprint]
    assert left_is_a == (a.fingerprint < b.fingerprint)


def test_malformed_adjacency_is_rejected() -> None:
    a, b = _identities(2, seed=4)
    graph = _graph([a, b], [])
    genuine = _adjacency(a, b)
    swapped = msgspec.structs.replace(genuine, left=genuine.right, right=genuine.left)
    short = msgspec.structs.replace(genuine, left_signature=b"\x00" * 10)
    for bad in (swapped, short):
        with pytest.raises(RemoteProtocolError) as excinfo:
            graph.insert_adjacency(bad, NOW, source=None)
        assert _reason(excinfo) == "bad_descriptor"


def test_adjacency_with_an_unknown_endpoint_is_rejected() -> None:
    a, b = _identities(2, seed=5)
    graph = _graph([a], [])
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_adjacency(_adjacency(a, b), NOW, source=None)
    assert _reason(excinfo) == "unknown_endpoint"
    assert graph.insert_identity(b.descriptor(NOW), NOW, source=None)
    assert graph.insert_adjacency(_adjacency(a, b), NOW, source=None)


def test_forged_identity_descriptor_is_rejected() -> None:
    a, b = _identities(2, seed=6)
    descriptor = a.descriptor(NOW)
    b_signature = b.descriptor(NOW).signature
    graph = RelayGraph()
    for bad, reason in (
        (msgspec.structs.replace(descriptor, onion_public=b.onion_public), "bad_signature"),
        (
            msgspec.structs.replace(descriptor, signature=b_signature),
            "bad_signature",
        ),
        (msgspec.structs.replace(descriptor, onion_public=b"short"), "bad_descriptor"),
        (msgspec.structs.replace(descriptor, identity_public=b"short"), "bad_descriptor"),
    ):
        with pytest.raises(RemoteProtocolError) as excinfo:
            graph.insert_identity(bad, NOW, source=None)
        assert _reason(excinfo) == reason
    assert graph.statistics().identities == 0


def test_newer_descriptor_replaces_older_and_older_is_ignored() -> None:
    a, b = _identities(2, seed=7)
    rotated = Identity(a.signing_seed, seeded_rng(70)(32))  # same identity, new onion key
    graph = _graph([a, b], [(0, 1)])
    assert graph.insert_identity(rotated.descriptor(NOW + 10), NOW + 10, source=None)
    assert graph.onion_key(a.fingerprint) == rotated.onion_public
    assert not graph.insert_identity(a.descriptor(NOW), NOW + 10, source=None)
    assert not graph.insert_identity(
        rotated.descriptor(NOW + 10), NOW + 10, source=None
    )  # duplicate
    assert graph.onion_key(a.fingerprint) == rotated.onion_public

    newer = _adjacency(a, b, NOW + 10)
    assert graph.insert_adjacency(newer, NOW + 10, source=None)
    assert not graph.insert_adjacency(_adjacency(a, b, NOW), NOW + 10, source=None)
    assert not graph.insert_adjacency(newer, NOW + 10, source=None)
    assert list(graph.adjacencies()) == [newer]
    assert graph.statistics().identities == 2


def test_future_dated_beyond_skew_is_rejected() -> None:
    a, b = _identities(2, seed=8)
    graph = RelayGraph()
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_identity(a.descriptor(NOW + MAX_CLOCK_SKEW_SECS + 1), NOW, source=None)
    assert _reason(excinfo) == "bad_timestamp"
    assert graph.insert_identity(a.descriptor(NOW + MAX_CLOCK_SKEW_SECS), NOW, source=None)
    assert graph.insert_identity(b.descriptor(NOW), NOW, source=None)
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_adjacency(_adjacency(a, b, NOW + MAX_CLOCK_SKEW_SECS + 1), NOW, source=None)
    assert _reason(excinfo) == "bad_timestamp"
    assert graph.insert_adjacency(_adjacency(a, b, NOW + MAX_CLOCK_SKEW_SECS), NOW, source=None)


def test_already_expired_descriptors_are_ignored() -> None:
    a, b = _identities(2, seed=9)
    graph = _graph([a, b], [])
    later = NOW + DESCRIPTOR_TTL_SECS
    c = _identities(1, seed=90)[0]
    assert not graph.insert_identity(c.descriptor(NOW), later, source=None)
    assert not graph.insert_adjacency(_adjacency(a, b, NOW), later, source=None)
    assert graph.statistics().identities == 2
    assert graph.statistics().adjacencies == 0


def test_expiry_removes_stale_entries_and_their_paths() -> None:
    nodes = _identities(4, seed=10)
    graph = _graph(nodes, [(0, 1), (1, 2), (2, 3)])
    fp = [n.fingerprint for n in nodes]
    assert graph.shortest_path(fp[0], fp[3]) is not None
    # Everyone but node 3 re-signs on schedule, and so do the links not touching 3.
    for tick in range(1, DESCRIPTOR_TTL_SECS // RESIGN_INTERVAL_SECS + 1):
        now = NOW + tick * RESIGN_INTERVAL_SECS
        for node in nodes[:3]:
            assert graph.insert_identity(node.descriptor(now), now, source=None)
        for a, b in ((0, 1), (1, 2)):
            assert graph.insert_adjacency(_adjacency(nodes[a], nodes[b], now), now, source=None)
        removed = graph.expire(now)
        assert removed == (0 if now < NOW + DESCRIPTOR_TTL_SECS else 2)
    assert graph.identity(fp[3]) is None
    assert graph.shortest_path(fp[0], fp[3]) is None
    assert graph.shortest_path(fp[0], fp[2]) == fp[:3]
    # The whole graph lapses one TTL after the last refresh.
    assert graph.expire(now + DESCRIPTOR_TTL_SECS) == 5
    assert graph.shortest_path(fp[0], fp[2]) is None
    assert graph.statistics().identities == graph.statistics().adjacencies == 0


def test_expired_identity_takes_its_adjacencies_along() -> None:
    a, b = _identities(2, seed=11)
    graph = _graph([a, b], [])
    later = NOW + DESCRIPTOR_TTL_SECS - 1
    assert graph.insert_identity(b.descriptor(later), later, source=None)
    assert graph.insert_adjacency(_adjacency(a, b, later), later, source=None)
    assert graph.expire(NOW + DESCRIPTOR_TTL_SECS) == 2  # a, and the fresh a-b link
    assert graph.neighbors(b.fingerprint) == []


def test_refreshes_of_held_entries_go_through_a_full_graph() -> None:
    nodes = _identities(3, seed=12)
    graph = _graph(nodes[:2], [(0, 1)], max_identities=2, max_adjacencies=1)
    assert graph.insert_identity(nodes[0].descriptor(NOW + 1), NOW + 1, source=None)
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[1], NOW + 1), NOW + 1, source=None)
    # Our own entries never go: a table holding nothing else refuses a newcomer.
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_identity(nodes[2].descriptor(NOW), NOW, source=b"N" * 32)
    assert _reason(excinfo) == "graph_full"
    with pytest.raises(LocalProtocolError):
        RelayGraph(max_identities=0)


# --- bounds and fairness ---------------------------------------------------------------------


def _dump(
    graph: RelayGraph,
    source: Identity,
    identities: list[Identity],
    adjacencies: list[tuple[Identity, Identity]],
) -> Counter[str]:
    """`source`, a neighbour, sends descriptors; returns the rejections."""
    dump = GraphDump(
        [node.descriptor(NOW) for node in identities], [_adjacency(a, b) for a, b in adjacencies]
    )
    return graph.insert_dump(dump, NOW, source=source.fingerprint).rejected


def _neighborhood(graph: RelayGraph, me: Identity, neighbors: list[Identity]) -> None:
    """Us, linked to neighbours that each sent their own descriptor."""
    assert graph.insert_identity(me.descriptor(NOW), NOW, source=None)
    for neighbor in neighbors:
        assert not _dump(graph, neighbor, [neighbor], [])
        assert graph.insert_adjacency(_adjacency(me, neighbor), NOW, source=None)


def _held(graph: RelayGraph, nodes: list[Identity]) -> list[bool]:
    return [graph.identity(node.fingerprint) is not None for node in nodes]


def test_a_flooding_neighbor_cannot_keep_an_honest_relay_out() -> None:
    me, attacker, honest = _identities(3, seed=30)
    sybils = _identities(40, seed=31)  # self-made, free, far more than the tables hold
    graph = RelayGraph(max_identities=16, max_adjacencies=24)
    _neighborhood(graph, me, [attacker, honest])
    previous = attacker
    for sybil in sybils:  # each linked to the attacker and to the one before: all reachable
        _dump(graph, attacker, [sybil], [(sybil, attacker), (sybil, previous)])
        previous = sybil
        stats = graph.statistics()
        assert stats.identities <= 16
        assert stats.adjacencies <= 24
    assert (stats.identities, stats.adjacencies) == (16, 24)
    flood = graph.shares()[attacker.fingerprint]
    assert flood == Share(identities=14, adjacencies=22)  # all but ours and the honest one's

    relay, far_relay = _identities(2, seed=32)
    rejected = _dump(graph, honest, [relay, far_relay], [(relay, honest), (far_relay, relay)])
    assert not rejected
    assert graph.next_hop(me.fingerprint, far_relay.fingerprint) == honest.fingerprint
    assert graph.shortest_path(me.fingerprint, far_relay.fingerprint) == _fps(
        [me, honest, relay, far_relay], [0, 1, 2, 3]
    )
    route = graph.choose_route(me.fingerprint, far_relay.fingerprint, 3, seeded_rng(1))
    assert route[-1] == (far_relay.fingerprint, far_relay.onion_public)
    # The room came out of the flood; ours, the neighbours' and the links to them stayed.
    shares = graph.shares()
    assert shares[honest.fingerprint] == Share(identities=3, adjacencies=2)
    assert shares[None] == Share(identities=1, adjacencies=2)
    assert shares[attacker.fingerprint].identities < flood.identities
    assert _held(graph, [me, attacker, honest]) == [True] * 3
    assert graph.neighbors(me.fingerprint) == sorted([attacker.fingerprint, honest.fingerprint])
    stats = graph.statistics()
    assert stats.evicted_identities >= 2
    assert (stats.identities, stats.adjacencies) == (16, 24)


def test_unreachable_entries_are_evicted_first() -> None:
    me, attacker, honest = _identities(3, seed=33)
    reachable = _identities(5, seed=34)
    unreachable = _identities(2, seed=35)
    graph = RelayGraph(max_identities=10)
    _neighborhood(graph, me, [attacker, honest])
    _dump(graph, attacker, reachable, [(node, attacker) for node in reachable])
    _dump(graph, attacker, unreachable, [])
    assert graph.statistics().identities == 10
    assert graph.next_hop(me.fingerprint, reachable[0].fingerprint) == attacker.fingerprint
    newcomers = _identities(3, seed=36)
    for count, newcomer in enumerate(newcomers[:2], start=1):
        assert not _dump(graph, honest, [newcomer], [(newcomer, honest)])
        # The attacker's unreachable entries go, oldest first, though they are newer.
        assert _held(graph, unreachable) == [False] * count + [True] * (2 - count)
        assert _held(graph, reachable) == [True] * 5
    # Then the largest share's oldest, and the path cache follows.
    assert not _dump(graph, honest, [newcomers[2]], [(newcomers[2], honest)])
    assert _held(graph, reachable) == [False] + [True] * 4
    assert graph.next_hop(me.fingerprint, reachable[0].fingerprint) is None
    assert graph.next_hop(me.fingerprint, newcomers[2].fingerprint) == honest.fingerprint


def test_unreachable_links_are_evicted_first() -> None:
    me, attacker, honest = _identities(3, seed=37)
    reachable = _identities(3, seed=38)
    island = _identities(3, seed=39)
    graph = RelayGraph(max_adjacencies=8)
    _neighborhood(graph, me, [attacker, honest])
    _dump(graph, attacker, reachable, [(node, attacker) for node in reachable])
    ring = [(island[0], island[1]), (island[1], island[2]), (island[2], island[0])]
    _dump(graph, attacker, island, ring)
    assert graph.statistics().adjacencies == 8
    relay = _identities(1, seed=40)[0]
    assert not _dump(graph, honest, [relay], [(relay, honest)])
    held = {(d.left, d.right) for d in graph.adjacencies()}
    expected_gone = _adjacency(*ring[0])
    assert (expected_gone.left, expected_gone.right) not in held
    assert len(held) == 8
    assert all(graph.next_hop(me.fingerprint, n.fingerprint) for n in [*reachable, relay])
    assert _held(graph, island) == [True] * 3  # a link's eviction leaves its endpoints


def test_the_largest_share_goes_first_and_no_one_loses_its_fair_share() -> None:
    me, big, small = _identities(3, seed=41)
    big_relays = _identities(6, seed=42)
    small_relays = _identities(12, seed=43)
    graph = RelayGraph(max_identities=12)
    _neighborhood(graph, me, [big, small])
    _dump(graph, big, big_relays, [(node, big) for node in big_relays])
    _dump(graph, small, small_relays[:3], [(node, small) for node in small_relays[:3]])
    assert graph.shares()[big.fingerprint].identities == 7
    assert graph.shares()[small.fingerprint].identities == 4
    # Three sources hold entries: a fair share is 12 / 3 = 4. The small one holds no more,
    # so the big one pays for the newcomer.
    assert not _dump(graph, small, [small_relays[3]], [(small_relays[3], small)])
    assert _held(graph, big_relays) == [False] + [True] * 5
    for relay in small_relays[4:]:
        _dump(graph, small, [relay], [(relay, small)])
        assert graph.shares()[big.fingerprint].identities >= 4
    # Once the small one holds the larger share, it pays for its own newcomers.
    assert graph.shares()[big.fingerprint].identities == 5
    assert graph.shares()[small.fingerprint].identities == 6
    assert _held(graph, small_relays) == [False] * 7 + [True] * 5  # its own oldest went


def test_a_batch_takes_a_share_down_to_its_fair_size_and_no_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(graph_module, "EVICTION_BATCH_DIVISOR", 2)  # batches of 6
    me, big, small = _identities(3, seed=55)
    big_relays = _identities(6, seed=56)
    small_relays = _identities(4, seed=57)
    graph = RelayGraph(max_identities=12)
    _neighborhood(graph, me, [big, small])
    _dump(graph, big, big_relays, [])
    _dump(graph, small, small_relays[:3], [])
    assert not _dump(graph, small, [small_relays[3]], [])
    # The big share (7 of 12, with 3 sources) gave 3 of its oldest, down to 12 / 3 = 4.
    assert _held(graph, big_relays) == [False] * 3 + [True] * 3
    assert graph.statistics().evicted_identities == 3
    assert graph.statistics().identities == 10


def test_a_new_neighbor_gets_a_share_of_a_table_split_evenly() -> None:
    me, first, second, third = _identities(4, seed=52)
    relays = _identities(5, seed=53)
    graph = RelayGraph(max_adjacencies=6)
    _neighborhood(graph, me, [first, second])
    _dump(graph, first, relays[:2], [(relays[0], first), (relays[1], first)])
    _dump(graph, second, relays[2:4], [(relays[2], second), (relays[3], second)])
    # Full, and we and the two neighbours hold 2 = 6 / 3 links each: no one more than a
    # fair share. With a third source a fair share is 6 / 4, and a newcomer gets in.
    assert graph.statistics().adjacencies == 6
    assert not _dump(graph, third, [third, relays[4]], [(relays[4], third)])
    assert graph.neighbors(relays[4].fingerprint) == [third.fingerprint]
    assert graph.neighbors(relays[0].fingerprint) == []  # the oldest of the first's share
    assert graph.shares()[third.fingerprint] == Share(identities=2, adjacencies=1)


def test_our_entries_and_our_neighbors_identities_are_never_evicted() -> None:
    me, neighbor, linked, stranger = _identities(4, seed=44)
    other = b"O" * 32
    graph = RelayGraph(max_identities=3, max_adjacencies=1)
    assert graph.insert_identity(me.descriptor(NOW), NOW, source=None)
    # The neighbour's own descriptor, and a node linked to us that a neighbour told us of.
    assert not _dump(graph, neighbor, [neighbor, linked], [(linked, me)])
    assert graph.shares()[neighbor.fingerprint] == Share(identities=2, adjacencies=1)
    for descriptor in (
        stranger.descriptor(NOW),
        _adjacency(neighbor, linked),
    ):
        with pytest.raises(RemoteProtocolError) as excinfo:
            _insert(graph, descriptor, NOW, source=other)
        assert _reason(excinfo) == "graph_full"
    assert _held(graph, [me, neighbor, linked]) == [True] * 3
    assert graph.neighbors(me.fingerprint) == [linked.fingerprint]
    assert graph.statistics().evicted_identities == 0


def test_refreshes_keep_the_first_source_and_expiry_releases_shares() -> None:
    me, first, second = _identities(3, seed=45)
    relay = _identities(1, seed=46)[0]
    graph = RelayGraph()
    _neighborhood(graph, me, [first, second])
    assert not _dump(graph, first, [relay], [(relay, first)])
    refreshed = relay.descriptor(NOW + 10)
    assert graph.insert_identity(refreshed, NOW + 10, source=second.fingerprint)
    assert graph.identity(relay.fingerprint) == refreshed
    assert graph.shares()[first.fingerprint] == Share(identities=2, adjacencies=1)
    assert graph.shares()[second.fingerprint] == Share(identities=1, adjacencies=0)
    assert graph.expire(NOW + DESCRIPTOR_TTL_SECS) == 3 + 3  # all but the refreshed relay
    assert graph.shares() == {first.fingerprint: Share(identities=1, adjacencies=0)}


def test_a_flood_at_the_real_bound_leaves_room_for_an_honest_relay() -> None:
    me, attacker, honest = _identities(3, seed=47)
    graph = RelayGraph()
    _neighborhood(graph, me, [attacker, honest])
    sybils = _identities(MAX_IDENTITIES - 3, seed=48)
    report = graph.insert_dump(
        GraphDump([s.descriptor(NOW) for s in sybils], []), NOW, source=attacker.fingerprint
    )
    assert not report.rejected
    assert graph.statistics().identities == MAX_IDENTITIES
    relay = _identities(1, seed=49)[0]
    assert not _dump(graph, honest, [relay], [(relay, honest)])
    assert graph.next_hop(me.fingerprint, relay.fingerprint) == honest.fingerprint
    # One batch made the room, all of it from the flood.
    batch = MAX_IDENTITIES // EVICTION_BATCH_DIVISOR
    assert graph.statistics().evicted_identities == batch
    assert graph.shares()[attacker.fingerprint].identities == MAX_IDENTITIES - 2 - batch
    assert graph.statistics().identities == MAX_IDENTITIES - batch + 1


# Property: several sources insert, in any order, from pools that overlap. Module-level so
# that the signing is done once.
_ME = _identities(1, seed=50)[0]
_POOL = _identities(8, seed=51)
_SOURCES: list[bytes | None] = [b"1" * 32, b"2" * 32, b"3" * 32, None]
_DESCRIPTORS: list[Descriptor] = [
    *(node.descriptor(NOW) for node in _POOL),
    *(node.descriptor(NOW + 1) for node in _POOL[:4]),  # refreshes
    *(_adjacency(a, b) for i, a in enumerate(_POOL) for b in _POOL[i + 1 :] if (i + 1) % 3),
    _adjacency(_ME, _POOL[0]),
]
# One source brings most, so that it often holds more than its share.
_SOURCE_INDICES = st.sampled_from([0, 0, 0, 1, 2, 3])
_MAX_IDENTITIES = 6
_MAX_ADJACENCIES = 7


def _entries(graph: RelayGraph) -> set[bytes | tuple[bytes, bytes]]:
    return {fingerprint_of(d.identity_public) for d in graph.identities()} | {
        (d.left, d.right) for d in graph.adjacencies()
    }


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(_SOURCE_INDICES, st.integers(0, len(_DESCRIPTORS) - 1)),
        max_size=80,
    ),
    st.sampled_from([2, EVICTION_BATCH_DIVISOR]),  # batches of 3 entries, or of 1
)
def test_no_source_at_or_below_its_fair_share_loses_an_entry(
    steps: list[tuple[int, int]], batch_divisor: int
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_module, "EVICTION_BATCH_DIVISOR", batch_divisor)
        _check_fair_shares(steps)


def _check_fair_shares(steps: list[tuple[int, int]]) -> None:
    graph = RelayGraph(max_identities=_MAX_IDENTITIES, max_adjacencies=_MAX_ADJACENCIES)
    assert graph.insert_identity(_ME.descriptor(NOW), NOW, source=None)
    owner: dict[bytes | tuple[bytes, bytes], bytes | None] = {_ME.fingerprint: None}
    for source_index, descriptor_index in steps:
        source = _SOURCES[source_index]
        before = dict(owner)
        with contextlib.suppress(RemoteProtocolError):
            _insert(graph, _DESCRIPTORS[descriptor_index], NOW, source=source)
        held = _entries(graph)
        for key in held - before.keys():
            owner[key] = source  # the first source to bring an entry owns it
        for key in before.keys() - held:
            del owner[key]
        stats = graph.statistics()
        assert stats.identities <= _MAX_IDENTITIES
        assert stats.adjacencies <= _MAX_ADJACENCIES
        for is_link, bound in ((False, _MAX_IDENTITIES), (True, _MAX_ADJACENCIES)):
            table = {k: s for k, s in before.items() if isinstance(k, tuple) == is_link}
            counts = Counter(table.values())
            sources = len(counts) + (source not in counts)
            # Evicted, not taken along with an evicted endpoint: a link whose ends are held.
            evicted = Counter(
                s
                for k, s in table.items()
                if k not in held and (not isinstance(k, tuple) or {k[0], k[1]} <= held)
            )
            for evicted_source, lost in evicted.items():
                # A fair share is bound / sources; eviction takes no one below it.
                assert counts[evicted_source] - lost >= bound // sources
        expected = {
            s: Share(
                sum(1 for k, o in owner.items() if o == s and not isinstance(k, tuple)),
                sum(1 for k, o in owner.items() if o == s and isinstance(k, tuple)),
            )
            for s in set(owner.values())
        }
        assert graph.shares() == expected


def test_signing_helpers_refuse_misuse() -> None:
    a, b, c = _identities(3, seed=13)
    left, right, _ = adjacency_unsigned(b.fingerprint, a.fingerprint, NOW)
    assert left < right
    assert (left, right) == tuple(sorted([a.fingerprint, b.fingerprint]))
    with pytest.raises(LocalProtocolError):
        adjacency_unsigned(a.fingerprint, a.fingerprint, NOW)
    with pytest.raises(LocalProtocolError):
        sign_adjacency(c, left, right, NOW)  # c is not an endpoint
    with pytest.raises(LocalProtocolError):
        sign_adjacency(a, right, left, NOW)  # not canonical


# --- routes --------------------------------------------------------------------------------


def test_choose_route_gives_distinct_peelers_ending_at_dst_and_packets_flow() -> None:
    nodes = _identities(8, seed=14)
    ring = [(i, (i + 1) % 8) for i in range(8)]
    graph = _graph(nodes, ring)
    secrets = {n.fingerprint: n.onion_secret for n in nodes}
    src, dst = nodes[0].fingerprint, nodes[4].fingerprint
    seen_first = set()
    for seed in range(20):
        route = graph.choose_route(src, dst, MAX_HOPS, seeded_rng(seed))
        peelers = [fp for fp, _ in route]
        assert len(route) == MAX_HOPS
        assert peelers[-1] == dst
        assert len(set(peelers)) == len(peelers)
        assert src not in peelers
        assert all(onion == graph.onion_key(fp) for fp, onion in route)
        seen_first.add(peelers[0])

        next_peeler, packet = build_packet(route, b"hello over the graph", seeded_rng(seed))
        for fp in peelers:
            assert next_peeler == fp
            result = peel_packet(packet, secrets[fp])
            if isinstance(result, Forward):
                next_peeler, packet = result.next_peeler, result.packet
        assert isinstance(result, Delivered)
        assert result.payload == b"hello over the graph"
    assert len(seen_first) > 3  # the rng, not a fixed order, picks the peelers
    assert graph.choose_route(src, dst, 3, seeded_rng(5)) == graph.choose_route(
        src, dst, 3, seeded_rng(5)
    )


def test_choose_route_uses_what_exists_and_refuses_the_unreachable() -> None:
    nodes = _identities(5, seed=15)
    graph = _graph(nodes, [(0, 1), (1, 2), (3, 4)])
    fp = [n.fingerprint for n in nodes]
    route = graph.choose_route(fp[0], fp[2], MAX_HOPS, seeded_rng(1))
    assert [p for p, _ in route] == [fp[1], fp[2]]  # only one candidate peeler exists
    assert graph.choose_route(fp[0], fp[2], 1, seeded_rng(1)) == [(fp[2], nodes[2].onion_public)]
    for dst in (fp[3], _identities(1, seed=150)[0].fingerprint):
        with pytest.raises(LocalProtocolError, match="no route"):
            graph.choose_route(fp[0], dst, 3, seeded_rng(1))
    for hops in (0, MAX_HOPS + 1):
        with pytest.raises(LocalProtocolError):
            graph.choose_route(fp[0], fp[2], hops, seeded_rng(1))


# --- wire format and convergence -----------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decode_dump_raises_only_remote_protocol_error(data: bytes) -> None:
    try:
        dump = decode_dump(data)
    except RemoteProtocolError as exc:
        assert exc.reason == "bad_dump"
    else:
        assert isinstance(dump, GraphDump)
        RelayGraph().insert_dump(dump, NOW, source=None)  # never raises either


def test_dump_messages_are_bounded_and_identities_come_first() -> None:
    nodes = _identities(12, seed=16)
    edges = [(i, j) for i in range(12) for j in range(i + 1, 12) if (i * j) % 3 == 0]
    graph = _graph(nodes, edges)
    messages = encode_dumps(graph.identities(), graph.adjacencies(), 1200)
    assert len(messages) > 2
    assert all(len(m) <= 1200 for m in messages)
    dumps = [decode_dump(m) for m in messages]
    kinds = [k for d in dumps for k in ["i"] * len(d.identities) + ["a"] * len(d.adjacencies)]
    assert kinds == sorted(kinds, reverse=True)  # every "i" before any "a"
    with pytest.raises(LocalProtocolError):
        encode_dumps(graph.identities(), [], 100)

    copy = RelayGraph()
    for message in messages:
        report = copy.insert_dump(decode_dump(message), NOW, source=None)
        assert not report.rejected
    assert set(copy.identities()) == set(graph.identities())
    assert set(copy.adjacencies()) == set(graph.adjacencies())
    # A second dump changes nothing, so nothing would be forwarded again.
    for message in messages:
        again = copy.insert_dump(decode_dump(message), NOW, source=None)
        assert again.identities == []
        assert again.adjacencies == []


def test_graphs_fed_the_same_descriptors_in_different_orders_converge() -> None:
    nodes = _identities(10, seed=17)
    rng = random.Random(17)
    edges = {(a, b) for a, b in (sorted(rng.sample(range(10), 2)) for _ in range(20))}
    identities: list[IdentityDescriptor] = []
    for i, node in enumerate(nodes):
        identities += [node.descriptor(NOW - 100), node.descriptor(NOW + i % 3)]
    # Same identity, same second, another onion key: every graph must keep the same one.
    identities.append(Identity(nodes[0].signing_seed, seeded_rng(170)(32)).descriptor(NOW))
    adjacencies = [_adjacency(nodes[a], nodes[b], t) for a, b in edges for t in (NOW - 50, NOW)]

    def feed(order_seed: int) -> RelayGraph:
        shuffled: list[Descriptor] = [*identities, *adjacencies]
        random.Random(order_seed).shuffle(shuffled)
        graph = RelayGraph()
        changed = True
        while changed:  # as the periodic re-exchange does: a refused adjacency comes again
            changed = False
            for descriptor in shuffled:
                try:
                    changed |= _insert(graph, descriptor, NOW)
                except RemoteProtocolError as exc:
                    assert exc.reason == "unknown_endpoint"
        return graph

    from_dump = RelayGraph()
    report = from_dump.insert_dump(GraphDump(identities[::-1], adjacencies[::-1]), NOW, source=None)
    assert not report.rejected
    graphs = [from_dump] + [feed(seed) for seed in range(3)]
    fp = [n.fingerprint for n in nodes]
    for graph in graphs:
        assert set(graph.identities()) == set(from_dump.identities())
        assert set(graph.adjacencies()) == set(from_dump.adjacencies())
        assert graph.statistics().identities == 10
        assert graph.statistics().adjacencies == len(edges)
        assert all(d.timestamp == NOW for d in graph.adjacencies())
        assert [graph.shortest_path(fp[0], f) for f in fp] == [
            from_dump.shortest_path(fp[0], f) for f in fp
        ]


def test_dump_fields_outside_their_bounds_make_a_bad_dump() -> None:
    """Sizes and timestamps are checked at decode, so nothing further in sees them."""
    a, b = _identities(2, seed=17)
    identity, adjacency = a.descriptor(NOW), _adjacency(a, b)
    replace = msgspec.structs.replace
    dumps = [
        GraphDump([replace(identity, timestamp=-1)], []),
        GraphDump([replace(identity, timestamp=2**63)], []),
        GraphDump([replace(identity, identity_public=bytes(31))], []),
        GraphDump([replace(identity, onion_public=bytes(33))], []),
        GraphDump([replace(identity, signature=bytes(65))], []),
        GraphDump([], [replace(adjacency, timestamp=-1)]),
        GraphDump([], [replace(adjacency, left=bytes(31))]),
    ]
    for dump in dumps:
        with pytest.raises(RemoteProtocolError) as caught:
            decode_dump(msgspec.msgpack.encode(dump))
        assert caught.value.reason == "bad_dump"
