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
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple, TypeVar

import blake3
import msgspec

from earendil_py.core.accounting import MAX_CLOCK_SKEW_SECS
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
from earendil_py.core.signed import sign, signed_part, verify_signed

# v2: the signed part is the struct with its signature emptied (core/signed.py).
SETTLEMENT_DOMAIN = b"earendil_py settlement v2"
REJECTION_DOMAIN = b"earendil_py settlement rejection v2"
# Keyed BLAKE3 separates attestation hashes from every other BLAKE3 use in the project.
ATTESTATION_HASH_KEY = b"earendil_py settlement attest v2"
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

PROPOSER_SIGNATURE = "proposer_signature"  # the Proposal field its proposer's signature is in

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
        """What both the proposer and the responder sign (under SETTLEMENT_DOMAIN): the
        proposal with its signature emptied."""
        return signed_part(self, PROPOSER_SIGNATURE)

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
        bytes(64),  # emptied when signed
    )
    if problem := unsigned._shape_problem():
        raise LocalProtocolError(f"cannot propose this settlement: {problem}")
    return sign(identity, SETTLEMENT_DOMAIN, unsigned, PROPOSER_SIGNATURE)


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


def make_rejection(identity: Identity, proposal: Proposal, reason: str, now: int) -> Rejection:
    unsigned = Rejection(
        proposal.settlement_id,
        proposal.proposer,
        proposal.responder,
        proposal.proposer_signature,
        reason,
        now,
        b"",
    )
    return sign(identity, REJECTION_DOMAIN, unsigned)


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
    verify_signed(responder_public, REJECTION_DOMAIN, rejection)


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
    """A settlement as one side sees it. `TRANSITIONS` is the table of its moves."""

    PENDING = "pending"  # proposed, no answer yet
    # The mutual-credit name for the responder's act. Never stored: approving signs the
    # attestation and completes the responder's record in one step, and the proposer
    # completes on receipt of it, so no record ever waits in between.
    APPROVED = "approved"
    COMPLETED = "completed"  # attested by both; applied to the accounts exactly once
    REJECTED = "rejected"
    CANCELED = "canceled"  # proposer: asked to cancel (open until answered); responder: done
    EXPIRED = "expired"


class Step(enum.StrEnum):
    """What moves a record. The responder acts (`RECEIVE`, `APPROVE`, `REJECT`, `CANCEL` on
    the proposer's request, `EXPIRE` at its deadline); the proposer acts (`PROPOSE`, `CANCEL`
    as a request, `EXPIRE` when it gives up) and learns the responder's answer (`APPROVED`,
    or a rejection by its reason: `REJECTED`, `CANCELED`, `EXPIRED`)."""

    PROPOSE = "propose"
    RECEIVE = "receive"
    APPROVE = "approve"
    REJECT = "reject"
    CANCEL = "cancel"
    EXPIRE = "expire"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELED = "canceled"
    EXPIRED = "expired"


PENDING = SettlementState.PENDING
COMPLETED = SettlementState.COMPLETED
REJECTED = SettlementState.REJECTED
CANCELED = SettlementState.CANCELED
EXPIRED = SettlementState.EXPIRED

# The state machine, written once: (role, state before or None for a new record, step) ->
# state after. docs/settlement.md has the same table. Anything not in it is our own misuse
# (LocalProtocolError); a peer's input is checked before it can reach a step.
_AWAITING_ANSWER = (PENDING, CANCELED, EXPIRED)  # a proposer takes the responder's word late
TRANSITIONS: dict[tuple[Role, SettlementState | None, Step], SettlementState] = {
    ("proposer", None, Step.PROPOSE): PENDING,
    ("proposer", PENDING, Step.CANCEL): CANCELED,  # a request: open until answered
    ("proposer", PENDING, Step.EXPIRE): EXPIRED,  # no answer by expires_at + grace
    ("proposer", CANCELED, Step.EXPIRE): EXPIRED,
    **{("proposer", s, Step.APPROVED): COMPLETED for s in _AWAITING_ANSWER},
    **{("proposer", s, Step.REJECTED): REJECTED for s in _AWAITING_ANSWER},
    **{("proposer", s, Step.CANCELED): CANCELED for s in _AWAITING_ANSWER},
    **{("proposer", s, Step.EXPIRED): EXPIRED for s in _AWAITING_ANSWER},
    ("responder", None, Step.RECEIVE): PENDING,
    ("responder", PENDING, Step.APPROVE): COMPLETED,
    ("responder", PENDING, Step.REJECT): REJECTED,
    ("responder", PENDING, Step.CANCEL): CANCELED,
    ("responder", PENDING, Step.EXPIRE): EXPIRED,
}
# The rejection reasons the book writes itself, and the step each is for either side.
_REASON_STEPS = {"canceled": Step.CANCELED, "expired": Step.EXPIRED}
_RESPONDER_REASONS = {"canceled": Step.CANCEL, "expired": Step.EXPIRE}

# Finished records kept in memory per neighbour, and completed attestations (the tail of the
# chain): enough to answer a retransmission or a late status question, to take a late
# approval of a proposal we gave up on, and to serve an audit of a neighbour that lags by a
# settlement or two. Older ones are only in the ledger.
RECENT = 8


class SettlementRecord(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
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

    @property
    def settlement_id(self) -> bytes:
        return self.proposal.settlement_id

    def is_open(self, now: int) -> bool:
        """In flight: unanswered and not past its deadline. Blocks any other settlement."""
        return self.state in (PENDING, CANCELED) and self.answer is None and now < self.expires_at

    @classmethod
    def new(
        cls, proposal: Proposal, role: Role, step: Step, *, created_at: int, expires_at: int
    ) -> SettlementRecord:
        """A record that `step` creates, by `TRANSITIONS`."""
        state = TRANSITIONS.get((role, None, step))
        if state is None:
            raise LocalProtocolError(f"a {role} record is not created by {step}")
        return cls(proposal, role, state, created_at, expires_at)

    def step(self, step: Step, **changes: object) -> SettlementRecord:
        """This record after `step` (and `changes`), by `TRANSITIONS`. Raises
        LocalProtocolError for a step the table does not allow from here."""
        state = TRANSITIONS.get((self.role, self.state, step))
        if state is None:
            raise LocalProtocolError(
                f"settlement {self.proposal.id_hex} ({self.role}) is {self.state}: cannot {step}"
            )
        return msgspec.structs.replace(self, state=state, **changes)


class BookState(msgspec.Struct, forbid_unknown_fields=True):
    """A book's state: the head of the chain and what is kept in memory. Bounded: the open
    records (one at most, see the module docstring) and the RECENT newest finished records
    and completed attestations; older ones live only in the ledger."""

    neighbor: bytes
    head: bytes = GENESIS  # hash of the last completed attestation
    completed: int = 0  # attestations in the chain
    chain: list[Attestation] = msgspec.field(default_factory=list)  # the newest, oldest first
    open: dict[str, SettlementRecord] = msgspec.field(default_factory=dict)  # by id hex
    finished: dict[str, SettlementRecord] = msgspec.field(default_factory=dict)  # oldest first
    # The finished records no longer kept, counted by (method, role, state); a method that is
    # not one of METHODS counts as "other".
    tally: dict[tuple[str, str, str], int] = msgspec.field(default_factory=dict)

    def copy(self) -> BookState:
        """A copy to work on: records and attestations are immutable, so new containers do."""
        return msgspec.structs.replace(
            self,
            chain=list(self.chain),
            open=dict(self.open),
            finished=dict(self.finished),
            tally=dict(self.tally),
        )

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Every settlement with the neighbour, kept or not, by (method, role, state)."""
        counts = dict(self.tally)
        for record in (*self.finished.values(), *self.open.values()):
            key = _tally_key(record)
            counts[key] = counts.get(key, 0) + 1
        return counts


def _tally_key(record: SettlementRecord) -> tuple[str, str, str]:
    method = record.proposal.method
    return (method if method in METHODS else "other", record.role, str(record.state))


@dataclass(frozen=True, slots=True)
class AuditMismatch:
    """Where the neighbour's settlement chain and ours part.

    `reason`: "broken_chain" (their page does not chain from our head, or does not reach
    their head), "bad_signature" / "wrong_party" / "malformed_settlement" (an attestation in
    it does not verify), "extra" (they have an attestation after our head that answers no
    proposal of ours: we lost it), "diverged" (their head is neither ours nor one we passed
    recently). `index` counts the page's attestations.
    """

    reason: str
    index: int
    detail: str


class SettlementBook:
    """Settlements with one neighbour, as one side sees them, over `state`. See the module
    docstring. Every method changes `state` in place (give it a copy to keep the original)
    and returns the record it moved; the caller persists the move before sending anything.
    """

    __slots__ = ("identity", "me", "neighbor", "neighbor_public", "state")

    def __init__(self, identity: Identity, neighbor_public: bytes, state: BookState) -> None:
        if fingerprint_of(neighbor_public) != state.neighbor:
            raise LocalProtocolError("neighbor_public is not the book's neighbour's key")
        self.identity = identity
        self.me = identity.fingerprint
        self.neighbor = state.neighbor
        self.neighbor_public = neighbor_public
        self.state = state

    # --- queries ------------------------------------------------------------------------

    @property
    def head(self) -> bytes:
        return self.state.head

    def record(self, settlement_id: bytes) -> SettlementRecord | None:
        key = settlement_id.hex()
        return self.state.open.get(key) or self.state.finished.get(key)

    def in_flight(self, now: int) -> SettlementRecord | None:
        """The open settlement on this link, either way, if any (at most one)."""
        return next((r for r in self.state.open.values() if r.is_open(now)), None)

    def outgoing_open(self) -> SettlementRecord | None:
        """Our proposal still waiting for an answer (pending, or canceled by us), if any."""
        return next((r for r in self.state.open.values() if r.role == "proposer"), None)

    def deadline(self) -> int | None:
        """When the first open record passes its deadline (for `expire`)."""
        return min((r.expires_at for r in self.state.open.values()), default=None)

    def heads(self) -> list[bytes]:
        """Our recent heads, oldest first, ending with the current one."""
        chain = self.state.chain
        if not chain:
            return [self.state.head]
        return [chain[0].proposal.previous, *map(attestation_hash, chain)]

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
    ) -> SettlementRecord:
        """A new signed proposal at our head, recorded PENDING; persist before sending.

        `reduce_mine_umel` is what we pay (our debt goes down), `reduce_theirs_umel` what we
        waive of theirs. Raises LocalProtocolError if a settlement is already in flight on
        this link, the id is not new, or the proposal would be malformed.
        """
        if (busy := self.in_flight(now)) is not None:
            raise LocalProtocolError(f"settlement {busy.proposal.id_hex} is in flight")
        if self.record(settlement_id) is not None:
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
        record = SettlementRecord.new(
            proposal,
            "proposer",
            Step.PROPOSE,
            created_at=now,
            expires_at=proposal.expires_at + EXPIRY_GRACE_SECS,
        )
        return self._store(record)

    def cancel(self, settlement_id: bytes) -> SettlementRecord:
        """Withdraw our PENDING proposal (the caller then asks the responder to cancel it).
        It stays open, blocking new settlements, until the responder answers — which may
        still be an approval — or its deadline passes. Raises LocalProtocolError unless it
        is our proposal and PENDING."""
        record = self.state.open.get(settlement_id.hex())
        if record is None or record.role != "proposer":
            raise LocalProtocolError(f"no open proposal of ours with id {settlement_id.hex()}")
        return self._store(record.step(Step.CANCEL, reason="canceled"))

    def on_approved(self, attestation: Attestation) -> SettlementRecord | None:
        """The responder approved our proposal: complete it and move the head (apply its
        `reduction_for(me)` to the account). None if it was already completed.

        Completes a proposal we canceled or gave up on too: the responder is the authority.
        Raises RemoteProtocolError: "unknown_settlement" (not our proposal, or one too old to
        still be kept), "bad_signature", "conflicting_answer" (they already rejected it),
        "fork" (our head moved on meanwhile: the chains diverged, the operator must look).
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
        if record.state is COMPLETED:
            return None
        if record.rejection is not None:
            raise RemoteProtocolError("approval of a rejected settlement", "conflicting_answer")
        if record.proposal.previous != self.state.head:
            raise RemoteProtocolError("approved settlement no longer follows our head", "fork")
        return self.answered(record, attestation)

    def on_rejected(self, rejection: Rejection) -> SettlementRecord | None:
        """The responder refused our proposal. None if we already knew its answer.
        Raises RemoteProtocolError: "unknown_settlement", "wrong_settlement",
        "bad_signature", "conflicting_answer" (we hold its attestation)."""
        record = self._outgoing(rejection.settlement_id)
        verify_rejection(rejection, record.proposal, self.neighbor_public)
        if record.state is COMPLETED:
            raise RemoteProtocolError("rejection of a completed settlement", "conflicting_answer")
        if record.rejection is not None:
            return None
        return self.answered(record, rejection)

    # --- responder side -----------------------------------------------------------------

    def check_proposal(self, proposal: Proposal, now: int) -> SettlementRecord | Rejection | None:
        """Judge the neighbour's proposal before taking it in. Returns the record we already
        hold for it (a retransmission: answer it again, applied once), a signed refusal that
        changes nothing and is not recorded ("expired", "stale_head" if it does not follow
        our head, "settlement_in_flight" if one is open already), or None: a new proposal
        that `receive` may open. A proposer that lost our refusal asks again and is judged
        again; one that got it never sends the proposal again.

        Raises RemoteProtocolError, recording nothing: "malformed_settlement", "wrong_party",
        "bad_signature", "settlement_id_reused" (a different proposal under a known id),
        "stale_settlement" (timestamp further than MAX_CLOCK_SKEW_SECS from `now`).
        """
        proposal.check_shape()
        if proposal.proposer != self.neighbor or proposal.responder != self.me:
            raise RemoteProtocolError("settlement between other parties", "wrong_party")
        verify_signed(self.neighbor_public, SETTLEMENT_DOMAIN, proposal, PROPOSER_SIGNATURE)
        known = self.record(proposal.settlement_id)
        if known is not None:
            if known.proposal != proposal:
                raise RemoteProtocolError("settlement id reused", "settlement_id_reused")
            return known
        if abs(proposal.timestamp - now) > MAX_CLOCK_SKEW_SECS:
            raise RemoteProtocolError("settlement timestamp too far off", "stale_settlement")
        if now >= proposal.expires_at:
            return make_rejection(self.identity, proposal, "expired", now)
        if proposal.previous != self.state.head:
            return make_rejection(self.identity, proposal, "stale_head", now)
        if self.in_flight(now) is not None:
            return make_rejection(self.identity, proposal, "settlement_in_flight", now)
        return None

    def receive(self, proposal: Proposal, now: int, *, expiry_secs: int) -> SettlementRecord:
        """Open a proposal `check_proposal` found new: PENDING until `approve`, `reject`,
        `on_cancel` or its deadline, `min(proposal.expires_at, now + expiry_secs)`."""
        if expiry_secs <= 0:
            raise LocalProtocolError("expiry_secs must be positive")
        record = SettlementRecord.new(
            proposal,
            "responder",
            Step.RECEIVE,
            created_at=now,
            expires_at=min(proposal.expires_at, now + expiry_secs),
        )
        return self._store(record)

    def approve(self, settlement_id: bytes, now: int) -> SettlementRecord:
        """Approve a PENDING incoming proposal: sign the attestation, complete the record and
        move the head (apply its `reduction_for(me)` to the account). If it expired meanwhile
        or no longer follows our head it is refused instead ("expired", "stale_head"): the
        returned record holds the answer to send. Raises LocalProtocolError unless it is an
        incoming proposal still PENDING."""
        record = self._incoming(settlement_id)
        if now >= record.expires_at:
            return self._refuse(record, "expired", now)
        if record.proposal.previous != self.state.head:
            return self._refuse(record, "stale_head", now)
        proposal = record.proposal
        attestation = Attestation(
            proposal, self.identity.sign(SETTLEMENT_DOMAIN, proposal.signed_part())
        )
        return self.answered(record, attestation)

    def reject(self, settlement_id: bytes, reason: str, now: int) -> SettlementRecord:
        """Refuse a PENDING incoming proposal with a snake_case `reason` (1..64 characters;
        not "canceled" or "expired", which the book uses itself). Raises LocalProtocolError
        unless it is an incoming proposal still PENDING."""
        if not 0 < len(reason) <= 64 or reason in _REASON_STEPS:
            raise LocalProtocolError(f"invalid rejection reason {reason!r}")
        return self._refuse(self._incoming(settlement_id), reason, now)

    def on_cancel(self, settlement_id: bytes, now: int) -> SettlementRecord:
        """The proposer asks to cancel its proposal. Returns the record with our answer, which
        is final: a "canceled" rejection if it was still PENDING, else what we answered
        before (changing nothing). Raises RemoteProtocolError("unknown_settlement") for an id
        the neighbour never proposed, or one we no longer keep."""
        record = self.record(settlement_id)
        if record is None or record.role != "responder":
            raise RemoteProtocolError("cancel of an unknown settlement", "unknown_settlement")
        if record.state is PENDING:
            return self._refuse(record, "expired" if now >= record.expires_at else "canceled", now)
        return record

    # --- both sides ---------------------------------------------------------------------

    def expire(self, now: int) -> list[SettlementRecord]:
        """Move every open record past its deadline to EXPIRED and return them. An incoming
        one gets a signed "expired" rejection (send it); an outgoing one only expires
        `EXPIRY_GRACE_SECS` after its proposal's `expires_at`, and a late approval would
        still complete it."""
        moved = []
        for record in list(self.state.open.values()):
            if now < record.expires_at:
                continue
            if record.role == "responder":
                moved.append(self._refuse(record, "expired", now))
            else:
                moved.append(self._store(record.step(Step.EXPIRE, reason="expired")))
        return moved

    def answered(
        self, record: SettlementRecord, answer: Attestation | Rejection
    ) -> SettlementRecord:
        """`record` with the responder's `answer`, whichever side we are: the one place a
        record takes its final answer, live and when replaying the ledger."""
        if isinstance(answer, Attestation):
            step = Step.APPROVE if record.role == "responder" else Step.APPROVED
            done = record.step(step, reason="", attestation=answer)
        elif record.role == "responder":
            step = _RESPONDER_REASONS.get(answer.reason, Step.REJECT)
            done = record.step(step, reason=answer.reason, rejection=answer)
        else:
            step = _REASON_STEPS.get(answer.reason, Step.REJECTED)
            done = record.step(step, reason=answer.reason, rejection=answer)
        return self._store(done)

    def restore(self, record: SettlementRecord) -> SettlementRecord:
        """Put a record read back from the ledger in its place (replay)."""
        return self._store(record)

    # --- audit --------------------------------------------------------------------------

    def audit_page(self, since: bytes) -> AuditPage | None:
        """The answer to a neighbour's audit request: our head and our attestations after
        `since`, oldest first (at most AUDIT_PAGE_BYTES of msgpack, always at least one, and
        MAX_AUDIT_PAGE_ATTESTATIONS); None if `since` is not one of our recent heads."""
        heads = self.heads()
        if since not in heads:
            return None
        page: list[Attestation] = []
        size = 0
        for attestation in self.state.chain[heads.index(since) :]:
            size += len(_encoder.encode(attestation))
            if page and (size > AUDIT_PAGE_BYTES or len(page) >= MAX_AUDIT_PAGE_ATTESTATIONS):
                break
            page.append(attestation)
        return AuditPage(since, self.state.head, page)

    def judge_audit(self, page: AuditPage, since: bytes) -> list[Attestation] | AuditMismatch:
        """Judge the neighbour's answer to our audit from our head `since`. Returns the
        attestations they have after it — each completes a proposal of ours they approved
        and we had not heard of yet (feed them to `on_approved`, in order; a partial page
        then asks again from the new head) — or where our chains part. Never raises on their
        data."""
        try:
            if page.since != since:
                raise RemoteProtocolError("audit page from another head", "broken_chain")
            end = verify_chain(page.attestations, start=since)
        except RemoteProtocolError as exc:
            return AuditMismatch("broken_chain", 0, str(exc))
        if not page.attestations and end != page.head:
            return AuditMismatch("broken_chain", 0, "empty page that does not reach their head")
        publics = {self.me: self.identity.identity_public, self.neighbor: self.neighbor_public}
        for index, attestation in enumerate(page.attestations):
            proposal = attestation.proposal
            if {proposal.proposer, proposal.responder} != publics.keys():
                return AuditMismatch("wrong_party", index, "attestation between other parties")
            try:
                attestation.verify(publics[proposal.proposer], publics[proposal.responder])
            except RemoteProtocolError as exc:
                return AuditMismatch(exc.reason, index, str(exc))
            record = self.record(proposal.settlement_id)
            if (
                record is None
                or record.role != "proposer"
                or record.answer is not None
                or record.proposal != proposal
            ):
                return AuditMismatch("extra", index, f"they have settlement {proposal.id_hex}")
        return list(page.attestations)

    def judge_unknown_since(self, their_head: bytes) -> AuditMismatch | None:
        """The neighbour does not know our head. None if theirs is one we passed recently
        (they lag: they will learn the rest as proposers, or find it themselves), else where
        the chains part."""
        if their_head in self.heads():
            return None
        return AuditMismatch("diverged", 0, f"their head {their_head.hex()[:16]} is not ours")

    # --- internals ----------------------------------------------------------------------

    def _store(self, record: SettlementRecord) -> SettlementRecord:
        """Put `record` where it belongs: open while unanswered and PENDING or CANCELED, else
        among the finished (the RECENT newest), moving the head if it completed."""
        state, key = self.state, record.proposal.id_hex
        if record.state in (PENDING, CANCELED) and record.answer is None:
            state.finished.pop(key, None)
            state.open[key] = record
            return record
        state.open.pop(key, None)
        state.finished.pop(key, None)
        state.finished[key] = record
        while len(state.finished) > RECENT:
            counted = _tally_key(state.finished.pop(next(iter(state.finished))))
            state.tally[counted] = state.tally.get(counted, 0) + 1
        if record.state is COMPLETED and record.attestation is not None:
            attestation = record.attestation
            if attestation.proposal.previous == state.head:
                state.head = attestation_hash(attestation)
                state.completed += 1
                state.chain.append(attestation)
                del state.chain[:-RECENT]
        return record

    def _refuse(self, record: SettlementRecord, reason: str, now: int) -> SettlementRecord:
        return self.answered(record, make_rejection(self.identity, record.proposal, reason, now))

    def _outgoing(self, settlement_id: bytes) -> SettlementRecord:
        record = self.record(settlement_id)
        if record is None or record.role != "proposer":
            raise RemoteProtocolError("answer to no proposal of ours", "unknown_settlement")
        return record

    def _incoming(self, settlement_id: bytes) -> SettlementRecord:
        record = self.state.open.get(settlement_id.hex())
        if record is None or record.role != "responder":
            raise LocalProtocolError(f"no open incoming proposal with id {settlement_id.hex()}")
        return record
