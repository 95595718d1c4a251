"""Proof-of-work payments: difficulty, solve/verify, and the payee's challenge book."""

from __future__ import annotations

import contextlib

import blake3
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.pow import (
    CHALLENGE_TTL_SECS,
    MAX_CHALLENGES_PER_PAYER,
    MAX_DIFFICULTY_BITS,
    MAX_POW_AMOUNT_UMEL,
    POW_HASH_KEY,
    ChallengeBook,
    PowChallenge,
    PowProof,
    decode_challenge,
    decode_proof,
    difficulty_bits,
    encode_challenge,
    encode_proof,
    make_proof,
    redeem_proof,
    solve,
    verify_proof,
)
from tests.helpers import seeded_rng

NOW = 1_800_000_000
PAYEE = bytes([0xAA]) * 32
PAYER = bytes([0x11]) * 32
OTHER = bytes([0x22]) * 32
SID = bytes(range(16))
# 2**16 leading-zero-bits work: fast to solve (~65k hashes), and a wrong nonce passes by
# chance with probability 2**-16 (the seeded data below is fixed, so never in practice).
HARD_UMEL = 50_000


def challenge_for(payer: bytes = PAYER, seed: int = 1) -> tuple[ChallengeBook, PowChallenge]:
    book = ChallengeBook(PAYEE)
    return book, book.issue(payer, NOW, seeded_rng(seed))


def leading_zero_bits(challenge: PowChallenge, sid: bytes, amount: int, nonce: bytes) -> int:
    data = (
        challenge.challenge
        + challenge.payee
        + challenge.payer
        + challenge.expires_at.to_bytes(8, "big")
        + bytes([len(sid)])
        + sid
        + amount.to_bytes(8, "big")
        + nonce
    )
    digest = int.from_bytes(blake3.blake3(data, key=POW_HASH_KEY).digest(), "big")
    return 256 - digest.bit_length()


# --- difficulty ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "bits"),
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (1024, 10), (1025, 11), (MAX_POW_AMOUNT_UMEL, 40)],
)
def test_difficulty_is_the_ceiling_of_log2_of_the_amount(amount: int, bits: int) -> None:
    assert difficulty_bits(amount) == bits


def test_difficulty_is_monotone_and_expected_work_covers_the_amount() -> None:
    powers = {2**k + d for k in range(12, 41) for d in (-1, 0, 1)}
    amounts = sorted({*range(1, 5_000), *powers} - {MAX_POW_AMOUNT_UMEL + 1})
    bits = [difficulty_bits(a) for a in amounts]
    assert bits == sorted(bits)
    assert all(2**b >= a for a, b in zip(amounts, bits, strict=True))
    assert all(2 ** (b - 1) < a for a, b in zip(amounts, bits, strict=True) if b > 1)
    assert max(bits) <= MAX_DIFFICULTY_BITS


@pytest.mark.parametrize("amount", [0, -1, MAX_POW_AMOUNT_UMEL + 1])
def test_amounts_outside_the_cap_are_refused_not_clamped(amount: int) -> None:
    with pytest.raises(LocalProtocolError):
        difficulty_bits(amount)
    _, challenge = challenge_for()
    with pytest.raises(RemoteProtocolError) as caught:
        verify_proof(challenge, SID, amount, bytes(8))
    assert caught.value.reason == "bad_pow"


# --- solve / verify ------------------------------------------------------------------


@pytest.mark.parametrize("amount", [1, 2, 3, 100, 1_000, 4_097, HARD_UMEL])
def test_solve_then_verify_round_trip(amount: int) -> None:
    _, challenge = challenge_for(seed=amount)
    nonce = solve(challenge, SID, amount)
    assert len(nonce) == 8
    verify_proof(challenge, SID, amount, nonce)
    assert leading_zero_bits(challenge, SID, amount, nonce) >= difficulty_bits(amount)


def test_proof_is_bound_to_nonce_amount_settlement_and_challenge() -> None:
    _, challenge = challenge_for()
    nonce = solve(challenge, SID, HARD_UMEL)
    _, other_challenge = challenge_for(seed=2)
    wrong = [
        (challenge, SID, HARD_UMEL, (int.from_bytes(nonce, "big") + 1).to_bytes(8, "big")),
        (challenge, SID, HARD_UMEL - 1, nonce),
        (challenge, SID, HARD_UMEL * 2, nonce),
        (challenge, bytes(16), HARD_UMEL, nonce),
        (other_challenge, SID, HARD_UMEL, nonce),
        (msgspec.structs.replace(challenge, payer=OTHER), SID, HARD_UMEL, nonce),
        (challenge, SID, HARD_UMEL, nonce[:7]),
    ]
    for args in wrong:
        with pytest.raises(RemoteProtocolError) as caught:
            verify_proof(*args)
        assert caught.value.reason == "bad_pow"


def test_make_and_redeem_a_proof() -> None:
    book, challenge = challenge_for()
    proof = make_proof(challenge, SID, 1_000)
    assert decode_proof(proof).challenge == challenge
    redeemed = redeem_proof(
        book, proof, payer=PAYER, settlement_id=SID, amount_umel=1_000, now=NOW + 1
    )
    assert redeemed == challenge
    assert len(book) == 0


# --- the challenge book --------------------------------------------------------------

EASY_UMEL = 10  # for tests where the book, not the work, decides


def redeem_reason(
    book: ChallengeBook,
    proof: bytes,
    *,
    payer: bytes = PAYER,
    now: int = NOW,
    amount: int = EASY_UMEL,
) -> str:
    with pytest.raises(RemoteProtocolError) as caught:
        redeem_proof(book, proof, payer=payer, settlement_id=SID, amount_umel=amount, now=now)
    return caught.value.reason


def test_a_challenge_is_single_use() -> None:
    book, challenge = challenge_for()
    proof = make_proof(challenge, SID, EASY_UMEL)
    redeem_proof(book, proof, payer=PAYER, settlement_id=SID, amount_umel=EASY_UMEL, now=NOW)
    assert redeem_reason(book, proof) == "unknown_challenge"


def test_a_wrong_proof_burns_the_challenge() -> None:
    book, challenge = challenge_for()
    nonce = solve(challenge, SID, HARD_UMEL)
    bad = encode_proof(PowProof(challenge, (int.from_bytes(nonce, "big") + 1).to_bytes(8, "big")))
    assert redeem_reason(book, bad, amount=HARD_UMEL) == "bad_pow"
    good = encode_proof(PowProof(challenge, nonce))
    assert redeem_reason(book, good, amount=HARD_UMEL) == "unknown_challenge"


def test_a_proof_naming_an_altered_challenge_is_refused() -> None:
    book, challenge = challenge_for()
    longer = msgspec.structs.replace(challenge, expires_at=challenge.expires_at + 10**6)
    proof = make_proof(longer, SID, HARD_UMEL)
    assert redeem_reason(book, proof, amount=HARD_UMEL) == "bad_pow"


def test_a_foreign_challenge_is_refused_and_not_consumed() -> None:
    book, challenge = challenge_for(payer=PAYER)
    proof = make_proof(challenge, SID, EASY_UMEL)
    assert redeem_reason(book, proof, payer=OTHER) == "foreign_challenge"
    assert len(book) == 1
    redeem_proof(book, proof, payer=PAYER, settlement_id=SID, amount_umel=EASY_UMEL, now=NOW)


def test_an_expired_challenge_is_refused_and_burned() -> None:
    book, challenge = challenge_for()
    assert challenge.expires_at == NOW + CHALLENGE_TTL_SECS
    proof = make_proof(challenge, SID, EASY_UMEL)
    assert redeem_reason(book, proof, now=challenge.expires_at) == "expired_challenge"
    assert redeem_reason(book, proof, now=NOW) == "unknown_challenge"
    # one second earlier it was still good
    book, challenge = challenge_for(seed=3)
    proof = make_proof(challenge, SID, EASY_UMEL)
    last_second = challenge.expires_at - 1
    redeem_proof(
        book, proof, payer=PAYER, settlement_id=SID, amount_umel=EASY_UMEL, now=last_second
    )


def test_a_never_issued_challenge_is_unknown() -> None:
    book, _ = challenge_for()
    stranger = ChallengeBook(PAYEE).issue(PAYER, NOW, seeded_rng(99))
    assert redeem_reason(book, make_proof(stranger, SID, EASY_UMEL)) == "unknown_challenge"


def test_outstanding_challenges_per_payer_are_bounded_oldest_dropped() -> None:
    book = ChallengeBook(PAYEE)
    rng = seeded_rng(4)
    issued = [book.issue(PAYER, NOW + i, rng) for i in range(MAX_CHALLENGES_PER_PAYER + 1)]
    book.issue(OTHER, NOW, rng)
    assert len(book) == MAX_CHALLENGES_PER_PAYER + 1
    with pytest.raises(RemoteProtocolError) as caught:
        book.consume(issued[0].challenge, PAYER, NOW)
    assert caught.value.reason == "unknown_challenge"
    assert book.consume(issued[1].challenge, PAYER, NOW) == issued[1]


def test_expire_drops_only_expired_challenges() -> None:
    book = ChallengeBook(PAYEE)
    rng = seeded_rng(5)
    early = book.issue(PAYER, NOW, rng)
    late = book.issue(OTHER, NOW + 100, rng)
    assert book.expire(early.expires_at - 1) == 0
    assert book.expire(early.expires_at) == 1
    assert len(book) == 1
    assert book.consume(late.challenge, OTHER, early.expires_at) == late


# --- encodings -----------------------------------------------------------------------


def test_challenge_and_proof_encodings_round_trip() -> None:
    _, challenge = challenge_for()
    assert decode_challenge(encode_challenge(challenge)) == challenge
    proof = PowProof(challenge, bytes(range(8)))
    assert decode_proof(encode_proof(proof)) == proof


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_proof_or_remote_error_only(data: bytes) -> None:
    for decode in (decode_proof, decode_challenge):
        try:
            decode(data)
        except RemoteProtocolError as exc:
            assert exc.reason == "bad_pow"


@given(st.data())
def test_any_corrupted_proof_redeems_or_raises_remote_error_only(data: st.DataObject) -> None:
    book, challenge = challenge_for()
    proof = bytearray(encode_proof(PowProof(challenge, bytes(8))))
    index = data.draw(st.integers(0, len(proof) - 1))
    proof[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RemoteProtocolError):
        redeem_proof(
            book, bytes(proof), payer=PAYER, settlement_id=SID, amount_umel=HARD_UMEL, now=NOW
        )
