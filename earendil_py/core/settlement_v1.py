"""Settlements between two neighbours: signed proposals, co-signed attestations, the book.

Two neighbours are `left` and `right`, left being the lexicographically smaller fingerprint.
A settlement reduces the debt left owes right by `reduce_left_umel` and the debt right owes
left by `reduce_right_umel`; the difference, `net_umel`, is what actually changes hands (by
proof of work or out of band), in `direction` "left_pays", "right_pays" or "none".

The proposer signs a `Proposal`; the responder, if it approves, signs *the same bytes* under
the same domain, which makes the `Attestation` (proposal + responder signature) the record
both sides keep. Attestations form a hash chain per link: each proposal names in `previous`
the hash of the last attestation completed between the two (`GENESIS` at first), and that
hash is the link's settlement *head*. A responder only approves a proposal whose `previous`
is its own head, so both sides' chains stay equal and any divergence shows as a "stale_head"
rejection or in the audit, never as a silent fork.

**The responder is the authority** on a proposal's fate: its attestation (approved) or its
signed `Rejection` (rejected, canceled, expired) is final, and a proposer's own cancel or
timeout never overrides it. To keep the chain linear, a side never has two settlements in
flight on a link: it proposes nothing, and rejects every incoming proposal with
"settlement_in_flight", while one is open either way. A proposer's record stays open until
the responder answers or until `expires_at + EXPIRY_GRACE_SECS`, after which no honest
responder can still approve it (it refuses at `expires_at` by its own clock, and clocks are
assumed within MAX_CLOCK_SKEW_SECS). docs/settlement.md has the states and transitions.

Pure: `now` is integer unix seconds, given by the caller. Nothing bytes from a peer can reach
raises anything but RemoteProtocolError.

The pre-`Neighbor` version, kept only for runtime/accounting.py and runtime/settlement.py
until the neighbour service replaces them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple, TypeVar

import blake3
import msgspec

from earendil_py.core.accounting_v1 import MAX_CLOCK_SKEW_SECS
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError, decode_remote
from earendil_py.core.identity import (
    MAX_UINT,
    Fingerprint,
    Identity,
    Signature,
    Uint,
    fingerprint_of,
    verify,
)
from earendil_py.core.ledger import GENESIS

SETTLEMENT_DOMAIN = b"earendil_py settlement v1"
REJECTION_DOMAIN = b"earendil_py settlement rejection v1"
# Keyed BLAKE3 separates attestation hashes from every other BLAKE3 use in the project.
ATTESTATION_HASH_KEY = b"earendil_py settlement attest v1"
assert len(ATTESTATION_HASH_KEY) == 32

SETTLEMENT_ID_SIZE = 16
HASH_SIZE = 32
MAX_PROOF_SIZE = 1024
# A proposal lives at most this long (its signed `expires_at`); a manual one waits for an
# operator, and while it is open no other settlement can start on the link.
MAX_EXPIRY_SECS = 7 * 24 * 3600
# How long past `expires_at` a proposer keeps its unanswered proposal open: the responder
# stops approving at `expires_at` by its clock, which may be MAX_CLOCK_SKEW_SECS behind ours.
EXPIRY_GRACE_SECS = 2 * MAX_CLOCK_SKEW_SECS
# An audit page is at most this much msgpack, so it fits one RPC payload even as base64.
AUDIT_PAGE_BYTES = 8_000
MAX_AUDIT_PAGE_ATTESTATIONS = 64

METHOD_MANUAL = "manual"
METHOD_POW = "pow"
METHODS = frozenset({METHOD_MANUAL, METHOD_POW})

LEFT_PAYS = "left_pays"
RIGHT_PAYS = "right_pays"
NO_PAYMENT = "none"

SettlementId = Annotated[
    bytes, msgspec.Meta(min_length=SETTLEMENT_ID_SIZE, max_length=SETTLEMENT_ID_SIZE)
]
Digest = Annotated[bytes, msgspec.Meta(min_length=HASH_SIZE, max_length=HASH_SIZE)]
Proof = Annotated[bytes, msgspec.Meta(max_length=MAX_PROOF_SIZE)]
MethodName = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
RejectReason = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Direction = Literal["left_pays", "right_pays", "none"]
Role = Literal["proposer", "responder"]

_T = TypeVar("_T")
_encoder = msgspec.msgpack.Encoder()


class Reduction(NamedTuple):
    """What a completed settlement does to one side's account, in `Account.settle` order:
    `account.settle(*reduction)`."""

    paid_in_umel: int  # the neighbour's debt to us goes down by this
    paid_out_umel: int  # our debt to the neighbour goes down by this


class Proposal(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """`start_settlement`: the proposer's signed offer to settle. See the module docstring."""

    settlement_id: SettlementId
    proposer: Fingerprint
    responder: Fingerprint
    left: Fingerprint
    right: Fingerprint
    reduce_left_umel: Uint  # debt owed by left to right goes down by this
    reduce_right_umel: Uint  # debt owed by right to left goes down by this
    net_umel: Uint
    direction: Direction
    method: MethodName
    proof: Proof  # method-specific: a pow.PowProof for "pow", free-form for "manual"
    previous: Digest  # the settlement head both sides must be at
    proposer_ledger_head: Digest  # the proposer's ledger head for this link (a pin)
    timestamp: Uint
    expires_at: Uint  # the responder refuses to approve at or after this
    proposer_signature: Signature

    def signed_part(self) -> bytes:
        """What both the proposer and the responder sign (under SETTLEMENT_DOMAIN)."""
        return _encoder.encode(
            (
                self.settlement_id,
                self.proposer,
                self.responder,
                self.left,
                self.right,
                self.reduce_left_umel,
                self.reduce_right_umel,
                self.net_umel,
                self.direction,
                self.method,
                self.proof,
                self.previous,
                self.proposer_ledger_head,
                self.timestamp,
                self.expires_at,
            )
        )

    @property
    def id_hex(self) -> str:
        return self.settlement_id.hex()

    @property
    def payer(self) -> bytes | None:
        """Who hands over `net_umel`; None when the reductions cancel out."""
        if self.direction == LEFT_PAYS:
            return self.left
        if self.direction == RIGHT_PAYS:
            return self.right
        return None

    def check_shape(self) -> None:
        """Raises RemoteProtocolError("malformed_settlement") unless the proposal is
        internally consistent (signatures are checked elsewhere)."""
        problem = self._shape_problem()
        if problem:
            raise RemoteProtocolError(f"malformed settlement: {problem}", "malformed_settlement")

    def _shape_problem(self) -> str:
        # msgspec checks the Meta constraints on decode only; repeat them for proposals
        # built in memory.
        if len(self.settlement_id) != SETTLEMENT_ID_SIZE:
            return "settlement id is not 16 bytes"
        fields = (self.proposer, self.responder, self.left, self.right)
        if any(len(f) != HASH_SIZE for f in (*fields, self.previous, self.proposer_ledger_head)):
            return "a fingerprint or hash is not 32 bytes"
        if len(self.proof) > MAX_PROOF_SIZE or len(self.proposer_signature) != 64:
            return "proof too large or signature malformed"
        amounts = (self.reduce_left_umel, self.reduce_right_umel, self.net_umel)
        if not all(0 <= n <= MAX_UINT for n in (*amounts, self.timestamp, self.expires_at)):
            return "an integer is out of range"
        if not self.left < self.right:
            return "left must sort before right"
        if (self.proposer, self.responder) not in (
            (self.left, self.right),
            (self.right, self.left),
        ):
            return "proposer and responder are not left and right"
        if self.reduce_left_umel == self.reduce_right_umel == 0:
            return "settles nothing"
        if (self.net_umel, self.direction) != _net(self.reduce_left_umel, self.reduce_right_umel):
            return "net amount or direction does not match the reductions"
        if self.method not in METHODS:
            return f"unknown method {self.method[:32]!r}"
        if not self.timestamp < self.expires_at <= self.timestamp + MAX_EXPIRY_SECS:
            return "expires_at is not within MAX_EXPIRY_SECS after timestamp"
        if self.method == METHOD_POW and (self.payer != self.proposer or not self.proof):
            return "a pow settlement is paid by the proposer, with a proof"
        return ""

    def reduction_for(self, fingerprint: bytes) -> Reduction:
        """(paid_in_umel, paid_out_umel) from `fingerprint`'s side: `Account.settle` order.

        Reductions are applied gross, never netted: left's debt to right goes down by
        `reduce_left_umel` and right's debt to left by `reduce_right_umel`.
        """
        if fingerprint == self.left:
            return Reduction(self.reduce_right_umel, self.reduce_left_umel)
        if fingerprint == self.right:
            return Reduction(self.reduce_left_umel, self.reduce_right_umel)
        raise LocalProtocolError("not a party to this settlement")


def _net(reduce_left_umel: int, reduce_right_umel: int) -> tuple[int, Direction]:
    if reduce_left_umel > reduce_right_umel:
        return reduce_left_umel - reduce_right_umel, "left_pays"
    if reduce_right_umel > reduce_left_umel:
        return reduce_right_umel - reduce_left_umel, "right_pays"
    return 0, "none"


def make_proposal(
    identity: Identity,
    neighbor: bytes,
    *,
    settlement_id: bytes,
    reduce_mine_umel: int,
    reduce_theirs_umel: int,
    method: str,
    proof: bytes,
    previous: bytes,
    ledger_head: bytes,
    now: int,
    expiry_secs: int,
) -> Proposal:
    """A signed proposal from us to `neighbor`.

    `reduce_mine_umel`: the debt we owe the neighbour goes down by this (we pay it);
    `reduce_theirs_umel`: the debt the neighbour owes us goes down by this. Raises
    LocalProtocolError if the result would be malformed.
    """
    me = identity.fingerprint
    left, right = sorted((me, neighbor))
    if me == left:
        reduce_left, reduce_right = reduce_mine_umel, reduce_theirs_umel
    else:
        reduce_left, reduce_right = reduce_theirs_umel, reduce_mine_umel
    if reduce_left < 0 or reduce_right < 0 or not 0 < expiry_secs <= MAX_EXPIRY_SECS:
        raise LocalProtocolError("settlement amounts are never negative; expiry is 1..7 days")
    net, direction = _net(reduce_left, reduce_right)
    unsigned = Proposal(
        settlement_id,
        me,
        neighbor,
        left,
        right,
        reduce_left,
        reduce_right,
        net,
        direction,
        method,
        proof,
        previous,
        ledger_head,
        now,
        now + expiry_secs,
        bytes(64),
    )
    if problem := unsigned._shape_problem():
        raise LocalProtocolError(f"cannot propose this settlement: {problem}")
    return msgspec.structs.replace(
        unsigned, proposer_signature=identity.sign(SETTLEMENT_DOMAIN, unsigned.signed_part())
    )


class Attestation(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A completed settlement: the proposal and the responder's signature over the very bytes
    the proposer signed. The record both sides keep and chain."""

    proposal: Proposal
    responder_signature: Signature

    def verify(self, proposer_public: bytes, responder_public: bytes) -> None:
        """Raises RemoteProtocolError unless the proposal is well formed, the keys are those
        of its proposer and responder ("wrong_party"), and both signed it ("bad_signature")."""
        proposal = self.proposal
        proposal.check_shape()
        if (fingerprint_of(proposer_public), fingerprint_of(responder_public)) != (
            proposal.proposer,
            proposal.responder,
        ):
            raise RemoteProtocolError("attestation between other parties", "wrong_party")
        signed = proposal.signed_part()
        verify(proposer_public, SETTLEMENT_DOMAIN, signed, proposal.proposer_signature)
        verify(responder_public, SETTLEMENT_DOMAIN, signed, self.responder_signature)


def attestation_hash(attestation: Attestation) -> bytes:
    """The chain hash of an attestation: the next proposal's `previous`. It covers the signed
    part and both signatures (fixed width, last, so the encoding is injective)."""
    return blake3.blake3(
        attestation.proposal.signed_part()
        + attestation.proposal.proposer_signature
        + attestation.responder_signature,
        key=ATTESTATION_HASH_KEY,
    ).digest()


def verify_chain(attestations: Iterable[Attestation], *, start: bytes = GENESIS) -> bytes:
    """The head after `attestations`, in order, starting from head `start`.

    The head is the hash of the last attestation (`start` for none); each proposal's
    `previous` must be the hash of the one before. Checks linkage only: verify signatures
    with `Attestation.verify`. Raises RemoteProtocolError("fork") at the first break.
    """
    head = start
    for index, attestation in enumerate(attestations):
        if attestation.proposal.previous != head:
            raise RemoteProtocolError(f"attestation {index} does not follow the head", "fork")
        head = attestation_hash(attestation)
    return head


class Rejection(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The responder's signed "no" to one exact proposal (pinned by its signature).
    `reason` "canceled" and "expired" mean what they say; any other is a rejection."""

    settlement_id: SettlementId
    proposer: Fingerprint
    responder: Fingerprint
    proposal_signature: Signature
    reason: RejectReason
    timestamp: Uint
    signature: Signature

    def signed_part(self) -> bytes:
        return _encoder.encode(
            (
                self.settlement_id,
                self.proposer,
                self.responder,
                self.proposal_signature,
                self.reason,
                self.timestamp,
            )
        )


def make_rejection(identity: Identity, proposal: Proposal, reason: str, now: int) -> Rejection:
    unsigned = Rejection(
        proposal.settlement_id,
        proposal.proposer,
        proposal.responder,
        proposal.proposer_signature,
        reason,
        now,
        bytes(64),
    )
    return msgspec.structs.replace(
        unsigned, signature=identity.sign(REJECTION_DOMAIN, unsigned.signed_part())
    )


def verify_rejection(rejection: Rejection, proposal: Proposal, responder_public: bytes) -> None:
    """Raises RemoteProtocolError unless `rejection` answers exactly `proposal`
    ("wrong_settlement"), with a reason ("malformed_settlement"), signed by its responder."""
    if (
        rejection.settlement_id,
        rejection.proposer,
        rejection.responder,
        rejection.proposal_signature,
    ) != (
        proposal.settlement_id,
        proposal.proposer,
        proposal.responder,
        proposal.proposer_signature,
    ):
        raise RemoteProtocolError("rejection of another proposal", "wrong_settlement")
    if not 0 < len(rejection.reason) <= 64:
        raise RemoteProtocolError("rejection without a reason", "malformed_settlement")
    verify(responder_public, REJECTION_DOMAIN, rejection.signed_part(), rejection.signature)


class AuditPage(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One answer to an audit request: the sender's `head` and its attestations after
    `since`, oldest first. A page ending before `head` is partial: ask again from its last
    attestation's hash."""

    since: Digest
    head: Digest
    attestations: Annotated[list[Attestation], msgspec.Meta(max_length=MAX_AUDIT_PAGE_ATTESTATIONS)]


SettlementMessage = Proposal | Attestation | Rejection | AuditPage

_proposal_decoder = msgspec.msgpack.Decoder(Proposal)
_attestation_decoder = msgspec.msgpack.Decoder(Attestation)
_rejection_decoder = msgspec.msgpack.Decoder(Rejection)
_audit_decoder = msgspec.msgpack.Decoder(AuditPage)


def encode(message: SettlementMessage) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder[_T], data: bytes) -> _T:
    return decode_remote(decoder, data, "bad settlement message", "malformed_settlement")


def decode_proposal(data: bytes) -> Proposal:
    """Raises RemoteProtocolError("malformed_settlement") for anything but a proposal."""
    return _decode(_proposal_decoder, data)


def decode_attestation(data: bytes) -> Attestation:
    """Raises RemoteProtocolError("malformed_settlement") for anything but an attestation."""
    return _decode(_attestation_decoder, data)


def decode_rejection(data: bytes) -> Rejection:
    """Raises RemoteProtocolError("malformed_settlement") for anything but a rejection."""
    return _decode(_rejection_decoder, data)


def decode_audit(data: bytes) -> AuditPage:
    """Raises RemoteProtocolError("malformed_settlement") for anything but an audit page."""
    return _decode(_audit_decoder, data)


# --- the book: one per neighbour, per side -------------------------------------------------


class SettlementState(enum.StrEnum):
    """A settlement as one side sees it. docs/settlement.md has the transition table."""

    PENDING = "pending"  # proposed, no answer yet
    # The mutual-credit name for the responder's act. Never stored: approving signs the
    # attestation and completes the responder's record in one step, and the proposer
    # completes on receipt of it, so no record ever waits in between.
    APPROVED = "approved"
    COMPLETED = "completed"  # attested by both; applied to the accounts exactly once
    REJECTED = "rejected"
    CANCELED = "canceled"  # proposer: asked to cancel (open until answered); responder: done
    EXPIRED = "expired"


class SettlementRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One settlement in the book. `expires_at` is when it stops being open: the responder's
    deadline for approving, or for the proposer the proposal's `expires_at` plus
    EXPIRY_GRACE_SECS. `rejection`/`attestation` is the responder's answer, once known."""

    proposal: Proposal
    role: Role
    state: SettlementState
    created_at: int
    expires_at: int
    reason: str = ""
    attestation: Attestation | None = None
    rejection: Rejection | None = None

    @property
    def answer(self) -> Attestation | Rejection | None:
        return self.attestation if self.attestation is not None else self.rejection

    def is_open(self, now: int) -> bool:
        """In flight: unanswered and not past its deadline. Blocks any other settlement."""
        return (
            self.state in (SettlementState.PENDING, SettlementState.CANCELED)
            and self.answer is None
            and now < self.expires_at
        )


class SettlementBookState(msgspec.Struct, forbid_unknown_fields=True):
    """Everything a book needs to resume after a restart (checkpoint it in the ledger).

    Every settlement id ever seen is kept, with its final state, so a retransmission gets the
    identical answer forever. Settlements are rare (one in flight per link, each a payment),
    so this grows by a few hundred bytes per settlement.
    """

    neighbor: bytes
    head: bytes = GENESIS  # hash of the last completed attestation
    completed: list[str] = msgspec.field(default_factory=list)  # ids (hex), chain order
    records: dict[str, SettlementRecord] = msgspec.field(default_factory=dict)  # by id hex


@dataclass(frozen=True, slots=True)
class SettlementCompleted:
    """Our proposal was approved: apply `reduction` to the account. `late` if we had
    already canceled it or given it up: the responder's approval wins all the same."""

    record: SettlementRecord
    reduction: Reduction
    late: bool


@dataclass(frozen=True, slots=True)
class SettlementRejected:
    """The responder refused our proposal (`record.state` REJECTED, CANCELED or EXPIRED)."""

    record: SettlementRecord


@dataclass(frozen=True, slots=True)
class AuditMismatch:
    """Where the neighbour's settlement chain and ours part.

    `reason`: "unknown_since" (we do not know the head the page starts from),
    "broken_chain" (their page does not chain from `since` or does not reach their head),
    "bad_signature" / "wrong_party" / "malformed_settlement" (an attestation in it does not
    verify),
    "altered" (at `index` they have another attestation than ours),
    "extra" (they have attestations after our head), "missing" (we have ones after theirs).
    `index` counts from the first attestation after `since`.
    """

    reason: str
    index: int
    detail: str


_REJECTION_STATES = {
    "canceled": SettlementState.CANCELED,
    "expired": SettlementState.EXPIRED,
}


class SettlementBook:
    """Settlements with one neighbour, as one side sees them. See the module docstring.

    Each method that changes the state returns what to send (a proposal, an attestation, a
    rejection) or an event; the caller persists `snapshot()` before sending it, and applies
    a completed settlement's `Reduction` to the `Account` in the same transaction.
    """

    __slots__ = ("_open", "identity", "me", "neighbor", "neighbor_public", "state")

    def __init__(
        self, identity: Identity, neighbor_public: bytes, state: SettlementBookState
    ) -> None:
        if fingerprint_of(neighbor_public) != state.neighbor:
            raise LocalProtocolError("neighbor_public is not the book's neighbour's key")
        self.identity = identity
        self.me = identity.fingerprint
        self.neighbor = state.neighbor
        self.neighbor_public = neighbor_public
        self.state = state
        # Ids of records that may still be open: checked instead of every record ever seen.
        self._open = {
            key
            for key, record in state.records.items()
            if record.state in (SettlementState.PENDING, SettlementState.CANCELED)
            and record.answer is None
        }

    # --- queries ------------------------------------------------------------------------

    @property
    def head(self) -> bytes:
        return self.state.head

    def record(self, settlement_id: bytes) -> SettlementRecord | None:
        return self.state.records.get(settlement_id.hex())

    def in_flight(self, now: int) -> SettlementRecord | None:
        """The open settlement on this link, either way, if any (at most one)."""
        for key in self._open:
            if self.state.records[key].is_open(now):
                return self.state.records[key]
        return None

    def outgoing_pending(self) -> SettlementRecord | None:
        """Our proposal still waiting for an answer, if any."""
        for key in self._open:
            record = self.state.records[key]
            if record.role == "proposer" and record.state is SettlementState.PENDING:
                return record
        return None

    def answer(self, settlement_id: bytes) -> Attestation | Rejection | None:
        """What we answered to an incoming proposal: sent again, identical, on retransmission."""
        record = self.record(settlement_id)
        return None if record is None or record.role != "responder" else record.answer

    def reduction(self, record: SettlementRecord) -> Reduction:
        """(paid_in_umel, paid_out_umel) of a COMPLETED record, for `Account.settle`."""
        if record.state is not SettlementState.COMPLETED:
            raise LocalProtocolError(f"settlement {record.proposal.id_hex} is {record.state}")
        return record.proposal.reduction_for(self.me)

    def snapshot(self) -> SettlementBookState:
        """A deep copy of the state, for a checkpoint."""
        return msgspec.msgpack.decode(msgspec.msgpack.encode(self.state), type=SettlementBookState)

    # --- proposer side ------------------------------------------------------------------

    def propose(
        self,
        *,
        settlement_id: bytes,
        reduce_mine_umel: int,
        reduce_theirs_umel: int,
        method: str,
        proof: bytes = b"",
        ledger_head: bytes,
        now: int,
        expiry_secs: int,
    ) -> Proposal:
        """A new signed proposal at our head, recorded PENDING; persist before sending.

        `reduce_mine_umel` is what we pay (our debt goes down), `reduce_theirs_umel` what we
        waive of theirs. Raises LocalProtocolError if a settlement is already in flight on
        this link, the id is not new, or the proposal would be malformed.
        """
        if (busy := self.in_flight(now)) is not None:
            raise LocalProtocolError(f"settlement {busy.proposal.id_hex} is in flight")
        if settlement_id.hex() in self.state.records:
            raise LocalProtocolError("settlement id already used")
        proposal = make_proposal(
            self.identity,
            self.neighbor,
            settlement_id=settlement_id,
            reduce_mine_umel=reduce_mine_umel,
            reduce_theirs_umel=reduce_theirs_umel,
            method=method,
            proof=proof,
            previous=self.state.head,
            ledger_head=ledger_head,
            now=now,
            expiry_secs=expiry_secs,
        )
        self._add(
            SettlementRecord(
                proposal,
                "proposer",
                SettlementState.PENDING,
                created_at=now,
                expires_at=proposal.expires_at + EXPIRY_GRACE_SECS,
            )
        )
        return proposal

    def on_approved(self, attestation: Attestation) -> SettlementCompleted | None:
        """The responder approved our proposal: complete it and move the head.

        Returns None if it was already completed (a duplicate). Completes a proposal we
        canceled or gave up on too (`late`): the responder is the authority. Raises
        RemoteProtocolError: "unknown_settlement" (not our proposal), "bad_signature",
        "conflicting_answer" (they already rejected it: kept as evidence), "fork" (our head
        moved on meanwhile: the chains diverged, the operator must look).
        """
        record = self._outgoing(attestation.proposal.settlement_id)
        if attestation.proposal != record.proposal:
            raise RemoteProtocolError("attestation of another proposal", "unknown_settlement")
        verify(
            self.neighbor_public,
            SETTLEMENT_DOMAIN,
            record.proposal.signed_part(),
            attestation.responder_signature,
        )
        if record.state is SettlementState.COMPLETED:
            return None
        if record.rejection is not None:
            raise RemoteProtocolError("approval of a rejected settlement", "conflicting_answer")
        if record.proposal.previous != self.state.head:
            raise RemoteProtocolError("approved settlement no longer follows our head", "fork")
        late = record.state is not SettlementState.PENDING
        self._complete(record, attestation)
        return SettlementCompleted(record, self.reduction(record), late)

    def on_rejected(self, rejection: Rejection) -> SettlementRejected | None:
        """The responder refused our proposal. None if we already knew its answer.
        Raises RemoteProtocolError: "unknown_settlement", "wrong_settlement",
        "bad_signature", "conflicting_answer" (we hold its attestation)."""
        record = self._outgoing(rejection.settlement_id)
        verify_rejection(rejection, record.proposal, self.neighbor_public)
        if record.state is SettlementState.COMPLETED:
            raise RemoteProtocolError("rejection of a completed settlement", "conflicting_answer")
        if record.rejection is not None:
            return None
        record.state = _REJECTION_STATES.get(rejection.reason, SettlementState.REJECTED)
        record.reason = rejection.reason
        record.rejection = rejection
        self._open.discard(record.proposal.id_hex)
        return SettlementRejected(record)

    def cancel(self, settlement_id: bytes) -> SettlementRecord:
        """Withdraw our PENDING proposal (the caller then asks the responder to cancel it).
        It stays open, blocking new settlements, until the responder answers — which may
        still be an approval — or its deadline passes. Raises LocalProtocolError unless
        it is our proposal and PENDING."""
        record = self._outgoing_local(settlement_id)
        if record.state is not SettlementState.PENDING:
            raise LocalProtocolError(f"settlement {record.proposal.id_hex} is {record.state}")
        record.state = SettlementState.CANCELED
        record.reason = "canceled"
        return record

    # --- responder side -----------------------------------------------------------------

    def receive(self, proposal: Proposal, now: int, *, expiry_secs: int) -> SettlementRecord:
        """Take the neighbour's proposal in. Returns its record: PENDING (wait for the
        operator, or check the proof, then `approve` or `reject`), or already answered
        (send `record.answer`).

        A proposal already seen returns its record unchanged: a retransmission gets the same
        answer and is applied once. A new one is recorded REJECTED with reason "stale_head"
        (it does not follow our head) or "settlement_in_flight" (one is open already), or
        EXPIRED. `expiry_secs` caps how long we leave it open. Raises RemoteProtocolError,
        recording nothing: "malformed_settlement", "wrong_party", "bad_signature",
        "settlement_id_reused" (a different proposal under a known id), "stale_settlement"
        (timestamp further than MAX_CLOCK_SKEW_SECS from `now`).
        """
        if expiry_secs <= 0:
            raise LocalProtocolError("expiry_secs must be positive")
        proposal.check_shape()
        if proposal.proposer != self.neighbor or proposal.responder != self.me:
            raise RemoteProtocolError("settlement between other parties", "wrong_party")
        verify(
            self.neighbor_public,
            SETTLEMENT_DOMAIN,
            proposal.signed_part(),
            proposal.proposer_signature,
        )
        known = self.state.records.get(proposal.id_hex)
        if known is not None:
            if known.proposal != proposal:
                raise RemoteProtocolError("settlement id reused", "settlement_id_reused")
            return known
        if abs(proposal.timestamp - now) > MAX_CLOCK_SKEW_SECS:
            raise RemoteProtocolError("settlement timestamp too far off", "stale_settlement")
        busy = self.in_flight(now)
        record = SettlementRecord(
            proposal,
            "responder",
            SettlementState.PENDING,
            created_at=now,
            expires_at=min(proposal.expires_at, now + expiry_secs),
        )
        self._add(record)
        if now >= proposal.expires_at:
            self._refuse(record, SettlementState.EXPIRED, "expired", now)
        elif proposal.previous != self.state.head:
            self._refuse(record, SettlementState.REJECTED, "stale_head", now)
        elif busy is not None:
            self._refuse(record, SettlementState.REJECTED, "settlement_in_flight", now)
        return record

    def approve(self, settlement_id: bytes, now: int) -> Attestation | Rejection:
        """Approve a PENDING incoming proposal: sign the attestation, complete the record and
        move the head (apply `reduction(record)` to the account). Returns the answer to send:
        the attestation, or a rejection if it expired meanwhile ("expired") or no longer
        follows our head ("stale_head"). Raises LocalProtocolError unless it is an incoming
        proposal still PENDING."""
        record = self._incoming(settlement_id)
        if record.state is not SettlementState.PENDING:
            raise LocalProtocolError(f"settlement {record.proposal.id_hex} is {record.state}")
        if now >= record.expires_at:
            return self._refuse(record, SettlementState.EXPIRED, "expired", now)
        if record.proposal.previous != self.state.head:
            return self._refuse(record, SettlementState.REJECTED, "stale_head", now)
        proposal = record.proposal
        attestation = Attestation(
            proposal, self.identity.sign(SETTLEMENT_DOMAIN, proposal.signed_part())
        )
        self._complete(record, attestation)
        return attestation

    def reject(self, settlement_id: bytes, reason: str, now: int) -> Rejection:
        """Refuse a PENDING incoming proposal with a snake_case `reason` (1..64 characters;
        not "canceled" or "expired", which the book uses itself). Raises LocalProtocolError
        unless it is an incoming proposal still PENDING."""
        if not 0 < len(reason) <= 64 or reason in _REJECTION_STATES:
            raise LocalProtocolError(f"invalid rejection reason {reason!r}")
        record = self._incoming(settlement_id)
        if record.state is not SettlementState.PENDING:
            raise LocalProtocolError(f"settlement {record.proposal.id_hex} is {record.state}")
        return self._refuse(record, SettlementState.REJECTED, reason, now)

    def on_cancel(self, settlement_id: bytes, now: int) -> Attestation | Rejection:
        """The proposer asks to cancel its proposal. Returns our answer, which is final: a
        "canceled" rejection if it was still PENDING, else what we answered before. Raises
        RemoteProtocolError("unknown_settlement") for an id the neighbour never proposed."""
        record = self.state.records.get(settlement_id.hex())
        if record is None or record.role != "responder":
            raise RemoteProtocolError("cancel of an unknown settlement", "unknown_settlement")
        if record.state is SettlementState.PENDING:
            if now >= record.expires_at:
                return self._refuse(record, SettlementState.EXPIRED, "expired", now)
            return self._refuse(record, SettlementState.CANCELED, "canceled", now)
        answer = record.answer
        assert answer is not None  # every non-PENDING incoming record holds its answer
        return answer

    # --- both sides ---------------------------------------------------------------------

    def expire(self, now: int) -> list[SettlementRecord]:
        """Move every PENDING record past its deadline to EXPIRED and return them. An incoming
        one gets a signed "expired" rejection (send it); an outgoing one only expires
        `EXPIRY_GRACE_SECS` after its proposal's `expires_at`, and a late approval would
        still complete it."""
        expired = []
        for key in list(self._open):
            record = self.state.records[key]
            if now < record.expires_at:
                continue
            if record.role == "responder":
                self._refuse(record, SettlementState.EXPIRED, "expired", now)
            else:
                if record.state is SettlementState.PENDING:
                    record.state = SettlementState.EXPIRED
                    record.reason = "expired"
                self._open.discard(key)
            if record.state is SettlementState.EXPIRED:
                expired.append(record)
        return expired

    # --- audit --------------------------------------------------------------------------

    def audit_since(
        self, previous_head: bytes, *, max_bytes: int = AUDIT_PAGE_BYTES
    ) -> list[Attestation] | None:
        """Our completed attestations after `previous_head`, oldest first, at most
        `max_bytes` of msgpack (always at least one) and MAX_AUDIT_PAGE_ATTESTATIONS.
        None if `previous_head` is not in our chain."""
        chain = self._chain()
        start = self._position(chain, previous_head)
        if start is None:
            return None
        page: list[Attestation] = []
        size = 0
        for attestation in chain[start:]:
            size += len(_encoder.encode(attestation))
            if page and (size > max_bytes or len(page) >= MAX_AUDIT_PAGE_ATTESTATIONS):
                break
            page.append(attestation)
        return page

    def audit_page(self, since: bytes) -> AuditPage | None:
        """The answer to a neighbour's audit request; None if `since` is unknown to us."""
        attestations = self.audit_since(since)
        return None if attestations is None else AuditPage(since, self.state.head, attestations)

    def verify_audit(
        self, their_head: bytes, attestations: Sequence[Attestation], *, since: bytes = GENESIS
    ) -> AuditMismatch | None:
        """Compare the neighbour's audit page (their head, their attestations after `since`)
        with our chain. None if they agree as far as the page goes (a partial page, ending
        before `their_head`, leaves the rest to the next page). Never raises on their data.
        """
        ours_all = self._chain()
        start = self._position(ours_all, since)
        if start is None:
            return AuditMismatch("unknown_since", 0, "we do not know the audit's start head")
        ours = ours_all[start:]
        try:
            end = verify_chain(attestations, start=since)
        except RemoteProtocolError as exc:
            return AuditMismatch("broken_chain", 0, str(exc))
        publics = {self.me: self.identity.identity_public, self.neighbor: self.neighbor_public}
        for index, attestation in enumerate(attestations):
            proposal = attestation.proposal
            if {proposal.proposer, proposal.responder} != publics.keys():
                return AuditMismatch("wrong_party", index, "attestation between other parties")
            try:
                attestation.verify(publics[proposal.proposer], publics[proposal.responder])
            except RemoteProtocolError as exc:
                return AuditMismatch(exc.reason, index, str(exc))
        complete = end == their_head
        if not complete and not attestations:
            return AuditMismatch("broken_chain", 0, "empty page that does not reach their head")
        for index, attestation in enumerate(attestations):
            if index >= len(ours):
                return AuditMismatch(
                    "extra", index, f"they have settlement {attestation.proposal.id_hex}"
                )
            if attestation != ours[index]:
                return AuditMismatch(
                    "altered",
                    index,
                    f"they have settlement {attestation.proposal.id_hex},"
                    f" we have {ours[index].proposal.id_hex}",
                )
        if complete and len(ours) > len(attestations):
            missing = ours[len(attestations)].proposal.id_hex
            return AuditMismatch("missing", len(attestations), f"they lack settlement {missing}")
        return None

    # --- internals ----------------------------------------------------------------------

    def _add(self, record: SettlementRecord) -> None:
        key = record.proposal.id_hex
        self.state.records[key] = record
        self._open.add(key)

    def _complete(self, record: SettlementRecord, attestation: Attestation) -> None:
        record.state = SettlementState.COMPLETED
        record.reason = ""
        record.attestation = attestation
        key = record.proposal.id_hex
        self.state.head = attestation_hash(attestation)
        self.state.completed.append(key)
        self._open.discard(key)

    def _refuse(
        self, record: SettlementRecord, state: SettlementState, reason: str, now: int
    ) -> Rejection:
        rejection = make_rejection(self.identity, record.proposal, reason, now)
        record.state = state
        record.reason = reason
        record.rejection = rejection
        self._open.discard(record.proposal.id_hex)
        return rejection

    def _outgoing(self, settlement_id: bytes) -> SettlementRecord:
        record = self.state.records.get(settlement_id.hex())
        if record is None or record.role != "proposer":
            raise RemoteProtocolError("answer to no proposal of ours", "unknown_settlement")
        return record

    def _outgoing_local(self, settlement_id: bytes) -> SettlementRecord:
        record = self.state.records.get(settlement_id.hex())
        if record is None or record.role != "proposer":
            raise LocalProtocolError(f"no proposal of ours with id {settlement_id.hex()}")
        return record

    def _incoming(self, settlement_id: bytes) -> SettlementRecord:
        record = self.state.records.get(settlement_id.hex())
        if record is None or record.role != "responder":
            raise LocalProtocolError(f"no incoming proposal with id {settlement_id.hex()}")
        return record

    def _chain(self) -> list[Attestation]:
        chain = []
        for key in self.state.completed:
            attestation = self.state.records[key].attestation
            assert attestation is not None
            chain.append(attestation)
        return chain

    @staticmethod
    def _position(chain: Sequence[Attestation], head: bytes) -> int | None:
        """Index just after the attestation whose hash is `head` (0 for GENESIS)."""
        if head == GENESIS:
            return 0
        for index in range(len(chain) - 1, -1, -1):  # recent heads are the usual question
            if attestation_hash(chain[index]) == head:
                return index + 1
        return None
