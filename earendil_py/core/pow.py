"""Proof-of-work payments: the automatic settlement method ("pow").

The payee hands the payer a fresh random challenge; the payer pays `amount_umel` by finding a
nonce whose keyed BLAKE3 hash over (challenge, settlement id, amount, nonce) starts with
`difficulty_bits(amount_umel)` zero bits. Work is the only thing that changes hands: the
payee burns nothing but one hash to check it.

**Rate.** `UMEL_PER_HASH` = 1: one expected BLAKE3 evaluation buys one µMEL. A payment of A
µMEL needs `bits = max(1, ceil(log2(ceil(A / UMEL_PER_HASH))))` leading zero bits, i.e. an
expected 2**bits >= A evaluations (between A and 2A: difficulty moves in powers of two).

**Cap.** One proof pays at most `MAX_POW_AMOUNT_UMEL` = 2**40 µMEL (40 bits, about 10**12
hashes, days of one CPU core). Larger amounts are refused, never clamped: clamping would let
a payer settle any debt for 2**40 hashes. A larger debt settles in several settlements.

**Challenges** are single use and bound to one payer and one payee (`ChallengeBook`), so a
proof cannot be replayed to pay twice, or reused by another neighbour. The proof also binds
the settlement id and the amount, so it cannot be moved to another settlement either.

Pure: `now` is integer unix seconds, randomness comes from an `rng` parameter.
Formats in docs/settlement.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Annotated

import blake3
import msgspec

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError, decode_remote
from earendil_py.core.identity import Fingerprint, Uint

UMEL_PER_HASH = 1
MAX_DIFFICULTY_BITS = 40
MAX_POW_AMOUNT_UMEL = UMEL_PER_HASH << MAX_DIFFICULTY_BITS
# A challenge is good for this long after it is issued: enough to solve the largest proof a
# node should attempt in one go, short enough that the payee's book stays small.
CHALLENGE_TTL_SECS = 300
# Outstanding challenges per payer; issuing one more drops that payer's oldest. Payers are
# authenticated neighbours, so the whole book is bounded by 16 x the number of neighbours.
MAX_CHALLENGES_PER_PAYER = 16
CHALLENGE_SIZE = 32
NONCE_SIZE = 8

# Keyed BLAKE3 separates proof hashes from every other BLAKE3 use in the project.
POW_HASH_KEY = b"earendil_py pow payment proof v1"
assert len(POW_HASH_KEY) == 32

Rng = Callable[[int], bytes]
ChallengeBytes = Annotated[
    bytes, msgspec.Meta(min_length=CHALLENGE_SIZE, max_length=CHALLENGE_SIZE)
]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]

_u64 = struct.Struct(">Q")


class PowChallenge(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Issued by `payee` to `payer`; usable once, while `now < expires_at`."""

    challenge: ChallengeBytes
    payee: Fingerprint
    payer: Fingerprint
    expires_at: Uint


class PowProof(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A settlement proposal's `proof` for method "pow" (msgpack, see `encode_proof`)."""

    challenge: PowChallenge
    nonce: Nonce


_encoder = msgspec.msgpack.Encoder()
_challenge_decoder = msgspec.msgpack.Decoder(PowChallenge)
_proof_decoder = msgspec.msgpack.Decoder(PowProof)


def difficulty_bits(amount_umel: int) -> int:
    """Leading zero bits that pay `amount_umel` (see the module docstring).

    Raises LocalProtocolError unless 1 <= amount_umel <= MAX_POW_AMOUNT_UMEL.
    """
    if not 1 <= amount_umel <= MAX_POW_AMOUNT_UMEL:
        raise LocalProtocolError(
            f"a pow payment is 1..{MAX_POW_AMOUNT_UMEL} umel, not {amount_umel}"
        )
    hashes = -(-amount_umel // UMEL_PER_HASH)
    return max(1, (hashes - 1).bit_length())  # ceil(log2(hashes)) for hashes >= 1


def _prefix(challenge: PowChallenge, settlement_id: bytes, amount_umel: int) -> blake3.blake3:
    """A hasher over everything but the nonce. Every field is fixed width except the
    length-prefixed settlement id, so the encoding is injective."""
    if not 0 < len(settlement_id) < 256:
        raise LocalProtocolError("a settlement id is 1..255 bytes")
    hasher = blake3.blake3(key=POW_HASH_KEY)
    hasher.update(
        challenge.challenge
        + challenge.payee
        + challenge.payer
        + _u64.pack(challenge.expires_at)
        + bytes([len(settlement_id)])
        + settlement_id
        + _u64.pack(amount_umel)
    )
    return hasher


def _threshold(bits: int) -> bytes:
    # The first 8 digest bytes, read big-endian, are below 2**(64 - bits) iff the digest has
    # `bits` leading zero bits; comparing equal-length bytes compares them as big-endian ints.
    return _u64.pack(1 << (64 - bits))


def solve(challenge: PowChallenge, settlement_id: bytes, amount_umel: int) -> bytes:
    """The first 8-byte nonce (a big-endian counter from 0) that pays `amount_umel`.

    CPU-bound (an expected 2**difficulty_bits hashes): the runtime runs it off the event loop.
    Raises LocalProtocolError if the amount is out of range.
    """
    threshold = _threshold(difficulty_bits(amount_umel))
    copy = _prefix(challenge, settlement_id, amount_umel).copy
    pack = _u64.pack
    for counter in range(1 << 64):
        nonce = pack(counter)
        hasher = copy()
        hasher.update(nonce)
        if hasher.digest(8) < threshold:
            return nonce
    raise LocalProtocolError("no nonce found")  # pragma: no cover - 2**64 tries


def verify_proof(
    challenge: PowChallenge, settlement_id: bytes, amount_umel: int, nonce: bytes
) -> None:
    """Raises RemoteProtocolError("bad_pow") unless `nonce` pays `amount_umel` for this
    settlement under `challenge`. Pass the challenge from `ChallengeBook.consume`, not the
    copy the payer sent."""
    if not 1 <= amount_umel <= MAX_POW_AMOUNT_UMEL:
        raise RemoteProtocolError(f"pow amount {amount_umel} out of range", "bad_pow")
    if len(nonce) != NONCE_SIZE or not 0 < len(settlement_id) < 256:
        raise RemoteProtocolError("malformed pow nonce or settlement id", "bad_pow")
    hasher = _prefix(challenge, settlement_id, amount_umel)
    hasher.update(nonce)
    if hasher.digest(8) >= _threshold(difficulty_bits(amount_umel)):
        raise RemoteProtocolError("proof of work does not meet the difficulty", "bad_pow")


class ChallengeBook:
    """The payee's outstanding challenges. Not persisted: after a restart every outstanding
    challenge is "unknown_challenge" and the payer asks for a new one."""

    __slots__ = ("_by_payer", "payee")

    def __init__(self, payee: bytes) -> None:
        self.payee = payee
        # payer -> {challenge bytes -> challenge}, oldest first (dicts keep insertion order)
        self._by_payer: dict[bytes, dict[bytes, PowChallenge]] = {}

    def __len__(self) -> int:
        return sum(len(issued) for issued in self._by_payer.values())

    def issue(self, payer: bytes, now: int, rng: Rng) -> PowChallenge:
        """A fresh challenge for `payer`, valid for CHALLENGE_TTL_SECS. Drops the payer's
        oldest outstanding challenge beyond MAX_CHALLENGES_PER_PAYER."""
        if len(payer) != 32:
            raise LocalProtocolError("a payer is a 32-byte fingerprint")
        challenge = PowChallenge(rng(CHALLENGE_SIZE), self.payee, payer, now + CHALLENGE_TTL_SECS)
        issued = self._by_payer.setdefault(payer, {})
        issued[challenge.challenge] = challenge
        while len(issued) > MAX_CHALLENGES_PER_PAYER:
            del issued[next(iter(issued))]
        return challenge

    def consume(self, challenge_bytes: bytes, payer: bytes, now: int) -> PowChallenge:
        """Take the challenge out of the book (single use) and return it as we issued it.

        It is removed before any proof is checked, so a wrong proof burns it too. Raises
        RemoteProtocolError: "unknown_challenge" (never issued, already used, or dropped),
        "foreign_challenge" (issued to another payer; it stays usable by its payer),
        "expired_challenge" (consumed all the same).
        """
        issued = self._by_payer.get(payer)
        if issued is None or (challenge := issued.pop(challenge_bytes, None)) is None:
            if any(challenge_bytes in other for other in self._by_payer.values()):
                raise RemoteProtocolError("challenge issued to another payer", "foreign_challenge")
            raise RemoteProtocolError("unknown or used challenge", "unknown_challenge")
        if not issued:
            del self._by_payer[payer]
        if now >= challenge.expires_at:
            raise RemoteProtocolError("challenge expired", "expired_challenge")
        return challenge

    def expire(self, now: int) -> int:
        """Drop every expired challenge; returns how many."""
        dropped = 0
        for payer in list(self._by_payer):
            issued = self._by_payer[payer]
            for key in [k for k, c in issued.items() if now >= c.expires_at]:
                del issued[key]
                dropped += 1
            if not issued:
                del self._by_payer[payer]
        return dropped


def encode_challenge(challenge: PowChallenge) -> bytes:
    return _encoder.encode(challenge)


def decode_challenge(data: bytes) -> PowChallenge:
    """Raises RemoteProtocolError("bad_pow") for anything but a well-formed challenge."""
    return decode_remote(_challenge_decoder, data, "bad pow challenge", "bad_pow")


def encode_proof(proof: PowProof) -> bytes:
    return _encoder.encode(proof)


def decode_proof(data: bytes) -> PowProof:
    """Raises RemoteProtocolError("bad_pow") for anything but a well-formed proof."""
    return decode_remote(_proof_decoder, data, "bad pow proof", "bad_pow")


def make_proof(challenge: PowChallenge, settlement_id: bytes, amount_umel: int) -> bytes:
    """The payer's side in one call: solve and encode, ready for a proposal's `proof`."""
    return encode_proof(PowProof(challenge, solve(challenge, settlement_id, amount_umel)))


def redeem_proof(
    book: ChallengeBook,
    proof_bytes: bytes,
    *,
    payer: bytes,
    settlement_id: bytes,
    amount_umel: int,
    now: int,
) -> PowChallenge:
    """The payee's side in one call: decode, consume the challenge, check the work.

    Raises RemoteProtocolError: "bad_pow" (undecodable, altered challenge, or not enough
    work) or any reason of `ChallengeBook.consume`. The challenge is burned whatever the
    outcome, once it was found and belonged to `payer`.
    """
    proof = decode_proof(proof_bytes)
    issued = book.consume(proof.challenge.challenge, payer, now)
    if proof.challenge != issued:
        raise RemoteProtocolError("pow proof names an altered challenge", "bad_pow")
    verify_proof(issued, settlement_id, amount_umel, proof.nonce)
    return issued
