"""The relay graph: signed descriptors, freshness, bounds, paths, routes and convergence."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core import graph as graph_module
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.graph import (
    DESCRIPTOR_TTL_SECS,
    MAX_CLOCK_SKEW_SECS,
    RESIGN_INTERVAL_SECS,
    AdjacencyDescriptor,
    GraphDump,
    RelayGraph,
    adjacency_unsigned,
    decode_dump,
    encode_dumps,
    sign_adjacency,
)
from earendil_py.core.identity import Identity, IdentityDescriptor
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


def _graph(nodes: list[Identity], edges: list[tuple[int, int]], now: int = NOW) -> RelayGraph:
    graph = RelayGraph()
    for node in nodes:
        assert graph.insert_identity(node.descriptor(now), now)
    for a, b in edges:
        assert graph.insert_adjacency(_adjacency(nodes[a], nodes[b], now), now)
    return graph


def _fps(nodes: list[Identity], indices: list[int]) -> list[bytes]:
    return [nodes[i].fingerprint for i in indices]


def _reason(excinfo: pytest.ExceptionInfo[RemoteProtocolError]) -> str:
    return excinfo.value.reason


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
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[1], NOW + 1), NOW + 1)
    assert graph.statistics().cached_sources == 1
    # A shortcut is.
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[4], NOW + 1), NOW + 1)
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
            graph.insert_adjacency(forged, NOW)
        assert _reason(excinfo) == "bad_signature"
    assert list(graph.adjacencies()) == []
    assert graph.insert_adjacency(genuine, NOW)
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
            graph.insert_adjacency(bad, NOW)
        assert _reason(excinfo) == "bad_descriptor"


def test_adjacency_with_an_unknown_endpoint_is_rejected() -> None:
    a, b = _identities(2, seed=5)
    graph = _graph([a], [])
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_adjacency(_adjacency(a, b), NOW)
    assert _reason(excinfo) == "unknown_endpoint"
    assert graph.insert_identity(b.descriptor(NOW), NOW)
    assert graph.insert_adjacency(_adjacency(a, b), NOW)


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
            graph.insert_identity(bad, NOW)
        assert _reason(excinfo) == reason
    assert graph.statistics().identities == 0


def test_newer_descriptor_replaces_older_and_older_is_ignored() -> None:
    a, b = _identities(2, seed=7)
    rotated = Identity(a.signing_seed, seeded_rng(70)(32))  # same identity, new onion key
    graph = _graph([a, b], [(0, 1)])
    assert graph.insert_identity(rotated.descriptor(NOW + 10), NOW + 10)
    assert graph.onion_key(a.fingerprint) == rotated.onion_public
    assert not graph.insert_identity(a.descriptor(NOW), NOW + 10)
    assert not graph.insert_identity(rotated.descriptor(NOW + 10), NOW + 10)  # duplicate
    assert graph.onion_key(a.fingerprint) == rotated.onion_public

    newer = _adjacency(a, b, NOW + 10)
    assert graph.insert_adjacency(newer, NOW + 10)
    assert not graph.insert_adjacency(_adjacency(a, b, NOW), NOW + 10)
    assert not graph.insert_adjacency(newer, NOW + 10)
    assert list(graph.adjacencies()) == [newer]
    assert graph.statistics().identities == 2


def test_future_dated_beyond_skew_is_rejected() -> None:
    a, b = _identities(2, seed=8)
    graph = RelayGraph()
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_identity(a.descriptor(NOW + MAX_CLOCK_SKEW_SECS + 1), NOW)
    assert _reason(excinfo) == "bad_timestamp"
    assert graph.insert_identity(a.descriptor(NOW + MAX_CLOCK_SKEW_SECS), NOW)
    assert graph.insert_identity(b.descriptor(NOW), NOW)
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_adjacency(_adjacency(a, b, NOW + MAX_CLOCK_SKEW_SECS + 1), NOW)
    assert _reason(excinfo) == "bad_timestamp"
    assert graph.insert_adjacency(_adjacency(a, b, NOW + MAX_CLOCK_SKEW_SECS), NOW)


def test_already_expired_descriptors_are_ignored() -> None:
    a, b = _identities(2, seed=9)
    graph = _graph([a, b], [])
    later = NOW + DESCRIPTOR_TTL_SECS
    c = _identities(1, seed=90)[0]
    assert not graph.insert_identity(c.descriptor(NOW), later)
    assert not graph.insert_adjacency(_adjacency(a, b, NOW), later)
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
            assert graph.insert_identity(node.descriptor(now), now)
        for a, b in ((0, 1), (1, 2)):
            assert graph.insert_adjacency(_adjacency(nodes[a], nodes[b], now), now)
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
    assert graph.insert_identity(b.descriptor(later), later)
    assert graph.insert_adjacency(_adjacency(a, b, later), later)
    assert graph.expire(NOW + DESCRIPTOR_TTL_SECS) == 2  # a, and the fresh a-b link
    assert graph.neighbors(b.fingerprint) == []


def test_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_module, "MAX_IDENTITIES", 3)
    monkeypatch.setattr(graph_module, "MAX_ADJACENCIES", 2)
    nodes = _identities(4, seed=12)
    graph = _graph(nodes[:3], [(0, 1), (1, 2)])
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_identity(nodes[3].descriptor(NOW), NOW)
    assert _reason(excinfo) == "graph_full"
    with pytest.raises(RemoteProtocolError) as excinfo:
        graph.insert_adjacency(_adjacency(nodes[0], nodes[2]), NOW)
    assert _reason(excinfo) == "graph_full"
    # Refreshes of what is held still go through.
    assert graph.insert_identity(nodes[0].descriptor(NOW + 1), NOW + 1)
    assert graph.insert_adjacency(_adjacency(nodes[0], nodes[1], NOW + 1), NOW + 1)


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
        RelayGraph().insert_dump(dump, NOW)  # never raises either


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
        report = copy.insert_dump(decode_dump(message), NOW)
        assert not report.rejected
    assert set(copy.identities()) == set(graph.identities())
    assert set(copy.adjacencies()) == set(graph.adjacencies())
    # A second dump changes nothing, so nothing would be forwarded again.
    for message in messages:
        again = copy.insert_dump(decode_dump(message), NOW)
        assert again.identities == []
        assert again.adjacencies == []


def _insert(graph: RelayGraph, descriptor: Descriptor, now: int) -> bool:
    if isinstance(descriptor, AdjacencyDescriptor):
        return graph.insert_adjacency(descriptor, now)
    return graph.insert_identity(descriptor, now)


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
    report = from_dump.insert_dump(GraphDump(identities[::-1], adjacencies[::-1]), NOW)
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
