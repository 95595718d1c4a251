"""Settlements between two neighbours: proposals, attestations, the book on both sides."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.core.accounting import MAX_CLOCK_SKEW_SECS, Account, AccountState
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Identity
from earendil_py.core.ledger import GENESIS
from earendil_py.core.pow import ChallengeBook, make_proof, redeem_proof
from earendil_py.core.settlement import (
    EXPIRY_GRACE_SECS,
    MAX_EXPIRY_SECS,
    MAX_PROOF_SIZE,
    REJECTION_DOMAIN,
    SETTLEMENT_DOMAIN,
    Attestation,
    Proposal,
    Reduction,
    Rejection,
    SettlementBook,
    SettlementBookState,
    SettlementCompleted,
    SettlementState,
    attestation_hash,
    decode_attestation,
    decode_audit,
    decode_proposal,
    decode_rejection,
    encode,
    make_rejection,
    verify_chain,
    verify_rejection,
)
from tests.helpers import seeded_rng

NOW = 1_800_000_000
EXPIRY = 3_600
ALICE = Identity.generate(seeded_rng(1))
BOB = Identity.generate(seeded_rng(2))
MALLORY = Identity.generate(seeded_rng(3))
LEFT, RIGHT = sorted((ALICE, BOB), key=lambda identity: identity.fingerprint)
LEDGER_HEAD = bytes([7]) * 32

PENDING = SettlementState.PENDING
COMPLETED = SettlementState.COMPLETED
REJECTED = SettlementState.REJECTED
CANCELED = SettlementState.CANCELED
EXPIRED = SettlementState.EXPIRED


def book(me: Identity, them: Identity, state: SettlementBookState | None = None) -> SettlementBook:
    return SettlementBook(me, them.identity_public, state or SettlementBookState(them.fingerprint))


def restored(me: Identity, them: Identity, state: SettlementBookState) -> SettlementBook:
    """The book after a restart: its checkpoint through msgpack and back."""
    data = msgspec.msgpack.encode(state)
    return book(me, them, msgspec.msgpack.decode(data, type=SettlementBookState))


def sid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def propose(
    proposer: SettlementBook,
    n: int,
    *,
    mine: int = 700,
    theirs: int = 200,
    now: int = NOW,
    method: str = "manual",
    proof: bytes = b"",
    expiry: int = EXPIRY,
) -> Proposal:
    return proposer.propose(
        settlement_id=sid(n),
        reduce_mine_umel=mine,
        reduce_theirs_umel=theirs,
        method=method,
        proof=proof,
        ledger_head=LEDGER_HEAD,
        now=now,
        expiry_secs=expiry,
    )


def settle(
    proposer: SettlementBook,
    responder: SettlementBook,
    n: int,
    *,
    mine: int = 700,
    theirs: int = 200,
) -> Attestation:
    """A whole manual settlement, approved at once."""
    proposal = propose(proposer, n, mine=mine, theirs=theirs)
    assert responder.receive(proposal, NOW, expiry_secs=EXPIRY).state is PENDING
    attestation = responder.approve(proposal.settlement_id, NOW)
    assert isinstance(attestation, Attestation)
    assert proposer.on_approved(attestation) is not None
    return attestation


def signed_as(identity: Identity, proposal: Proposal) -> Proposal:
    signature = identity.sign(SETTLEMENT_DOMAIN, proposal.signed_part())
    return msgspec.structs.replace(proposal, proposer_signature=signature)


def reason_of(call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(RemoteProtocolError) as caught:
        call(*args, **kwargs)
    return caught.value.reason


# --- proposals -------------------------------------------------------------------------


@pytest.mark.parametrize("proposer_is_left", [True, False])
def test_manual_settlement_approved_seen_from_both_sides(proposer_is_left: bool) -> None:
    me, them = (LEFT, RIGHT) if proposer_is_left else (RIGHT, LEFT)
    proposer, responder = book(me, them), book(them, me)
    proposal = propose(proposer, 1, mine=700, theirs=200)
    assert proposal.direction == ("left_pays" if proposer_is_left else "right_pays")
    assert (proposal.net_umel, proposal.payer) == (500, me.fingerprint)
    reductions = (700, 200) if proposer_is_left else (200, 700)
    assert (proposal.reduce_left_umel, proposal.reduce_right_umel) == reductions
    assert proposer.outgoing_pending() is proposer.record(sid(1))

    record = responder.receive(proposal, NOW + 1, expiry_secs=EXPIRY)
    assert (record.state, record.role) == (PENDING, "responder")
    attestation = responder.approve(sid(1), NOW + 2)
    assert isinstance(attestation, Attestation)
    attestation.verify(me.identity_public, them.identity_public)
    assert record.state is COMPLETED and record.attestation == attestation

    event = proposer.on_approved(attestation)
    completed = proposer.record(sid(1))
    assert completed is not None and completed.state is COMPLETED
    assert event == SettlementCompleted(completed, Reduction(200, 700), late=False)
    assert event is not None
    assert responder.reduction(record) == Reduction(paid_in_umel=700, paid_out_umel=200)
    assert proposer.head == responder.head == attestation_hash(attestation) != GENESIS
    assert proposer.state.completed == responder.state.completed == [sid(1).hex()]
    assert proposer.outgoing_pending() is None and proposer.in_flight(NOW + 3) is None

    # Applied to both accounts: what one side pays, the other side receives.
    mine = Account(me, them.identity_public, AccountState(them.fingerprint))
    theirs = Account(them, me.identity_public, AccountState(me.fingerprint))
    mine.settle(*event.reduction)
    theirs.settle(*responder.reduction(record))
    assert (mine.debt_out_umel, mine.debt_in_umel) == (-700, -200)
    assert (theirs.debt_in_umel, theirs.debt_out_umel) == (-700, -200)

    assert proposer.on_approved(attestation) is None  # a duplicate changes nothing
    assert proposer.state.completed == [sid(1).hex()]


def test_reductions_that_cancel_out_move_nothing() -> None:
    proposal = propose(book(ALICE, BOB), 1, mine=300, theirs=300)
    assert (proposal.net_umel, proposal.direction, proposal.payer) == (0, "none", None)
    assert proposal.reduction_for(ALICE.fingerprint) == (300, 300)
    with pytest.raises(LocalProtocolError):
        proposal.reduction_for(MALLORY.fingerprint)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mine": -1},
        {"mine": 0, "theirs": 0},
        {"method": "onchain"},
        {"method": "pow", "proof": b"proof", "mine": 0, "theirs": 500},  # the payee proposes
        {"method": "pow", "mine": 500, "theirs": 0},  # no proof
        {"proof": bytes(MAX_PROOF_SIZE + 1)},
    ],
)
def test_we_refuse_to_propose_a_malformed_settlement(kwargs: dict[str, object]) -> None:
    proposer = book(ALICE, BOB)
    with pytest.raises(LocalProtocolError):
        propose(proposer, 1, **kwargs)  # type: ignore[arg-type]
    assert proposer.state.records == {}


def test_a_forged_or_altered_proposal_is_refused() -> None:
    proposal = propose(book(ALICE, BOB), 1)
    responder = book(BOB, ALICE)
    for bad in [
        signed_as(MALLORY, proposal),
        msgspec.structs.replace(proposal, proof=b"paid in full"),
        msgspec.structs.replace(proposal, timestamp=NOW + 1),
        msgspec.structs.replace(proposal, proposer_signature=bytes(64)),
    ]:
        assert reason_of(responder.receive, bad, NOW, expiry_secs=EXPIRY) == "bad_signature"
    to_mallory = propose(book(ALICE, MALLORY), 2)
    assert reason_of(responder.receive, to_mallory, NOW, expiry_secs=EXPIRY) == "wrong_party"
    from_bob = propose(book(BOB, ALICE), 3)
    assert reason_of(responder.receive, from_bob, NOW, expiry_secs=EXPIRY) == "wrong_party"
    assert responder.state.records == {}
    responder.receive(proposal, NOW, expiry_secs=EXPIRY)  # the genuine one is fine


MALFORMATIONS: dict[str, Callable[[Proposal], dict[str, object]]] = {
    "left_after_right": lambda p: {"left": p.right, "right": p.left},
    "wrong_net": lambda p: {"net_umel": p.net_umel - 1},
    "wrong_direction": lambda p: {
        "direction": "right_pays" if p.direction == "left_pays" else "left_pays"
    },
    "unknown_direction": lambda p: {"direction": "both"},
    "unknown_method": lambda p: {"method": "onchain"},
    "settles_nothing": lambda p: {
        "reduce_left_umel": 0,
        "reduce_right_umel": 0,
        "net_umel": 0,
        "direction": "none",
    },
    "expires_at_once": lambda p: {"expires_at": p.timestamp},
    "expires_too_late": lambda p: {"expires_at": p.timestamp + MAX_EXPIRY_SECS + 1},
    "third_party": lambda p: {"responder": MALLORY.fingerprint},
    "to_itself": lambda p: {"proposer": p.responder},
    "short_id": lambda p: {"settlement_id": b"short"},
    "short_previous": lambda p: {"previous": b"short"},
    "huge_proof": lambda p: {"proof": bytes(MAX_PROOF_SIZE + 1)},
    "pow_without_proof": lambda p: {"method": "pow", "proof": b""},
    "amount_out_of_range": lambda p: {"reduce_left_umel": 2**63},
}


@pytest.mark.parametrize("malformation", MALFORMATIONS)
def test_a_malformed_proposal_is_refused_before_its_signature(malformation: str) -> None:
    proposal = propose(book(ALICE, BOB), 1, mine=700, theirs=200)
    changes = MALFORMATIONS[malformation](proposal)
    bad = signed_as(ALICE, msgspec.structs.replace(proposal, **changes))
    assert reason_of(bad.check_shape) == "malformed_settlement"
    responder = book(BOB, ALICE)
    assert reason_of(responder.receive, bad, NOW, expiry_secs=EXPIRY) == "malformed_settlement"


def test_pow_must_be_paid_by_the_proposer() -> None:
    proposal = propose(book(ALICE, BOB), 1, mine=0, theirs=500)
    bad = msgspec.structs.replace(proposal, method="pow", proof=b"x")
    assert reason_of(bad.check_shape) == "malformed_settlement"


def test_a_proposal_dated_too_far_from_our_clock_is_refused() -> None:
    proposal = propose(book(ALICE, BOB), 1)
    responder = book(BOB, ALICE)
    for now in (NOW + MAX_CLOCK_SKEW_SECS + 1, NOW - MAX_CLOCK_SKEW_SECS - 1):
        assert reason_of(responder.receive, proposal, now, expiry_secs=EXPIRY) == (
            "stale_settlement"
        )
    assert responder.state.records == {}
    record = responder.receive(proposal, NOW + MAX_CLOCK_SKEW_SECS, expiry_secs=EXPIRY)
    assert record.state is PENDING


# --- replay and idempotency ------------------------------------------------------------


def test_a_replayed_proposal_gets_the_same_record_and_is_applied_once() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    first = responder.receive(proposal, NOW, expiry_secs=EXPIRY)
    assert responder.receive(proposal, NOW + 1, expiry_secs=EXPIRY) is first
    attestation = responder.approve(sid(1), NOW + 2)
    head = responder.head
    # long after, past the clock skew: still the same record and the same answer
    again = responder.receive(proposal, NOW + 100 * MAX_CLOCK_SKEW_SECS, expiry_secs=EXPIRY)
    assert again is first and again.state is COMPLETED
    assert responder.answer(sid(1)) == attestation
    assert (responder.head, responder.state.completed) == (head, [sid(1).hex()])
    assert len(responder.state.records) == 1
    with pytest.raises(LocalProtocolError):
        responder.approve(sid(1), NOW + 3)
    # a different proposal under a known id is refused
    reused = propose(book(ALICE, BOB), 1, mine=1)
    assert reason_of(responder.receive, reused, NOW, expiry_secs=EXPIRY) == "settlement_id_reused"


def test_we_never_reuse_a_settlement_id() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    settle(proposer, responder, 1)
    with pytest.raises(LocalProtocolError):
        propose(proposer, 1)


# --- attestations ----------------------------------------------------------------------


def test_an_attestation_signed_by_one_side_only_is_refused() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    responder.receive(proposal, NOW, expiry_secs=EXPIRY)
    signed = proposal.signed_part()
    one_sided = [
        Attestation(proposal, bytes(64)),
        Attestation(proposal, BOB.sign(SETTLEMENT_DOMAIN, signed + b"x")),
        Attestation(proposal, BOB.sign(REJECTION_DOMAIN, signed)),
        Attestation(proposal, proposal.proposer_signature),
        Attestation(proposal, MALLORY.sign(SETTLEMENT_DOMAIN, signed)),
    ]
    for attestation in one_sided:
        assert (
            reason_of(attestation.verify, ALICE.identity_public, BOB.identity_public)
            == "bad_signature"
        )
        assert reason_of(proposer.on_approved, attestation) == "bad_signature"
    # the responder's signature is genuine, the proposer's is not
    forged_proposer = Attestation(
        msgspec.structs.replace(proposal, proposer_signature=bytes(64)),
        BOB.sign(SETTLEMENT_DOMAIN, signed),
    )
    assert (
        reason_of(forged_proposer.verify, ALICE.identity_public, BOB.identity_public)
        == "bad_signature"
    )
    assert reason_of(proposer.on_approved, forged_proposer) == "unknown_settlement"
    assert proposer.record(sid(1)).state is PENDING  # type: ignore[union-attr]
    assert proposer.head == GENESIS
    genuine = responder.approve(sid(1), NOW)
    assert isinstance(genuine, Attestation)
    assert reason_of(genuine.verify, BOB.identity_public, ALICE.identity_public) == "wrong_party"
    assert proposer.on_approved(genuine) is not None


def test_attestations_chain_and_a_gap_is_a_fork() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    chain = [settle(alice, bob, 1), settle(bob, alice, 2, mine=50, theirs=0), settle(alice, bob, 3)]
    assert [a.proposal.previous for a in chain] == [
        GENESIS,
        attestation_hash(chain[0]),
        attestation_hash(chain[1]),
    ]
    assert verify_chain(chain) == alice.head == bob.head
    assert verify_chain(chain[1:], start=attestation_hash(chain[0])) == alice.head
    assert verify_chain([]) == GENESIS
    assert reason_of(verify_chain, [chain[0], chain[2]]) == "fork"
    assert reason_of(verify_chain, chain[1:]) == "fork"


# --- heads -----------------------------------------------------------------------------


def test_a_proposal_naming_a_stale_head_is_rejected_as_stale_head() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    settle(alice, bob, 1)
    stale_alice = book(ALICE, BOB)  # e.g. restored from a checkpoint older than settlement 1
    proposal = propose(stale_alice, 2)
    assert proposal.previous == GENESIS != bob.head
    record = bob.receive(proposal, NOW, expiry_secs=EXPIRY)
    assert (record.state, record.reason) == (REJECTED, "stale_head")
    rejection = bob.answer(sid(2))
    assert isinstance(rejection, Rejection)
    verify_rejection(rejection, proposal, BOB.identity_public)
    event = stale_alice.on_rejected(rejection)
    assert event is not None and (event.record.state, event.record.reason) == (
        REJECTED,
        "stale_head",
    )
    assert bob.state.completed == [sid(1).hex()]


def test_a_late_approval_completes_a_given_up_proposal_and_approval_rechecks_the_head() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(bob, 1)
    alice.receive(proposal, NOW, expiry_secs=EXPIRY)
    delayed = alice.approve(sid(1), NOW + 10)  # approved in time, delivered late
    assert isinstance(delayed, Attestation)
    gave_up = proposal.expires_at + EXPIRY_GRACE_SECS
    assert bob.expire(gave_up - 1) == []
    assert [r.state for r in bob.expire(gave_up)] == [EXPIRED]
    # Bob takes a proposal from a stale copy of Alice (head GENESIS, like his)
    stale = propose(book(ALICE, BOB), 2, now=gave_up)
    assert bob.receive(stale, gave_up, expiry_secs=EXPIRY).state is PENDING
    event = bob.on_approved(delayed)  # the responder is the authority
    assert event is not None and event.late and event.record.state is COMPLETED
    assert bob.head == alice.head
    answer = bob.approve(sid(2), gave_up + 1)  # no longer follows Bob's head
    assert isinstance(answer, Rejection) and answer.reason == "stale_head"
    assert bob.record(sid(2)).state is REJECTED  # type: ignore[union-attr]


def test_diverged_chains_show_as_a_fork() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    bob.receive(proposal, NOW, expiry_secs=EXPIRY)
    delayed = bob.approve(sid(1), NOW + 1)
    assert isinstance(delayed, Attestation)
    gave_up = proposal.expires_at + EXPIRY_GRACE_SECS
    alice.expire(gave_up)
    amnesiac_bob = book(BOB, ALICE)  # Bob lost his state and proposes at GENESIS
    other = propose(amnesiac_bob, 2, now=gave_up)
    alice.receive(other, gave_up, expiry_secs=EXPIRY)
    assert isinstance(alice.approve(sid(2), gave_up), Attestation)
    assert reason_of(alice.on_approved, delayed) == "fork"
    assert alice.record(sid(1)).state is EXPIRED  # type: ignore[union-attr]


# --- rejection, expiry, cancel ---------------------------------------------------------


def test_manual_rejection_seen_from_both_sides() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    bob.receive(proposal, NOW, expiry_secs=EXPIRY)
    rejection = bob.reject(sid(1), "operator_declined", NOW + 5)
    assert bob.record(sid(1)).state is REJECTED  # type: ignore[union-attr]
    forged = msgspec.structs.replace(
        rejection, signature=MALLORY.sign(REJECTION_DOMAIN, rejection.signed_part())
    )
    assert reason_of(alice.on_rejected, forged) == "bad_signature"
    other = msgspec.structs.replace(rejection, proposal_signature=bytes(64))
    assert reason_of(alice.on_rejected, other) == "wrong_settlement"

    event = alice.on_rejected(rejection)
    assert event is not None and (event.record.state, event.record.reason) == (
        REJECTED,
        "operator_declined",
    )
    assert alice.on_rejected(rejection) is None
    assert alice.in_flight(NOW + 6) is None and bob.in_flight(NOW + 6) is None
    assert alice.head == bob.head == GENESIS
    with pytest.raises(LocalProtocolError):
        bob.approve(sid(1), NOW + 6)
    with pytest.raises(LocalProtocolError):
        alice.reduction(alice.record(sid(1)))  # type: ignore[arg-type]
    # Bob cannot take it back: an approval after a rejection is a conflicting answer
    approval = Attestation(proposal, BOB.sign(SETTLEMENT_DOMAIN, proposal.signed_part()))
    assert reason_of(alice.on_approved, approval) == "conflicting_answer"
    assert bob.receive(proposal, NOW + 7, expiry_secs=EXPIRY).state is REJECTED
    assert bob.answer(sid(1)) == rejection


@pytest.mark.parametrize("reason", ["", "expired", "canceled", "x" * 65])
def test_reserved_or_invalid_rejection_reasons_are_ours_to_refuse(reason: str) -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    bob.receive(propose(alice, 1), NOW, expiry_secs=EXPIRY)
    with pytest.raises(LocalProtocolError):
        bob.reject(sid(1), reason, NOW)


def test_an_unanswered_incoming_proposal_expires_at_the_responders_deadline() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    record = bob.receive(proposal, NOW, expiry_secs=60)
    assert record.expires_at == NOW + 60
    assert bob.expire(NOW + 59) == []
    assert bob.expire(NOW + 60) == [record]
    assert bob.expire(NOW + 61) == []
    assert (record.state, record.reason) == (EXPIRED, "expired")
    rejection = bob.answer(sid(1))
    assert isinstance(rejection, Rejection)
    event = alice.on_rejected(rejection)
    assert event is not None and event.record.state is EXPIRED
    with pytest.raises(LocalProtocolError):
        bob.approve(sid(1), NOW + 61)


def test_approving_past_the_deadline_answers_expired() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    record = bob.receive(proposal, NOW, expiry_secs=10 * EXPIRY)
    assert record.expires_at == proposal.expires_at  # the proposal's own deadline caps ours
    answer = bob.approve(sid(1), proposal.expires_at)
    assert isinstance(answer, Rejection) and answer.reason == "expired"
    assert record.state is EXPIRED and bob.head == GENESIS
    late = propose(book(ALICE, BOB), 2, expiry=60)
    assert bob.receive(late, late.expires_at, expiry_secs=EXPIRY).state is EXPIRED


def test_the_proposer_gives_up_only_after_the_grace_period() -> None:
    alice = book(ALICE, BOB)
    proposal = propose(alice, 1)
    assert alice.expire(proposal.expires_at) == []
    assert alice.in_flight(proposal.expires_at) is alice.record(sid(1))
    with pytest.raises(LocalProtocolError):
        propose(alice, 2, now=proposal.expires_at)
    gave_up = proposal.expires_at + EXPIRY_GRACE_SECS
    assert alice.expire(gave_up) == [alice.record(sid(1))]
    assert alice.record(sid(1)).state is EXPIRED  # type: ignore[union-attr]
    assert propose(alice, 2, now=gave_up).previous == GENESIS


def test_a_cancel_is_final_once_the_responder_confirms_it() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    bob.receive(propose(alice, 1), NOW, expiry_secs=EXPIRY)
    assert alice.cancel(sid(1)).state is CANCELED
    with pytest.raises(LocalProtocolError):  # still open until Bob answers
        propose(alice, 2)
    with pytest.raises(LocalProtocolError):
        alice.cancel(sid(1))
    answer = bob.on_cancel(sid(1), NOW + 1)
    assert isinstance(answer, Rejection) and answer.reason == "canceled"
    assert bob.record(sid(1)).state is CANCELED  # type: ignore[union-attr]
    assert bob.on_cancel(sid(1), NOW + 2) == answer
    event = alice.on_rejected(answer)
    assert event is not None and event.record.state is CANCELED
    assert alice.in_flight(NOW + 2) is None
    propose(alice, 2, now=NOW + 2)
    assert reason_of(bob.on_cancel, sid(9), NOW) == "unknown_settlement"


def test_a_cancel_that_crosses_the_approval_loses() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    bob.receive(propose(alice, 1), NOW, expiry_secs=EXPIRY)
    attestation = bob.approve(sid(1), NOW + 1)
    alice.cancel(sid(1))
    assert bob.on_cancel(sid(1), NOW + 2) == attestation
    assert isinstance(attestation, Attestation)
    event = alice.on_approved(attestation)
    assert event is not None and event.late and event.record.state is COMPLETED
    assert alice.head == bob.head


# --- one settlement in flight per link -------------------------------------------------


def test_crossing_proposals_are_both_refused_then_a_retry_succeeds() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    from_alice, from_bob = propose(alice, 1), propose(bob, 2)
    assert alice.receive(from_bob, NOW, expiry_secs=EXPIRY).reason == "settlement_in_flight"
    assert bob.receive(from_alice, NOW, expiry_secs=EXPIRY).reason == "settlement_in_flight"
    for proposer, responder, n in ((alice, bob, 1), (bob, alice, 2)):
        answer = responder.answer(sid(n))
        assert isinstance(answer, Rejection)
        proposer.on_rejected(answer)
    assert alice.in_flight(NOW) is None and bob.in_flight(NOW) is None
    settle(alice, bob, 3)
    assert alice.head == bob.head != GENESIS


def test_a_pending_incoming_proposal_blocks_our_own() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    bob.receive(propose(alice, 1), NOW, expiry_secs=EXPIRY)
    assert bob.in_flight(NOW) is bob.record(sid(1))
    assert bob.outgoing_pending() is None
    with pytest.raises(LocalProtocolError):
        propose(bob, 2)


# --- persistence -----------------------------------------------------------------------


def test_a_restored_book_resumes_where_it_stopped() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    settle(alice, bob, 1)
    proposal = propose(alice, 2)
    bob.receive(proposal, NOW, expiry_secs=EXPIRY)
    alice, bob = restored(ALICE, BOB, alice.snapshot()), restored(BOB, ALICE, bob.snapshot())
    outgoing = alice.outgoing_pending()
    assert outgoing is not None and outgoing.proposal == proposal
    with pytest.raises(LocalProtocolError):
        propose(alice, 3)
    assert bob.receive(proposal, NOW + 1, expiry_secs=EXPIRY).state is PENDING
    attestation = bob.approve(sid(2), NOW + 2)
    assert isinstance(attestation, Attestation)
    assert alice.on_approved(attestation) is not None
    assert alice.head == bob.head and alice.state.completed == [sid(1).hex(), sid(2).hex()]


def test_a_snapshot_is_a_copy() -> None:
    alice = book(ALICE, BOB)
    snapshot = alice.snapshot()
    propose(alice, 1)
    assert snapshot.records == {} and len(alice.state.records) == 1


def test_a_book_refuses_a_key_that_is_not_its_neighbours() -> None:
    with pytest.raises(LocalProtocolError):
        SettlementBook(ALICE, MALLORY.identity_public, SettlementBookState(BOB.fingerprint))


# --- proof of work ---------------------------------------------------------------------


def test_a_pow_settlement_end_to_end() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    challenges = ChallengeBook(BOB.fingerprint)
    challenge = challenges.issue(ALICE.fingerprint, NOW, seeded_rng(7))
    proof = make_proof(challenge, sid(1), 300)
    proposal = propose(alice, 1, mine=300, theirs=0, method="pow", proof=proof)
    assert bob.receive(proposal, NOW, expiry_secs=60).state is PENDING
    redeem_proof(
        challenges,
        proposal.proof,
        payer=proposal.proposer,
        settlement_id=proposal.settlement_id,
        amount_umel=proposal.net_umel,
        now=NOW,
    )
    attestation = bob.approve(sid(1), NOW)
    assert isinstance(attestation, Attestation)
    event = alice.on_approved(attestation)
    assert event is not None and event.reduction == Reduction(paid_in_umel=0, paid_out_umel=300)
    assert bob.reduction(bob.record(sid(1))) == Reduction(300, 0)  # type: ignore[arg-type]


# --- audit -----------------------------------------------------------------------------


def chained(count: int) -> tuple[SettlementBook, SettlementBook, list[Attestation]]:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    chain = [
        settle(alice, bob, n) if n % 2 else settle(bob, alice, n, mine=40, theirs=10)
        for n in range(1, count + 1)
    ]
    return alice, bob, chain


def test_an_audit_of_equal_chains_finds_nothing_page_by_page() -> None:
    alice, bob, chain = chained(3)
    page = alice.audit_page(GENESIS)
    assert page is not None and page.attestations == chain and page.head == alice.head
    assert decode_audit(encode(page)) == page
    assert bob.verify_audit(page.head, page.attestations, since=page.since) is None
    middle = attestation_hash(chain[0])
    assert alice.audit_since(middle) == chain[1:]
    assert bob.verify_audit(alice.head, chain[1:], since=middle) is None
    assert alice.audit_since(alice.head) == []
    # pages of one: each partial page agrees, and the last one reaches the head
    since, pages = GENESIS, 0
    while since != alice.head:
        attestations = alice.audit_since(since, max_bytes=1)
        assert attestations is not None and len(attestations) == 1
        assert bob.verify_audit(alice.head, attestations, since=since) is None
        since, pages = attestation_hash(attestations[0]), pages + 1
    assert pages == 3


def test_an_audit_finds_a_missing_attestation() -> None:
    _, bob, chain = chained(3)
    mismatch = bob.verify_audit(attestation_hash(chain[1]), chain[:2])
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("missing", 2)
    assert chain[2].proposal.id_hex in mismatch.detail


def test_an_audit_finds_an_extra_attestation() -> None:
    alice, bob, _ = chained(2)
    behind = restored(BOB, ALICE, bob.snapshot())
    settle(alice, bob, 3)
    page = alice.audit_page(GENESIS)
    assert page is not None
    mismatch = behind.verify_audit(page.head, page.attestations)
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("extra", 2)
    theirs = behind.audit_page(GENESIS)
    assert theirs is not None
    mismatch = alice.verify_audit(theirs.head, theirs.attestations)
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("missing", 2)


def test_an_audit_finds_an_altered_attestation() -> None:
    alice, bob, chain = chained(3)
    # a validly co-signed but different history (e.g. one side replayed another ledger)
    other_alice, other_bob = book(ALICE, BOB), book(BOB, ALICE)
    other = [settle(other_alice, other_bob, 1, mine=1, theirs=0)]
    mismatch = bob.verify_audit(other_alice.head, other)
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("altered", 0)
    # amounts edited after signing: the signatures no longer hold
    last = chain[2]
    edited_proposal = msgspec.structs.replace(
        last.proposal,
        reduce_left_umel=last.proposal.reduce_left_umel + 1,
        reduce_right_umel=last.proposal.reduce_right_umel + 1,
    )
    edited = msgspec.structs.replace(last, proposal=edited_proposal)
    mismatch = bob.verify_audit(attestation_hash(edited), [*chain[:2], edited])
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("bad_signature", 2)
    # signed by one side only
    one_sided = msgspec.structs.replace(last, responder_signature=bytes(64))
    mismatch = bob.verify_audit(attestation_hash(one_sided), [*chain[:2], one_sided])
    assert mismatch is not None and (mismatch.reason, mismatch.index) == ("bad_signature", 2)
    # an edited middle attestation breaks the chain after it
    middle = msgspec.structs.replace(chain[1], responder_signature=bytes(64))
    mismatch = bob.verify_audit(alice.head, [chain[0], middle, chain[2]])
    assert mismatch is not None and mismatch.reason == "broken_chain"
    # an empty page that claims a head it does not reach
    mismatch = bob.verify_audit(alice.head, [])
    assert mismatch is not None and mismatch.reason == "broken_chain"


def test_an_audit_from_an_unknown_head_is_refused() -> None:
    alice, bob, _ = chained(2)
    unknown = bytes([9]) * 32
    assert alice.audit_since(unknown) is None and alice.audit_page(unknown) is None
    mismatch = bob.verify_audit(alice.head, [], since=unknown)
    assert mismatch is not None and mismatch.reason == "unknown_since"


# --- anything a peer sends -------------------------------------------------------------

_ALICE_BOOK = book(ALICE, BOB)
PROPOSAL = propose(_ALICE_BOOK, 1)


@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_remote_error_only(data: bytes) -> None:
    for decode in (decode_proposal, decode_attestation, decode_rejection, decode_audit):
        try:
            decode(data)
        except RemoteProtocolError as exc:
            assert exc.reason == "malformed_settlement"


def _corrupt(data: st.DataObject, encoded: bytes) -> bytes:
    corrupted = bytearray(encoded)
    index = data.draw(st.integers(0, len(corrupted) - 1))
    corrupted[index] = data.draw(st.integers(0, 255))
    return bytes(corrupted)


@given(st.data())
def test_a_corrupted_proposal_is_refused_with_a_remote_error(data: st.DataObject) -> None:
    responder = book(BOB, ALICE)
    try:
        proposal = decode_proposal(_corrupt(data, encode(PROPOSAL)))
        responder.receive(proposal, NOW, expiry_secs=EXPIRY)
    except RemoteProtocolError:
        assert responder.state.records == {}
        return
    assert proposal == PROPOSAL  # only the genuine proposal gets in


@given(st.data())
def test_a_corrupted_answer_is_refused_with_a_remote_error(data: st.DataObject) -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    responder.receive(proposal, NOW, expiry_secs=EXPIRY)
    attestation = responder.approve(sid(1), NOW)
    assert isinstance(attestation, Attestation)
    rejection = make_rejection(BOB, proposal, "no", NOW)
    with contextlib.suppress(RemoteProtocolError):
        proposer.on_approved(decode_attestation(_corrupt(data, encode(attestation))))
    with contextlib.suppress(RemoteProtocolError):
        proposer.on_rejected(decode_rejection(_corrupt(data, encode(rejection))))
    record = proposer.record(sid(1))
    assert record is not None
    # only a genuine answer gets in
    if record.state is COMPLETED:
        assert record.attestation == attestation
    elif record.state is REJECTED:
        assert record.rejection == rejection
    else:
        assert record.state is PENDING


CHAINED = chained(2)


@given(st.data())
def test_a_corrupted_audit_page_is_judged_never_raises(data: st.DataObject) -> None:
    alice, bob, _ = CHAINED
    page = alice.audit_page(GENESIS)
    assert page is not None
    try:
        corrupted = decode_audit(_corrupt(data, encode(page)))
    except RemoteProtocolError:
        return
    mismatch = bob.verify_audit(corrupted.head, corrupted.attestations, since=corrupted.since)
    if mismatch is None:  # e.g. a corrupted head only makes the page look partial
        assert corrupted.attestations == page.attestations


_fingerprints = st.sampled_from([ALICE.fingerprint, BOB.fingerprint, MALLORY.fingerprint])


@given(
    st.builds(
        Proposal,
        settlement_id=st.binary(min_size=16, max_size=16),
        proposer=_fingerprints,
        responder=_fingerprints,
        left=_fingerprints,
        right=_fingerprints,
        reduce_left_umel=st.integers(0, 2**63 - 1),
        reduce_right_umel=st.integers(0, 2**63 - 1),
        net_umel=st.integers(0, 2**63 - 1),
        direction=st.sampled_from(["left_pays", "right_pays", "none"]),
        method=st.sampled_from(["manual", "pow", "x"]),
        proof=st.binary(max_size=64),
        previous=st.sampled_from([GENESIS, bytes([1]) * 32]),
        proposer_ledger_head=st.binary(min_size=32, max_size=32),
        timestamp=st.integers(0, 2**63 - 1),
        expires_at=st.integers(0, 2**63 - 1),
        proposer_signature=st.binary(min_size=64, max_size=64),
    )
)
def test_any_well_typed_proposal_is_refused_with_a_remote_error_only(proposal: Proposal) -> None:
    responder = book(BOB, ALICE)
    with pytest.raises(RemoteProtocolError):
        responder.receive(proposal, NOW, expiry_secs=EXPIRY)
    assert responder.state.records == {}
