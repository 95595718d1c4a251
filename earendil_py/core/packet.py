"""Fixed-size onion packets: build a layered packet for a route, peel one layer, and reply
blocks, with which a destination answers a sender it cannot name.

The format is Sphinx-like (Danezis and Goldberg, 2009) with one change that halves the
public-key work per hop: Sphinx gives each hop a single group element that the hop *blinds*
for the next one (a second scalar multiplication). Here each hop's encrypted routing block
carries the next hop's fresh ephemeral X25519 public key instead, so a peeler does exactly one
`crypto_scalarmult` and no blinding. The price is 32 more header bytes per hop, which is why
`HOP_SIZE` is 80 rather than Sphinx's 48.

Each hop's MAC pins the whole packet, body included, so tampering is caught at the next
peeler. It has two parts so that reply packets can be pinned too: a BLAKE3 MAC over the
routing part of beta, then a GHASH-based MAC (AES-GCM's tag, with no plaintext) over that
digest, beta's five 16-byte MAC slots and the body. The second part is affine in what it
covers, which lets the replier, who holds only those per-hop GHASH keys, fix up every hop's
MAC for the body it writes without being able to touch the route (docs/packet-format.md,
"Reply blocks").

Per peel: one X25519, one BLAKE3 key derivation, one BLAKE3 MAC over 320 bytes, one AES-GCM
tag over 998 bytes, and one ChaCha20 pass over beta, a zero block and the body. The exact byte
layout, the key schedule and the threat notes are in docs/packet-format.md; keep that page in
step with this module.

This module is pure: randomness is an `rng(n) -> bytes` parameter, and peeling never consults
the replay filter (the caller checks `replay_tag` against a `ReplayFilter`).
"""

from __future__ import annotations

import hmac
import operator
from collections.abc import Callable, Sequence

import blake3
import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl.bindings import (
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import RuntimeError as NaclRuntimeError

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError

Rng = Callable[[int], bytes]

# A link frame adds at most ~64 bytes (frame header, counter nonce, next_peeler, AEAD tag).
# The smallest common path MTU we design for is Ethernet's 1500 bytes under IPv6:
# 1500 - 40 (IPv6) - 8 (UDP) = 1452 bytes of UDP payload. 1350 + 64 = 1414 leaves headroom
# for tunnels (e.g. a WireGuard or PPPoE hop), so a whole frame is one datagram, unfragmented.
PACKET_SIZE = 1350

# Peelers per route, destination included. Every packet carries room for this many routing
# blocks whatever the real route length, so a hop cannot tell its position from the size.
MAX_HOPS = 5

KEY_SIZE = 32  # X25519 keys and most derived symmetric keys
BODY_KEY_SIZE = 16  # the AES-128 key of a hop's GHASH MAC: the one a replier is given
FINGERPRINT_SIZE = 32  # BLAKE3 fingerprint of an identity key, as in core/identity.py
MAC_SIZE = 16  # 128-bit tags: forging needs ~2^121 online tries, each costing a whole packet
TAG_SIZE = 16  # replay tag: two distinct packets collide (a false "replay") with p ~ 2^-65
# even after 2^32 tags in one window

# One routing block as the peeler sees it in plaintext:
#   next peeler fingerprint (32, all zeros = deliver here) | next alpha (32) | next gamma (16)
HOP_SIZE = FINGERPRINT_SIZE + KEY_SIZE + MAC_SIZE
assert HOP_SIZE == 80
# Where a routing block's gamma sits: beta's MAC slots are at this offset in each 80 bytes.
SLOT_OFFSET = FINGERPRINT_SIZE + KEY_SIZE

ALPHA_SIZE = KEY_SIZE
BETA_SIZE = MAX_HOPS * HOP_SIZE
HEADER_SIZE = ALPHA_SIZE + MAC_SIZE + BETA_SIZE
BODY_SIZE = PACKET_SIZE - HEADER_SIZE
LENGTH_PREFIX_SIZE = 2  # u16 big-endian payload length at the start of the final body
MAX_PAYLOAD = BODY_SIZE - LENGTH_PREFIX_SIZE

# Offsets into a packet.
GAMMA_OFFSET = ALPHA_SIZE
BETA_OFFSET = GAMMA_OFFSET + MAC_SIZE
BODY_OFFSET = BETA_OFFSET + BETA_SIZE
assert BODY_OFFSET == HEADER_SIZE

# Offsets into the peeler's decrypted stream (beta || HOP_SIZE zero bytes || body). The routing
# block's fields are ordered so that the next packet, alpha | gamma | beta | body, is one slice.
_STREAM_SIZE = BETA_SIZE + HOP_SIZE + BODY_SIZE
_NEXT_PACKET_START = FINGERPRINT_SIZE
_NEXT_PACKET_END = FINGERPRINT_SIZE + PACKET_SIZE
_NEXT_BODY_START = HOP_SIZE + BETA_SIZE
assert _NEXT_PACKET_END == _STREAM_SIZE

# The destination's routing block: next fingerprint all zeros, then what is delivered: a
# datagram whose body is framed as below, or a reply whose body the reply block's builder
# opens (`open_reply`). Then 31 zero bytes; its MAC slot is not read.
DELIVER_DATAGRAM = 0
DELIVER_REPLY = 1
_KIND_OFFSET = FINGERPRINT_SIZE
_KIND_PADDING = slice(_KIND_OFFSET + 1, SLOT_OFFSET)
_ZERO_KIND_PADDING = bytes(SLOT_OFFSET - _KIND_OFFSET - 1)

# One BLAKE3 derive_key call per hop yields the header MAC key, the GHASH MAC key, the stream
# key and the replay tag.
KDF_CONTEXT = "earendil_py 2026-12 onion hop keys v2"
_KDF_SIZE = KEY_SIZE + BODY_KEY_SIZE + KEY_SIZE + TAG_SIZE
_STREAM_KEY = slice(KEY_SIZE + BODY_KEY_SIZE, 2 * KEY_SIZE + BODY_KEY_SIZE)
_REPLAY_TAG = slice(2 * KEY_SIZE + BODY_KEY_SIZE, _KDF_SIZE)

# beta in its two MAC parts: the routing fields (fingerprint and alpha of each 80 bytes) and
# the MAC slots (the gamma of each). The GHASH part covers the slots, its digest input below.
_ROUTING_PARTS = tuple(slice(i, i + SLOT_OFFSET) for i in range(0, BETA_SIZE, HOP_SIZE))
_SLOT_PARTS = tuple(slice(i + SLOT_OFFSET, i + HOP_SIZE) for i in range(0, BETA_SIZE, HOP_SIZE))
# All five parts in one call: ~3 µs less per peel than slicing them one by one in Python.
_routing_fields = operator.itemgetter(*_ROUTING_PARTS)
_mac_slots = operator.itemgetter(*_SLOT_PARTS)
_GHASH_INPUT_SIZE = MAC_SIZE + MAX_HOPS * MAC_SIZE + BODY_SIZE

# pynacl exposes no raw ChaCha20 stream, so the keystream comes from ChaCha20-Poly1305 (RFC 8439)
# with the tag cut off: its ciphertext is the plaintext XOR the ChaCha20 keystream starting at
# block counter 1. A fixed all-zero nonce is safe because every stream key is derived from a
# fresh ephemeral X25519 secret and is therefore used for exactly one packet at one hop; a
# replayed packet reuses it on the *same* plaintext, which reveals nothing new. The same holds
# for the GHASH MAC's AES-GCM key, and for a reply block's end-to-end key (single use).
_NONCE = bytes(12)

_ZERO_HOP = bytes(HOP_SIZE)
_ZERO_FINGERPRINT = bytes(FINGERPRINT_SIZE)
_ZERO_BODY = bytes(BODY_SIZE)
_ZERO_STREAM = bytes(_STREAM_SIZE)
_ZERO_GHASH_INPUT = bytes(_GHASH_INPUT_SIZE)
_ZERO_MAC = bytes(MAC_SIZE)
_DATAGRAM_BLOCK = _ZERO_HOP
_REPLY_BLOCK = _ZERO_FINGERPRINT + bytes([DELIVER_REPLY]) + bytes(HOP_SIZE - FINGERPRINT_SIZE - 1)

_KEY_ALPHA_HIGH_BIT = 0x80

# A reply block on the wire: the first peeler, the header (alpha, gamma, beta) as it leaves
# the replier, one GHASH key per possible hop, and the key that hides the body from the
# first peeler.
E2E_KEY_SIZE = 32
REPLY_BLOCK_SIZE = FINGERPRINT_SIZE + HEADER_SIZE + MAX_HOPS * BODY_KEY_SIZE + E2E_KEY_SIZE
assert REPLY_BLOCK_SIZE == 592


# msgspec Structs rather than frozen dataclasses: a frozen dataclass's __init__ costs ~0.5 us
# (object.__setattr__ per field), about 1% of a peel; gc=False is safe as the fields are bytes.
class Forward(msgspec.Struct, frozen=True, gc=False):
    """Peeled: send `packet` (exactly PACKET_SIZE bytes) on toward `next_peeler`."""

    next_peeler: bytes
    packet: bytes
    replay_tag: bytes


class Delivered(msgspec.Struct, frozen=True, gc=False):
    """Peeled: we are the destination and `payload` is for us."""

    payload: bytes
    replay_tag: bytes


class ReplyArrived(msgspec.Struct, frozen=True, gc=False):
    """Peeled: a reply came back through one of our reply blocks. `replay_tag` names the block
    (`ReplyOpener.replay_tag`); `open_reply` with its opener recovers the payload."""

    body: bytes
    replay_tag: bytes


class ReplyBlock(msgspec.Struct, frozen=True, gc=False):
    """What a replier holds to send one reply: see `build_reply_block`, `use_reply_block`."""

    first_peeler: bytes
    header: bytes  # alpha | gamma | beta, HEADER_SIZE bytes
    body_keys: tuple[bytes, ...]  # MAX_HOPS GHASH keys, the route's first, the rest random
    e2e_key: bytes

    def to_bytes(self) -> bytes:
        return b"".join((self.first_peeler, self.header, *self.body_keys, self.e2e_key))


class ReplyOpener(msgspec.Struct, frozen=True, gc=False):
    """What the builder of a reply block keeps to read the reply: the replay tag its own peel
    of that reply yields (the block's name) and the keys of the body's layers."""

    replay_tag: bytes
    stream_keys: tuple[bytes, ...]  # every peeler's on the return route, ours last
    e2e_key: bytes


class _Hop(msgspec.Struct, frozen=True, gc=False):
    """A sender's view of one hop: what the peeler will derive, and its ephemeral key."""

    alpha: bytes
    header_key: bytes
    body_key: bytes
    stream_key: bytes
    replay_tag: bytes
    keystream: bytes


def _chacha20_xor(stream_key: bytes, data: bytes) -> bytes:
    # ChaCha20 keystream XOR `data`, via the AEAD with the tag cut off: the stream key is
    # unique per hop per packet, so the fixed nonce never repeats under one key. The AEAD is
    # `cryptography`'s (OpenSSL), ~2x faster per call than PyNaCl's wrapper at this size.
    return ChaCha20Poly1305(stream_key).encrypt(_NONCE, data, None)[: len(data)]


def _keystream(stream_key: bytes) -> bytes:
    return _chacha20_xor(stream_key, _ZERO_STREAM)


def _xor(a: bytes, b: bytes) -> bytes:
    assert len(a) == len(b)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _ghash_mac(body_key: bytes, data: bytes) -> bytes:
    # AES-GCM with no plaintext: its tag is GHASH_H(data) XOR AES_K(nonce block), which for a
    # fixed length is affine in `data` over GF(2): tag(x ^ y) = tag(x) ^ tag(y) ^ tag(0).
    return AESGCM(body_key).encrypt(_NONCE, b"", data)


def _gamma(
    header_key: bytes, body_key: bytes, beta: bytes | memoryview, body: bytes | memoryview
) -> bytes:
    """A hop's MAC over beta and body: a BLAKE3 digest of beta's routing fields, then the
    GHASH MAC over that digest, beta's MAC slots and the body."""
    digest = blake3.blake3(b"".join(_routing_fields(beta)), key=header_key).digest(MAC_SIZE)
    return _ghash_mac(body_key, b"".join((digest, *_mac_slots(beta), body)))


def _random(rng: Rng, size: int) -> bytes:
    data = rng(size)
    if len(data) != size:
        raise LocalProtocolError(f"rng returned {len(data)} bytes, asked for {size}")
    return data


def _check_route(route: Sequence[tuple[bytes, bytes]]) -> None:
    hops = len(route)
    if not 1 <= hops <= MAX_HOPS:
        raise LocalProtocolError(f"a route has 1 to {MAX_HOPS} peelers, got {hops}")
    for fingerprint, onion_public in route:
        if len(fingerprint) != FINGERPRINT_SIZE or len(onion_public) != KEY_SIZE:
            raise LocalProtocolError("route fingerprints and onion keys must be 32 bytes")
        if fingerprint == _ZERO_FINGERPRINT:
            raise LocalProtocolError("the all-zero fingerprint is reserved for delivery")


def _hops(route: Sequence[tuple[bytes, bytes]], rng: Rng) -> list[_Hop]:
    """A fresh ephemeral key per hop, and the keys that hop will derive from it."""
    hops = []
    for _fingerprint, onion_public in route:
        ephemeral_secret = _random(rng, KEY_SIZE)
        try:
            shared = crypto_scalarmult(ephemeral_secret, onion_public)
        except NaclRuntimeError:
            raise LocalProtocolError("onion public key is a low-order point") from None
        keys = blake3.blake3(shared, derive_key_context=KDF_CONTEXT).digest(_KDF_SIZE)
        stream_key = keys[_STREAM_KEY]
        hops.append(
            _Hop(
                alpha=crypto_scalarmult_base(ephemeral_secret),
                header_key=keys[:KEY_SIZE],
                body_key=keys[KEY_SIZE : KEY_SIZE + BODY_KEY_SIZE],
                stream_key=stream_key,
                replay_tag=keys[_REPLAY_TAG],
                keystream=_keystream(stream_key),
            )
        )
    return hops


def _header(
    route: Sequence[tuple[bytes, bytes]],
    hops: list[_Hop],
    bodies: list[bytes],
    final_block: bytes,
    rng: Rng,
) -> bytes:
    """alpha | gamma | beta of the first hop, for `bodies[i]` as hop i will receive it."""
    count = len(hops)
    # Sphinx filler: peeling shifts beta left by HOP_SIZE and appends the decryption of
    # HOP_SIZE zero bytes. `filler` is what those appended tails will be at the last hop,
    # so the sender can precompute the MACs over them.
    filler = b""
    for i in range(count - 1):
        start = BETA_SIZE - HOP_SIZE * i
        filler = _xor(filler + _ZERO_HOP, hops[i].keystream[start : BETA_SIZE + HOP_SIZE])

    # The destination's routing block says what is delivered; random padding after it keeps
    # the destination from learning the route length from where the filler begins.
    last = hops[-1]
    padding = _random(rng, BETA_SIZE - HOP_SIZE - len(filler))
    plain = final_block + padding
    beta = _xor(plain, last.keystream[: len(plain)]) + filler
    gamma = _gamma(last.header_key, last.body_key, beta, bodies[-1])
    for i in reversed(range(count - 1)):
        routing = route[i + 1][0] + hops[i + 1].alpha + gamma
        beta = _xor(routing + beta[: BETA_SIZE - HOP_SIZE], hops[i].keystream[:BETA_SIZE])
        gamma = _gamma(hops[i].header_key, hops[i].body_key, beta, bodies[i])
    return hops[0].alpha + gamma + beta


def build_packet(
    route: Sequence[tuple[bytes, bytes]], payload: bytes, rng: Rng
) -> tuple[bytes, bytes]:
    """Build an onion packet that carries `payload` along `route`.

    `route` lists the peelers in order as (fingerprint, onion X25519 public key) pairs; the
    last one is the destination. Returns (first peeler's fingerprint, packet bytes): send the
    packet toward that fingerprint. `rng(n)` must return n uniformly random bytes; it supplies
    one ephemeral key per hop and the padding that hides the route length from the destination.

    Raises LocalProtocolError for an empty or too-long route, an oversize payload, a key or
    fingerprint of the wrong size, an all-zero fingerprint (reserved for "deliver here"), or a
    low-order onion key.
    """
    _check_route(route)
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload is {len(payload)} bytes, at most {MAX_PAYLOAD}")
    hops = _hops(route, rng)
    # Bodies from the inside out: bodies[i] is what peeler i receives.
    final_body = len(payload).to_bytes(LENGTH_PREFIX_SIZE, "big") + payload
    body = final_body + _ZERO_BODY[len(final_body) :]
    bodies = [b""] * len(hops)
    for i in reversed(range(len(hops))):
        body = _xor(body, hops[i].keystream[_NEXT_BODY_START:])
        bodies[i] = body
    header = _header(route, hops, bodies, _DATAGRAM_BLOCK, rng)
    packet = header + bodies[0]
    assert len(packet) == PACKET_SIZE
    return route[0][0], packet


def build_reply_block(
    route: Sequence[tuple[bytes, bytes]], rng: Rng
) -> tuple[ReplyBlock, ReplyOpener]:
    """A single-use reply block for the return `route`, whose last peeler is ourselves.

    Give the block to the replier (`ReplyBlock.to_bytes`); keep the opener. The header is built
    as `build_packet` builds one, for the body the replier will start from (all zeros) and with
    a final routing block that says "reply". The replier gets, besides the header and the first
    peeler, each hop's GHASH key (padded with random ones to MAX_HOPS, so the route length
    stays hidden) and a fresh end-to-end key; never a routing key or a stream key.

    Raises LocalProtocolError as `build_packet` does for a bad route.
    """
    _check_route(route)
    hops = _hops(route, rng)
    # Bodies from the outside in: the replier sends a body of zeros XOR what it writes, and
    # each peeler adds its layer.
    bodies = [_ZERO_BODY]
    for hop in hops[:-1]:
        bodies.append(_xor(bodies[-1], hop.keystream[_NEXT_BODY_START:]))
    header = _header(route, hops, bodies, _REPLY_BLOCK, rng)
    fakes = [_random(rng, BODY_KEY_SIZE) for _ in range(MAX_HOPS - len(hops))]
    e2e_key = _random(rng, E2E_KEY_SIZE)
    block = ReplyBlock(
        first_peeler=route[0][0],
        header=header,
        body_keys=(*(hop.body_key for hop in hops), *fakes),
        e2e_key=e2e_key,
    )
    opener = ReplyOpener(
        replay_tag=hops[-1].replay_tag,
        stream_keys=tuple(hop.stream_key for hop in hops),
        e2e_key=e2e_key,
    )
    return block, opener


def parse_reply_block(data: bytes) -> ReplyBlock:
    """A reply block received from a peer. Raises RemoteProtocolError ("bad_reply_block") if
    it is not REPLY_BLOCK_SIZE bytes or names the all-zero first peeler. Any other bytes make
    a block; if they are not an honest one, the first peeler drops what is sent with it."""
    if len(data) != REPLY_BLOCK_SIZE:
        raise RemoteProtocolError(f"reply block is {len(data)} bytes", "bad_reply_block")
    first_peeler = data[:FINGERPRINT_SIZE]
    if first_peeler == _ZERO_FINGERPRINT:
        raise RemoteProtocolError("reply block names no first peeler", "bad_reply_block")
    keys_start = FINGERPRINT_SIZE + HEADER_SIZE
    keys_end = keys_start + MAX_HOPS * BODY_KEY_SIZE
    return ReplyBlock(
        first_peeler=first_peeler,
        header=data[FINGERPRINT_SIZE:keys_start],
        body_keys=tuple(
            data[i : i + BODY_KEY_SIZE] for i in range(keys_start, keys_end, BODY_KEY_SIZE)
        ),
        e2e_key=data[keys_end:],
    )


def use_reply_block(block: ReplyBlock, payload: bytes) -> tuple[bytes, bytes]:
    """The reply packet that carries `payload` back through `block`: (first peeler, packet),
    as `build_packet` returns. Costs no public-key operation.

    The body is the framed payload under the end-to-end key. Writing it changes what every
    hop's GHASH MAC covers by the same delta (the peelers' layers are XORs), and each hop's
    gamma, which the next hop carries in a MAC slot of beta, by a delta of its own. The GHASH
    MAC is affine, so those deltas are computed from the inside out (`_ghash_mac` of the delta
    alone, XOR its value at zero) and XORed into gamma and into the slots of beta.

    Raises LocalProtocolError for an oversize payload.
    """
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload is {len(payload)} bytes, at most {MAX_PAYLOAD}")
    framed = len(payload).to_bytes(LENGTH_PREFIX_SIZE, "big") + payload
    body = _chacha20_xor(block.e2e_key, framed + _ZERO_BODY[len(framed) :])
    # deltas[j]: what hop j's gamma changes by. Hop j's beta carries the gammas of hops j+1,
    # j+2, ... in its slots 0, 1, ...; the digest of its routing fields does not change.
    deltas = [_ZERO_MAC] * (MAX_HOPS + MAX_HOPS)
    for j in reversed(range(MAX_HOPS)):
        delta_input = b"".join((_ZERO_MAC, *deltas[j + 1 : j + 1 + MAX_HOPS], body))
        ghash = AESGCM(block.body_keys[j])  # `_ghash_mac` twice under one key
        at_zero = ghash.encrypt(_NONCE, b"", _ZERO_GHASH_INPUT)
        deltas[j] = _xor(ghash.encrypt(_NONCE, b"", delta_input), at_zero)
    # At the first hop, hop j's gamma sits in slot j - 1 of beta.
    beta_delta = b"".join(
        piece for j in range(1, MAX_HOPS + 1) for piece in (bytes(SLOT_OFFSET), deltas[j])
    )
    header = block.header
    gamma = _xor(header[GAMMA_OFFSET:BETA_OFFSET], deltas[0])
    beta = _xor(header[BETA_OFFSET:], beta_delta)
    packet = header[:ALPHA_SIZE] + gamma + beta + body
    assert len(packet) == PACKET_SIZE
    return block.first_peeler, packet


def open_reply(opener: ReplyOpener, body: bytes) -> bytes:
    """The payload of a reply that arrived through the block `opener` belongs to (`body` as in
    `ReplyArrived`). Every peeler's MAC, ours last, already verified it; this removes the
    layers and the end-to-end encryption. Raises RemoteProtocolError ("bad_packet") if the
    replier framed it wrongly."""
    mask = _chacha20_xor(opener.e2e_key, _ZERO_BODY)
    for stream_key in opener.stream_keys:
        mask = _xor(mask, _keystream(stream_key)[_NEXT_BODY_START:])
    return _parse_final_body(_xor(body, mask))


def peel_packet(packet: bytes, onion_secret: bytes) -> Forward | Delivered | ReplyArrived:
    """Peel one layer of `packet` with our X25519 onion secret.

    Returns Forward (send the inner packet to the next peeler), Delivered (the payload is
    ours) or ReplyArrived (a reply through one of our reply blocks). Each carries
    `replay_tag`, which the caller must check against its ReplayFilter before acting: this
    function is pure and does not remember packets.

    Raises RemoteProtocolError for any packet that is not a valid layer for our key, with
    reason "bad_size" (wrong length), "bad_packet" (malformed key, final routing block or final
    body) or "bad_mac" (tampered, or built for another key). Raises LocalProtocolError if
    `onion_secret` is not 32 bytes. Nothing else escapes, whatever the bytes.
    """
    if len(packet) != PACKET_SIZE:
        raise RemoteProtocolError(f"packet is {len(packet)} bytes", "bad_size")
    if len(onion_secret) != KEY_SIZE:
        raise LocalProtocolError("onion secret must be 32 bytes")
    # X25519 ignores the top bit of the u-coordinate, so without this check flipping it would
    # give a second valid encoding of the same packet. Honest senders never set it.
    if packet[KEY_SIZE - 1] & _KEY_ALPHA_HIGH_BIT:
        raise RemoteProtocolError("non-canonical ephemeral key", "bad_packet")
    try:
        shared = crypto_scalarmult(onion_secret, packet[:ALPHA_SIZE])
    except NaclRuntimeError:
        # libsodium refuses an all-zero shared secret, i.e. alpha is a low-order point.
        raise RemoteProtocolError("low-order ephemeral key", "bad_packet") from None
    keys = blake3.blake3(shared, derive_key_context=KDF_CONTEXT).digest(_KDF_SIZE)

    view = memoryview(packet)
    beta, body = view[BETA_OFFSET:BODY_OFFSET], view[BODY_OFFSET:]
    expected = _gamma(keys[:KEY_SIZE], keys[KEY_SIZE : KEY_SIZE + BODY_KEY_SIZE], beta, body)
    if not hmac.compare_digest(expected, packet[GAMMA_OFFSET:BETA_OFFSET]):
        raise RemoteProtocolError("packet MAC does not verify", "bad_mac")

    stream = _chacha20_xor(keys[_STREAM_KEY], b"".join((beta, _ZERO_HOP, body)))
    replay_tag = keys[_REPLAY_TAG]
    next_peeler = stream[:FINGERPRINT_SIZE]
    if next_peeler != _ZERO_FINGERPRINT:
        return Forward(next_peeler, stream[_NEXT_PACKET_START:_NEXT_PACKET_END], replay_tag)
    kind = stream[_KIND_OFFSET]
    if stream[_KIND_PADDING] != _ZERO_KIND_PADDING:
        raise RemoteProtocolError("nonzero bytes in the final routing block", "bad_packet")
    final_body = stream[_NEXT_BODY_START:_STREAM_SIZE]
    if kind == DELIVER_DATAGRAM:
        return Delivered(_parse_final_body(final_body), replay_tag)
    if kind == DELIVER_REPLY:
        return ReplyArrived(final_body, replay_tag)
    raise RemoteProtocolError(f"unknown delivery kind {kind}", "bad_packet")


def _parse_final_body(body: bytes) -> bytes:
    # The MAC already proved these bytes come from whoever built the packet for our key, but
    # that can be anyone: our onion key is public. So the framing is still remote input.
    length = int.from_bytes(body[:LENGTH_PREFIX_SIZE], "big")
    end = LENGTH_PREFIX_SIZE + length
    if length > MAX_PAYLOAD:
        raise RemoteProtocolError(f"payload length {length} exceeds the body", "bad_packet")
    if body[end:] != _ZERO_BODY[end:]:
        raise RemoteProtocolError("nonzero padding after the payload", "bad_packet")
    return body[LENGTH_PREFIX_SIZE:end]
