"""Onion packets: round trips, tamper detection, replay tags, hostile input."""

from __future__ import annotations

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from earendil_py.core import packet as pk
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.packet import (
    BETA_OFFSET,
    BODY_OFFSET,
    GAMMA_OFFSET,
    MAX_HOPS,
    MAX_PAYLOAD,
    PACKET_SIZE,
    Delivered,
    Forward,
    ReplyArrived,
    build_packet,
    peel_packet,
)
from earendil_py.core.replay import ReplayFilter
from tests.helpers import seeded_rng

_key_rng = seeded_rng(2026)
SECRETS = [_key_rng(32) for _ in range(MAX_HOPS + 1)]
PUBLICS = [crypto_scalarmult_base(secret) for secret in SECRETS]
FINGERPRINTS = [_key_rng(32) for _ in range(MAX_HOPS + 1)]
ROUTE = list(zip(FINGERPRINTS, PUBLICS, strict=True))

HOPS = st.integers(min_value=1, max_value=MAX_HOPS)
SEEDS = st.integers(min_value=0, max_value=2**32)
PAYLOADS = st.binary(min_size=0, max_size=MAX_PAYLOAD)


def _route(hops: int) -> list[tuple[bytes, bytes]]:
    return ROUTE[:hops]


def _peel_to(packet: bytes, hop: int) -> bytes:
    """The packet as it arrives at peeler `hop`, peeling the honest hops before it."""
    for i in range(hop):
        result = peel_packet(packet, SECRETS[i])
        assert isinstance(result, Forward)
        packet = result.packet
    return packet


def test_constants_fit_one_unfragmented_datagram() -> None:
    assert pk.HOP_SIZE == 80
    assert pk.HEADER_SIZE == 32 + 16 + MAX_HOPS * 80 == 448
    assert pk.BODY_SIZE == PACKET_SIZE - pk.HEADER_SIZE == 902
    assert MAX_PAYLOAD == 900
    # Link framing adds at most ~64 bytes; IPv6 over 1500-byte Ethernet leaves 1452 for UDP.
    assert PACKET_SIZE + 64 <= 1500 - 40 - 8


@settings(max_examples=200, deadline=None, derandomize=True)
@given(hops=HOPS, payload=PAYLOADS, seed=SEEDS)
def test_round_trip(hops: int, payload: bytes, seed: int) -> None:
    first, packet = build_packet(_route(hops), payload, seeded_rng(seed))
    assert first == FINGERPRINTS[0]
    tags = []
    for i in range(hops):
        assert len(packet) == PACKET_SIZE
        result = peel_packet(packet, SECRETS[i])
        tags.append(result.replay_tag)
        if i < hops - 1:
            assert isinstance(result, Forward)
            assert result.next_peeler == FINGERPRINTS[i + 1]
            packet = result.packet
        else:
            assert isinstance(result, Delivered)
            assert result.payload == payload
    assert len(set(tags)) == hops
    assert all(len(tag) == pk.TAG_SIZE for tag in tags)


def test_same_route_and_payload_give_unlinkable_packets() -> None:
    _, one = build_packet(_route(3), b"same", seeded_rng(1))
    _, two = build_packet(_route(3), b"same", seeded_rng(2))
    assert one != two
    assert peel_packet(one, SECRETS[0]).replay_tag != peel_packet(two, SECRETS[0]).replay_tag


def test_build_is_deterministic_for_a_seed() -> None:
    # Pins the wire format: a change here is a protocol change and needs a new KDF context.
    _, packet = build_packet(_route(3), b"earendil", seeded_rng(7))
    assert packet == build_packet(_route(3), b"earendil", seeded_rng(7))[1]
    assert blake3.blake3(packet).hexdigest()[:32] == "33399daeea86a5d5ec26af150bacf8d0"


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=st.data(), hops=HOPS, seed=SEEDS)
def test_tampering_is_caught_at_the_next_peeler(data: st.DataObject, hops: int, seed: int) -> None:
    _, packet = build_packet(_route(hops), b"tag me if you can", seeded_rng(seed))
    hop = data.draw(st.integers(min_value=0, max_value=hops - 1), label="hop")
    index = data.draw(st.integers(min_value=0, max_value=PACKET_SIZE - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    in_flight = bytearray(_peel_to(packet, hop))
    in_flight[index] ^= mask
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(bytes(in_flight), SECRETS[hop])
    assert caught.value.reason in {"bad_mac", "bad_packet"}


# Both ends of every region, plus the alpha bit that X25519 itself ignores.
REGION_EDGES = [
    (0, 0x01),
    (GAMMA_OFFSET - 1, 0x80),
    (GAMMA_OFFSET - 1, 0x01),
    (GAMMA_OFFSET, 0x01),
    (BETA_OFFSET - 1, 0x80),
    (BETA_OFFSET, 0x01),
    (BODY_OFFSET - 1, 0x01),
    (BODY_OFFSET, 0x01),
    (BODY_OFFSET + 1, 0x01),
    (PACKET_SIZE - 1, 0x01),
]


@pytest.mark.parametrize(("index", "mask"), REGION_EDGES)
@pytest.mark.parametrize("hop", range(3))
def test_tampering_every_region_at_every_hop(hop: int, index: int, mask: int) -> None:
    _, packet = build_packet(_route(3), b"x" * 100, seeded_rng(hop))
    in_flight = bytearray(_peel_to(packet, hop))
    in_flight[index] ^= mask
    with pytest.raises(RemoteProtocolError):
        peel_packet(bytes(in_flight), SECRETS[hop])


def test_same_packet_twice_gives_the_same_tag_and_the_filter_rejects_it() -> None:
    _, packet = build_packet(_route(2), b"once", seeded_rng(3))
    first = peel_packet(packet, SECRETS[0])
    second = peel_packet(packet, SECRETS[0])
    assert first == second
    replays = ReplayFilter(window=60.0, max_entries=1024)
    assert replays.check_and_insert(first.replay_tag, now=0.0)
    assert not replays.check_and_insert(second.replay_tag, now=1.0)


def test_wrong_onion_key_is_rejected() -> None:
    _, packet = build_packet(_route(2), b"not for you", seeded_rng(4))
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(packet, SECRETS[MAX_HOPS])
    assert caught.value.reason == "bad_mac"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=2 * PACKET_SIZE))
def test_any_bytes_raise_only_remote_errors(data: bytes) -> None:
    try:
        peel_packet(data, SECRETS[0])
    except RemoteProtocolError as error:
        assert error.reason in {"bad_size", "bad_mac", "bad_packet"}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE))
def test_random_full_size_packets_are_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(data, SECRETS[0])
    assert caught.value.reason in {"bad_mac", "bad_packet"}


@pytest.mark.parametrize("size", [0, 1, PACKET_SIZE - 1, PACKET_SIZE + 1])
def test_wrong_size_is_bad_size(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(bytes(size), SECRETS[0])
    assert caught.value.reason == "bad_size"


@pytest.mark.parametrize("alpha", [bytes(32), (1).to_bytes(32, "little")])
def test_low_order_ephemeral_key_is_bad_packet(alpha: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(alpha + bytes(PACKET_SIZE - 32), SECRETS[0])
    assert caught.value.reason == "bad_packet"


def test_wrong_size_onion_secret_is_our_bug() -> None:
    _, packet = build_packet(_route(1), b"", seeded_rng(5))
    with pytest.raises(LocalProtocolError):
        peel_packet(packet, SECRETS[0][:31])


# --- A malicious sender: a hand-built one-hop packet with an arbitrary final body. ---------
# This also re-derives the format from docs/packet-format.md independently of build_packet.


def _independent_gamma(header_key: bytes, body_key: bytes, beta: bytes, body: bytes) -> bytes:
    routing = b"".join(beta[i : i + 64] for i in range(0, pk.BETA_SIZE, 80))
    slots = b"".join(beta[i + 64 : i + 80] for i in range(0, pk.BETA_SIZE, 80))
    digest = blake3.blake3(routing, key=header_key).digest(16)
    return AESGCM(body_key).encrypt(bytes(12), b"", digest + slots + body)


def _one_hop_packet(
    final_body: bytes, onion_public: bytes, seed: int, final_block: bytes = bytes(80)
) -> bytes:
    rng = seeded_rng(seed)
    ephemeral = rng(32)
    shared = crypto_scalarmult(ephemeral, onion_public)
    keys = blake3.blake3(shared, derive_key_context=pk.KDF_CONTEXT).digest(96)
    header_key, body_key, stream_key = keys[:32], keys[32:48], keys[48:80]
    plain = final_block + rng(pk.BETA_SIZE - pk.HOP_SIZE) + final_body
    assert len(plain) == pk.BETA_SIZE + pk.BODY_SIZE
    # Encrypting the zero slot too keeps the keystream offsets as the peeler sees them.
    stream_in = plain[: pk.BETA_SIZE] + bytes(pk.HOP_SIZE) + plain[pk.BETA_SIZE :]
    ciphertext = crypto_aead_chacha20poly1305_ietf_encrypt(stream_in, None, bytes(12), stream_key)
    beta = ciphertext[: pk.BETA_SIZE]
    body = ciphertext[pk.BETA_SIZE + pk.HOP_SIZE : pk.BETA_SIZE + pk.HOP_SIZE + pk.BODY_SIZE]
    gamma = _independent_gamma(header_key, body_key, beta, body)
    return crypto_scalarmult_base(ephemeral) + gamma + beta + body


def _final_body(length_field: int, payload: bytes, padding_byte: int = 0) -> bytes:
    head = length_field.to_bytes(2, "big") + payload
    return head + bytes([padding_byte]) * (pk.BODY_SIZE - len(head))


def test_hand_built_packet_matches_the_documented_format() -> None:
    packet = _one_hop_packet(_final_body(5, b"hello"), PUBLICS[0], seed=6)
    result = peel_packet(packet, SECRETS[0])
    assert result == Delivered(b"hello", result.replay_tag)


@pytest.mark.parametrize("length_field", [MAX_PAYLOAD + 1, 0xFFFF])
def test_final_body_with_impossible_length_is_bad_packet(length_field: int) -> None:
    packet = _one_hop_packet(_final_body(length_field, b""), PUBLICS[0], seed=8)
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(packet, SECRETS[0])
    assert caught.value.reason == "bad_packet"


def _final_block(kind: int, filler: int = 0) -> bytes:
    return bytes(32) + bytes([kind]) + bytes([filler]) * 31 + bytes(16)


@pytest.mark.parametrize(("kind", "filler"), [(2, 0), (255, 0), (0, 1), (1, 7)])
def test_final_routing_block_must_say_datagram_or_reply(kind: int, filler: int) -> None:
    final_block = _final_block(kind, filler)
    packet = _one_hop_packet(_final_body(1, b"x"), PUBLICS[0], seed=12, final_block=final_block)
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(packet, SECRETS[0])
    assert caught.value.reason == "bad_packet"


def test_final_routing_block_saying_reply_gives_the_raw_body() -> None:
    body = _final_body(1, b"x", padding_byte=9)  # a reply's body is not framed in the clear
    packet = _one_hop_packet(body, PUBLICS[0], seed=13, final_block=_final_block(1))
    result = peel_packet(packet, SECRETS[0])
    assert result == ReplyArrived(body, result.replay_tag)


def test_final_body_with_nonzero_padding_is_bad_packet() -> None:
    packet = _one_hop_packet(_final_body(3, b"abc", padding_byte=1), PUBLICS[0], seed=9)
    with pytest.raises(RemoteProtocolError) as caught:
        peel_packet(packet, SECRETS[0])
    assert caught.value.reason == "bad_packet"


def test_full_size_payload_round_trips() -> None:
    payload = seeded_rng(10)(MAX_PAYLOAD)
    _, packet = build_packet(_route(MAX_HOPS), payload, seeded_rng(11))
    result = peel_packet(_peel_to(packet, MAX_HOPS - 1), SECRETS[MAX_HOPS - 1])
    assert result == Delivered(payload, result.replay_tag)


# --- Building: our own misuse is LocalProtocolError. --------------------------------------


@pytest.mark.parametrize("hops", [0, MAX_HOPS + 1])
def test_route_length_is_bounded(hops: int) -> None:
    with pytest.raises(LocalProtocolError):
        build_packet(ROUTE[:hops] if hops else [], b"", seeded_rng(0))


def test_oversize_payload_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        build_packet(_route(1), bytes(MAX_PAYLOAD + 1), seeded_rng(0))


@pytest.mark.parametrize(
    "hop",
    [
        (FINGERPRINTS[0][:31], PUBLICS[0]),
        (FINGERPRINTS[0], PUBLICS[0] + b"\x00"),
        (bytes(32), PUBLICS[0]),  # the all-zero fingerprint means "deliver here"
        (FINGERPRINTS[0], bytes(32)),  # a low-order onion key
    ],
)
def test_bad_route_entries_are_refused(hop: tuple[bytes, bytes]) -> None:
    with pytest.raises(LocalProtocolError):
        build_packet([ROUTE[1], hop], b"", seeded_rng(0))


def test_short_rng_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        build_packet(_route(1), b"", lambda size: bytes(size - 1))
