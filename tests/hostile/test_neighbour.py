"""An authenticated neighbour turned hostile: it completed a real handshake and proved its
identity, and now sends what no honest node would. Over UDP and TCP links alike.

Every test ends with the target unharmed (`Pair.check_unharmed`) and nothing logged as an
error: bad input from a peer is expected, dropped and counted, never a bug to recover from.
"""

from __future__ import annotations

import base64
import os
import random

import msgspec
import pytest

from earendil_py.core.accounting import DebtLimitNotice
from earendil_py.core.graph import AdjacencyDescriptor, encode_dumps
from earendil_py.core.identity import Identity, fingerprint_of
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    AdjacencyRequest,
    DockMessage,
    GraphPull,
    GraphPush,
    encode_control,
)
from earendil_py.core.packet import PACKET_SIZE
from earendil_py.core.rpc import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR
from earendil_py.runtime.gossip import unix_now
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import HELD_PER_LINK
from tests.helpers import wait_until
from tests.hostile.harness import Pair
from tests.hostile.peer import HostilePeer, error_code

pytestmark = pytest.mark.timeout(60)

DEPTH = 1000
PROTOCOLS = ["udp", "tcp"]


def connected(pair: Pair, protocol: str) -> HostilePeer:
    return pair.peer(protocol).connect()


def nested_json_bodies() -> list[bytes]:
    """~1 KB JSON-RPC bodies nested DEPTH deep: unclosed, and a well-formed request."""
    request = b'{"jsonrpc":"2.0","id":"deep","method":"chat","params":'
    return [
        b'{"":' + b"[" * DEPTH,
        request + b"[" * DEPTH + b"]" * DEPTH + b"}",
        b'{"jsonrpc":"2.0","id":' + b"[" * DEPTH + b"]" * DEPTH + b',"method":"x"}',
    ]


def nested_msgpack(depth: int = DEPTH) -> bytes:
    """A msgpack value nested `depth` arrays deep (fixarray of one, down to a nil)."""
    return b"\x91" * depth + b"\xc0"


def with_extra(message: bytes, extra: bytes) -> bytes:
    """An array-like control message (a fixarray) with one more element appended."""
    assert 0x90 <= message[0] < 0x9F
    return bytes([message[0] + 1]) + message[1:] + extra


def nested_control_payloads() -> list[bytes]:
    dock = encode_control(DockMessage(GLOBAL_RPC_DOCK, b"{}"))
    push = encode_control(GraphPush(b""))
    pull = encode_control(GraphPull())
    return [
        with_extra(dock, nested_msgpack()),
        with_extra(push, nested_msgpack()),
        with_extra(pull, nested_msgpack()),
        nested_msgpack(),
        b"\x81" * DEPTH + b"\xc0",  # maps of one key, nested (each never given its value)
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deeply_nested_json_rpc_body(pair: Pair, protocol: str) -> None:
    with pair.attacking() as mark, connected(pair, protocol) as peer:
        for body in nested_json_bodies():
            peer.send_rpc(body)
        # The daemon still answers this neighbour: a malformed body is one refused call.
        answer = peer.call("no_such_method")
        assert error_code(answer) == -32601
        for response in peer.calls.anonymous:
            assert error_code(response) in (PARSE_ERROR, INVALID_REQUEST), response
    pair.check_unharmed()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deeply_nested_control_message(pair: Pair, protocol: str) -> None:
    with pair.attacking() as mark, connected(pair, protocol) as peer:
        for payload in nested_control_payloads():
            peer.send_control(payload)
        assert error_code(peer.call("no_such_method")) == -32601
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_a_bad_length_on_an_established_tcp_link_closes_that_link_alone(pair: Pair) -> None:
    with pair.attacking() as mark, connected(pair, "tcp") as peer:
        assert error_code(peer.call("no_such_method")) == -32601  # up, and answering
        peer._writes.put(b"\x00\x00")  # a length of 0: the stream cannot be resynchronised
        peer.wait_for(lambda: not peer.up)  # told by a CLOSE, the connection closed
    pair.check_unharmed()
    pair.assert_no_errors(mark)


class Impostor:
    """Claims another node's identity key in the link's identity proof, and signs with its
    own: all a cookie holder can do without that node's secret key."""

    def __init__(self, claimed_public: bytes) -> None:
        self._own = Identity.generate(os.urandom)
        self.identity_public = claimed_public
        self.fingerprint = fingerprint_of(claimed_public)

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self._own.sign(domain, message)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cookie_holder_cannot_prove_the_honest_neighbours_identity(
    pair: Pair, protocol: str
) -> None:
    honest = load_identity_file(pair.honest.config.identity_file)
    impostor = Impostor(honest.identity_public)
    with pair.attacking() as mark, pair.peer(protocol, identity=impostor) as peer:
        # Our side of the link may come up (the target's proof is genuine, if it went out
        # before the target judged ours); the target's never does, so nothing is taken.
        try:
            peer.connect(timeout=3.0)
        except AssertionError:
            pass  # the target ended the connection first
        else:
            with pytest.raises(AssertionError):
                peer.call("no_such_method", timeout=2.0)
        # The honest neighbour's link, account and ledger are its own still.
        links = [ln for ln in pair.status()["links"] if ln["neighbor"] == pair.honest_fp.hex()]
        assert [ln["route"] for ln in links] == ["from_node1_udp"]
    pair.check_unharmed()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("timestamp", [-1, -(2**63), 2**64 - 1])
def test_adjacency_request_with_a_timestamp_out_of_range(pair: Pair, timestamp: int) -> None:
    with pair.attacking() as mark, connected(pair, "udp") as peer:
        request = AdjacencyRequest(peer.identity.descriptor(unix_now()), timestamp, bytes(64))
        peer.send_message(request)
        assert error_code(peer.call("no_such_method")) == -32601
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_debt_limit_notice_with_a_debt_beyond_the_wire(pair: Pair) -> None:
    """2**64 - 1 µMEL is a msgpack integer but fits no debt field (int64): the call is
    refused as invalid params (-32602), not answered as an internal error."""
    with pair.attacking() as mark, connected(pair, "udp") as peer:
        fields = [peer.fingerprint, pair.target_fp, 2**64 - 1, 1_000_000, unix_now(), bytes(64)]
        assert len(fields) == len(DebtLimitNotice.__struct_fields__)
        encoded = base64.b64encode(msgspec.msgpack.encode(fields)).decode()
        answer = peer.call("debt_limit", {"msg": encoded})
        assert error_code(answer) == INVALID_PARAMS, answer
    pair.check_unharmed()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_garbage_onion_frames_are_paid_for_and_go_nowhere(pair: Pair, protocol: str) -> None:
    """Onion frames of random bytes, for the target to peel or for a stranger. The target
    drops them, and counts every one it took in the hostile neighbour's debt."""
    rng = random.Random(5)
    with pair.attacking() as mark, connected(pair, protocol) as peer:
        peer.push_price()
        peer.wait_for(lambda: peer.account is not None and peer.account.priced)
        # The target takes the peer's answer to its offer once that is on disk: priced there
        # a moment after the peer is.
        wait_until(lambda: pair.books_of(peer.fingerprint)["priced"], 10)
        frames = [(pair.target_fp, rng.randbytes(PACKET_SIZE)) for _ in range(100)]
        frames += [(os.urandom(32), rng.randbytes(PACKET_SIZE)) for _ in range(100)]
        frames += [(pair.target_fp, rng.randbytes(rng.randrange(1, 64))) for _ in range(50)]
        for start in range(0, len(frames), 25):
            peer.send_onions(frames[start : start + 25])
        assert error_code(peer.call("no_such_method")) == -32601  # all of them arrived
        status = pair.books_of(peer.fingerprint)
        assert status["packets_in"] > 0
        assert status["debt_in_umel"] == status["packets_in"] * status["our_price_umel"]
    pair.check_unharmed()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frames_sent_while_our_price_goes_unanswered_are_held_within_a_bound(
    pair: Pair, protocol: str
) -> None:
    """The target accepted the peer's price; the peer never answers the target's, but sends
    onion frames as if priced. The target holds at most HELD_PER_LINK of them (its acceptance
    might just be on its way to disk), drops and counts the rest, and charges nothing."""
    rng = random.Random(9)
    peer = pair.peer(protocol)
    peer.silent.add("push_price")
    with pair.attacking() as mark, peer.connect():
        peer.push_price()
        peer.wait_for(lambda: any(method == "push_price" for method, _ in peer.calls.requests))
        frames = [(pair.target_fp, rng.randbytes(PACKET_SIZE)) for _ in range(200)]
        for start in range(0, len(frames), 25):
            peer.send_onions(frames[start : start + 25])
        assert error_code(peer.call("no_such_method")) == -32601  # all of them arrived
        (link,) = [
            link for link in pair.status()["links"] if link["neighbor"] == peer.fingerprint.hex()
        ]
        assert link["drops"]["not_priced"] == len(frames) - HELD_PER_LINK
        books = pair.books_of(peer.fingerprint)
        assert not books["priced"] and books["packets_in"] == 0
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_garbage_control_payloads(pair: Pair) -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(0, 2000)) for _ in range(300)]
    payloads += [encode_control(DockMessage(rng.randrange(2**32), b"x")) for _ in range(20)]
    payloads += [encode_control(GraphPush(rng.randbytes(300))) for _ in range(20)]
    with pair.attacking() as mark, connected(pair, "udp") as peer:
        for payload in payloads:
            peer.send_control(payload)
        assert error_code(peer.call("no_such_method")) == -32601
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_forged_and_malformed_gossip(pair: Pair) -> None:
    """Descriptors with bad signatures or from the future, an adjacency with the target that
    the target never signed, a dump whose length prefix lies: none gets into the graph."""
    stranger = Identity.generate(os.urandom)
    now = unix_now()
    forged = msgspec.structs.replace(stranger.descriptor(now), signature=bytes(64))
    future = Identity.generate(os.urandom).descriptor(now + 10**6)
    before = pair.graph()
    with pair.attacking() as mark, connected(pair, "tcp") as peer:
        left, right = sorted((peer.fingerprint, pair.target_fp))
        unsigned = AdjacencyDescriptor(left, right, now, bytes(64), bytes(64))
        valid = peer.identity.descriptor(now)
        for dump in encode_dumps([forged, future, valid], [unsigned]):
            peer.send_message(GraphPush(dump))
        peer.send_message(GraphPush(b"\x92\xdd\xff\xff\xff\xff"))  # 4 G entries, none there
        assert error_code(peer.call("no_such_method")) == -32601
        # Only the neighbour's own, valid descriptor got in.
        assert pair.graph() == {**before, "identities": before["identities"] + 1}
    pair.check_unharmed()
    pair.assert_no_errors(mark)
