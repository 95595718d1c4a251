"""What a node does with one onion frame: forward it untouched, or peel it.

A frame names its `next_peeler`. If that is not us we are a plain relay: the packet goes on
toward the next peeler with no onion crypto at all. If it is us we peel one layer (one X25519),
check the per-hop replay tag, and either forward the inner packet, deliver its payload, or
hand a reply that came back through one of our reply blocks to whoever holds its opener.

Datagrams delivered to a node are addressed to a *dock* (like a port number). The final
payload of a forward packet says how it may be answered:

    0 DATAGRAM      | dock u32 | data                            no way to answer
    1 ANONYMOUS     | dock u32 | endpoint (16) | n u8 | n reply blocks | data
    2 REPLY_BLOCKS  | dock u32 | endpoint (16) | n u8 | n reply blocks

ANONYMOUS is a datagram from an *anonymous endpoint*: a random id that stands for the sender,
with reply blocks (core/packet.py) through which the receiver answers that id; REPLY_BLOCKS
only stocks the receiver with more of them. A reply's payload (`open_reply`) is
`remaining u8 | data`: how many blocks for that endpoint the replier still holds, so that the
sender knows when to send more (docs/apps.md).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.packet import (
    MAX_PAYLOAD,
    REPLY_BLOCK_SIZE,
    Delivered,
    Forward,
    ReplyArrived,
    ReplyBlock,
    parse_reply_block,
    peel_packet,
)
from earendil_py.core.replay import ReplayFilter

DATAGRAM, ANONYMOUS, REPLY_BLOCKS = 0, 1, 2
HEAD = struct.Struct(">BI")  # kind, dock
ENDPOINT_SIZE = 16  # an anonymous endpoint id: random, so collisions need ~2^64 of them
ANONYMOUS_HEAD_SIZE = HEAD.size + ENDPOINT_SIZE + 1
MAX_DATAGRAM = MAX_PAYLOAD - HEAD.size
MAX_ANONYMOUS_DATA = MAX_PAYLOAD - ANONYMOUS_HEAD_SIZE
MAX_ANONYMOUS_DATA_WITH_BLOCK = MAX_ANONYMOUS_DATA - REPLY_BLOCK_SIZE
MAX_REPLY_DATA = MAX_PAYLOAD - 1  # after the `remaining` byte
MAX_REMAINING = 255
# Replay tags are remembered for at least this long, and at most this many at once.
REPLAY_WINDOW_SECS = 600.0
REPLAY_MAX_ENTRIES = 1_000_000
# One onion layer peeled: or why it could not be.
Layer = Forward | Delivered | ReplyArrived | RemoteProtocolError


@dataclass(frozen=True, slots=True)
class Datagram:
    """A datagram that arrived for this node. From an anonymous endpoint, it says which, and
    brings the reply blocks that came with it (possibly none)."""

    dock: int
    data: bytes
    endpoint: bytes | None = None
    reply_blocks: tuple[ReplyBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyBlocks:
    """Reply blocks, and nothing to deliver: more ways to answer `endpoint` from `dock`."""

    dock: int
    endpoint: bytes
    reply_blocks: tuple[ReplyBlock, ...]


Accepted = tuple[bytes, bytes] | Datagram | ReplyBlocks | ReplyArrived


def encode_datagram(dock: int, data: bytes) -> bytes:
    """The onion payload for `data` sent to `dock`. Raises LocalProtocolError if too big."""
    _check_dock(dock)
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"a datagram carries at most {MAX_DATAGRAM} bytes")
    return HEAD.pack(DATAGRAM, dock) + data


def encode_anonymous(
    dock: int, endpoint: bytes, reply_blocks: list[ReplyBlock], data: bytes | None
) -> bytes:
    """The onion payload for `data` from anonymous `endpoint` to `dock`, with `reply_blocks`;
    with `data` None, the blocks alone (REPLY_BLOCKS). Raises LocalProtocolError if it does
    not fit or `endpoint` is not ENDPOINT_SIZE bytes."""
    _check_dock(dock)
    if len(endpoint) != ENDPOINT_SIZE:
        raise LocalProtocolError(f"an endpoint id is {ENDPOINT_SIZE} bytes")
    kind = REPLY_BLOCKS if data is None else ANONYMOUS
    payload = b"".join(
        (
            HEAD.pack(kind, dock),
            endpoint,
            bytes([len(reply_blocks)]),
            *(block.to_bytes() for block in reply_blocks),
            data or b"",
        )
    )
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"{len(payload)} bytes with the reply blocks, at most {MAX_PAYLOAD}"
        )
    return payload


def encode_reply(remaining: int, data: bytes) -> bytes:
    """The payload of a reply: `remaining` (capped at MAX_REMAINING), then `data`. Raises
    LocalProtocolError if `data` is too big."""
    if len(data) > MAX_REPLY_DATA:
        raise LocalProtocolError(f"a reply carries at most {MAX_REPLY_DATA} bytes")
    return bytes([min(max(remaining, 0), MAX_REMAINING)]) + data


def decode_reply(payload: bytes) -> tuple[int, bytes]:
    """(remaining, data) of a reply's payload. Raises RemoteProtocolError ("bad_reply") if
    it is empty."""
    if not payload:
        raise RemoteProtocolError("empty reply", "bad_reply")
    return payload[0], payload[1:]


def decode_payload(payload: bytes) -> Datagram | ReplyBlocks:
    """A delivered payload. Raises RemoteProtocolError ("bad_datagram" for a short head or an
    unknown kind, "bad_reply_block" for blocks that do not parse) and nothing else."""
    if len(payload) < HEAD.size:
        raise RemoteProtocolError("payload shorter than its head", "bad_datagram")
    kind, dock = HEAD.unpack_from(payload)
    if kind == DATAGRAM:
        return Datagram(dock, payload[HEAD.size :])
    if kind not in (ANONYMOUS, REPLY_BLOCKS) or len(payload) < ANONYMOUS_HEAD_SIZE:
        raise RemoteProtocolError(f"payload of kind {kind}", "bad_datagram")
    endpoint = payload[HEAD.size : HEAD.size + ENDPOINT_SIZE]
    count = payload[ANONYMOUS_HEAD_SIZE - 1]
    end = ANONYMOUS_HEAD_SIZE + count * REPLY_BLOCK_SIZE
    if len(payload) < end:
        raise RemoteProtocolError(f"{count} reply blocks do not fit", "bad_reply_block")
    blocks = tuple(
        parse_reply_block(payload[i : i + REPLY_BLOCK_SIZE])
        for i in range(ANONYMOUS_HEAD_SIZE, end, REPLY_BLOCK_SIZE)
    )
    if kind == REPLY_BLOCKS:
        if len(payload) != end:
            raise RemoteProtocolError("data after the reply blocks", "bad_datagram")
        return ReplyBlocks(dock, endpoint, blocks)
    return Datagram(dock, payload[end:], endpoint, blocks)


def _check_dock(dock: int) -> None:
    if not 0 <= dock < 2**32:
        raise LocalProtocolError("a dock is a u32")


class Peeler:
    """Peels onion layers addressed to us, with replay protection. Never raises for bad
    packets: they are dropped and counted in `drops` by reason."""

    def __init__(self, onion_secret: bytes, replay: ReplayFilter | None = None) -> None:
        self._onion_secret = onion_secret
        self._replay = replay or ReplayFilter(REPLAY_WINDOW_SECS, REPLAY_MAX_ENTRIES)
        self.drops: Counter[str] = Counter()

    def peel(self, packet: bytes, now: float) -> Accepted | None:
        """What `accept` returns for this packet's layer, or None (dropped)."""
        return self.accept(self.peel_layer(packet), now)

    def peel_layer(self, packet: bytes) -> Layer:
        """The onion crypto of `peel`, and nothing else: it reads only the key and writes
        nothing, so several threads may call it at once. Pass the result to `accept`."""
        try:
            return peel_packet(packet, self._onion_secret)
        except RemoteProtocolError as exc:
            return exc

    def accept(self, layer: Layer, now: float) -> Accepted | None:
        """A `peel_layer` result with drops counted and the replay filter checked: (next
        peeler, inner packet) to forward, a Datagram or ReplyBlocks for a dock here, a
        ReplyArrived for the holder of its opener, or None (dropped). A reply block used twice
        is a replay here, at its first peeler, like any other packet."""
        if isinstance(layer, RemoteProtocolError):
            self.drops[layer.reason] += 1
            return None
        # The tag is only recorded once the MAC verified, so forged packets cannot fill it.
        if not self._replay.check_and_insert(layer.replay_tag, now):
            self.drops["replay"] += 1
            return None
        if isinstance(layer, Forward):
            return layer.next_peeler, layer.packet
        if isinstance(layer, ReplyArrived):
            return layer
        try:
            return decode_payload(layer.payload)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return None
