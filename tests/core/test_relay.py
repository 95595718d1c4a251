"""What a peeler delivers: payload kinds round trip, any payload bytes are a counted drop,
replies pass the replay filter like any packet."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.packet import (
    MAX_PAYLOAD,
    ReplyArrived,
    build_packet,
    build_reply_block,
    use_reply_block,
)
from earendil_py.core.relay import (
    MAX_ANONYMOUS_DATA,
    MAX_ANONYMOUS_DATA_WITH_BLOCK,
    MAX_DATAGRAM,
    MAX_REPLY_DATA,
    Datagram,
    Peeler,
    ReplyBlocks,
    decode_payload,
    decode_reply,
    encode_anonymous,
    encode_datagram,
    encode_reply,
)
from tests.helpers import seeded_rng

_rng = seeded_rng(99)
SECRET = _rng(32)
ME = [(_rng(32), crypto_scalarmult_base(SECRET))]
ENDPOINT = _rng(16)
BLOCK, _ = build_reply_block(ME, seeded_rng(1))
DOCKS = st.integers(min_value=0, max_value=2**32 - 1)


@given(dock=DOCKS, data=st.binary(max_size=MAX_DATAGRAM))
def test_a_datagram_round_trips(dock: int, data: bytes) -> None:
    assert decode_payload(encode_datagram(dock, data)) == Datagram(dock, data)


@settings(max_examples=50, deadline=None)
@given(dock=DOCKS, data=st.binary(max_size=MAX_ANONYMOUS_DATA_WITH_BLOCK), with_block=st.booleans())
def test_an_anonymous_datagram_round_trips(dock: int, data: bytes, with_block: bool) -> None:
    blocks = [BLOCK] if with_block else []
    decoded = decode_payload(encode_anonymous(dock, ENDPOINT, blocks, data))
    assert decoded == Datagram(dock, data, ENDPOINT, tuple(blocks))


def test_blocks_alone_round_trip() -> None:
    decoded = decode_payload(encode_anonymous(3, ENDPOINT, [BLOCK], None))
    assert decoded == ReplyBlocks(3, ENDPOINT, (BLOCK,))


def test_the_size_limits_are_exact() -> None:
    assert len(encode_datagram(1, bytes(MAX_DATAGRAM))) == MAX_PAYLOAD
    assert len(encode_anonymous(1, ENDPOINT, [], bytes(MAX_ANONYMOUS_DATA))) == MAX_PAYLOAD
    full = encode_anonymous(1, ENDPOINT, [BLOCK], bytes(MAX_ANONYMOUS_DATA_WITH_BLOCK))
    assert len(full) == MAX_PAYLOAD
    assert len(encode_reply(0, bytes(MAX_REPLY_DATA))) == MAX_PAYLOAD
    for oversize in (
        lambda: encode_datagram(1, bytes(MAX_DATAGRAM + 1)),
        lambda: encode_anonymous(1, ENDPOINT, [BLOCK], bytes(MAX_ANONYMOUS_DATA_WITH_BLOCK + 1)),
        lambda: encode_anonymous(1, ENDPOINT[:15], [], b""),
        lambda: encode_reply(0, bytes(MAX_REPLY_DATA + 1)),
        lambda: encode_datagram(2**32, b""),
    ):
        with pytest.raises(LocalProtocolError):
            oversize()


@given(remaining=st.integers(min_value=-5, max_value=1000), data=st.binary(max_size=100))
def test_a_reply_payload_round_trips_with_remaining_capped(remaining: int, data: bytes) -> None:
    assert decode_reply(encode_reply(remaining, data)) == (min(max(remaining, 0), 255), data)
    with pytest.raises(RemoteProtocolError):
        decode_reply(b"")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    payload=st.one_of(
        st.binary(max_size=MAX_PAYLOAD),
        st.binary(max_size=60).map(lambda tail: bytes([1, 0, 0, 0, 7]) + bytes(16) + tail),
        st.integers(0, 3).map(
            lambda n: bytes([2, 0, 0, 0, 7]) + bytes(16) + bytes([n]) + bytes(40)
        ),
    )
)
def test_any_payload_decodes_or_raises_only_remote_errors(payload: bytes) -> None:
    try:
        decode_payload(payload)
    except RemoteProtocolError as error:
        assert error.reason in {"bad_datagram", "bad_reply_block"}


def test_the_peeler_hands_on_a_reply_once() -> None:
    block, opener = build_reply_block(ME, seeded_rng(2))
    _, packet = use_reply_block(block, encode_reply(3, b"hi"))
    peeler = Peeler(SECRET)
    arrived = peeler.peel(packet, now=0.0)
    assert isinstance(arrived, ReplyArrived)
    assert arrived.replay_tag == opener.replay_tag
    assert peeler.peel(packet, now=1.0) is None
    assert peeler.drops == {"replay": 1}


def test_the_peeler_counts_a_payload_it_cannot_decode() -> None:
    _, packet = build_packet(ME, bytes([9, 0, 0, 0, 1]), seeded_rng(3))
    peeler = Peeler(SECRET)
    assert peeler.peel(packet, now=0.0) is None
    assert peeler.drops == {"bad_datagram": 1}
