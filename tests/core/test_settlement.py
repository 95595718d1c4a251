"""Settlements between two neighbours: proposals, attestations, the book on both sides."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.core.accounting import MAX_CLOCK_SKEW_SECS, Account, AccountState, Counters
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Identity
from earendil_py.core.ledger import GENESIS
from earendil_py.core.pow import ChallengeBook, make_proof, redeem_proof
from earendil_py.core.settlement import (
    EXPIRY_GRACE_SECS,
    MAX_EXPIRY_SECS,
    MAX_PROOF_SIZE,
    RECENT,
    REJECTION_DOMAIN,
    SETTLEMENT_DOMAIN,
    TRANSITIONS,
    Attestation,
    AuditMismatch,
    AuditPage,
    BookState,
    Proposal,
    Reduction,
    Rejection,
    SettlementBook,
    SettlementRecord,
    SettlementState,
    Step,
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
from earendil_py.core.signed import signed_part
from tests.core.neighbor_pair import seeded_rng

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


def book(me: Identity, them: Identity, state: BookState | None = None) -> SettlementBook:
    return SettlementBook(me, them.identity_public, state or BookState(them.fingerprint))


def restored(me: Identity, them: Identity, state: BookState) -> SettlementBook:
    """The book as it was: its state through msgpack and back."""
    data = msgspec.msgpack.encode(state)
    return book(me, them, msgspec.msgpack.decode(data, type=BookState))


def receive(responder: SettlementBook, proposal: Proposal, now: int = NOW) -> SettlementRecord:
    """What the neighbour does with a proposal: judge it, then open it if it is new."""
    judged = responder.check_proposal(proposal, now)
    assert judged is None, judged
    return responder.receive(proposal, now, expiry_secs=EXPIRY)


def refusal(responder: SettlementBook, proposal: Proposal, now: int = NOW) -> Rejection:
    judged = responder.check_proposal(proposal, now)
    assert isinstance(judged, Rejection), judged
    return judged


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
    ).proposal


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
    assert receive(responder, proposal).state is PENDING
    attestation = responder.approve(proposal.settlement_id, NOW).attestation
    assert attestation is not None
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
    assert proposer.outgoing_open() is proposer.record(sid(1))

    record = receive(responder, proposal, NOW + 1)
    assert (record.state, record.role) == (PENDING, "responder")
    record = responder.approve(sid(1), NOW + 2)
    attestation = record.attestation
    assert attestation is not None and record.state is COMPLETED
    attestation.verify(me.identity_public, them.identity_public)

    completed = proposer.on_approved(attestation)
    assert completed is not None and completed.state is COMPLETED
    assert completed is proposer.record(sid(1))
    reduction = completed.proposal.reduction_for(me.fingerprint)
    assert reduction == Reduction(200, 700)
    assert proposal.reduction_for(them.fingerprint) == Reduction(
        paid_in_umel=700, paid_out_umel=200
    )
    assert proposer.head == responder.head == attestation_hash(attestation) != GENESIS
    assert proposer.state.completed == responder.state.completed == 1
    assert proposer.state.chain == responder.state.chain == [attestation]
    assert proposer.outgoing_open() is None and proposer.in_flight(NOW + 3) is None

    # Applied to both accounts: what one side pays, the other side receives.
    mine = Account(me, them.identity_public, AccountState(them.fingerprint), Counters())
    theirs = Account(them, me.identity_public, AccountState(me.fingerprint), Counters())
    mine.settle(*reduction)
    theirs.settle(*proposal.reduction_for(them.fingerprint))
    assert (mine.debt_out_umel, mine.debt_in_umel) == (-700, -200)
    assert (theirs.debt_in_umel, theirs.debt_out_umel) == (-700, -200)

    assert proposer.on_approved(attestation) is None  # a duplicate changes nothing
    assert proposer.state.completed == 1


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
    assert not proposer.state.open and not proposer.state.finished


def test_a_forged_or_altered_proposal_is_refused() -> None:
    proposal = propose(book(ALICE, BOB), 1)
    responder = book(BOB, ALICE)
    for bad in [
        signed_as(MALLORY, proposal),
        msgspec.structs.replace(proposal, proof=b"paid in full"),
        msgspec.structs.replace(proposal, timestamp=NOW + 1),
        msgspec.structs.replace(proposal, proposer_signature=bytes(64)),
    ]:
        assert reason_of(responder.check_proposal, bad, NOW) == "bad_signature"
    to_mallory = propose(book(ALICE, MALLORY), 2)
    assert reason_of(responder.check_proposal, to_mallory, NOW) == "wrong_party"
    from_bob = propose(book(BOB, ALICE), 3)
    assert reason_of(responder.check_proposal, from_bob, NOW) == "wrong_party"
    assert not responder.state.open and not responder.state.finished
    receive(responder, proposal)  # the genuine one is fine


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
    assert reason_of(responder.check_proposal, bad, NOW) == "malformed_settlement"


def test_pow_must_be_paid_by_the_proposer() -> None:
    proposal = propose(book(ALICE, BOB), 1, mine=0, theirs=500)
    bad = msgspec.structs.replace(proposal, method="pow", proof=b"x")
    assert reason_of(bad.check_shape) == "malformed_settlement"


def test_a_proposal_dated_too_far_from_our_clock_is_refused() -> None:
    proposal = propose(book(ALICE, BOB), 1)
    responder = book(BOB, ALICE)
    for now in (NOW + MAX_CLOCK_SKEW_SECS + 1, NOW - MAX_CLOCK_SKEW_SECS - 1):
        assert reason_of(responder.check_proposal, proposal, now) == "stale_settlement"
    assert not responder.state.open
    record = receive(responder, proposal, NOW + MAX_CLOCK_SKEW_SECS)
    assert record.state is PENDING


# --- replay and idempotency ------------------------------------------------------------


def test_a_replayed_proposal_gets_the_same_record_and_is_applied_once() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    first = receive(responder, proposal)
    assert responder.check_proposal(proposal, NOW + 1) is first
    completed = responder.approve(sid(1), NOW + 2)
    head = responder.head
    # long after, past the clock skew: still the same record and the same answer
    again = responder.check_proposal(proposal, NOW + 100 * MAX_CLOCK_SKEW_SECS)
    assert again is completed and completed.state is COMPLETED
    assert (responder.head, responder.state.completed) == (head, 1)
    assert len(responder.state.finished) == 1 and not responder.state.open
    with pytest.raises(LocalProtocolError):
        responder.approve(sid(1), NOW + 3)
    # a different proposal under a known id is refused
    reused = propose(book(ALICE, BOB), 1, mine=1)
    assert reason_of(responder.check_proposal, reused, NOW) == "settlement_id_reused"


def test_we_never_reuse_a_settlement_id() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    settle(proposer, responder, 1)
    with pytest.raises(LocalProtocolError):
        propose(proposer, 1)


# --- attestations ----------------------------------------------------------------------


def test_an_attestation_signed_by_one_side_only_is_refused() -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    receive(responder, proposal)
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
    genuine = responder.approve(sid(1), NOW).attestation
    assert genuine is not None
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
    stale_alice = book(ALICE, BOB)  # e.g. restored from a ledger older than settlement 1
    proposal = propose(stale_alice, 2)
    assert proposal.previous == GENESIS != bob.head
    rejection = refusal(bob, proposal)  # signed, and nothing recorded
    assert rejection.reason == "stale_head" and bob.record(sid(2)) is None
    verify_rejection(rejection, proposal, BOB.identity_public)
    record = stale_alice.on_rejected(rejection)
    assert record is not None and (record.state, record.reason) == (REJECTED, "stale_head")
    assert bob.state.completed == 1


def test_a_late_approval_completes_a_given_up_proposal_and_approval_rechecks_the_head() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(bob, 1)
    receive(alice, proposal)
    delayed = alice.approve(sid(1), NOW + 10).attestation  # approved in time, delivered late
    assert delayed is not None
    gave_up = proposal.expires_at + EXPIRY_GRACE_SECS
    assert bob.expire(gave_up - 1) == []
    assert [r.state for r in bob.expire(gave_up)] == [EXPIRED]
    # Bob takes a proposal from a stale copy of Alice (head GENESIS, like his)
    stale = propose(book(ALICE, BOB), 2, now=gave_up)
    assert receive(bob, stale, gave_up).state is PENDING
    record = bob.on_approved(delayed)  # the responder is the authority
    assert record is not None and record.state is COMPLETED
    assert bob.head == alice.head
    answer = bob.approve(sid(2), gave_up + 1)  # no longer follows Bob's head
    assert answer.rejection is not None and answer.rejection.reason == "stale_head"
    assert bob.record(sid(2)).state is REJECTED  # type: ignore[union-attr]


def test_diverged_chains_show_as_a_fork() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    receive(bob, proposal)
    delayed = bob.approve(sid(1), NOW + 1).attestation
    assert delayed is not None
    gave_up = proposal.expires_at + EXPIRY_GRACE_SECS
    alice.expire(gave_up)
    amnesiac_bob = book(BOB, ALICE)  # Bob lost his state and proposes at GENESIS
    other = propose(amnesiac_bob, 2, now=gave_up)
    receive(alice, other, gave_up)
    assert alice.approve(sid(2), gave_up).attestation is not None
    assert reason_of(alice.on_approved, delayed) == "fork"
    assert alice.record(sid(1)).state is EXPIRED  # type: ignore[union-attr]


# --- rejection, expiry, cancel ---------------------------------------------------------


def test_manual_rejection_seen_from_both_sides() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    receive(bob, proposal)
    rejection = bob.reject(sid(1), "operator_declined", NOW + 5).rejection
    assert rejection is not None
    assert bob.record(sid(1)).state is REJECTED  # type: ignore[union-attr]
    forged = msgspec.structs.replace(
        rejection, signature=MALLORY.sign(REJECTION_DOMAIN, signed_part(rejection))
    )
    assert reason_of(alice.on_rejected, forged) == "bad_signature"
    other = msgspec.structs.replace(rejection, proposal_signature=bytes(64))
    assert reason_of(alice.on_rejected, other) == "wrong_settlement"

    record = alice.on_rejected(rejection)
    assert record is not None and (record.state, record.reason) == (REJECTED, "operator_declined")
    assert alice.on_rejected(rejection) is None
    assert alice.in_flight(NOW + 6) is None and bob.in_flight(NOW + 6) is None
    assert alice.head == bob.head == GENESIS
    with pytest.raises(LocalProtocolError):
        bob.approve(sid(1), NOW + 6)
    # Bob cannot take it back: an approval after a rejection is a conflicting answer
    approval = Attestation(proposal, BOB.sign(SETTLEMENT_DOMAIN, proposal.signed_part()))
    assert reason_of(alice.on_approved, approval) == "conflicting_answer"
    known = bob.check_proposal(proposal, NOW + 7)
    assert isinstance(known, SettlementRecord) and known.answer == rejection


@pytest.mark.parametrize("reason", ["", "expired", "canceled", "x" * 65])
def test_reserved_or_invalid_rejection_reasons_are_ours_to_refuse(reason: str) -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    receive(bob, propose(alice, 1))
    with pytest.raises(LocalProtocolError):
        bob.reject(sid(1), reason, NOW)


def test_an_unanswered_incoming_proposal_expires_at_the_responders_deadline() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    assert bob.check_proposal(proposal, NOW) is None
    record = bob.receive(proposal, NOW, expiry_secs=60)
    assert record.expires_at == NOW + 60
    assert bob.expire(NOW + 59) == []
    (record,) = bob.expire(NOW + 60)
    assert bob.expire(NOW + 61) == []
    assert (record.state, record.reason) == (EXPIRED, "expired")
    assert record.rejection is not None
    answered = alice.on_rejected(record.rejection)
    assert answered is not None and answered.state is EXPIRED
    with pytest.raises(LocalProtocolError):
        bob.approve(sid(1), NOW + 61)


def test_approving_past_the_deadline_answers_expired() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    record = bob.receive(proposal, NOW, expiry_secs=10 * EXPIRY)
    assert record.expires_at == proposal.expires_at  # the proposal's own deadline caps ours
    answer = bob.approve(sid(1), proposal.expires_at)
    assert answer.rejection is not None and answer.rejection.reason == "expired"
    assert answer.state is EXPIRED and bob.head == GENESIS
    late = propose(book(ALICE, BOB), 2, expiry=60)
    assert refusal(bob, late, late.expires_at).reason == "expired"


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
    assert alice.record(sid(1)).answer is None  # type: ignore[union-attr]  # a late one may come
    assert propose(alice, 2, now=gave_up).previous == GENESIS


def test_a_cancel_is_final_once_the_responder_confirms_it() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    receive(bob, propose(alice, 1))
    assert alice.cancel(sid(1)).state is CANCELED
    with pytest.raises(LocalProtocolError):  # still open until Bob answers
        propose(alice, 2)
    with pytest.raises(LocalProtocolError):
        alice.cancel(sid(1))
    answer = bob.on_cancel(sid(1), NOW + 1)
    assert answer.rejection is not None and answer.reason == "canceled"
    assert bob.record(sid(1)).state is CANCELED  # type: ignore[union-attr]
    assert bob.on_cancel(sid(1), NOW + 2) is answer
    record = alice.on_rejected(answer.rejection)
    assert record is not None and record.state is CANCELED
    assert alice.in_flight(NOW + 2) is None
    propose(alice, 2, now=NOW + 2)
    assert reason_of(bob.on_cancel, sid(9), NOW) == "unknown_settlement"


def test_a_cancel_that_crosses_the_approval_loses() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    receive(bob, propose(alice, 1))
    approved = bob.approve(sid(1), NOW + 1)
    alice.cancel(sid(1))
    assert bob.on_cancel(sid(1), NOW + 2) is approved
    assert approved.attestation is not None
    record = alice.on_approved(approved.attestation)
    assert record is not None and record.state is COMPLETED
    assert alice.head == bob.head


# --- one settlement in flight per link -------------------------------------------------


def test_crossing_proposals_are_both_refused_then_a_retry_succeeds() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    from_alice, from_bob = propose(alice, 1), propose(bob, 2)
    to_alice, to_bob = refusal(bob, from_alice), refusal(alice, from_bob)
    assert to_alice.reason == to_bob.reason == "settlement_in_flight"
    alice.on_rejected(to_alice)
    bob.on_rejected(to_bob)
    assert alice.in_flight(NOW) is None and bob.in_flight(NOW) is None
    settle(alice, bob, 3)
    assert alice.head == bob.head != GENESIS


def test_a_pending_incoming_proposal_blocks_our_own() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    receive(bob, propose(alice, 1))
    assert bob.in_flight(NOW) is bob.record(sid(1))
    assert bob.outgoing_open() is None
    with pytest.raises(LocalProtocolError):
        propose(bob, 2)


# --- persistence -----------------------------------------------------------------------


def test_a_restored_book_resumes_where_it_stopped() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    settle(alice, bob, 1)
    proposal = propose(alice, 2)
    receive(bob, proposal)
    alice, bob = restored(ALICE, BOB, alice.state), restored(BOB, ALICE, bob.state)
    outgoing = alice.outgoing_open()
    assert outgoing is not None and outgoing.proposal == proposal
    with pytest.raises(LocalProtocolError):
        propose(alice, 3)
    record = bob.check_proposal(proposal, NOW + 1)
    assert isinstance(record, SettlementRecord) and record.state is PENDING
    attestation = bob.approve(sid(2), NOW + 2).attestation
    assert attestation is not None
    assert alice.on_approved(attestation) is not None
    assert alice.head == bob.head and alice.state.completed == 2


def test_a_copy_of_the_state_is_changed_apart() -> None:
    alice = book(ALICE, BOB)
    copy = alice.state.copy()
    propose(alice, 1)
    assert not copy.open and len(alice.state.open) == 1


def test_finished_records_leave_memory_and_the_newest_stay() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    for n in range(1, 3 * RECENT + 1):
        settle(alice, bob, n, mine=10, theirs=0)
    for side in (alice, bob):
        assert side.state.completed == 3 * RECENT
        assert len(side.state.finished) == len(side.state.chain) == RECENT
        assert side.record(sid(1)) is None and side.record(sid(3 * RECENT)) is not None
    assert verify_chain(alice.state.chain, start=alice.heads()[0]) == alice.head


def test_every_transition_is_in_the_table_and_others_are_refused() -> None:
    record = book(ALICE, BOB).propose(
        settlement_id=sid(1),
        reduce_mine_umel=1,
        reduce_theirs_umel=0,
        method="manual",
        ledger_head=LEDGER_HEAD,
        now=NOW,
        expiry_secs=EXPIRY,
    )
    assert TRANSITIONS[("proposer", None, Step.PROPOSE)] is record.state is PENDING
    with pytest.raises(LocalProtocolError):
        record.step(Step.APPROVE)  # the responder's step, not the proposer's
    done = record.step(Step.APPROVED)
    with pytest.raises(LocalProtocolError):
        done.step(Step.CANCEL)  # nothing moves a completed settlement
    roles = {role for role, _, _ in TRANSITIONS}
    assert roles == {"proposer", "responder"}
    assert {state for _, state, _ in TRANSITIONS} - {None} <= set(SettlementState)


def test_a_book_refuses_a_key_that_is_not_its_neighbours() -> None:
    with pytest.raises(LocalProtocolError):
        SettlementBook(ALICE, MALLORY.identity_public, BookState(BOB.fingerprint))


# --- proof of work ---------------------------------------------------------------------


def test_a_pow_settlement_end_to_end() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    challenges = ChallengeBook(BOB.fingerprint)
    challenge = challenges.issue(ALICE.fingerprint, NOW, seeded_rng(7))
    proof = make_proof(challenge, sid(1), 300)
    proposal = propose(alice, 1, mine=300, theirs=0, method="pow", proof=proof)
    assert receive(bob, proposal).state is PENDING
    redeem_proof(
        challenges,
        proposal.proof,
        payer=proposal.proposer,
        settlement_id=proposal.settlement_id,
        amount_umel=proposal.net_umel,
        now=NOW,
    )
    attestation = bob.approve(sid(1), NOW).attestation
    assert attestation is not None
    record = alice.on_approved(attestation)
    assert record is not None
    assert record.proposal.reduction_for(ALICE.fingerprint) == Reduction(0, 300)
    assert proposal.reduction_for(BOB.fingerprint) == Reduction(300, 0)


# --- audit -----------------------------------------------------------------------------


def chained(count: int) -> tuple[SettlementBook, SettlementBook, list[Attestation]]:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    chain = [
        settle(alice, bob, n) if n % 2 else settle(bob, alice, n, mine=40, theirs=10)
        for n in range(1, count + 1)
    ]
    return alice, bob, chain


def test_equal_heads_mean_equal_chains_and_an_audit_finds_nothing() -> None:
    alice, bob, _ = chained(3)
    page = alice.audit_page(bob.head)
    assert page == AuditPage(bob.head, alice.head, [])
    assert decode_audit(encode(page)) == page
    assert bob.judge_audit(page, since=bob.head) == []


def test_an_audit_serves_the_attestations_after_a_recent_head() -> None:
    alice, _, chain = chained(3)
    middle = attestation_hash(chain[0])
    page = alice.audit_page(middle)
    assert page is not None and page.attestations == chain[1:] and page.head == alice.head
    assert alice.audit_page(GENESIS) == AuditPage(GENESIS, alice.head, chain)
    assert alice.audit_page(bytes([9]) * 32) is None  # not one of our heads


def test_an_audit_finds_an_approval_of_ours_we_had_not_heard_of() -> None:
    alice, bob = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(alice, 1)
    receive(bob, proposal)
    approved = bob.approve(sid(1), NOW).attestation
    page = bob.audit_page(alice.head)
    assert page is not None and page.attestations == [approved]
    assert alice.judge_audit(page, since=alice.head) == [approved]
    assert alice.on_approved(approved) is not None  # type: ignore[arg-type]
    assert alice.head == bob.head


def test_an_audit_finds_a_ledger_that_lost_a_settlement() -> None:
    alice, bob, _ = chained(2)
    behind = restored(BOB, ALICE, bob.state)
    settle(alice, bob, 3, mine=5, theirs=0)
    page = alice.audit_page(behind.head)
    assert page is not None
    mismatch = behind.judge_audit(page, since=behind.head)
    assert isinstance(mismatch, AuditMismatch) and (mismatch.reason, mismatch.index) == (
        "extra",
        0,
    )
    # The other way round, the lagging side is simply one we passed recently.
    assert alice.judge_unknown_since(behind.head) is None


def test_an_audit_finds_a_diverged_or_altered_history() -> None:
    alice, bob, chain = chained(3)
    other_alice, other_bob = book(ALICE, BOB), book(BOB, ALICE)
    settle(other_alice, other_bob, 1, mine=1, theirs=0)
    mismatch = bob.judge_unknown_since(other_alice.head)
    assert mismatch is not None and mismatch.reason == "diverged"
    # amounts edited after signing: the signatures no longer hold
    last = chain[2]
    edited_proposal = msgspec.structs.replace(
        last.proposal,
        reduce_left_umel=last.proposal.reduce_left_umel + 1,
        reduce_right_umel=last.proposal.reduce_right_umel + 1,
    )
    edited = msgspec.structs.replace(last, proposal=edited_proposal)
    since = attestation_hash(chain[1])
    page = AuditPage(since, attestation_hash(edited), [edited])
    mismatch = restored(BOB, ALICE, bob.state).judge_audit(page, since=since)
    assert isinstance(mismatch, AuditMismatch) and mismatch.reason == "bad_signature"
    # signed by one side only
    one_sided = msgspec.structs.replace(last, responder_signature=bytes(64))
    page = AuditPage(since, attestation_hash(one_sided), [one_sided])
    mismatch = bob.judge_audit(page, since=since)
    assert isinstance(mismatch, AuditMismatch) and mismatch.reason == "bad_signature"
    # a page that does not chain from the head asked for
    page = AuditPage(GENESIS, alice.head, chain[1:])
    mismatch = bob.judge_audit(page, since=GENESIS)
    assert isinstance(mismatch, AuditMismatch) and mismatch.reason == "broken_chain"
    # an empty page that claims a head it does not reach
    page = AuditPage(bob.head, bytes([3]) * 32, [])
    mismatch = bob.judge_audit(page, since=bob.head)
    assert isinstance(mismatch, AuditMismatch) and mismatch.reason == "broken_chain"


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
        assert responder.check_proposal(proposal, NOW) is None
    except RemoteProtocolError:
        assert not responder.state.open
        return
    assert proposal == PROPOSAL  # only the genuine proposal gets in


@given(st.data())
def test_a_corrupted_answer_is_refused_with_a_remote_error(data: st.DataObject) -> None:
    proposer, responder = book(ALICE, BOB), book(BOB, ALICE)
    proposal = propose(proposer, 1)
    receive(responder, proposal)
    attestation = responder.approve(sid(1), NOW).attestation
    assert attestation is not None
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
    alice, _, _ = CHAINED
    behind = book(BOB, ALICE)  # Bob as if he had lost both settlements
    page = alice.audit_page(GENESIS)
    assert page is not None
    try:
        corrupted = decode_audit(_corrupt(data, encode(page)))
    except RemoteProtocolError:
        return
    verdict = behind.judge_audit(corrupted, since=GENESIS)
    # Attestations Bob never proposed are never taken for approvals of his own.
    assert isinstance(verdict, AuditMismatch) or verdict == []


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
        responder.check_proposal(proposal, NOW)
    assert not responder.state.open
