"""The relay graph: every node's view of the network, built from signed descriptors.

Nodes are `IdentityDescriptor`s (identity key, onion key, timestamp, self-signature). Edges are
`AdjacencyDescriptor`s signed by *both* endpoints, so no node can claim a link that its
neighbour does not confirm (Earendil's adjacency descriptors, with the second signature
actually checked). Neighbours exchange descriptors and every node converges on the same graph:
for each fingerprint and each pair of fingerprints the newest valid descriptor wins, with a
deterministic tie-break, so the result does not depend on the order descriptors arrived in.

Pure: no clock, no randomness of our own. `now` is integer unix seconds (descriptor timestamps
are wall-clock, as they must mean the same thing on every node), `rng(n)` returns n random
bytes. Formats, TTLs, bounds and the exchange protocol are in docs/relay-graph.md.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Generic, TypeVar

import msgspec

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError, decode_remote
from earendil_py.core.identity import (
    FINGERPRINT_SIZE,
    KEY_SIZE,
    SIGNATURE_SIZE,
    Fingerprint,
    Identity,
    IdentityDescriptor,
    Signature,
    Timestamp,
    fingerprint_of,
    verify,
)
from earendil_py.core.packet import MAX_HOPS

Rng = Callable[[int], bytes]

ADJACENCY_DOMAIN = b"earendil_py adjacency v1"

# Every node re-signs its identity descriptor, and every link its adjacency, each
# RESIGN_INTERVAL_SECS; a descriptor lives DESCRIPTOR_TTL_SECS from its timestamp. The ratio of
# six lets five consecutive refreshes be lost before a live node or link drops out of the graph,
# while a node that went away disappears within an hour.
DESCRIPTOR_TTL_SECS = 3600
RESIGN_INTERVAL_SECS = 600
# Timestamps further in the future than this are refused: a descriptor dated a year ahead would
# otherwise outlive its signer and beat every honest refresh. Five minutes tolerates
# unsynchronised clocks without letting a node extend its descriptors' life meaningfully.
MAX_CLOCK_SKEW_SECS = 300

# Memory bounds (defaults of RelayGraph's). Held, an identity costs ~0.5 KB and an adjacency
# ~0.75 KB (descriptor, key, neighbour-set entries), so a full graph is ~80 MB: a ceiling, not
# a working size. A full table makes room by evicting from the sources over their fair share
# (see RelayGraph); refreshes of held entries always go through.
MAX_IDENTITIES = 10_000
MAX_ADJACENCIES = 100_000
# A full table frees 1/64 of its bound at once: choosing what to evict scans the table, so
# the scan is paid once per bound/64 insertions rather than on each.
EVICTION_BATCH_DIVISOR = 64
# Next-hop tables kept at once. The relay loop asks from its own fingerprint only; the others
# are for diagnostics, so a small bound costs nothing on the hot path.
MAX_CACHED_SOURCES = 16

# A dump message carries at most this many bytes by default: with the link framing it stays
# in one unfragmented UDP datagram, like an onion packet (see docs/packet-format.md).
DUMP_MESSAGE_SIZE_BYTES = 1200
# Decode-time cap on entries per dump message, far above what a link message can carry; it
# only stops a hostile length prefix from making the decoder allocate.
MAX_DUMP_ENTRIES = 4096

_TIMESTAMP = struct.Struct(">Q")


def _signed_part(left: bytes, right: bytes, timestamp: int) -> bytes:
    # Fixed-size fields, so the concatenation is an injective encoding.
    return left + right + _TIMESTAMP.pack(timestamp)


def adjacency_unsigned(a_fp: bytes, b_fp: bytes, timestamp: int) -> tuple[bytes, bytes, bytes]:
    """Canonical (left, right, message to sign) for a link between `a_fp` and `b_fp`.

    `left` is the bytewise smaller fingerprint. Raises LocalProtocolError for a self-link, a
    fingerprint that is not 32 bytes, or a timestamp outside u64.
    """
    if len(a_fp) != FINGERPRINT_SIZE or len(b_fp) != FINGERPRINT_SIZE:
        raise LocalProtocolError("fingerprints must be 32 bytes")
    if a_fp == b_fp:
        raise LocalProtocolError("a node is not adjacent to itself")
    if not 0 <= timestamp < 2**64:
        raise LocalProtocolError("timestamp must fit in u64")
    left, right = (a_fp, b_fp) if a_fp < b_fp else (b_fp, a_fp)
    return left, right, _signed_part(left, right, timestamp)


def sign_adjacency(identity: Identity, left: bytes, right: bytes, timestamp: int) -> bytes:
    """Our signature on the adjacency (left, right, timestamp), which must name us.

    Two steps make a descriptor: one side proposes (left, right, timestamp) with its signature,
    the other countersigns with this same call. Raises LocalProtocolError if `left` < `right`
    does not hold or `identity` is neither endpoint.
    """
    canonical_left, canonical_right, message = adjacency_unsigned(left, right, timestamp)
    if (canonical_left, canonical_right) != (left, right):
        raise LocalProtocolError("adjacency endpoints must be in canonical order (left < right)")
    if identity.fingerprint not in (left, right):
        raise LocalProtocolError("we can only sign adjacencies that name us")
    return identity.sign(ADJACENCY_DOMAIN, message)


class AdjacencyDescriptor(msgspec.Struct, frozen=True, array_like=True):
    """A link between two nodes, signed by both. `left` < `right` bytewise."""

    left: Fingerprint
    right: Fingerprint
    timestamp: Timestamp  # unix seconds when proposed
    left_signature: Signature
    right_signature: Signature

    def check_shape(self) -> None:
        """Raises RemoteProtocolError("bad_descriptor") unless sizes and order are canonical.

        msgspec checks the same constraints at decode; this covers descriptors built in code.
        """
        if (
            len(self.left) != FINGERPRINT_SIZE
            or len(self.right) != FINGERPRINT_SIZE
            or not self.left < self.right
            or not 0 <= self.timestamp < 2**64
            or len(self.left_signature) != SIGNATURE_SIZE
            or len(self.right_signature) != SIGNATURE_SIZE
        ):
            raise RemoteProtocolError("malformed adjacency descriptor", "bad_descriptor")

    def verify(self, left_identity_public: bytes, right_identity_public: bytes) -> None:
        """Check both signatures against the endpoints' Ed25519 public keys.

        Raises RemoteProtocolError: "bad_descriptor" if the descriptor is malformed or the keys
        are not the named endpoints', "bad_signature" if either signature fails.
        """
        self.check_shape()
        if (
            len(left_identity_public) != KEY_SIZE
            or len(right_identity_public) != KEY_SIZE
            or fingerprint_of(left_identity_public) != self.left
            or fingerprint_of(right_identity_public) != self.right
        ):
            raise RemoteProtocolError("adjacency names other identities", "bad_descriptor")
        message = _signed_part(self.left, self.right, self.timestamp)
        verify(left_identity_public, ADJACENCY_DOMAIN, message, self.left_signature)
        verify(right_identity_public, ADJACENCY_DOMAIN, message, self.right_signature)


class GraphDump(msgspec.Struct, frozen=True, array_like=True):
    """Descriptors sent to a neighbour: identities first, so adjacencies find their endpoints."""

    identities: Annotated[list[IdentityDescriptor], msgspec.Meta(max_length=MAX_DUMP_ENTRIES)]
    adjacencies: Annotated[list[AdjacencyDescriptor], msgspec.Meta(max_length=MAX_DUMP_ENTRIES)]


_encoder = msgspec.msgpack.Encoder()
_dump_decoder = msgspec.msgpack.Decoder(GraphDump)
# A GraphDump with empty lists, plus the worst-case growth of both array headers (fixarray to
# array32) and a byte of slack: what a message costs beyond its entries.
_DUMP_OVERHEAD_BYTES = len(_encoder.encode(GraphDump([], []))) + 2 * 4 + 1


def encode_dumps(
    identities: Iterable[IdentityDescriptor],
    adjacencies: Iterable[AdjacencyDescriptor],
    max_size_bytes: int = DUMP_MESSAGE_SIZE_BYTES,
) -> list[bytes]:
    """Pack descriptors into GraphDump messages of at most `max_size_bytes` each.

    All identities come before any adjacency, across messages too, so a receiver that handles
    messages in order knows every endpoint by the time its adjacencies arrive. Raises
    LocalProtocolError if one descriptor alone does not fit.
    """
    messages: list[bytes] = []
    batch_identities: list[IdentityDescriptor] = []
    batch_adjacencies: list[AdjacencyDescriptor] = []
    size = _DUMP_OVERHEAD_BYTES

    def flush() -> None:
        nonlocal size
        if batch_identities or batch_adjacencies:
            message = _encoder.encode(GraphDump(batch_identities[:], batch_adjacencies[:]))
            assert len(message) <= max_size_bytes
            messages.append(message)
        batch_identities.clear()
        batch_adjacencies.clear()
        size = _DUMP_OVERHEAD_BYTES

    descriptors: list[IdentityDescriptor | AdjacencyDescriptor] = [*identities, *adjacencies]
    for descriptor in descriptors:
        entry_size = len(_encoder.encode(descriptor))
        if _DUMP_OVERHEAD_BYTES + entry_size > max_size_bytes:
            raise LocalProtocolError(f"a descriptor does not fit in {max_size_bytes} bytes")
        if size + entry_size > max_size_bytes:
            flush()
        size += entry_size
        if isinstance(descriptor, IdentityDescriptor):
            batch_identities.append(descriptor)
        else:
            batch_adjacencies.append(descriptor)
    flush()
    return messages


def decode_dump(data: bytes) -> GraphDump:
    """Parse a GraphDump message; signatures are checked on insertion, not here.

    Raises RemoteProtocolError("bad_dump") for anything that is not a well-formed dump.
    """
    return decode_remote(_dump_decoder, data, "undecodable graph dump", "bad_dump")


Source = bytes | None
"""The neighbour an entry was learned through (its fingerprint); None for our own entries."""

_Key = TypeVar("_Key", bytes, tuple[bytes, bytes])


@dataclass(frozen=True, slots=True)
class GraphStatistics:
    identities: int
    adjacencies: int
    cached_sources: int
    evicted_identities: int
    evicted_adjacencies: int  # those of evicted identities included


@dataclass(frozen=True, slots=True)
class Share:
    """The entries held on behalf of one source."""

    identities: int
    adjacencies: int


@dataclass(slots=True)
class DumpReport:
    """What `insert_dump` did: the descriptors that changed the graph (forward these to the
    other neighbours) and the rejections by reason (count these)."""

    identities: list[IdentityDescriptor] = field(default_factory=list)
    adjacencies: list[AdjacencyDescriptor] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Tree:
    """A BFS tree from one source: parent pointers and the first hop toward each node."""

    parent: dict[bytes, bytes]
    first_hop: dict[bytes, bytes]


class _Shares(Generic[_Key]):
    """Who brought each entry of one table: the first source that did, whoever refreshes it
    later, so a neighbour cannot take over entries by re-sending them."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.source_of: dict[_Key, Source] = {}  # in arrival order: oldest first
        self.counts: Counter[Source] = Counter()

    def __len__(self) -> int:
        return len(self.source_of)

    def add(self, key: _Key, source: Source) -> None:
        self.source_of[key] = source
        self.counts[source] += 1

    def remove(self, key: _Key) -> None:
        source = self.source_of.pop(key)
        self.counts[source] -= 1
        if not self.counts[source]:
            del self.counts[source]

    def over_share(self, source: Source, newcomer: Source) -> bool:
        """Whether `source` holds more than its fair share: the bound divided equally among
        the sources holding entries and `newcomer`'s."""
        sources = len(self.counts) + (newcomer not in self.counts)
        return self.counts[source] * sources > self.bound

    def evictable(self, newcomer: Source) -> bool:
        """Whether some neighbour holds more than its share (our own entries never go)."""
        return any(s is not None and self.over_share(s, newcomer) for s in self.counts)


def _check_timestamp(timestamp: int, now: int) -> bool:
    """False if already expired; raises if dated too far in the future."""
    if timestamp > now + MAX_CLOCK_SKEW_SECS:
        raise RemoteProtocolError("descriptor dated in the future", "bad_timestamp")
    return timestamp + DESCRIPTOR_TTL_SECS > now


class RelayGraph:
    """Identity and adjacency descriptors, with cached shortest-path next hops.

    Every entry is attributed to the source it was first learned from (`Source`: the
    neighbour, or None for our own), and counts against that source's share of its table.
    A full table admits a newcomer by evicting a batch of what serves us least: entries
    unreachable from us first, then those of the largest shares. Only a source holding more
    than its fair share (the bound divided among the sources holding entries and the
    newcomer's) loses entries, and never our own descriptors, our direct neighbours'
    identities or our own adjacencies. See docs/relay-graph.md.
    """

    def __init__(
        self, *, max_identities: int = MAX_IDENTITIES, max_adjacencies: int = MAX_ADJACENCIES
    ) -> None:
        if max_identities < 1 or max_adjacencies < 1:
            raise LocalProtocolError("graph bounds must be positive")
        self._identities: dict[bytes, IdentityDescriptor] = {}
        self._adjacencies: dict[tuple[bytes, bytes], AdjacencyDescriptor] = {}
        self._neighbors: dict[bytes, set[bytes]] = {}
        self._identity_shares: _Shares[bytes] = _Shares(max_identities)
        self._adjacency_shares: _Shares[tuple[bytes, bytes]] = _Shares(max_adjacencies)
        self._evicted_identities = 0
        self._evicted_adjacencies = 0
        # BFS trees per source, dropped whenever the set of edges changes. Refreshing a
        # descriptor does not change the topology, so the re-signing churn of a large network
        # does not throw the cache away.
        self._trees: dict[bytes, _Tree] = {}

    # --- insertion -------------------------------------------------------------------------

    def insert_identity(self, descriptor: IdentityDescriptor, now: int, *, source: Source) -> bool:
        """Add or refresh a node learned from `source`. Returns True if the graph changed.

        A descriptor no newer than the one held, or already expired, is ignored (False).
        Raises RemoteProtocolError with reason "bad_descriptor", "bad_signature",
        "bad_timestamp" (more than MAX_CLOCK_SKEW_SECS ahead of `now`) or "graph_full" (the
        table is full and nothing in it may be evicted).
        """
        if len(descriptor.identity_public) != KEY_SIZE:
            raise RemoteProtocolError("malformed identity descriptor", "bad_descriptor")
        if not _check_timestamp(descriptor.timestamp, now):
            return False
        fingerprint = fingerprint_of(descriptor.identity_public)
        held = self._identities.get(fingerprint)
        # Cheap checks before the signature: in a periodic dump nearly everything is known.
        if held is not None and _identity_order(descriptor) <= _identity_order(held):
            return False
        shares = self._identity_shares
        full = held is None and len(shares) >= shares.bound
        if full and not shares.evictable(source):
            raise RemoteProtocolError("identity table full", "graph_full")
        descriptor.verify()  # before evicting anything for it
        if full:
            self._evict_identities(source)
        if held is None:
            shares.add(fingerprint, source)
        self._identities[fingerprint] = descriptor
        return True

    def insert_adjacency(
        self, descriptor: AdjacencyDescriptor, now: int, *, source: Source
    ) -> bool:
        """Add or refresh a link learned from `source`. Returns True if the graph changed.

        Both endpoints' identity descriptors must already be held: the signatures cannot be
        checked without their keys, and exchanges send identities first. Raises
        RemoteProtocolError with reason "bad_descriptor", "bad_signature", "bad_timestamp",
        "unknown_endpoint" or "graph_full".
        """
        descriptor.check_shape()
        if not _check_timestamp(descriptor.timestamp, now):
            return False
        key = (descriptor.left, descriptor.right)
        held = self._adjacencies.get(key)
        if held is not None and _adjacency_order(descriptor) <= _adjacency_order(held):
            return False
        left = self._identities.get(descriptor.left)
        right = self._identities.get(descriptor.right)
        if left is None or right is None:
            raise RemoteProtocolError("adjacency endpoint not known", "unknown_endpoint")
        shares = self._adjacency_shares
        full = held is None and len(shares) >= shares.bound
        if full and not shares.evictable(source):
            raise RemoteProtocolError("adjacency table full", "graph_full")
        descriptor.verify(left.identity_public, right.identity_public)
        if full:
            self._evict_adjacencies(source)
        self._adjacencies[key] = descriptor
        if held is None:
            shares.add(key, source)
            self._neighbors.setdefault(descriptor.left, set()).add(descriptor.right)
            self._neighbors.setdefault(descriptor.right, set()).add(descriptor.left)
            self._trees.clear()
        return True

    def insert_dump(self, dump: GraphDump, now: int, *, source: Source) -> DumpReport:
        """Insert a dump from `source`, identities first; never raises RemoteProtocolError."""
        report = DumpReport()
        for identity in dump.identities:
            try:
                if self.insert_identity(identity, now, source=source):
                    report.identities.append(identity)
            except RemoteProtocolError as exc:
                report.rejected[exc.reason] += 1
        for adjacency in dump.adjacencies:
            try:
                if self.insert_adjacency(adjacency, now, source=source):
                    report.adjacencies.append(adjacency)
            except RemoteProtocolError as exc:
                report.rejected[exc.reason] += 1
        return report

    def expire(self, now: int) -> int:
        """Drop descriptors DESCRIPTOR_TTL_SECS old or older, and the links of dropped nodes.

        Returns how many descriptors were removed. Call it about once a minute.
        """
        cutoff = now - DESCRIPTOR_TTL_SECS
        removed = 0
        for fingerprint in [fp for fp, d in self._identities.items() if d.timestamp <= cutoff]:
            removed += 1 + self._remove_identity(fingerprint)
        stale = [key for key, d in self._adjacencies.items() if d.timestamp <= cutoff]
        for key in stale:
            self._remove_adjacency(key)
        return removed + len(stale)

    # --- eviction --------------------------------------------------------------------------

    def _evict_identities(self, newcomer: Source) -> None:
        local = self._local_identities()
        direct = {fp for own in local for fp in self._neighbors.get(own, ())}
        reachable = self._reachable_from(local)
        shares = self._identity_shares

        def keep(fingerprint: bytes) -> bool:
            # A neighbour's own descriptor counts as direct before our link is co-signed.
            return fingerprint in direct or fingerprint == shares.source_of[fingerprint]

        def remove(fingerprint: bytes) -> None:
            self._evicted_adjacencies += self._remove_identity(fingerprint)
            self._evicted_identities += 1

        self._evict(shares, newcomer, keep, reachable.__contains__, remove)

    def _evict_adjacencies(self, newcomer: Source) -> None:
        local = self._local_identities()
        reachable = self._reachable_from(local)

        def keep(key: tuple[bytes, bytes]) -> bool:
            return key[0] in local or key[1] in local

        def remove(key: tuple[bytes, bytes]) -> None:
            self._remove_adjacency(key)
            self._evicted_adjacencies += 1

        # A link is reachable exactly when either endpoint is: it joins them.
        self._evict(self._adjacency_shares, newcomer, keep, lambda key: key[0] in reachable, remove)

    def _evict(
        self,
        shares: _Shares[_Key],
        newcomer: Source,
        keep: Callable[[_Key], bool],
        reachable: Callable[[_Key], bool],
        remove: Callable[[_Key], None],
    ) -> None:
        """Free up to a batch of a full table's entries, none that we `keep` and none of a
        source holding its fair share or less (that source counted again after each one):
        entries unreachable from us first, then by share, largest first, each source's
        oldest first. Raises RemoteProtocolError("graph_full") if none may go.

        Choosing scans the table once, so a batch of bound/EVICTION_BATCH_DIVISOR spreads
        the scan over that many insertions.
        """
        # Per source over its share: (unreachable, reachable) candidates, oldest first.
        candidates: dict[bytes, tuple[list[_Key], list[_Key]]] = {}
        for key, source in shares.source_of.items():
            if source is not None and shares.over_share(source, newcomer) and not keep(key):
                candidates.setdefault(source, ([], []))[reachable(key)].append(key)
        largest_first = sorted(candidates, key=shares.counts.__getitem__, reverse=True)
        batch = max(1, shares.bound // EVICTION_BATCH_DIVISOR)
        evicted = 0
        for is_reachable in (False, True):
            for source in largest_first:
                for key in candidates[source][is_reachable]:
                    if evicted == batch or not shares.over_share(source, newcomer):
                        break
                    remove(key)
                    evicted += 1
        if not evicted:
            raise RemoteProtocolError("graph table full", "graph_full")

    def _local_identities(self) -> list[bytes]:
        return [fp for fp, source in self._identity_shares.source_of.items() if source is None]

    def _reachable_from(self, fingerprints: list[bytes]) -> set[bytes]:
        reachable = set(fingerprints)
        for fingerprint in fingerprints:
            reachable.update(self._tree(fingerprint).parent)
        return reachable

    def _remove_identity(self, fingerprint: bytes) -> int:
        """Drop a node and its links (an edge needs both endpoints); returns how many links."""
        links = sorted(self._neighbors.get(fingerprint, ()))
        for other in links:
            self._remove_adjacency(
                (fingerprint, other) if fingerprint < other else (other, fingerprint)
            )
        del self._identities[fingerprint]
        self._identity_shares.remove(fingerprint)
        return len(links)

    def _remove_adjacency(self, key: tuple[bytes, bytes]) -> None:
        left, right = key
        del self._adjacencies[key]
        self._adjacency_shares.remove(key)
        self._unlink(left, right)
        self._unlink(right, left)
        self._trees.clear()

    def _unlink(self, a: bytes, b: bytes) -> None:
        neighbors = self._neighbors[a]
        neighbors.discard(b)
        if not neighbors:
            del self._neighbors[a]

    # --- queries ---------------------------------------------------------------------------

    def identities(self) -> Iterator[IdentityDescriptor]:
        return iter(self._identities.values())

    def adjacencies(self) -> Iterator[AdjacencyDescriptor]:
        return iter(self._adjacencies.values())

    def identity(self, fingerprint: bytes) -> IdentityDescriptor | None:
        return self._identities.get(fingerprint)

    def onion_key(self, fingerprint: bytes) -> bytes | None:
        descriptor = self._identities.get(fingerprint)
        return None if descriptor is None else descriptor.onion_public

    def neighbors(self, fingerprint: bytes) -> list[bytes]:
        """Adjacent fingerprints, in ascending byte order."""
        return sorted(self._neighbors.get(fingerprint, ()))

    def statistics(self) -> GraphStatistics:
        return GraphStatistics(
            identities=len(self._identities),
            adjacencies=len(self._adjacencies),
            cached_sources=len(self._trees),
            evicted_identities=self._evicted_identities,
            evicted_adjacencies=self._evicted_adjacencies,
        )

    def shares(self) -> dict[Source, Share]:
        """The entries held per source (None: our own)."""
        identities, adjacencies = self._identity_shares.counts, self._adjacency_shares.counts
        return {
            s: Share(identities[s], adjacencies[s]) for s in identities.keys() | adjacencies.keys()
        }

    def next_hop(self, src_fp: bytes, dst_fp: bytes) -> bytes | None:
        """The neighbour of `src_fp` on the shortest path to `dst_fp`; None if unreachable or
        `src_fp == dst_fp`. O(1) once the source's table is cached."""
        return self._tree(src_fp).first_hop.get(dst_fp)

    def shortest_path(self, src_fp: bytes, dst_fp: bytes) -> list[bytes] | None:
        """Fingerprints from `src_fp` to `dst_fp` inclusive, or None if there is no path.

        Among equally short paths the choice is deterministic: the BFS visits neighbours in
        ascending fingerprint order and keeps the first parent that reaches each node.
        """
        if src_fp == dst_fp:
            return [src_fp] if src_fp in self._identities else None
        parent = self._tree(src_fp).parent
        if dst_fp not in parent:
            return None
        path = [dst_fp]
        while path[-1] != src_fp:
            path.append(parent[path[-1]])
        path.reverse()
        return path

    def choose_route(
        self, src_fp: bytes, dst_fp: bytes, hops: int, rng: Rng
    ) -> list[tuple[bytes, bytes]]:
        """An onion route from `src_fp` to `dst_fp`: [(fingerprint, onion_public)], dst last.

        `hops - 1` intermediate peelers are drawn uniformly without replacement from the
        nodes reachable from `src_fp` other than the two ends, in random order; if fewer
        exist, all of them are used, so the route can be shorter than `hops`. The result
        feeds `packet.build_packet`. Raises LocalProtocolError if `hops` is not within
        1..MAX_HOPS or `dst_fp` is unknown or unreachable ("no route").
        """
        if not 1 <= hops <= MAX_HOPS:
            raise LocalProtocolError(f"a route has 1 to {MAX_HOPS} peelers, got {hops}")
        destination = self._identities.get(dst_fp)
        if self.shortest_path(src_fp, dst_fp) is None or destination is None:
            raise LocalProtocolError("no route")
        # Sorted so that a given rng gives the same route whatever the insertion history.
        candidates = sorted(fp for fp in self._tree(src_fp).parent if fp not in (src_fp, dst_fp))
        count = min(hops - 1, len(candidates))
        for i in range(count):  # partial Fisher-Yates shuffle
            j = i + _uniform_below(rng, len(candidates) - i)
            candidates[i], candidates[j] = candidates[j], candidates[i]
        route = [(fp, self._identities[fp].onion_public) for fp in candidates[:count]]
        route.append((dst_fp, destination.onion_public))
        return route

    def _tree(self, src_fp: bytes) -> _Tree:
        tree = self._trees.get(src_fp)
        if tree is not None:
            return tree
        parent: dict[bytes, bytes] = {src_fp: src_fp}
        first_hop: dict[bytes, bytes] = {}
        queue = deque([src_fp])
        while queue:
            node = queue.popleft()
            for neighbor in sorted(self._neighbors.get(node, ())):
                if neighbor not in parent:
                    parent[neighbor] = node
                    first_hop[neighbor] = neighbor if node == src_fp else first_hop[node]
                    queue.append(neighbor)
        del parent[src_fp]
        if len(self._trees) >= MAX_CACHED_SOURCES:
            del self._trees[next(iter(self._trees))]  # oldest first
        tree = self._trees[src_fp] = _Tree(parent, first_hop)
        return tree


def _identity_order(descriptor: IdentityDescriptor) -> tuple[int, bytes]:
    # Newest wins; at equal timestamps the larger signature does, so that every node keeps the
    # same one of two descriptors signed in the same second, whatever order they came in.
    return descriptor.timestamp, descriptor.signature


def _adjacency_order(descriptor: AdjacencyDescriptor) -> tuple[int, bytes, bytes]:
    return descriptor.timestamp, descriptor.left_signature, descriptor.right_signature


def _uniform_below(rng: Rng, bound: int) -> int:
    """A uniform integer in [0, bound), by rejection sampling so no value is favoured."""
    limit = (1 << 64) - (1 << 64) % bound
    while True:
        data = rng(8)
        if len(data) != 8:
            raise LocalProtocolError(f"rng returned {len(data)} bytes, asked for 8")
        value = int.from_bytes(data, "big")
        if value < limit:
            return value % bound
