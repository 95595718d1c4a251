"""Fixed-size onion packets: build a layered packet for a route, peel one layer.

The format is Sphinx-like (Danezis and Goldberg, 2009) with one change that halves the
public-key work per hop: Sphinx gives each hop a single group element that the hop *blinds*
for the next one (a second scalar multiplication). Here each hop's encrypted routing block
carries the next hop's fresh ephemeral X25519 public key instead, so a peeler does exactly one
`crypto_scalarmult` and no blinding. The price is 32 more header bytes per hop, which is why
`HOP_SIZE` is 80 rather than Sphinx's 48.

Per peel: one X25519, one BLAKE3 key derivation, one BLAKE3 MAC over beta and body, and one
ChaCha20 pass over beta, a zero block and the body. The exact byte layout, the key schedule and
the threat notes are in docs/packet-format.md; keep that page in step with this module.

This module is pure: randomness is an `rng(n) -> bytes` parameter, and peeling never consults
the replay filter (the caller checks `replay_tag` against a `ReplayFilter`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

import blake3
import msgspec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
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

KEY_SIZE = 32  # X25519 keys and every derived symmetric key
FINGERPRINT_SIZE = 32  # BLAKE3 fingerprint of an identity key, as in core/identity.py
MAC_SIZE = 16  # 128-bit tags: forging needs ~2^128 online tries, each costing a whole packet
TAG_SIZE = 16  # replay tag: two distinct packets collide (a false "replay") with p ~ 2^-65
# even after 2^32 tags in one window

# One routing block as the peeler sees it in plaintext:
#   next peeler fingerprint (32, all zeros = deliver here) | next alpha (32) | next gamma (16)
HOP_SIZE = FINGERPRINT_SIZE + KEY_SIZE + MAC_SIZE
assert HOP_SIZE == 80

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

# One BLAKE3 derive_key call per hop yields the MAC key, the stream key and the replay tag.
KDF_CONTEXT = "earendil_py 2026-11 onion hop keys v1"
_KDF_SIZE = KEY_SIZE + KEY_SIZE + TAG_SIZE

# pynacl exposes no raw ChaCha20 stream, so the keystream comes from ChaCha20-Poly1305 (RFC 8439)
# with the tag cut off: its ciphertext is the plaintext XOR the ChaCha20 keystream starting at
# block counter 1. A fixed all-zero nonce is safe because every stream key is derived from a
# fresh ephemeral X25519 secret and is therefore used for exactly one packet at one hop; a
# replayed packet reuses it on the *same* plaintext, which reveals nothing new.
_NONCE = bytes(12)

_ZERO_HOP = bytes(HOP_SIZE)
_ZERO_FINGERPRINT = bytes(FINGERPRINT_SIZE)
_ZERO_BODY = bytes(BODY_SIZE)
_ZERO_STREAM = bytes(_STREAM_SIZE)

_KEY_ALPHA_HIGH_BIT = 0x80


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


def _hop_keys(shared: bytes) -> tuple[bytes, bytes, bytes]:
    keys = blake3.blake3(shared, derive_key_context=KDF_CONTEXT).digest(_KDF_SIZE)
    return keys[:KEY_SIZE], keys[KEY_SIZE : 2 * KEY_SIZE], keys[2 * KEY_SIZE :]


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


def _mac(mac_key: bytes, beta_and_body: bytes | memoryview) -> bytes:
    return blake3.blake3(beta_and_body, key=mac_key).digest(MAC_SIZE)


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
    hops = len(route)
    if not 1 <= hops <= MAX_HOPS:
        raise LocalProtocolError(f"a route has 1 to {MAX_HOPS} peelers, got {hops}")
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload is {len(payload)} bytes, at most {MAX_PAYLOAD}")
    for fingerprint, onion_public in route:
        if len(fingerprint) != FINGERPRINT_SIZE or len(onion_public) != KEY_SIZE:
            raise LocalProtocolError("route fingerprints and onion keys must be 32 bytes")
        if fingerprint == _ZERO_FINGERPRINT:
            raise LocalProtocolError("the all-zero fingerprint is reserved for delivery")

    alphas: list[bytes] = []
    mac_keys: list[bytes] = []
    keystreams: list[bytes] = []
    for _fingerprint, onion_public in route:
        ephemeral_secret = _random(rng, KEY_SIZE)
        try:
            shared = crypto_scalarmult(ephemeral_secret, onion_public)
        except NaclRuntimeError:
            raise LocalProtocolError("onion public key is a low-order point") from None
        mac_key, stream_key, _tag = _hop_keys(shared)
        alphas.append(crypto_scalarmult_base(ephemeral_secret))
        mac_keys.append(mac_key)
        keystreams.append(_keystream(stream_key))

    # Sphinx filler: peeling shifts beta left by HOP_SIZE and appends the decryption of
    # HOP_SIZE zero bytes. `filler` is what those appended tails will be at the last hop,
    # so the sender can precompute the MACs over them.
    filler = b""
    for i in range(hops - 1):
        start = BETA_SIZE - HOP_SIZE * i
        filler = _xor(filler + _ZERO_HOP, keystreams[i][start : BETA_SIZE + HOP_SIZE])

    # Bodies from the inside out: body[i] is what peeler i receives.
    final_body = len(payload).to_bytes(LENGTH_PREFIX_SIZE, "big") + payload
    body = final_body + _ZERO_BODY[len(final_body) :]
    bodies = [b""] * hops
    for i in reversed(range(hops)):
        body = _xor(body, keystreams[i][_NEXT_BODY_START:])
        bodies[i] = body

    # Betas and MACs from the inside out. The destination's routing block is all zeros
    # (next fingerprint zero = deliver here); random padding after it keeps the destination
    # from learning the route length from where the filler begins.
    padding = _random(rng, BETA_SIZE - HOP_SIZE - len(filler))
    plain = _ZERO_HOP + padding
    beta = _xor(plain, keystreams[-1][: len(plain)]) + filler
    gamma = _mac(mac_keys[-1], beta + bodies[-1])
    for i in reversed(range(hops - 1)):
        routing = route[i + 1][0] + alphas[i + 1] + gamma
        beta = _xor(routing + beta[: BETA_SIZE - HOP_SIZE], keystreams[i][:BETA_SIZE])
        gamma = _mac(mac_keys[i], beta + bodies[i])

    packet = alphas[0] + gamma + beta + bodies[0]
    assert len(packet) == PACKET_SIZE
    return route[0][0], packet


def _random(rng: Rng, size: int) -> bytes:
    data = rng(size)
    if len(data) != size:
        raise LocalProtocolError(f"rng returned {len(data)} bytes, asked for {size}")
    return data


def peel_packet(packet: bytes, onion_secret: bytes) -> Forward | Delivered:
    """Peel one layer of `packet` with our X25519 onion secret.

    Returns Forward (send the inner packet to the next peeler) or Delivered (the payload is
    ours). Either carries `replay_tag`, which the caller must check against its ReplayFilter
    before acting: this function is pure and does not remember packets.

    Raises RemoteProtocolError for any packet that is not a valid layer for our key, with
    reason "bad_size" (wrong length), "bad_packet" (malformed key or final body) or "bad_mac"
    (tampered, or built for another key). Raises LocalProtocolError if `onion_secret` is not
    32 bytes. Nothing else escapes, whatever the bytes.
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
    expected = blake3.blake3(view[BETA_OFFSET:], key=keys[:KEY_SIZE]).digest(MAC_SIZE)
    if not hmac.compare_digest(expected, packet[GAMMA_OFFSET:BETA_OFFSET]):
        raise RemoteProtocolError("packet MAC does not verify", "bad_mac")

    stream = _chacha20_xor(
        keys[KEY_SIZE : 2 * KEY_SIZE],
        b"".join((view[BETA_OFFSET:BODY_OFFSET], _ZERO_HOP, view[BODY_OFFSET:])),
    )
    replay_tag = keys[2 * KEY_SIZE :]
    next_peeler = stream[:FINGERPRINT_SIZE]
    if next_peeler != _ZERO_FINGERPRINT:
        return Forward(next_peeler, stream[_NEXT_PACKET_START:_NEXT_PACKET_END], replay_tag)
    return Delivered(_parse_final_body(stream[_NEXT_BODY_START:_STREAM_SIZE]), replay_tag)


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
