"""Control messages between neighbours: what decodes is within the bounds of its fields."""

from __future__ import annotations

import msgspec
import pytest

from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.graph import adjacency_unsigned, sign_adjacency
from earendil_py.core.identity import Identity
from earendil_py.core.link import MAX_MESSAGE_SIZE
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    AdjacencyRequest,
    DockMessage,
    GraphPull,
    GraphPush,
    decode_control,
    encode_control,
)
from tests.helpers import seeded_rng

NOW = 1_800_000_000
ALICE = Identity.generate(seeded_rng(1))
BOB = Identity.generate(seeded_rng(2))


def request(timestamp: int) -> AdjacencyRequest:
    left, right, _ = adjacency_unsigned(ALICE.fingerprint, BOB.fingerprint, NOW)
    return AdjacencyRequest(
        ALICE.descriptor(NOW), timestamp, sign_adjacency(ALICE, left, right, NOW)
    )


def bad_control(data: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_control(data)
    return caught.value.reason


def test_messages_round_trip() -> None:
    for message in (
        GraphPush(b"dump"),
        GraphPull(),
        request(NOW),
        DockMessage(GLOBAL_RPC_DOCK, b"{}"),
    ):
        assert decode_control(encode_control(message)) == message


@pytest.mark.parametrize("timestamp", [-1, -(2**63), 2**63, 2**64 - 1])
def test_an_adjacency_request_dated_outside_the_wire_range_is_refused_at_decode(
    timestamp: int,
) -> None:
    """Such a timestamp used to decode, then raise LocalProtocolError in the gossip task when
    we countersigned it (a u64 timestamp in the signed part)."""
    assert bad_control(encode_control(request(timestamp))) == "bad_control"


def test_descriptor_keys_and_signatures_have_their_exact_sizes() -> None:
    descriptor = ALICE.descriptor(NOW)
    for field, size in (("identity_public", 31), ("onion_public", 33), ("signature", 63)):
        bad = msgspec.structs.replace(descriptor, **{field: bytes(size)})
        message = msgspec.structs.replace(request(NOW), identity=bad)
        assert bad_control(encode_control(message)) == "bad_control"
    short = msgspec.structs.replace(request(NOW), signature=bytes(32))
    assert bad_control(encode_control(short)) == "bad_control"


def test_payloads_are_at_most_a_link_message() -> None:
    for message in (
        GraphPush(bytes(MAX_MESSAGE_SIZE + 1)),
        DockMessage(GLOBAL_RPC_DOCK, bytes(MAX_MESSAGE_SIZE + 1)),
    ):
        assert bad_control(encode_control(message)) == "bad_control"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_nesting_deeper_than_the_parser_goes_is_bad_control(depth: int) -> None:
    """A GraphPull with one extra element nested `depth` deep: msgspec skips unknown trailing
    elements recursively and used to raise RecursionError out of the link's task."""
    pull = encode_control(GraphPull())
    assert pull == b"\x91\x02"
    assert bad_control(b"\x92\x02" + b"\x91" * depth + b"\xc0") == "bad_control"
    assert decode_control(b"\x92\x02" + b"\x91" * 10 + b"\xc0") == GraphPull()  # shallow: fine
