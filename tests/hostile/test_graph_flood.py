"""A neighbour fills the relay graph with identities it made itself, each with an adjacency
to it countersigned by itself: all of them valid, all of them reachable through it, none of
them costing it more than a key pair. A relay that joins the network afterwards, behind the
honest neighbour, must still get into the target's graph and be routed to.
"""

from __future__ import annotations

import base64
import os
import time

import pytest

from earendil_py.core import graph
from earendil_py.core.graph import AdjacencyDescriptor, encode_dumps, sign_adjacency
from earendil_py.core.identity import Identity, IdentityDescriptor
from earendil_py.core.messages import AdjacencyRequest, GraphPush
from earendil_py.runtime.gossip import unix_now
from earendil_py.runtime.http import ControlApiError
from tests.helpers import wait_until
from tests.hostile.harness import DOCK, START_SECS, Daemon, Pair, api, received
from tests.hostile.peer import HostilePeer, error_code

pytestmark = pytest.mark.timeout(120)

DUMP_BYTES = 12_000  # per GraphPush: well inside one link message
PAIR = {"late_relay": True}
RESEND_SECS = 1.0
ROUTED_SECS = 30.0  # the late relay joins, its descriptors travel two hops


def adjacency(a: Identity, b: Identity, timestamp: int) -> AdjacencyDescriptor:
    left, right = sorted((a, b), key=lambda i: i.fingerprint)
    return AdjacencyDescriptor(
        left.fingerprint,
        right.fingerprint,
        timestamp,
        sign_adjacency(left, left.fingerprint, right.fingerprint, timestamp),
        sign_adjacency(right, left.fingerprint, right.fingerprint, timestamp),
    )


def sybils(
    owner: Identity, count: int
) -> tuple[list[IdentityDescriptor], list[AdjacencyDescriptor]]:
    """`count` fresh identities, each adjacent to `owner`, every signature genuine."""
    now = unix_now()
    identities, adjacencies = [], []
    for _ in range(count):
        sybil = Identity.generate(os.urandom)
        identities.append(sybil.descriptor(now))
        adjacencies.append(adjacency(owner, sybil, now))
    return identities, adjacencies


def request_adjacency(peer: HostilePeer, target: bytes) -> None:
    """Ask the target to countersign our link, as a node does at link-up."""
    now = unix_now()
    left, right = sorted((peer.fingerprint, target))
    signature = sign_adjacency(peer.identity, left, right, now)
    peer.send_message(AdjacencyRequest(peer.identity.descriptor(now), now, signature))


def send_datagram(pair: Pair, to: str, payload: bytes) -> bool:
    """Whether the target took a datagram for `to` (False: no route yet)."""
    body = {
        "destination": to,
        "dock": DOCK,
        "data_b64": base64.b64encode(payload).decode(),
        "hops": 1,
    }
    try:
        api(pair.target, "POST", "/api/send", body)
    except ControlApiError as exc:
        if exc.status == 422:
            return False
        raise
    return True


def test_graph_flood_leaves_room_for_a_relay_that_joins_later(pair: Pair) -> None:
    relay = pair.late
    assert relay is not None
    with pair.attacking() as mark, pair.peer("tcp") as peer:
        peer.connect()
        request_adjacency(peer, pair.target_fp)
        identities, adjacencies = sybils(peer.identity, graph.MAX_IDENTITIES)
        for dump in encode_dumps(identities, adjacencies, max_size_bytes=DUMP_BYTES):
            peer.send_message(GraphPush(dump))
        # Answered after every push before it on this stream: the flood has been taken in.
        assert error_code(peer.call("no_such_method", timeout=60)) == -32601
        flooded = pair.graph()
        assert flooded["identities"] > 100  # the attack landed, as far as the target let it

        late = Daemon(relay.config_path)
        try:
            wait_until(lambda: pair.ready(relay, pair.honest_fp), START_SECS)
            # A datagram may still be lost while the relay's own link is being priced: send
            # again until one arrives, as a user of datagrams does.
            payload = b"to the late relay"
            deadline = time.monotonic() + ROUTED_SECS
            got: list[bytes] = []
            while not got:
                assert time.monotonic() < deadline, f"no datagram reached it: {pair.graph()}"
                if not send_datagram(pair, relay.fingerprint, payload):
                    time.sleep(0.2)  # no route yet
                    continue
                until = time.monotonic() + RESEND_SECS
                while not got and time.monotonic() < until:
                    time.sleep(0.05)
                    got = received(relay)
            assert set(got) == {payload}
        finally:
            late.stop()
    pair.check_unharmed()
    pair.assert_no_errors(mark)
