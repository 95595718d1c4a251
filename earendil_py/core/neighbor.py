"""One neighbour as one sans-IO state machine: prices, claims, limits, settlements, audits.

A `Neighbor` is to a neighbour's money what `core.link.Link` is to its link. It owns the
account (core/accounting.py), the settlement book (core/settlement.py) and the policy, and is
driven by the shell the same way: calls and replies from the neighbour in (`receive_call`,
`receive_reply`), the clock (`get_timer` / `handle_timer(now)`), the link (`on_link_up`,
`on_link_down`), the operator (`reprice`, `unfreeze`, `propose`, `cancel`, `decide`). The
relay loop only touches `counters` and `allowance()`, once per batch, and raises `refusing`
when it dropped the neighbour's packets.

**Effects.** Every method that may change something returns an `Effect`, computed on a copy of
the state: the ledger entries to write, the new state, the RPC calls to make, proof-of-work to
run, events to log, and for a call its reply. The shell commits the entries, then `apply`s
the effect, then sends and logs; an effect whose commit failed is dropped and leaves the
object exactly as it was, so memory, disk and the neighbour never disagree about a step. One
effect at a time: `apply` refuses an effect computed before another one was applied. The
packet counters are outside the copied state, so work done meanwhile never loses a packet.

**The ledger.** Each state change is one entry (and a few prunes). Entries that change the
account carry the whole account state (it is small and bounded: four offers and at most
MAX_EPOCHS epochs each way), settlement entries carry only the record or answer they add,
and `counts` entries the packet totals. `Neighbor.restore` rebuilds the object from the
entries alone: the newest account state, the settlements after it applied to it, the
settlement book replayed, the highest totals. Bodies of old claims and counts may be pruned:
the newest account state is always kept, and nothing before it is needed.

**The outbound lease.** Counts are written every few seconds, not per packet, so a crash
loses the last ones. Inbound, that only costs us (and the debtor's next claim gives them
back). Outbound, it would leave a claim that exceeds our counts unexplained, so the relay
loop sends nothing past a ceiling that a `counts` entry has already written. Every `counts`
entry tops the ceiling up to a lease beyond the count, so under steady traffic the periodic
ones (every `checkpoint_secs`) keep it ahead at no extra cost; a burst that uses half of it
first wakes the shell (`wake_mark`) for one more, twice the size (up to LEASE_GROWTH times
the policy's); a lease of which less than an eighth was used between two entries halves.
After an unclean stop we count the whole lease as sent: an upper bound, as our estimate
always is, that the neighbour's next claim corrects down.

**Wire format.** Calls are JSON-RPC (docs/rpc.md) between neighbours. Params and results are
one msgpack message each, base64 in an object: `{"msg": "<base64>"}`:

    method             params                   result
    push_price         PriceOffer               PriceAnswer
    push_debt          DebtClaim                DebtAck
    debt_limit         DebtLimitNotice          null
    pow_challenge      null                     PowChallenge (for the caller as payer)
    start_settlement   Proposal                 SettlementAnswer
    settlement_status  SettlementQuery          SettlementAnswer (of a proposal we received)
    cancel_settlement  SettlementQuery          SettlementAnswer (final)
    settlement_answer  SettlementAnswer         null (the responder's late answer)
    settlement_audit   AuditQuery               AuditPage

Refusals are JSON-RPC error REFUSED (1000) with the reason in `data`; UNKNOWN_SINCE (1002)
answers an audit from a head we do not know, with our head (hex) in `data`; undecodable params
are INVALID_PARAMS. Every input from the neighbour is parsed and checked before it changes
anything; a refused input is counted by reason in `statistics().refused`.

**What the neighbour does on each input.** `CALLS` and `REPLIES` dispatch them; the settlement
records move by `core.settlement.TRANSITIONS`. Any step that writes an entry also writes the
packet totals with it, if they moved. docs/accounting.md has the same table (a test compares
them), docs/settlement.md the same TRANSITIONS.

    input                    entries written                  calls made
    link up                  counts (a lease, if needed),     push_price; settlement_status
                             price_offer_sent (a new offer)   (our open proposal); audit
    wake: half the lease     counts (a higher lease)          -
    checkpoint tick          counts (if the totals moved)     -
    timer: claim due         claim_sent (if counts moved)     push_debt
    timer: offer unanswered  -                                push_price
    timer: poll              -                                settlement_status
    timer: a deadline        settlement_refused "expired"     settlement_answer
                             (ours: settlement_given_up)
    auto-settle (timer, or   -                                pow_challenge, then a Solve
      the relay loop wakes)
    refusing (relay loop)    -                                debt_limit (every 10 s at most)
    push_price               price_answered (if new)          -
    push_debt                claim_received, or dispute       -
    start_settlement         settlement_opened (manual), or   -
                             settlement_completed (pow), or
                             nothing (refused on receipt)
    cancel_settlement        settlement_refused "canceled"    -
    settlement_answer        settlement_completed / _refused  -
    reply: push_price        price_answer_received            -
    proof ready              settlement_opened                start_settlement
    reply: an answer         settlement_completed / _refused  -
    reply: audit             settlement_completed (late       settlement_audit (partial page)
                             approvals), or dispute
    operator                 unfreeze, price_offer_sent,      push_price, pow_challenge,
                             settlement_opened/_canceling/    start_settlement,
                             _completed/_refused              cancel_settlement, ...

Pure: `now` is float unix seconds (signed timestamps take its integer part), randomness comes
from the `rng` given at construction.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import operator
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from earendil_py.core import pow as pow_method
from earendil_py.core.accounting import (
    UNLIMITED,
    Account,
    AccountState,
    Counters,
    DebtClaim,
    DebtLimitNotice,
    Dispute,
    EpochCount,
)
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError, decode_remote
from earendil_py.core.identity import Identity, Int, fingerprint_of
from earendil_py.core.ledger import GENESIS, Entry
from earendil_py.core.pricing import (
    AcceptanceRule,
    PriceAccepted,
    PriceAnswer,
    PriceOffer,
    PriceTerms,
)
from earendil_py.core.rpc import APPLICATION_ERROR_MIN, INVALID_PARAMS
from earendil_py.core.settlement import (
    METHOD_POW,
    Attestation,
    AuditMismatch,
    AuditPage,
    BookState,
    Digest,
    Proposal,
    Rejection,
    Role,
    SettlementBook,
    SettlementId,
    SettlementRecord,
    SettlementState,
    Step,
    make_rejection,
)

Rng = Callable[[int], bytes]
T = TypeVar("T")

# JSON-RPC application errors: a refusal (`data` is the reason label), and an audit from a
# head we do not know (`data` is our head, hex).
REFUSED = APPLICATION_ERROR_MIN
UNKNOWN_SINCE = APPLICATION_ERROR_MIN + 2

AUTOMATIC_METHODS = frozenset({METHOD_POW})  # approved without the operator
PRICE_RETRY_SECS = 5.0  # an offer the neighbour has not answered is pushed again after this,
PRICE_RETRY_MAX_SECS = 300.0  # doubling up to this: a neighbour that never answers costs little
POLL_SECS = 5.0  # ask about our open proposal this often while linked
NOTICE_INTERVAL_SECS = 10.0  # a debt-limit notice at most this often
LEASE_GROWTH = 1024  # the largest outbound lease, in units of the policy's smallest
RETRY_MIN_SECS = 2.0  # auto-settlement backoff after a failure (doubles)
RETRY_MAX_SECS = 120.0
# Old bodies are pruned every PRUNE_EVERY claims (in that claim's transaction) and counts
# (each neighbour at a turn of its own); the newest of each kind is always kept.
PRUNE_EVERY = 10
KEEP_COUNTS = 10

# Ledger entry kinds.
MIGRATED = "migrated"  # a ledger from before Neighbors, carried over: restore starts here
ACCOUNT_KINDS = frozenset(
    {
        MIGRATED,
        "price_offer_sent",
        "price_answer_received",
        "price_answered",
        "claim_sent",
        "claim_received",
        "dispute",
        "unfreeze",
    }
)
COUNTS = "counts"
SETTLEMENT_OPENED = "settlement_opened"
SETTLEMENT_COMPLETED = "settlement_completed"
SETTLEMENT_REFUSED = "settlement_refused"
SETTLEMENT_CANCELING = "settlement_canceling"
SETTLEMENT_GIVEN_UP = "settlement_given_up"


# --- wire messages besides the signed ones -------------------------------------------------


class SettlementQuery(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    settlement_id: SettlementId


class AuditQuery(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    since: Digest


class SettlementAnswer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A responder's word on a proposal: its state, and its final answer once there is one."""

    state: SettlementState
    attestation: Attestation | None = None
    rejection: Rejection | None = None

    @property
    def answer(self) -> Attestation | Rejection | None:
        return self.attestation if self.attestation is not None else self.rejection


class DebtAck(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    debt_umel: Int


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def wire(message: msgspec.Struct) -> dict[str, str]:
    """`message` as RPC params or result."""
    return {"msg": base64.b64encode(_encoder.encode(message)).decode()}


def unwire(value: Any, kind: type[T]) -> T:
    """The `kind` message in RPC params or a result. Raises RemoteProtocolError
    ("malformed_message") for anything else."""
    text = value.get("msg") if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise RemoteProtocolError("expected {'msg': base64}", "malformed_message")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("message is not base64", "malformed_message") from None
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    result: T = decode_remote(decoder, data, f"bad {kind.__name__}", "malformed_message")
    return result


# --- ledger bodies ---------------------------------------------------------------------------


class AccountEntry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """An entry that changed the account: its whole new state, the packet totals when it was
    computed, and what caused it (the offer, answer or claim, msgpack), for the record."""

    account: AccountState
    packets_in: int
    packets_out: int
    evidence: bytes = b""


class CountsEntry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The packet totals, and the outbound lease: the relay loop sends nothing past
    `ceiling_out` before a higher one is written. `peak`: the most packets counted between
    two of these, either way (how many inbound counts a crash may lose); `clean`: written at
    a clean shutdown, nothing was counted after; `unsure_out`: outbound totals a crash
    counted as sent that no claim of the neighbour has corrected yet (`Account.unsure_out`);
    `assumed_out`: every crash's such totals (`AccountState.assumed_out`), as of this entry."""

    packets_in: int
    packets_out: int
    ceiling_out: int
    peak: int
    clean: bool = False
    unsure_out: tuple[int, int] = (0, 0)
    assumed_out: tuple[tuple[int, int], ...] = ()


class OpenedEntry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A settlement opened: one we proposed, or one we received that waits for our operator.
    Its record is the proposal, pending, until `expires_at`; the role follows from the
    proposal, the creation time is the entry's."""

    proposal: Proposal
    expires_at: int

    @staticmethod
    def of(record: SettlementRecord) -> bytes:
        return _encoder.encode(OpenedEntry(record.proposal, record.expires_at))

    def record(self, me: bytes, created_at: int) -> SettlementRecord:
        role: Role = "proposer" if self.proposal.proposer == me else "responder"
        return SettlementRecord(
            self.proposal, role, SettlementState.PENDING, created_at, self.expires_at
        )


class RefusedEntry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """An open settlement's signed "no" (rejected, canceled, expired): the `Rejection` less
    what its record's proposal already holds (the parties and the proposal's signature)."""

    settlement_id: bytes
    reason: str
    timestamp: int
    signature: bytes

    @staticmethod
    def of(rejection: Rejection) -> bytes:
        return _encoder.encode(
            RefusedEntry(
                rejection.settlement_id, rejection.reason, rejection.timestamp, rejection.signature
            )
        )

    def rejection(self, proposal: Proposal) -> Rejection:
        return Rejection(
            self.settlement_id,
            proposal.proposer,
            proposal.responder,
            proposal.proposer_signature,
            self.reason,
            self.timestamp,
            self.signature,
        )


_account_entry = msgspec.msgpack.Decoder(AccountEntry)
_counts_entry = msgspec.msgpack.Decoder(CountsEntry)
_opened_entry = msgspec.msgpack.Decoder(OpenedEntry)
_attestation_entry = msgspec.msgpack.Decoder(Attestation)
_refused_entry = msgspec.msgpack.Decoder(RefusedEntry)
_query_entry = msgspec.msgpack.Decoder(SettlementQuery)


# --- what a Neighbor hands the shell -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """This neighbour's terms and our settlement rules (the route's price table and the
    node's config)."""

    terms: PriceTerms  # what we ask of the neighbour
    rule: AcceptanceRule  # what we accept from it
    methods: tuple[str, ...]  # our settlement methods, in preference order
    push_debt_secs: float = 60.0
    claim_tolerance_packets: int = 256
    lease_packets: int = 4_096  # the smallest outbound lease (it doubles when used up fast)
    keep_claims: int = 100  # claim bodies kept per direction (older ones are pruned)
    auto_settle_percent: int = 50
    min_settlement_umel: int = 1_000
    expiry_secs: int = 3_600  # how long a manual settlement waits for an operator


class Allowance(NamedTuple):
    """Packets the relay loop may still take from the neighbour, and send it."""

    inbound: int
    outbound: int


@dataclass(frozen=True, slots=True)
class Call:
    """An RPC call to make; feed its outcome to `receive_reply(token, ...)`."""

    token: int
    method: str
    params: Any


@dataclass(frozen=True, slots=True)
class Solve:
    """Proof of work to run off the event loop (`solve()`); feed the proof to
    `proof_ready(token, proof, now)`."""

    token: int
    challenge: pow_method.PowChallenge
    settlement_id: bytes
    amount_umel: int

    def solve(self) -> bytes:
        return pow_method.make_proof(self.challenge, self.settlement_id, self.amount_umel)


@dataclass(frozen=True, slots=True)
class Answered:
    """A call's result."""

    result: Any


@dataclass(frozen=True, slots=True)
class Refused:
    """A call's error answer (JSON-RPC error object), or the error to answer a call with."""

    code: int
    message: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """A call that got no answer (it may or may not have run there)."""


Reply = Answered | Refused | NoAnswer


@dataclass(frozen=True, slots=True)
class Event:
    """Something to log: a snake_case name, a level, key/values."""

    name: str
    level: Literal["info", "warning"] = "info"
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NeighborStatistics:
    refused: Counter[str] = field(default_factory=Counter)  # inputs refused, by reason
    events: Counter[str] = field(default_factory=Counter)  # events, by name


@dataclass(slots=True)
class _Pending:
    """A call in flight: what to do with its reply."""

    method: str
    key: bytes = b""  # the settlement id, audit head or claim it is about
    counts: tuple[object, ...] = ()  # a claim's counts
    operator: bool = False  # an operator waits for its outcome


@dataclass(slots=True)
class _Proposing:
    """A settlement of ours being prepared (challenge, proof of work) before it is proposed."""

    settlement_id: bytes
    pay_umel: int
    request_umel: int
    method: str
    operator: bool


@dataclass(slots=True)
class _Volatile:
    """What the Neighbor keeps besides the ledger: calls in flight, timers, the lease, the
    policy. A restart starts it afresh from the ledger, and the link-up that follows asks
    again whatever was in flight."""

    policy: Policy
    linked: bool = False
    override: PriceTerms | None = None  # an operator's reprice, kept until restart
    calls: dict[int, _Pending] = field(default_factory=dict)
    next_token: int = 1
    claim_token: int = 0  # the claim in flight (0: none); one at a time
    claim_deadline: float = 0.0  # abandoned then: the next claim supersedes it
    next_claim_at: float = 0.0
    acked: tuple[object, ...] | None = None  # the counts of the last claim the neighbour took
    # Bumped when a claim of the neighbour's shows other counts than ours; part of a claim's
    # counts, so the next claim goes out even if our counts did not move.
    resync: int = 0
    price_token: int = 0
    price_retry_at: float | None = None
    price_backoff: float = PRICE_RETRY_SECS  # the next retry's delay; reset by an answer
    poll_token: int = 0
    poll_at: float = 0.0
    audit_token: int = 0
    proposing: _Proposing | None = None
    settle_retry_at: float = 0.0
    settle_backoff: float = RETRY_MIN_SECS / 2
    last_notice_at: float = float("-inf")
    recovery_in: int = 0  # inbound counts a crash may have lost: re-learned once, from a claim
    # Outbound totals [low, high) a crash counted as sent, perhaps unused: no claim of ours
    # admits them, and no automatic settlement pays them, before a claim from the neighbour
    # has corrected our count.
    unsure_out: tuple[int, int] = (0, 0)
    ceiling: int = 0  # the outbound lease written: the relay loop sends nothing past it
    lease: int = 0  # its size now
    leased_from: int = 0  # the outbound count when the lease was last topped up
    peak: int = 0  # the most packets between two counts entries
    checkpointed: tuple[int, int] = (0, 0)  # totals in the last counts entry
    counts_written: int = 0
    ledger_head: bytes = GENESIS  # our ledger's head for this neighbour (a proposal pins it)
    challenges: pow_method.ChallengeBook | None = None  # issued to the neighbour as payer

    def copy(self) -> _Volatile:
        copied = _Volatile(*_volatile_fields(self))  # every field, in order: fast
        copied.calls = dict(self.calls)
        return copied


_volatile_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(_Volatile)))


@dataclass(frozen=True, slots=True)
class Effect:
    """What one step does: commit `entries` (kind, body) and `prunes` (kind, keep_last) in one
    transaction, then `Neighbor.apply` it, then make `calls`, run `work`, log `events`, and
    for a call answer `reply` (a result, or `Refused`). `done` resolves operator requests:
    (key, outcome). `batch`: the commit may wait a little to share a transaction."""

    entries: tuple[tuple[str, bytes], ...]
    prunes: tuple[tuple[str, int], ...]
    calls: tuple[Call, ...]
    work: tuple[Solve, ...]
    events: tuple[Event, ...]
    reply: Any
    done: tuple[tuple[tuple[str, bytes], object], ...]
    batch: bool
    recorded_at: int  # the entries' time (unix seconds): pass it to the ledger
    _base: int
    _account: AccountState
    _book: BookState
    _volatile: _Volatile


class _Work:
    """One step in progress, on copies of the state."""

    def __init__(self, neighbor: Neighbor, now: float) -> None:
        self.neighbor = neighbor
        self.now = now
        self.unix = int(now)
        self.volatile = neighbor._volatile.copy()
        self._account: Account | None = None  # copied when first used: most steps use one
        self._book: SettlementBook | None = None
        self.entries: list[tuple[str, bytes]] = []
        self.prunes: list[tuple[str, int]] = []
        self.calls: list[Call] = []
        self.work: list[Solve] = []
        self.events: list[Event] = []
        self.done: list[tuple[tuple[str, bytes], object]] = []
        self.batch = False

    @property
    def account(self) -> Account:
        """The account, on a copy of its state (made at first use)."""
        if self._account is None:
            neighbor = self.neighbor
            self._account = Account(
                neighbor.identity,
                neighbor.neighbor_public,
                neighbor._account.copy(),
                neighbor.counters,
                recovery_in=self.volatile.recovery_in,
                unsure_out=self.volatile.unsure_out,
            )
        return self._account

    @property
    def book(self) -> SettlementBook:
        """The settlement book, on a copy of its state (made at first use)."""
        if self._book is None:
            neighbor = self.neighbor
            self._book = SettlementBook(
                neighbor.identity, neighbor.neighbor_public, neighbor._book.copy()
            )
        return self._book

    @property
    def policy(self) -> Policy:
        return self.volatile.policy

    def log(self, name: str, level: Literal["info", "warning"] = "info", **fields: Any) -> None:
        self.events.append(Event(name, level, fields))

    def call(self, method: str, params: Any, pending: _Pending) -> int:
        volatile = self.volatile
        token = volatile.next_token
        volatile.next_token += 1
        volatile.calls[token] = pending
        self.calls.append(Call(token, method, params))
        return token

    def account_entry(self, kind: str, evidence: bytes = b"") -> None:
        counters = self.neighbor.counters
        totals = (counters.packets_in, counters.packets_out)
        entry = AccountEntry(self.account.state, totals[0], totals[1], evidence)
        self.entries.append((kind, _encoder.encode(entry)))
        self.counted(totals)

    def counted(self, totals: tuple[int, int]) -> None:
        """An entry of this step carries these totals: what a crash loses is counted since."""
        volatile = self.volatile
        volatile.peak = max(volatile.peak, sum(totals) - sum(volatile.checkpointed))
        volatile.checkpointed = totals

    def effect(self, reply: Any = None) -> Effect:
        counters = self.neighbor.counters
        if self._account is not None:
            self.volatile.recovery_in = self._account.recovery_in
            self.volatile.unsure_out = self._account.unsure_out
        if self.entries and (counters.packets_in, counters.packets_out) != (
            self.volatile.checkpointed
        ):  # the totals ride along, in the same transaction: a crash then loses less
            self.neighbor._write_counts(self)
        neighbor = self.neighbor
        return Effect(
            tuple(self.entries),
            tuple(self.prunes),
            tuple(self.calls),
            tuple(self.work),
            tuple(self.events),
            reply,
            tuple(self.done),
            self.batch,
            self.unix,
            neighbor._version,
            neighbor._account if self._account is None else self._account.state,
            neighbor._book if self._book is None else self._book.state,
            self.volatile,
        )


class Neighbor:
    """One neighbour. See the module docstring. Methods raise LocalProtocolError when misused
    (an operator request that cannot be honoured, an effect applied out of order); nothing
    the neighbour sends raises: it is refused and counted."""

    # A node holds one per neighbour, most of them idle: no __dict__.
    __slots__ = (
        "_account",
        "_book",
        "_ceiling",
        "_flowing",
        "_in_base",
        "_in_cap",
        "_in_limit",
        "_in_price",
        "_in_start",
        "_lease_mark",
        "_out_at",
        "_out_base",
        "_out_cap",
        "_out_claimed",
        "_out_limit",
        "_out_price",
        "_out_start",
        "_settle_mark",
        "_stats",
        "_version",
        "_volatile",
        "counters",
        "fingerprint",
        "identity",
        "neighbor_public",
        "refusing",
        "rng",
        "wake_mark",
    )

    def __init__(
        self,
        identity: Identity,
        neighbor_public: bytes,
        policy: Policy,
        rng: Rng,
        *,
        account: AccountState | None = None,
        book: BookState | None = None,
    ) -> None:
        self.identity = identity
        self.neighbor_public = neighbor_public
        self.fingerprint = fingerprint_of(neighbor_public)
        self.rng = rng
        self._account = account or AccountState(self.fingerprint)
        self._book = book or BookState(self.fingerprint)
        self._volatile = _Volatile(policy)
        self.counters = Counters()  # the relay loop's, see core/accounting.py
        self.refusing = False  # set by the relay loop when it dropped the neighbour's packets
        # The outbound total at which the relay loop must wake the shell (`handle_timer`): our
        # debt reaches the automatic settlement threshold, or half the lease is used. Set by
        # `_cache`, after every change.
        self.wake_mark = 0
        self._version = 0
        self._stats = NeighborStatistics()
        self._cache()

    @classmethod
    def restore(
        cls,
        identity: Identity,
        neighbor_public: bytes,
        policy: Policy,
        rng: Rng,
        entries: Sequence[Entry],
    ) -> Neighbor:
        """The neighbour as its committed ledger entries left it (oldest first; a pruned
        body is skipped), from the last `migrated` entry on if there is one. Entries of other
        kinds are skipped. A body that does not decode is our own file's corruption: it
        raises msgspec.DecodeError."""
        neighbor = cls(identity, neighbor_public, policy, rng)
        me = identity.fingerprint
        account = Account(identity, neighbor_public, neighbor._account, neighbor.counters)
        book = SettlementBook(identity, neighbor_public, neighbor._book)
        totals, ceiling, peak, clean, unsure = (0, 0), 0, 0, False, (0, 0)
        ledger_head = entries[-1].hash if entries else GENESIS
        start = max((i for i, e in enumerate(entries) if e.kind == MIGRATED), default=0)
        for entry in entries[start:]:
            kind, body = entry.kind, entry.body
            if body is None:
                continue
            clean = False
            if kind in ACCOUNT_KINDS:
                changed = _account_entry.decode(body)
                account.state = changed.account
                totals = max(totals[0], changed.packets_in), max(totals[1], changed.packets_out)
                if kind == "claim_received":
                    unsure = (0, 0)
            elif kind == COUNTS:
                counts = _counts_entry.decode(body)
                totals = max(totals[0], counts.packets_in), max(totals[1], counts.packets_out)
                ceiling = max(ceiling, counts.ceiling_out)
                peak, clean, unsure = counts.peak, counts.clean, counts.unsure_out
                account.state.assumed_out = counts.assumed_out
            elif kind == SETTLEMENT_OPENED:
                book.restore(_opened_entry.decode(body).record(me, entry.recorded_at))
            elif kind == SETTLEMENT_COMPLETED:
                attestation = _attestation_entry.decode(body)
                proposal = attestation.proposal
                record = book.record(proposal.settlement_id)
                if record is None:  # approved on receipt: it was never written open
                    record = book.receive(
                        proposal, entry.recorded_at, expiry_secs=policy.expiry_secs
                    )
                if record.state is not SettlementState.COMPLETED:
                    book.answered(record, attestation)
                    account.settle(*proposal.reduction_for(me))
            elif kind == SETTLEMENT_REFUSED:
                refusal = _refused_entry.decode(body)
                refused = book.record(refusal.settlement_id)
                if refused is not None and refused.answer is None:
                    book.answered(refused, refusal.rejection(refused.proposal))
            elif kind == SETTLEMENT_CANCELING:
                book.cancel(_query_entry.decode(body).settlement_id)
            elif kind == SETTLEMENT_GIVEN_UP:
                given_up = book.record(_query_entry.decode(body).settlement_id)
                if given_up is not None:
                    book.restore(given_up.step(Step.EXPIRE, reason="expired"))
        neighbor._account = account.state
        neighbor._book = book.state
        # After an unclean stop, what was counted since the totals were last written is
        # lost. Outbound, we count the whole lease as sent: an upper bound, as our estimate
        # always is, which the neighbour's next claim corrects down; our claims never admit
        # it as counted, and no automatic settlement pays it before that correction.
        # Inbound, we re-learn from the neighbour's next claim what it says it sent, up to
        # twice the busiest interval between two counts entries (never less than one
        # tolerance).
        packets_in, packets_out = totals
        volatile = neighbor._volatile
        volatile.unsure_out = unsure
        if entries and not clean:  # (a neighbour new to the ledger has counted nothing yet)
            if packets_out < ceiling:
                volatile.unsure_out = (unsure[0] if unsure[1] else packets_out, ceiling)
                account.assume_sent(packets_out, ceiling)
            packets_out = max(packets_out, ceiling)
            volatile.recovery_in = max(2 * peak, policy.claim_tolerance_packets)
        neighbor.counters.packets_in, neighbor.counters.packets_out = packets_in, packets_out
        volatile.ceiling = max(ceiling, packets_out)
        volatile.peak = peak
        volatile.checkpointed = (packets_in, packets_out)
        volatile.leased_from = packets_out
        volatile.ledger_head = ledger_head
        neighbor._cache()
        return neighbor

    # --- the hot path -------------------------------------------------------------------

    def allowance(self) -> Allowance:
        """Packets the relay loop may take from the neighbour and send it, before a debt
        passes its limit (0 both ways until both offers are accepted, or while frozen)."""
        return Allowance(self.inbound_allowance(), self.outbound_allowance())

    def inbound_allowance(self) -> int:
        """`allowance().inbound`, alone: what the relay loop reads of a source link, once a
        batch. `_cache` turned the limit into a count, so this is one subtraction."""
        cap = self._in_cap
        if cap is None:
            return UNLIMITED  # free, and flowing
        return max(0, cap - self.counters.packets_in)

    def outbound_allowance(self) -> int:
        """`allowance().outbound`, alone (the debt limit and the lease, whichever is first)."""
        return max(0, self._out_cap - self.counters.packets_out)

    def refusal(self, *, outbound: bool) -> str:
        """Why the relay loop refuses the neighbour's packets now (a drop reason)."""
        if not self.priced:
            return "not_priced"
        if self.frozen:
            return "frozen"
        if outbound and self.counters.packets_out >= self._ceiling:
            return "lease"  # the shell is writing a higher one
        return "debt_limit"

    # --- views --------------------------------------------------------------------------

    @property
    def account(self) -> Account:
        """A view of the account (read it; change it through the methods here)."""
        volatile = self._volatile
        return Account(
            self.identity,
            self.neighbor_public,
            self._account,
            self.counters,
            recovery_in=volatile.recovery_in,
            unsure_out=volatile.unsure_out,
        )

    @property
    def book(self) -> SettlementBook:
        """A view of the settlement book (read it; change it through the methods here)."""
        return SettlementBook(self.identity, self.neighbor_public, self._book)

    @property
    def priced(self) -> bool:
        return self._account.our_offer is not None and self._account.their_offer is not None

    @property
    def pricing(self) -> bool:
        """Not priced yet, but we accepted the neighbour's offer and ours is asked: the
        neighbour may be priced already, its answer on the way or being written, and send
        (the shell holds such packets until this ends, rather than dropping them)."""
        account = self._account
        return (
            account.our_offer is None
            and account.their_offer is not None
            and not account.frozen
            and self._volatile.price_token != 0
        )

    @property
    def frozen(self) -> str:
        return self._account.frozen

    @property
    def linked(self) -> bool:
        return self._volatile.linked

    @property
    def policy(self) -> Policy:
        return self._volatile.policy

    @property
    def version(self) -> int:
        """How many effects were applied: an effect made at another version is refused."""
        return self._version

    def statistics(self) -> NeighborStatistics:
        return self._stats

    def summary(self) -> dict[str, Any]:
        """The operator's view of the account."""
        account, s = self.account, self._account
        return {
            "neighbor": self.fingerprint.hex(),
            "priced": self.priced,
            "our_price_umel": s.our_offer.price_umel if s.our_offer else None,
            "our_debt_limit_umel": s.our_offer.debt_limit_umel if s.our_offer else None,
            "their_price_umel": s.their_offer.price_umel if s.their_offer else None,
            "their_debt_limit_umel": s.their_offer.debt_limit_umel if s.their_offer else None,
            "debt_in_umel": account.debt_in_umel,
            "debt_out_umel": account.debt_out_umel,
            "packets_in": self.counters.packets_in,
            "packets_out": self.counters.packets_out,
            "frozen": s.frozen,
            "settled_in_umel": s.settled_in_umel,
            "settled_out_umel": s.settled_out_umel,
            "auto_settle_at_umel": (
                None
                if _auto_method(s, self._volatile.policy) is None
                else _auto_threshold(s, self._volatile.policy)
            ),
        }

    def settlement_counts(self) -> dict[tuple[str, str, str], int]:
        """Every settlement with the neighbour since its ledger began (or was migrated), by
        (method, role, state); methods we do not know count as "other"."""
        return self._book.counts()

    def settlements(self) -> list[dict[str, Any]]:
        """The open and the recently finished settlements (older ones are in the ledger)."""
        out = []
        for record in (*self._book.finished.values(), *self._book.open.values()):
            proposal = record.proposal
            paid_in, paid_out = proposal.reduction_for(self.identity.fingerprint)
            out.append(
                {
                    "id": proposal.id_hex,
                    "neighbor": self.fingerprint.hex(),
                    "role": record.role,
                    "state": str(record.state),
                    "reason": record.reason,
                    "method": proposal.method,
                    "paid_in_umel": paid_in,
                    "paid_out_umel": paid_out,
                    "created_at": record.created_at,
                    "expires_at": record.expires_at,
                }
            )
        return out

    # --- applying effects ---------------------------------------------------------------

    def apply(self, effect: Effect, *, ledger_head: bytes | None = None) -> None:
        """Make `effect` the current state, once its entries are committed (`ledger_head`:
        our ledger's head for this neighbour after the commit). Raises LocalProtocolError for
        an effect computed before another one was applied."""
        if effect._base != self._version:
            raise LocalProtocolError("effect applied out of order: compute it again")
        self._account = effect._account
        self._book = effect._book
        self._volatile = effect._volatile
        if ledger_head is not None:
            self._volatile.ledger_head = ledger_head
        self._version += 1
        for event in effect.events:
            self._stats.events[event.name] += 1
            if event.name == "call_refused":
                self._stats.refused[str(event.fields["reason"])] += 1
        self._cache()

    def _cache(self) -> None:
        """Precompute what `allowance()` and `wake_mark` read, after every change: each
        direction's limit as the packet total at which it is reached (a debt of
        `base + (total - start) * price` reaches `limit` at total
        `start + (limit - base) // price`, rounding as the allowance does)."""
        s = self._account
        self._flowing = s.our_offer is not None and s.their_offer is not None and not s.frozen
        self._in_price = self._in_limit = self._in_base = self._in_start = 0
        self._out_price = self._out_limit = self._out_base = self._out_start = 0
        self._out_claimed, self._out_at = -1, 0
        if s.inbound and s.our_offer is not None:
            total, current = self.counters.packets_in, s.inbound[-1]
            self._in_price, self._in_limit = current.price_umel, s.our_offer.debt_limit_umel
            self._in_start = current.start
            closed = sum(e.count(total) * e.price_umel for e in s.inbound[:-1])
            self._in_base = s.folded_in_umel - s.settled_in_umel + closed
        if s.outbound and s.their_offer is not None:
            total, current = self.counters.packets_out, s.outbound[-1]
            self._out_price, self._out_limit = current.price_umel, s.their_offer.debt_limit_umel
            self._out_start = current.start
            self._out_claimed, self._out_at = current.claimed, current.counted_at_claim
            closed = sum(e.charged(e.count(total)) * e.price_umel for e in s.outbound[:-1])
            self._out_base = s.folded_out_umel - s.settled_out_umel + closed
        volatile = self._volatile
        self._ceiling = volatile.ceiling
        self._in_cap: int | None = -1
        self._out_cap = -1
        if self._flowing:
            price = self._in_price
            self._in_cap = (
                self._in_start + (self._in_limit - self._in_base) // price if price else None
            )
            price, cap = self._out_price, volatile.ceiling
            if price:
                # Charged: the count since the epoch began, or the adopted claim plus what we
                # counted since it came.
                adopted = self._out_claimed - self._out_at if self._out_claimed >= 0 else 0
                reached = self._out_start - adopted + (self._out_limit - self._out_base) // price
                cap = min(cap, reached)
            self._out_cap = cap
        self._lease_mark = volatile.ceiling - volatile.lease // 2
        self._settle_mark = self._auto_settle_mark()
        self.wake_mark = min(self._lease_mark, self._settle_mark)

    def _auto_settle_mark(self) -> int:
        volatile, price = self._volatile, self._out_price
        if (
            not volatile.linked
            or not price
            or volatile.proposing is not None
            or volatile.unsure_out[1]
            or self._book.open
            or _auto_method(self._account, volatile.policy) is None
        ):
            return UNLIMITED
        gap = _auto_threshold(self._account, volatile.policy) - self._debt_out()
        return self.counters.packets_out + max(0, -(-gap // price))

    def _debt_out(self) -> int:
        """`account.debt_out_umel`, from what `_cache` computed."""
        packets = self.counters.packets_out - self._out_start
        if self._out_claimed >= 0:
            packets = self._out_claimed + packets - self._out_at
        return self._out_base + packets * self._out_price

    # --- the link -----------------------------------------------------------------------

    def on_link_up(self, now: float, policy: Policy | None = None) -> Effect:
        """The link to the neighbour is up: offer our price (a new offer is written first),
        ask about our open proposal, audit the settlement chains; claims start."""
        w = _Work(self, now)
        volatile = w.volatile
        if policy is not None:
            volatile.policy = policy
        self._forget_calls(w)
        volatile.linked = True
        if self.counters.packets_out >= self._lease_mark:
            self._write_counts(w, lease=True)
        # A claim goes out at once: either side may have restarted and need one (to learn
        # back counts it lost, or to correct a lease it counted as sent).
        volatile.acked = None
        volatile.next_claim_at = now
        volatile.price_backoff = PRICE_RETRY_SECS
        self._push_price(w, volatile.override or w.policy.terms, operator=False)
        self._expire(w)
        if (record := w.book.outgoing_open()) is not None:
            self._ask_status(w, record)
        self._audit(w)
        return w.effect()

    def on_link_down(self, now: float) -> Effect:
        """The link is down: nothing is pushed until it is up again; calls in flight are
        forgotten (their late replies change nothing)."""
        w = _Work(self, now)
        w.volatile.linked = False
        self._forget_calls(w)
        return w.effect()

    def _forget_calls(self, w: _Work) -> None:
        volatile = w.volatile
        for pending in volatile.calls.values():
            if pending.operator:
                self._tell_operator(w, pending, "no link to the neighbour")
        volatile.calls.clear()
        volatile.claim_token = volatile.price_token = volatile.poll_token = 0
        volatile.audit_token = 0
        if (proposing := volatile.proposing) is not None:
            volatile.proposing = None
            self._settle_failed(w, proposing, "link_down")

    # --- timers -------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` next has something to do (None: nothing until an input)."""
        volatile, book = self._volatile, self._book
        deadlines = [float(r.expires_at) for r in book.open.values()]
        if volatile.linked:
            if volatile.claim_token:
                deadlines.append(volatile.claim_deadline)
            elif self._account.inbound or self._account.outbound:
                deadlines.append(volatile.next_claim_at)
            if volatile.price_retry_at is not None and not volatile.price_token:
                deadlines.append(volatile.price_retry_at)
            if not volatile.poll_token and any(r.role == "proposer" for r in book.open.values()):
                deadlines.append(volatile.poll_at)
            if self._settle_mark <= self.counters.packets_out:
                deadlines.append(volatile.settle_retry_at)
            if self._lease_mark <= self.counters.packets_out:
                deadlines.append(float("-inf"))  # raise the lease now
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> Effect | None:
        """Do what is due at `now`, and what the relay loop woke us for: deadlines, a claim,
        an offer pushed again, a status question, an automatic settlement, a debt-limit
        notice. None if nothing was due."""
        timer = self.get_timer()
        refusing, self.refusing = self.refusing, False
        if not refusing and (timer is None or now < timer):
            return None
        w = _Work(self, now)
        volatile = w.volatile
        self._expire(w)
        if volatile.linked:
            if self.counters.packets_out >= self._lease_mark:
                self._write_counts(w, lease=True)
            if volatile.claim_token and now >= volatile.claim_deadline:
                volatile.calls.pop(volatile.claim_token, None)
                volatile.claim_token = 0
                w.log("debt_push_unanswered", seq=w.account.state.claim_seq_sent)
            if not volatile.claim_token and now >= volatile.next_claim_at:
                self._push_claim(w)
            retry = volatile.price_retry_at
            if retry is not None and not volatile.price_token and now >= retry:
                self._push_price(w, volatile.override or w.policy.terms, operator=False)
            record = w.book.outgoing_open()
            if record is not None and not volatile.poll_token and now >= volatile.poll_at:
                self._ask_status(w, record)
            self._maybe_auto_settle(w)
            if refusing:
                self._maybe_notice(w)
        return w.effect()

    def checkpoint(self, now: float, *, clean: bool = False) -> Effect | None:
        """A `counts` entry if the packet totals moved since the last one (always when
        `clean`: at a clean shutdown, after which nothing counted is lost). None if there is
        nothing to write."""
        totals = (self.counters.packets_in, self.counters.packets_out)
        if totals == self._volatile.checkpointed and not clean:
            return None
        w = _Work(self, now)
        self._write_counts(w, clean=clean)
        return w.effect()

    def _write_counts(self, w: _Work, *, clean: bool = False, lease: bool = False) -> None:
        """A `counts` entry: the totals now, and the outbound ceiling topped up to a lease
        beyond them. `lease`: half of the lease was used since the last entry (the wake mark),
        so it doubles; if less than an eighth was, it halves."""
        volatile, policy = w.volatile, w.policy
        totals = (self.counters.packets_in, self.counters.packets_out)
        size = volatile.lease or policy.lease_packets
        if lease and volatile.lease:  # not the first since the start
            size = min(size * 2, policy.lease_packets * LEASE_GROWTH)
        elif totals[1] - volatile.leased_from < size // 8:
            size = max(size // 2, policy.lease_packets)
        volatile.lease, volatile.leased_from = size, totals[1]
        volatile.ceiling = max(volatile.ceiling, totals[1] + size)
        w.counted(totals)
        volatile.counts_written += 1
        entry = CountsEntry(
            totals[0],
            totals[1],
            volatile.ceiling,
            volatile.peak,
            clean,
            volatile.unsure_out,
            self._account.assumed_out,  # changed only by restores (and folds, which drop some)
        )
        w.entries.append((COUNTS, _encoder.encode(entry)))
        # Each neighbour prunes at a turn of its own, so a tick's transaction holds few.
        if (volatile.counts_written + self.fingerprint[0]) % PRUNE_EVERY == 0:
            w.prunes.append((COUNTS, KEEP_COUNTS))

    # --- operator requests --------------------------------------------------------------

    def reprice(self, terms: PriceTerms, now: float) -> Effect:
        """Offer new terms now (and at every later link-up until a restart). The reply is
        the offer's key (its seq, 8 bytes); the outcome comes as done ("price", key): why the
        offer is not in force ('' if the neighbour accepted it; its reason if it rejected it;
        why no answer came)."""
        w = _Work(self, now)
        w.volatile.override = terms
        key = self._push_price(w, terms, operator=True)
        return w.effect(reply=key)

    def set_policy(self, policy: Policy, now: float) -> Effect:
        """The route's price table changed: its terms are offered now (unless the operator
        set others with `reprice`), its rule judges the neighbour's next offers."""
        w = _Work(self, now)
        w.volatile.policy = policy
        if w.volatile.linked:
            self._push_price(w, w.volatile.override or policy.terms, operator=False)
        return w.effect()

    def unfreeze(self, now: float) -> Effect:
        """Lift a freeze (keeping our own view of the account)."""
        w = _Work(self, now)
        w.account.unfreeze()
        w.account_entry("unfreeze")
        w.log("account_unfrozen")
        return w.effect()

    def propose(
        self,
        *,
        pay_umel: int,
        request_umel: int,
        method: str,
        now: float,
        prepay: bool = False,
    ) -> Effect:
        """Propose a settlement: we pay `pay_umel` of our debt, they `request_umel` of theirs.
        The reply is the settlement id; its outcome comes as done ("settle", id): the record
        after the first answer, or the RemoteProtocolError of a failed payment. Raises
        LocalProtocolError for what we will not propose: nothing to settle, an amount below
        `min_settlement_umel`, paying more than we owe (unless `prepay`), a method not
        enabled here or not accepted there, one in flight or being prepared, no link."""
        w = _Work(self, now)
        if not w.volatile.linked:
            raise LocalProtocolError("no link to this neighbour")
        if pay_umel < 0 or request_umel < 0 or pay_umel == request_umel == 0:
            raise LocalProtocolError("nothing to settle: give an amount to pay or request")
        minimum = w.policy.min_settlement_umel
        if max(pay_umel, request_umel) < minimum:
            raise LocalProtocolError(f"below the minimum settlement of {minimum} uMEL")
        owed = max(0, w.account.debt_out_umel)
        if pay_umel > owed and not prepay:
            raise LocalProtocolError(f"we owe {owed} uMEL: paying {pay_umel} needs prepay")
        if method not in w.policy.methods:
            raise LocalProtocolError(f"payment method {method!r} is not enabled here")
        offer = w.account.state.their_offer
        if offer is None or method not in offer.methods:
            raise LocalProtocolError(f"the neighbour does not accept {method!r}")
        if method == METHOD_POW and pay_umel <= request_umel:
            raise LocalProtocolError("a pow settlement is paid by its proposer")
        self._expire(w)
        if w.volatile.proposing is not None or w.book.in_flight(w.unix) is not None:
            raise LocalProtocolError("a settlement with this neighbour is already in flight")
        proposing = _Proposing(self.rng(16), pay_umel, request_umel, method, operator=True)
        self._start_proposing(w, proposing)
        return w.effect(reply=proposing.settlement_id)

    def cancel(self, settlement_id: bytes, now: float) -> Effect:
        """Ask the neighbour to cancel our open proposal; it stays open until the answer,
        which may still be an approval. The reply is the id; the outcome comes as done
        ("settle", id): the record after the answer. Raises LocalProtocolError unless it is
        our proposal and pending."""
        w = _Work(self, now)
        record = w.book.cancel(settlement_id)
        w.entries.append((SETTLEMENT_CANCELING, _encoder.encode(SettlementQuery(settlement_id))))
        w.log("settlement_cancel_requested", id=record.proposal.id_hex)
        pending = _Pending("cancel_settlement", settlement_id, operator=True)
        if w.volatile.linked:
            w.call("cancel_settlement", wire(SettlementQuery(settlement_id)), pending)
        else:
            w.done.append((("settle", settlement_id), record))
        return w.effect(reply=settlement_id)

    def decide(
        self,
        settlement_id: bytes,
        *,
        approve: bool,
        now: float,
        reason: str = "rejected_by_operator",
    ) -> Effect:
        """The operator approves or rejects (with `reason`) a proposal waiting for it, and the
        neighbour is told. The reply is the record (refused instead if it expired or no longer
        follows our head). Raises LocalProtocolError unless it is an incoming proposal still
        pending, or for a reason that is not 1..64 characters (or is "canceled"/"expired")."""
        w = _Work(self, now)
        if approve:
            record = w.book.approve(settlement_id, w.unix)
        else:
            record = w.book.reject(settlement_id, reason, w.unix)
        self._record_answer(w, record)
        self._tell_proposer(w, record)
        return w.effect(reply=record)

    # --- calls from the neighbour -------------------------------------------------------

    def receive_call(self, method: str, params: Any, now: float) -> Effect:
        """Answer a call from the neighbour. The effect's `reply` is the result, or the
        `Refused` to answer with. Never raises for anything the neighbour sent."""
        w = _Work(self, now)
        handler = CALLS.get(method)
        if handler is None:
            return self._refused(w, Refused(INVALID_PARAMS, f"no method {method[:64]!r}"))
        try:
            reply = handler(self, w, params)
        except RemoteProtocolError as exc:
            w = _Work(self, now)  # nothing of a refused call is kept
            if exc.reason == "malformed_message":
                return self._refused(w, Refused(INVALID_PARAMS, f"invalid params: {exc}"))
            return self._refused(w, Refused(REFUSED, str(exc), exc.reason))
        if isinstance(reply, Refused):
            return self._refused(w, reply)
        return w.effect(reply)

    def _refused(self, w: _Work, refused: Refused) -> Effect:
        w.log("call_refused", reason=str(refused.data or "invalid_params"))
        return w.effect(refused)

    def _on_push_price(self, w: _Work, params: Any) -> Any:
        offer = unwire(params, PriceOffer)
        before = w.account.state.their_answer
        answer = w.account.on_offer(offer, w.policy.rule, w.unix)
        if w.account.state.their_answer is not before:
            w.account_entry("price_answered", _encoder.encode((offer, answer)))
        w.log(
            "price_offer_received",
            seq=offer.seq,
            price_umel=offer.price_umel,
            debt_limit_umel=offer.debt_limit_umel,
            accepted=answer.accepted,
            reason=answer.reason,
        )
        return wire(answer)

    def _on_push_debt(self, w: _Work, params: Any) -> Any:
        claim = unwire(params, DebtClaim)
        outcome = w.account.on_claim(claim, w.unix, w.policy.claim_tolerance_packets)
        if isinstance(outcome, Dispute):
            w.account_entry("dispute", _encoder.encode((claim, outcome.reason)))
            w.log(
                "debt_dispute",
                "warning",
                reason=outcome.reason,
                their_packets=outcome.their_packets,
                our_packets=outcome.our_packets,
            )
            return Refused(REFUSED, "claim disputed: account frozen", "dispute")
        w.account_entry("claim_received", _encoder.encode(claim))
        if _counts_differ(w.account.claim_counts()[0], claim.sent):
            # It thinks it sent us other than we counted (lost packets): its estimate of what
            # it owes is off. Our next claim tells it, even if our own counts did not move.
            w.volatile.resync += 1
        if claim.seq % PRUNE_EVERY == 0:
            w.prunes.append(("claim_received", w.policy.keep_claims))
        w.batch = True
        return wire(DebtAck(outcome.debt_out_after_umel))

    def _on_debt_limit(self, w: _Work, params: Any) -> Any:
        notice = unwire(params, DebtLimitNotice)
        w.account.verify_limit_notice(notice)
        w.log(
            "debt_limit_notice",
            "warning",
            their_view_umel=notice.debt_umel,
            our_view_umel=w.account.debt_out_umel,
            limit_umel=notice.limit_umel,
        )
        return None

    def _on_pow_challenge(self, w: _Work, params: Any) -> Any:
        if params not in (None, {}, []):
            raise RemoteProtocolError("pow_challenge takes no params", "malformed_message")
        challenges = _challenges(w)
        return wire(challenges.issue(self.fingerprint, w.unix, self.rng))

    def _on_start_settlement(self, w: _Work, params: Any) -> Any:
        proposal = unwire(params, Proposal)
        self._expire(w)
        book = w.book
        judged = book.check_proposal(proposal, w.unix)
        if isinstance(judged, SettlementRecord):  # a retransmission: the same answer
            return wire(_answer_of(judged))
        problem = judged.reason if isinstance(judged, Rejection) else self._refusal(w, proposal)
        if problem:  # refused on receipt: signed, not recorded (see check_proposal)
            rejection = (
                judged
                if isinstance(judged, Rejection)
                else make_rejection(self.identity, proposal, problem, w.unix)
            )
            w.log("settlement_refused", id=proposal.id_hex, reason=problem)
            state = SettlementState.EXPIRED if problem == "expired" else SettlementState.REJECTED
            return wire(SettlementAnswer(state, rejection=rejection))
        record = book.receive(proposal, w.unix, expiry_secs=w.policy.expiry_secs)
        if proposal.method in AUTOMATIC_METHODS:  # paid already: approved in the same step
            record = book.approve(proposal.settlement_id, w.unix)
            self._record_answer(w, record)
        else:
            w.entries.append((SETTLEMENT_OPENED, OpenedEntry.of(record)))
            w.log(
                "settlement_awaiting_operator",
                id=proposal.id_hex,
                net_umel=proposal.net_umel,
                direction=proposal.direction,
            )
        return wire(_answer_of(record))

    def _refusal(self, w: _Work, proposal: Proposal) -> str:
        """Why we refuse a new proposal that follows our head ('' if we do not): our policy,
        then its payment. A pow challenge is burned by any proof naming it, good or bad."""
        if proposal.method not in w.policy.methods:
            return "method_not_accepted"
        if max(proposal.reduce_left_umel, proposal.reduce_right_umel) < (
            w.policy.min_settlement_umel
        ):
            return "below_minimum"
        _, we_pay = proposal.reduction_for(self.identity.fingerprint)
        if we_pay > max(0, w.account.debt_out_umel):
            return "more_than_we_owe"
        if proposal.method == METHOD_POW:
            try:
                pow_method.redeem_proof(
                    _challenges(w),
                    proposal.proof,
                    payer=self.fingerprint,
                    settlement_id=proposal.settlement_id,
                    amount_umel=proposal.net_umel,
                    now=w.unix,
                )
            except RemoteProtocolError as exc:
                return exc.reason
        return ""

    def _on_settlement_status(self, w: _Work, params: Any) -> Any:
        query = unwire(params, SettlementQuery)
        record = w.book.record(query.settlement_id)
        if record is None or record.role != "responder":
            return Refused(REFUSED, "unknown settlement", "unknown_settlement")
        return wire(_answer_of(record))

    def _on_cancel_settlement(self, w: _Work, params: Any) -> Any:
        query = unwire(params, SettlementQuery)
        before = w.book.record(query.settlement_id)
        record = w.book.on_cancel(query.settlement_id, w.unix)
        if record is not before:
            self._record_answer(w, record)
        return wire(_answer_of(record))

    def _on_settlement_answer(self, w: _Work, params: Any) -> Any:
        self._take_answer(w, unwire(params, SettlementAnswer))
        return None

    def _on_settlement_audit(self, w: _Work, params: Any) -> Any:
        query = unwire(params, AuditQuery)
        page = w.book.audit_page(query.since)
        if page is None:
            return Refused(UNKNOWN_SINCE, "unknown head", w.book.head.hex())
        return wire(page)

    # --- replies to our calls -----------------------------------------------------------

    def receive_reply(self, token: int, reply: Reply, now: float) -> Effect:
        """The outcome of one of our calls. A reply to a call we forgot (the link went down,
        or it was abandoned) changes nothing; a bad reply only ends its call."""
        w = _Work(self, now)
        pending = w.volatile.calls.pop(token, None)
        if pending is None:
            return w.effect()
        try:
            REPLIES[pending.method](self, w, token, pending, reply)
        except RemoteProtocolError as exc:
            w = _Work(self, now)  # nothing of a bad reply is kept but the end of its call
            w.volatile.calls.pop(token, None)
            w.log("reply_refused", "warning", method=pending.method, reason=exc.reason)
            self._after_failed_call(w, token, pending, exc.reason)
        return w.effect()

    def _after_failed_call(self, w: _Work, token: int, pending: _Pending, reason: str) -> None:
        """What waits on a call that ended without a usable answer."""
        volatile = w.volatile
        for name in ("claim_token", "price_token", "poll_token", "audit_token"):
            if getattr(volatile, name) == token:
                setattr(volatile, name, 0)
        if pending.method == "push_price" and volatile.linked:
            volatile.price_retry_at = w.now + volatile.price_backoff
            volatile.price_backoff = min(2 * volatile.price_backoff, PRICE_RETRY_MAX_SECS)
        if pending.method == "settlement_status":
            volatile.poll_at = w.now + POLL_SECS
        if pending.method in ("pow_challenge", "solve") and (proposing := volatile.proposing):
            volatile.proposing = None
            self._settle_failed(w, proposing, reason)
        elif pending.operator:
            self._tell_operator(w, pending, reason)

    def _tell_operator(self, w: _Work, pending: _Pending, reason: str) -> None:
        if pending.method == "push_price":
            w.done.append((("price", pending.key), f"no answer: {reason}"))
        else:
            w.done.append((("settle", pending.key), w.book.record(pending.key)))

    def _reply_push_price(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        volatile = w.volatile
        volatile.price_token = 0
        proposed = w.account.state.proposed
        if not isinstance(reply, Answered) or proposed is None:
            w.log("price_push_failed", "warning", error=_describe(reply))
            self._after_failed_call(w, token, pending, _describe(reply))
            return
        answer = unwire(reply.result, PriceAnswer)
        if answer.seq.to_bytes(8, "big") != pending.key or pending.key != proposed.seq.to_bytes(
            8, "big"
        ):  # the answer to an offer we have replaced since: the newer push will tell
            if pending.operator:
                w.done.append((("price", pending.key), "replaced by a newer offer"))
            return
        in_force = w.account.state.our_offer
        outcome = w.account.on_answer(answer)
        volatile.price_retry_at = None
        volatile.price_backoff = PRICE_RETRY_SECS
        accepted = isinstance(outcome, PriceAccepted)
        if w.account.state.our_offer is not in_force:
            w.account_entry("price_answer_received", _encoder.encode(answer))
            w.log(
                "price_accepted",
                seq=proposed.seq,
                price_umel=proposed.price_umel,
                debt_limit_umel=proposed.debt_limit_umel,
            )
        elif not accepted:
            w.log("price_rejected", "warning", seq=proposed.seq, reason=answer.reason)
        if pending.operator:
            w.done.append((("price", pending.key), "" if accepted else answer.reason))

    def _reply_push_debt(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        w.volatile.claim_token = 0
        if isinstance(reply, Answered):
            unwire(reply.result, DebtAck)
            w.volatile.acked = pending.counts
        else:
            w.log("debt_push_failed", "warning", error=_describe(reply))

    def _reply_debt_limit(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        if not isinstance(reply, Answered):
            w.log("debt_limit_notice_failed", error=_describe(reply))

    def _reply_pow_challenge(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        proposing = w.volatile.proposing
        if proposing is None:
            return
        if not isinstance(reply, Answered):
            self._after_failed_call(w, token, pending, _describe(reply))
            return
        challenge = unwire(reply.result, pow_method.PowChallenge)
        if challenge.payer != self.identity.fingerprint or challenge.payee != self.fingerprint:
            raise RemoteProtocolError("challenge for other parties", "foreign_challenge")
        amount = proposing.pay_umel - proposing.request_umel
        if not 1 <= amount <= pow_method.MAX_POW_AMOUNT_UMEL:
            self._after_failed_call(w, token, pending, "amount_out_of_range")
            return
        solve = _Pending("solve", proposing.settlement_id)
        solve_token = w.volatile.next_token
        w.volatile.next_token += 1
        w.volatile.calls[solve_token] = solve
        w.work.append(Solve(solve_token, challenge, proposing.settlement_id, amount))

    def _reply_solve(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        """The proof of work failed (`proof_ready` takes a proof)."""
        self._after_failed_call(w, token, pending, _describe(reply))

    def proof_ready(self, token: int, proof: bytes, now: float) -> Effect:
        """The proof of work `Solve(token)` asked for: the settlement is proposed with it."""
        w = _Work(self, now)
        pending = w.volatile.calls.pop(token, None)
        proposing = w.volatile.proposing
        if pending is None or proposing is None or pending.key != proposing.settlement_id:
            return w.effect()
        self._make_proposal(w, proposing, proof)
        return w.effect()

    def _reply_settlement(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        """To start_settlement, settlement_status, cancel_settlement: the responder's word."""
        volatile = w.volatile
        if pending.method == "settlement_status":
            volatile.poll_token = 0
            volatile.poll_at = w.now + POLL_SECS
        record = w.book.record(pending.key)
        if (
            isinstance(reply, Refused)
            and reply.data == "unknown_settlement"
            and record is not None
            and record.answer is None
            and volatile.linked
        ):
            # It never got our proposal (lost, or we stopped before sending it): the
            # identical proposal again.
            w.call(
                "start_settlement",
                wire(record.proposal),
                _Pending("start_settlement", pending.key, operator=pending.operator),
            )
            return
        if isinstance(reply, Answered):
            self._take_answer(w, unwire(reply.result, SettlementAnswer), pending.key)
        else:
            w.log("settlement_not_answered", id=pending.key.hex(), error=_describe(reply))
        record = w.book.record(pending.key)
        if pending.operator:
            w.done.append((("settle", pending.key), record))
        elif (
            record is not None
            and record.rejection is not None
            and record.proposal.method in AUTOMATIC_METHODS
        ):
            self._settle_failed(w, None, record.reason)

    def _reply_settlement_answer(
        self, w: _Work, token: int, pending: _Pending, reply: Reply
    ) -> None:
        """Our late answer reached the proposer, or not: it asks us itself either way."""

    def _reply_audit(self, w: _Work, token: int, pending: _Pending, reply: Reply) -> None:
        w.volatile.audit_token = 0
        since = pending.key
        if since != w.book.head:
            return  # our head moved meanwhile; the next link-up audits again
        if isinstance(reply, Refused) and reply.code == UNKNOWN_SINCE:
            try:
                their_head = bytes.fromhex(str(reply.data))
            except ValueError:
                raise RemoteProtocolError(
                    "unknown head, and no head", "malformed_message"
                ) from None
            mismatch = w.book.judge_unknown_since(their_head)
            if mismatch is not None:
                self._audit_mismatch(w, mismatch)
            return
        if not isinstance(reply, Answered):
            w.log("settlement_audit_failed", error=_describe(reply))
            return
        verdict = w.book.judge_audit(unwire(reply.result, AuditPage), since)
        if isinstance(verdict, AuditMismatch):
            self._audit_mismatch(w, verdict)
            return
        for attestation in verdict:  # approvals of proposals of ours we had not heard of
            record = w.book.on_approved(attestation)
            if record is not None:
                self._record_answer(w, record)
        if verdict:  # a partial page? ask again from our new head
            self._audit(w)

    def _audit_mismatch(self, w: _Work, mismatch: AuditMismatch) -> None:
        detail = f"{mismatch.reason} at {mismatch.index}: {mismatch.detail}"
        w.account.freeze("audit_mismatch")
        w.account_entry("dispute", detail.encode())
        w.log("settlement_audit_mismatch", "warning", detail=detail)

    # --- the steps, shared --------------------------------------------------------------

    def _push_price(self, w: _Work, terms: PriceTerms, *, operator: bool) -> bytes:
        """Offer `terms` (a new offer is written before it is sent) and push it; returns the
        offer's key."""
        volatile = w.volatile
        before = w.account.state.proposed
        offer = w.account.propose(terms, w.unix)
        if offer is not before:
            w.account_entry("price_offer_sent", _encoder.encode(offer))
        volatile.price_retry_at = None
        pending = _Pending("push_price", offer.seq.to_bytes(8, "big"), operator=operator)
        if not volatile.linked:
            if operator:
                self._tell_operator(w, pending, "no link to the neighbour")
            return pending.key
        volatile.price_token = w.call("push_price", wire(offer), pending)
        return pending.key

    def _push_claim(self, w: _Work) -> None:
        volatile = w.volatile
        volatile.next_claim_at = w.now + w.policy.push_debt_secs
        received, sent, _ = w.account.claim_counts()
        counts = (volatile.resync, *received, None, *sent)
        if counts == volatile.acked or not (received or sent):
            return  # nothing changed since the neighbour took our last claim
        claim = w.account.make_claim(w.unix)
        w.account_entry("claim_sent", _encoder.encode(claim))
        if claim.seq % PRUNE_EVERY == 0:
            w.prunes.append(("claim_sent", w.policy.keep_claims))
        pending = _Pending("push_debt", counts=counts)
        volatile.claim_token = w.call("push_debt", wire(claim), pending)
        volatile.claim_deadline = w.now + w.policy.push_debt_secs

    def _ask_status(self, w: _Work, record: SettlementRecord) -> None:
        w.volatile.poll_token = w.call(
            "settlement_status",
            wire(SettlementQuery(record.settlement_id)),
            _Pending("settlement_status", record.settlement_id),
        )

    def _audit(self, w: _Work) -> None:
        head = w.book.head
        w.volatile.audit_token = w.call(
            "settlement_audit", wire(AuditQuery(head)), _Pending("settlement_audit", head)
        )

    def _tell_proposer(self, w: _Work, record: SettlementRecord) -> None:
        """Send our final answer to its proposer (best effort: it also asks)."""
        if w.volatile.linked:
            w.call(
                "settlement_answer",
                wire(_answer_of(record)),
                _Pending("settlement_answer", record.settlement_id),
            )

    def _expire(self, w: _Work) -> None:
        for record in w.book.expire(w.unix):
            if record.role == "responder":
                self._record_answer(w, record)
                self._tell_proposer(w, record)
                continue
            query = SettlementQuery(record.settlement_id)
            w.entries.append((SETTLEMENT_GIVEN_UP, _encoder.encode(query)))
            w.log("settlement_expired", id=record.proposal.id_hex, role=record.role)
            if record.proposal.method in AUTOMATIC_METHODS:
                self._settle_failed(w, None, "expired")

    def _take_answer(
        self, w: _Work, answer: SettlementAnswer, settlement_id: bytes | None = None
    ) -> None:
        """The responder's word on a proposal of ours (still pending: nothing to do)."""
        final = answer.answer
        if final is None:
            return
        answered_id = (
            final.proposal.settlement_id if isinstance(final, Attestation) else final.settlement_id
        )
        if settlement_id is not None and answered_id != settlement_id:
            raise RemoteProtocolError("answer about another settlement", "wrong_settlement")
        if isinstance(final, Attestation):
            record = w.book.on_approved(final)
        else:
            record = w.book.on_rejected(final)
        if record is not None:
            self._record_answer(w, record)

    def _record_answer(self, w: _Work, record: SettlementRecord) -> None:
        """Write a record's final answer, apply a completed one to the account, log it."""
        proposal = record.proposal
        if record.attestation is not None:
            paid_in, paid_out = proposal.reduction_for(self.identity.fingerprint)
            w.account.settle(paid_in, paid_out)
            w.entries.append((SETTLEMENT_COMPLETED, _encoder.encode(record.attestation)))
            w.log(
                "settlement_completed",
                id=proposal.id_hex,
                role=record.role,
                paid_in_umel=paid_in,
                paid_out_umel=paid_out,
            )
            if record.role == "proposer":
                w.volatile.settle_backoff = RETRY_MIN_SECS / 2
                w.volatile.settle_retry_at = 0.0
            return
        assert record.rejection is not None
        w.entries.append((SETTLEMENT_REFUSED, RefusedEntry.of(record.rejection)))
        w.log(
            "settlement_rejected",
            id=proposal.id_hex,
            role=record.role,
            state=str(record.state),
            reason=record.reason,
        )

    # --- proposing ----------------------------------------------------------------------

    def _maybe_auto_settle(self, w: _Work) -> None:
        volatile, state = w.volatile, w.account.state
        method = _auto_method(state, w.policy)
        if (
            method is None
            or volatile.proposing is not None
            or volatile.unsure_out[1]
            or w.now < volatile.settle_retry_at
            or w.book.state.open
        ):
            return
        debt = w.account.debt_out_umel
        if debt < _auto_threshold(state, w.policy):
            return
        amount = min(debt, pow_method.MAX_POW_AMOUNT_UMEL)  # more waits for the next one
        proposing = _Proposing(self.rng(16), amount, 0, method, operator=False)
        self._start_proposing(w, proposing)

    def _start_proposing(self, w: _Work, proposing: _Proposing) -> None:
        if proposing.method == METHOD_POW:  # the payee's challenge first, then the work
            w.volatile.proposing = proposing
            w.call("pow_challenge", None, _Pending("pow_challenge", proposing.settlement_id))
        else:
            self._make_proposal(w, proposing, b"")

    def _make_proposal(self, w: _Work, proposing: _Proposing, proof: bytes) -> None:
        w.volatile.proposing = None
        try:
            record = w.book.propose(
                settlement_id=proposing.settlement_id,
                reduce_mine_umel=proposing.pay_umel,
                reduce_theirs_umel=proposing.request_umel,
                method=proposing.method,
                proof=proof,
                ledger_head=w.volatile.ledger_head,
                now=w.unix,
                expiry_secs=w.policy.expiry_secs,
            )
        except LocalProtocolError as exc:  # one of theirs came in meanwhile
            self._settle_failed(w, proposing, str(exc))
            return
        w.entries.append((SETTLEMENT_OPENED, OpenedEntry.of(record)))
        w.log(
            "settlement_proposed",
            id=record.proposal.id_hex,
            method=proposing.method,
            pay_umel=proposing.pay_umel,
            request_umel=proposing.request_umel,
        )
        w.volatile.poll_at = w.now + POLL_SECS
        w.call(
            "start_settlement",
            wire(record.proposal),
            _Pending("start_settlement", proposing.settlement_id, operator=proposing.operator),
        )

    def _settle_failed(self, w: _Work, proposing: _Proposing | None, reason: str) -> None:
        """A settlement of ours did not complete. An operator learns why; an automatic one
        backs off (2 s, doubling up to 120 s)."""
        volatile = w.volatile
        if proposing is not None and proposing.operator:
            error = RemoteProtocolError(f"payment failed: {reason}", "payment_failed")
            w.done.append((("settle", proposing.settlement_id), error))
            return
        volatile.settle_backoff = min(volatile.settle_backoff * 2, RETRY_MAX_SECS)
        volatile.settle_retry_at = w.now + volatile.settle_backoff
        w.log("auto_settlement_failed", "warning", reason=reason)

    def _maybe_notice(self, w: _Work) -> None:
        volatile, account = w.volatile, w.account
        if not account.flowing or w.now - volatile.last_notice_at < NOTICE_INTERVAL_SECS:
            return
        volatile.last_notice_at = w.now
        notice = account.make_limit_notice(w.unix)
        w.log("debt_limit_reached", debt_umel=notice.debt_umel, limit_umel=notice.limit_umel)
        w.call("debt_limit", wire(notice), _Pending("debt_limit"))


# The neighbour's calls, and the replies to ours, by method: the input side of the table in
# the module docstring.
CALLS: dict[str, Callable[[Neighbor, _Work, Any], Any]] = {
    "push_price": Neighbor._on_push_price,
    "push_debt": Neighbor._on_push_debt,
    "debt_limit": Neighbor._on_debt_limit,
    "pow_challenge": Neighbor._on_pow_challenge,
    "start_settlement": Neighbor._on_start_settlement,
    "settlement_status": Neighbor._on_settlement_status,
    "cancel_settlement": Neighbor._on_cancel_settlement,
    "settlement_answer": Neighbor._on_settlement_answer,
    "settlement_audit": Neighbor._on_settlement_audit,
}
REPLIES: dict[str, Callable[[Neighbor, _Work, int, _Pending, Reply], None]] = {
    "push_price": Neighbor._reply_push_price,
    "push_debt": Neighbor._reply_push_debt,
    "debt_limit": Neighbor._reply_debt_limit,
    "pow_challenge": Neighbor._reply_pow_challenge,
    "solve": Neighbor._reply_solve,
    "start_settlement": Neighbor._reply_settlement,
    "settlement_status": Neighbor._reply_settlement,
    "cancel_settlement": Neighbor._reply_settlement,
    "settlement_answer": Neighbor._reply_settlement_answer,
    "settlement_audit": Neighbor._reply_audit,
}


def _counts_differ(ours: list[EpochCount], theirs: list[EpochCount]) -> bool:
    """Whether two cumulative counts differ in an epoch both keep. An epoch of theirs that we
    do not list counts 0 on our side, unless it is older than our oldest (folded by us, not
    yet by them): an epoch we never opened (its answer's commit failed here) holds nothing."""
    counted = {c.epoch: c.packets for c in ours}
    oldest = ours[0].epoch if ours else 0
    return any(
        counted.get(c.epoch, 0 if c.epoch >= oldest else c.packets) != c.packets for c in theirs
    )


def _auto_method(account: AccountState, policy: Policy) -> str | None:
    """Our first automatic method the neighbour's offer accepts, once both are priced."""
    offer = account.their_offer
    if offer is None or account.our_offer is None:
        return None
    automatic = (m for m in policy.methods if m in AUTOMATIC_METHODS and m in offer.methods)
    return next(automatic, None)


def _auto_threshold(account: AccountState, policy: Policy) -> int:
    """Our debt at which we settle by ourselves: a share of their limit, never dust."""
    limit = account.their_offer.debt_limit_umel if account.their_offer else 0
    return max(limit * policy.auto_settle_percent // 100, policy.min_settlement_umel, 1)


def _challenges(w: _Work) -> pow_method.ChallengeBook:
    """The challenges issued to the neighbour, copied for this step to change."""
    book = w.volatile.challenges
    book = (
        copy.deepcopy(book)
        if book is not None
        else pow_method.ChallengeBook(w.neighbor.identity.fingerprint)
    )
    w.volatile.challenges = book
    return book


def _answer_of(record: SettlementRecord) -> SettlementAnswer:
    return SettlementAnswer(record.state, record.attestation, record.rejection)


def _describe(reply: Reply) -> str:
    if isinstance(reply, Refused):
        return f"{reply.code}: {reply.message}" + (f" ({reply.data})" if reply.data else "")
    if isinstance(reply, NoAnswer):
        return "no answer"
    return "unexpected answer"
