"""Reply blocks: a reply goes back along a route the replier never learns, is pinned at every
hop like any packet, is read only by the block's builder, and is single use."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base

from earendil_py.core import packet as pk
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.packet import (
    MAX_HOPS,
    MAX_PAYLOAD,
    PACKET_SIZE,
    REPLY_BLOCK_SIZE,
    Delivered,
    Forward,
    ReplyArrived,
    ReplyBlock,
    build_packet,
    build_reply_block,
    open_reply,
    parse_reply_block,
    peel_packet,
    use_reply_block,
)
from earendil_py.core.replay import ReplayFilter
from tests.helpers import seeded_rng

_key_rng = seeded_rng(2027)
# Peelers 0..MAX_HOPS-1 relay; SENDER builds the blocks and ends every return route.
SECRETS = [_key_rng(32) for _ in range(MAX_HOPS + 2)]
PUBLICS = [crypto_scalarmult_base(secret) for secret in SECRETS]
FINGERPRINTS = [_key_rng(32) for _ in range(MAX_HOPS + 2)]
SENDER = MAX_HOPS + 1
REPLIER = MAX_HOPS

HOPS = st.integers(min_value=1, max_value=MAX_HOPS)
SEEDS = st.integers(min_value=0, max_value=2**32)
PAYLOADS = st.binary(min_size=0, max_size=MAX_PAYLOAD)


def _return_route(hops: int) -> list[tuple[bytes, bytes]]:
    """`hops` peelers, the sender last: relays hops-2 .. 0, then the sender."""
    relays = list(reversed(range(hops - 1)))
    return [(FINGERPRINTS[i], PUBLICS[i]) for i in relays] + [
        (FINGERPRINTS[SENDER], PUBLICS[SENDER])
    ]


def _secrets_along(hops: int) -> list[bytes]:
    return [SECRETS[i] for i in reversed(range(hops - 1))] + [SECRETS[SENDER]]


def _carry(packet: bytes, secrets: list[bytes]) -> Forward | Delivered | ReplyArrived:
    """Peel `packet` at each of `secrets` in turn; the last result."""
    for i, secret in enumerate(secrets):
        result = peel_packet(packet, secret)
        if i < len(secrets) - 1:
            assert isinstance(result, Forward)
            assert len(result.packet) == PACKET_SIZE
            packet = result.packet
    return result


@settings(max_examples=60, deadline=None, derandomize=True)
@given(forward_hops=HOPS, return_hops=HOPS, payload=PAYLOADS, seed=SEEDS)
def test_round_trip_through_a_block_sent_inside_a_packet(
    forward_hops: int, return_hops: int, payload: bytes, seed: int
) -> None:
    rng = seeded_rng(seed)
    block, opener = build_reply_block(_return_route(return_hops), rng)
    # The block travels to the replier inside an ordinary onion packet.
    forward_route = [(FINGERPRINTS[i], PUBLICS[i]) for i in range(forward_hops - 1)]
    forward_route.append((FINGERPRINTS[REPLIER], PUBLICS[REPLIER]))
    forward_secrets = [SECRETS[i] for i in range(forward_hops - 1)] + [SECRETS[REPLIER]]
    _, packet = build_packet(forward_route, block.to_bytes(), rng)
    delivered = _carry(packet, forward_secrets)
    assert isinstance(delivered, Delivered)
    received = parse_reply_block(delivered.payload)

    first, reply = use_reply_block(received, payload)
    assert first == _return_route(return_hops)[0][0]
    arrived = _carry(reply, _secrets_along(return_hops))
    assert isinstance(arrived, ReplyArrived)
    assert arrived.replay_tag == opener.replay_tag
    assert open_reply(opener, arrived.body) == payload


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data(), hops=HOPS, seed=SEEDS)
def test_tampering_with_a_reply_is_caught_at_the_next_peeler(
    data: st.DataObject, hops: int, seed: int
) -> None:
    block, _ = build_reply_block(_return_route(hops), seeded_rng(seed))
    _, reply = use_reply_block(block, b"tag me if you can")
    secrets = _secrets_along(hops)
    hop = data.draw(st.integers(min_value=0, max_value=hops - 1), label="hop")
    index = data.draw(st.integers(min_value=0, max_value=PACKET_SIZE - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    in_flight = bytearray(reply if hop == 0 else _carry(reply, secrets[:hop]).packet)  # type: ignore[union-attr]
    in_flight[index] ^= mask
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(bytes(in_flight), secrets[hop])
    assert caught.value.reason in {"bad_mac", "bad_packet"}


@pytest.mark.parametrize("hops", [2, MAX_HOPS])
@pytest.mark.parametrize("field", [slice(0, 32), slice(32, 64), slice(80, 112)])
def test_the_replier_cannot_steer_the_route_even_fixing_up_the_macs(
    hops: int, field: slice
) -> None:
    # The replier holds every hop's GHASH key, so it can make any change to the MAC slots
    # and the body verify. The routing fields (next fingerprint, next alpha) are under the
    # BLAKE3 part, whose key it never gets: flipping bits there, to test a guess about the
    # route by sending the packet to a node it watches, is caught at the first peeler.
    block, _ = build_reply_block(_return_route(hops), seeded_rng(hops))
    beta = bytearray(block.header[pk.BETA_OFFSET :])
    beta[field] = bytes(b ^ 0x5A for b in beta[field])
    steered = ReplyBlock(
        first_peeler=block.first_peeler,
        header=block.header[: pk.BETA_OFFSET] + bytes(beta),
        body_keys=block.body_keys,
        e2e_key=block.e2e_key,
    )
    _, reply = use_reply_block(steered, b"where are you?")
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(reply, _secrets_along(hops)[0])
    assert caught.value.reason == "bad_mac"


def test_a_block_used_twice_is_a_replay_at_its_first_peeler() -> None:
    block, _ = build_reply_block(_return_route(3), seeded_rng(1))
    first = peel_packet(use_reply_block(block, b"one")[1], _secrets_along(3)[0])
    second = peel_packet(use_reply_block(block, b"two")[1], _secrets_along(3)[0])
    assert first.replay_tag == second.replay_tag
    replays = ReplayFilter(window=60.0, max_entries=1024)
    assert replays.check_and_insert(first.replay_tag, now=0.0)
    assert not replays.check_and_insert(second.replay_tag, now=1.0)


@pytest.mark.parametrize("hops", range(1, MAX_HOPS + 1))
def test_the_block_shows_the_replier_only_the_first_peeler(hops: int) -> None:
    route = _return_route(hops)
    block, _ = build_reply_block(route, seeded_rng(hops))
    wire = block.to_bytes()
    assert len(wire) == REPLY_BLOCK_SIZE  # the same size for every route length
    assert len(block.body_keys) == MAX_HOPS
    assert wire.startswith(route[0][0])
    for fingerprint, _ in route[1:]:
        assert fingerprint not in wire
    for _, onion_public in route:
        assert onion_public not in wire


@pytest.mark.parametrize("hops", [1, 2, MAX_HOPS - 1])
def test_reply_packets_peel_like_forward_packets(hops: int) -> None:
    # What a relay sees: a Forward of a full-size packet, both ways, and the same fields.
    block, _ = build_reply_block(_return_route(hops + 1), seeded_rng(5))
    _, reply = use_reply_block(block, b"r")
    _, forward = build_packet(_return_route(hops + 1), b"f", seeded_rng(6))
    secret = _secrets_along(hops + 1)[0]
    as_reply, as_forward = peel_packet(reply, secret), peel_packet(forward, secret)
    assert isinstance(as_reply, Forward) and isinstance(as_forward, Forward)
    assert as_reply.next_peeler == as_forward.next_peeler
    assert len(as_reply.packet) == len(as_forward.packet) == PACKET_SIZE


def test_only_the_builder_reads_the_reply() -> None:
    block, opener = build_reply_block(_return_route(3), seeded_rng(7))
    _, other = build_reply_block(_return_route(3), seeded_rng(8))
    _, reply = use_reply_block(block, b"for your eyes only")
    arrived = _carry(reply, _secrets_along(3))
    assert isinstance(arrived, ReplyArrived)
    assert b"for your eyes only" not in arrived.body
    with pytest.raises(RemoteProtocolError):
        open_reply(other, arrived.body)
    assert open_reply(opener, arrived.body) == b"for your eyes only"


def test_two_replies_through_two_blocks_share_no_bytes_at_any_hop() -> None:
    route = _return_route(3)
    one, _ = build_reply_block(route, seeded_rng(9))
    two, _ = build_reply_block(route, seeded_rng(10))
    packets = [use_reply_block(one, b"same")[1], use_reply_block(two, b"same")[1]]
    for secret in _secrets_along(3)[:-1]:
        # Any 16-byte window in common would be a way to link them.
        windows = {packets[0][i : i + 16] for i in range(0, PACKET_SIZE - 16)}
        assert not any(packets[1][i : i + 16] in windows for i in range(PACKET_SIZE - 16))
        peeled = [peel_packet(packet, secret) for packet in packets]
        packets = [layer.packet for layer in peeled]  # type: ignore[union-attr]


def test_full_size_reply_round_trips() -> None:
    payload = seeded_rng(11)(MAX_PAYLOAD)
    block, opener = build_reply_block(_return_route(MAX_HOPS), seeded_rng(12))
    arrived = _carry(use_reply_block(block, payload)[1], _secrets_along(MAX_HOPS))
    assert isinstance(arrived, ReplyArrived)
    assert open_reply(opener, arrived.body) == payload


def test_oversize_reply_is_our_bug() -> None:
    block, _ = build_reply_block(_return_route(2), seeded_rng(13))
    with pytest.raises(LocalProtocolError):
        use_reply_block(block, bytes(MAX_PAYLOAD + 1))


@pytest.mark.parametrize("hops", [0, MAX_HOPS + 1])
def test_return_route_length_is_bounded(hops: int) -> None:
    route = [(FINGERPRINTS[0], PUBLICS[0])] * hops
    with pytest.raises(LocalProtocolError):
        build_reply_block(route, seeded_rng(0))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=2 * REPLY_BLOCK_SIZE))
def test_parsing_any_bytes_raises_only_remote_errors(data: bytes) -> None:
    try:
        block = parse_reply_block(data)
    except RemoteProtocolError as error:
        assert error.reason == "bad_reply_block"
    else:
        assert block.to_bytes() == data


def test_a_block_naming_no_first_peeler_is_refused() -> None:
    block, _ = build_reply_block(_return_route(2), seeded_rng(14))
    with pytest.raises(RemoteProtocolError):
        parse_reply_block(bytes(32) + block.to_bytes()[32:])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(body=st.binary(min_size=pk.BODY_SIZE, max_size=pk.BODY_SIZE), seed=SEEDS)
def test_opening_any_body_raises_only_remote_errors(body: bytes, seed: int) -> None:
    _, opener = build_reply_block(_return_route(2), seeded_rng(seed))
    try:
        open_reply(opener, body)
    except RemoteProtocolError as error:
        assert error.reason == "bad_packet"
