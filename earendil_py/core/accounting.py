"""Debt between two neighbours: price epochs, conservative estimates, signed claims.

One `Account` per neighbour holds both directions, never netted:

* **inbound** — packets the neighbour sent us, charged at *our* accepted price: what they owe
  us. Our own count is authoritative (we charge for what arrived).
* **outbound** — packets we sent them, charged at *their* accepted price: what we owe. We
  estimate it from our count (an upper bound: some may be lost) and correct it to their
  signed claim (`push_debt`) of what actually arrived.

The relay loop counts packets in one place, `Counters`: a running total per direction since
the account began. Each accepted offer opens a price epoch (named by the offer's `seq`) at the
total of that moment, so an epoch's count is the total since it opened (or its final count
once closed) and a re-price never re-charges old packets. Claims carry *cumulative* per-epoch
counts and a strictly increasing `seq`, so a replayed or reordered claim changes nothing.

**What a claim may charge.** The receiver's per-epoch counts win: packets in flight when an
epoch switched may be counted in different epochs on the two sides, and a lost price answer
can leave one side counting in an older epoch for a while. What the receiver may not do is
charge for packets that were never carried:

* the claim's *net* excess over our counts, summed over every epoch it and we both still
  list, is at most `tolerance_packets`. The bound is on the total, never per epoch and never
  reset: claims are cumulative, so the excess is recomputed from the totals at every claim
  and a re-price cannot open a fresh allowance;
* packets claimed in an epoch in which we carried nothing must be matched by packets we
  carried in another epoch that the claim does not count (packets that moved epochs in
  flight): an empty epoch holds no claimed debt of its own.

A claim outside these bounds is a **dispute**: nothing of it is applied, both views are
returned for the record, and the account is frozen — no traffic either way — until the
operator unfreezes it (docs/accounting.md has the policy).

Pure: `now` is integer unix seconds. The state is plain data (`AccountState`, with frozen
`Epoch`s), so a caller can work on a cheap copy and keep or drop the result.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated

import msgspec

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Fingerprint, Identity, Int, Signature, Uint
from earendil_py.core.pricing import (
    AcceptanceRule,
    PriceAccepted,
    PriceAnswer,
    PriceOffer,
    PriceRejected,
    PriceTerms,
    make_answer,
    make_offer,
    verify_answer,
    verify_offer,
)
from earendil_py.core.signed import sign, verify_signed

# v3: claims carry `counted` beside `sent`. The signed part is the struct with its signature
# emptied (core/signed.py).
CLAIM_DOMAIN = b"earendil_py push_debt v3"
LIMIT_NOTICE_DOMAIN = b"earendil_py debt limit notice v2"

# Claims whose timestamp is further than this from our clock are refused as stale. Timestamps
# are advisory (ordering is by seq), so this only bounds how long a captured claim stays usable.
MAX_CLOCK_SKEW_SECS = 300
# Epochs kept per direction; older ones are folded into a fixed amount. A claim lists at most
# this many, so it stays far below the link's control frame size.
MAX_EPOCHS = 32
# "No limit": the allowance of a free (price 0) direction.
UNLIMITED = 2**62


class EpochCount(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    epoch: Uint
    packets: Uint


EpochCounts = Annotated[list[EpochCount], msgspec.Meta(max_length=MAX_EPOCHS)]


class DebtClaim(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """`push_debt`: the claimant's cumulative counts, per price epoch, oldest first.

    `received`: packets the claimant received from the counterparty (epochs of the claimant's
    offers) — what the counterparty owes. The other two are in epochs of the counterparty's
    offers. `sent`: what the claimant is charged for, by its estimate (the counterparty's
    last adopted count plus what the claimant sent since): a counterparty whose own count
    differs knows packets were lost since its last claim, and claims again to correct it.
    `counted`: what the claimant counted as sent, less what its crashes only assumed sent
    (`AccountState.assumed_out`): a counterparty that lost counts in a crash re-learns them
    from it (`AccountState.unmatched_in`).
    """

    claimant: Fingerprint
    counterparty: Fingerprint
    seq: Uint
    timestamp: Uint
    received: EpochCounts
    sent: EpochCounts
    counted: EpochCounts
    signature: Signature


class DebtLimitNotice(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The creditor tells the debtor it stopped relaying for it: debt reached the limit."""

    creditor: Fingerprint
    debtor: Fingerprint
    debt_umel: Int  # the creditor's view of debt_in_umel: negative after an overpayment
    limit_umel: Uint
    timestamp: Uint
    signature: Signature


class Counters:
    """The live packet totals with one neighbour, each direction, since the account began.

    The relay loop adds to them once per batch and nothing else writes them; everything else
    reads them. They are not part of `AccountState`, so work done on a copy of the state never
    loses packets counted meanwhile."""

    __slots__ = ("packets_in", "packets_out")

    def __init__(self, packets_in: int = 0, packets_out: int = 0) -> None:
        self.packets_in = packets_in
        self.packets_out = packets_out


class Epoch(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Counts in one price epoch. The open (last) epoch counts `total - start`; a closed one
    keeps its final count in `packets`. For outbound epochs `claimed` is the creditor's last
    adopted count (-1: none yet) and `counted_at_claim` our own count when it was adopted."""

    epoch: int
    price_umel: int
    start: int = 0
    packets: int = -1
    claimed: int = -1
    counted_at_claim: int = 0

    def count(self, total: int) -> int:
        """Packets in this epoch, given the direction's live total."""
        return self.packets if self.packets >= 0 else total - self.start

    def charged(self, count: int) -> int:
        """Packets charged, given our count: the adopted claim plus what we counted since."""
        if self.claimed < 0:
            return count
        return self.claimed + count - self.counted_at_claim

    def relearned(self, packets: int) -> Epoch:
        """This epoch with `packets` more counted (counts a crash lost, learned back)."""
        if self.packets >= 0:
            return msgspec.structs.replace(self, packets=self.packets + packets)
        return msgspec.structs.replace(self, start=self.start - packets)


class AccountState(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an account needs to resume after a restart, besides the live totals."""

    neighbor: bytes
    our_offer: PriceOffer | None = None  # our offer in force (accepted by them)
    proposed: PriceOffer | None = None  # our latest offer, perhaps not yet answered
    their_offer: PriceOffer | None = None  # their offer in force (accepted by us)
    their_answer: PriceAnswer | None = None  # our answer to their latest offer
    inbound: list[Epoch] = msgspec.field(default_factory=list)
    outbound: list[Epoch] = msgspec.field(default_factory=list)
    folded_in_umel: int = 0  # charges of inbound epochs dropped beyond MAX_EPOCHS
    folded_out_umel: int = 0
    settled_in_umel: int = 0  # settlements they paid us
    settled_out_umel: int = 0  # settlements we paid them
    claim_seq_sent: int = 0
    claim_seq_received: int = 0
    frozen: str = ""  # why traffic is stopped; '' when it flows
    # Outbound totals [low, high) that a crash counted as sent without knowing it sent them
    # (the unused part of a lease, and what went out unwritten before the crash), oldest
    # first, at most MAX_EPOCHS: never admitted in a claim's `counted`.
    assumed_out: tuple[tuple[int, int], ...] = ()
    # How many more packets the neighbour's last claim counted as sent than we had counted
    # then (never below 0): lost on the way, or still in flight. A crash of ours re-learns
    # only what a later claim counts beyond our count in excess of this.
    unmatched_in: int = 0

    def copy(self) -> AccountState:
        """A copy to work on: epochs and offers are immutable, so new lists suffice."""
        return msgspec.structs.replace(
            self, inbound=list(self.inbound), outbound=list(self.outbound)
        )


@dataclass(frozen=True, slots=True)
class ClaimApplied:
    debt_out_before_umel: int
    debt_out_after_umel: int


@dataclass(frozen=True, slots=True)
class Dispute:
    """A claim that charges for packets we did not carry: both views, for the ledger.

    `reason` "overclaim": `their_packets` claimed against `our_packets` counted, over the
    epochs both list; "empty_epoch": `their_packets` claimed in epochs in which we carried
    nothing, against `our_packets` we carried that the claim leaves uncounted elsewhere."""

    reason: str
    their_packets: int
    our_packets: int


ClaimOutcome = ClaimApplied | Dispute


class Account:
    """Both debt directions with one neighbour, over `state` and the live `counters`. See
    the module docstring. Every method changes `state` in place: give it a copy to keep the
    original.

    After a crash lost the inbound counts since they were last written, the first claim
    applied re-learns up to `recovery_in` of them from what the neighbour says it counted
    (its own admission), beyond what its claim before said the link had lost. Outbound
    counts are never lost: the relay loop sends nothing a written lease does not cover, and
    after a crash we count the whole lease as sent (core/neighbor.py). Those totals
    (`assume_sent`) are never admitted in our claims' `counted`: a neighbour that crashed
    too must not re-learn packets we never sent from our own upper bound. `unsure_out` =
    [low, high), the last crash's, stays set until a claim of the neighbour has corrected
    our count (no automatic settlement pays it before).
    """

    __slots__ = (
        "counters",
        "identity",
        "neighbor",
        "neighbor_public",
        "recovery_in",
        "state",
        "unsure_out",
    )

    def __init__(
        self,
        identity: Identity,
        neighbor_public: bytes,
        state: AccountState,
        counters: Counters,
        *,
        recovery_in: int = 0,
        unsure_out: tuple[int, int] = (0, 0),
    ) -> None:
        self.identity = identity
        self.neighbor_public = neighbor_public
        self.neighbor = state.neighbor
        self.state = state
        self.counters = counters
        self.recovery_in = recovery_in
        self.unsure_out = unsure_out

    # --- balances -----------------------------------------------------------------------

    @property
    def priced(self) -> bool:
        return self.state.our_offer is not None and self.state.their_offer is not None

    @property
    def flowing(self) -> bool:
        """Both offers accepted and not frozen: traffic may pass either way."""
        return self.priced and not self.state.frozen

    @property
    def debt_in_umel(self) -> int:
        """What the neighbour owes us now (negative: we owe them a refund of overpayment)."""
        s, total = self.state, self.counters.packets_in
        charges = sum(e.count(total) * e.price_umel for e in s.inbound)
        return s.folded_in_umel - s.settled_in_umel + charges

    @property
    def debt_out_umel(self) -> int:
        """What we owe the neighbour now, by our best estimate."""
        s, total = self.state, self.counters.packets_out
        charges = sum(e.charged(e.count(total)) * e.price_umel for e in s.outbound)
        return s.folded_out_umel - s.settled_out_umel + charges

    def inbound_allowance(self) -> int:
        """Packets the neighbour may still send us before its debt passes our limit."""
        offer = self.state.our_offer
        if offer is None or not self.flowing:
            return 0
        if offer.price_umel == 0:
            return UNLIMITED
        return max(0, (offer.debt_limit_umel - self.debt_in_umel) // offer.price_umel)

    def outbound_allowance(self) -> int:
        """Packets we may still send before our estimated debt passes their limit."""
        offer = self.state.their_offer
        if offer is None or not self.flowing:
            return 0
        if offer.price_umel == 0:
            return UNLIMITED
        return max(0, (offer.debt_limit_umel - self.debt_out_umel) // offer.price_umel)

    def charged_out_packets(self) -> int:
        """Packets we are charged for over the epochs we keep (folded ones aside)."""
        total = self.counters.packets_out
        return sum(e.charged(e.count(total)) for e in self.state.outbound)

    def settle(self, paid_in_umel: int, paid_out_umel: int) -> None:
        """Apply a completed settlement: they paid us `paid_in_umel`, we paid `paid_out_umel`."""
        if paid_in_umel < 0 or paid_out_umel < 0:
            raise LocalProtocolError("settlement amounts are never negative")
        self.state.settled_in_umel += paid_in_umel
        self.state.settled_out_umel += paid_out_umel

    def freeze(self, reason: str) -> None:
        self.state.frozen = reason

    def unfreeze(self) -> None:
        self.state.frozen = ""

    # --- push_price ---------------------------------------------------------------------

    def propose(self, terms: PriceTerms, now: int) -> PriceOffer:
        """The offer to push now: the one in force or pending if its terms are `terms`, else a
        new one with the next seq (the state changes: persist it before sending)."""
        s = self.state
        if s.proposed is not None and s.proposed.terms() == terms:
            return s.proposed
        seq = s.proposed.seq + 1 if s.proposed is not None else 1
        s.proposed = make_offer(self.identity, self.neighbor, seq, terms, now)
        return s.proposed

    def on_answer(self, answer: PriceAnswer) -> PriceAccepted | PriceRejected:
        """The neighbour answered our proposed offer. On acceptance our new price applies to
        every packet counted from now. Raises RemoteProtocolError if the answer is forged or
        answers another offer."""
        s = self.state
        if s.proposed is None:
            raise RemoteProtocolError("price answer without an offer", "unexpected_answer")
        verify_answer(answer, s.proposed, self.neighbor_public)
        if not answer.accepted:
            return PriceRejected(s.proposed, answer.reason)
        if s.our_offer is None or s.our_offer.seq != s.proposed.seq:
            s.our_offer = s.proposed
            s.folded_in_umel += _open_epoch(s.inbound, s.proposed, self.counters.packets_in)
        return PriceAccepted(s.proposed)

    def on_offer(self, offer: PriceOffer, rule: AcceptanceRule, now: int) -> PriceAnswer:
        """Answer the neighbour's offer (signed). Accepting opens a new outbound epoch at its
        price. An offer already answered gets the same verdict again (the state is then
        unchanged). Raises RemoteProtocolError if the offer is forged or not addressed to us."""
        verify_offer(offer, self.neighbor_public, self.identity.fingerprint)
        if offer.offerer != self.neighbor:
            raise RemoteProtocolError("price offer from someone else", "wrong_party")
        s = self.state
        last = s.their_answer
        if last is not None and offer.seq <= last.seq:
            if offer.seq == last.seq and offer.signature == last.offer_signature:
                return last
            reason = "seq_reused" if offer.seq == last.seq else "stale_seq"
            return make_answer(self.identity, offer, reason, now)
        # The offer and our answer are kept: their parties as the objects the account holds
        # already, not the copies decoding made (130 bytes a neighbour).
        offer = msgspec.structs.replace(
            offer, offerer=self.neighbor, payer=self.identity.fingerprint
        )
        reason = rule.evaluate(offer.terms())
        s.their_answer = make_answer(self.identity, offer, reason, now)
        if not reason:
            s.their_offer = offer
            s.folded_out_umel += _open_epoch(s.outbound, offer, self.counters.packets_out)
            oldest = s.outbound[0].start
            s.assumed_out = tuple(r for r in s.assumed_out if r[1] > oldest)
        return s.their_answer

    # --- push_debt ----------------------------------------------------------------------

    def claim_counts(self) -> tuple[list[EpochCount], list[EpochCount], list[EpochCount]]:
        """Our cumulative counts per epoch, (received, sent, counted): what a claim now would
        say (`DebtClaim`)."""
        s, total = self.state, self.counters.packets_out
        sent, counted = [], []
        for e in s.outbound:
            count = e.count(total)
            sent.append(EpochCount(e.epoch, e.charged(count)))
            assumed = sum(
                max(0, min(e.start + count, high) - max(e.start, low))
                for low, high in s.assumed_out
            )
            counted.append(EpochCount(e.epoch, count - assumed))
        received = [EpochCount(e.epoch, e.count(self.counters.packets_in)) for e in s.inbound]
        return received, sent, counted

    def assume_sent(self, low: int, high: int) -> None:
        """A crash counted outbound totals [low, high) as sent: never admit them as counted.
        Beyond MAX_EPOCHS ranges the oldest two merge (what lay between is then not admitted
        either: a neighbour re-learning from us may lose it, but is never charged for more)."""
        assumed = list(self.state.assumed_out)
        if assumed and low <= assumed[-1][1]:
            assumed[-1] = (assumed[-1][0], max(high, assumed[-1][1]))
        else:
            assumed.append((low, high))
        if len(assumed) > MAX_EPOCHS:
            assumed[:2] = [(assumed[0][0], assumed[1][1])]
        self.state.assumed_out = tuple(assumed)

    def make_claim(self, now: int) -> DebtClaim:
        """Our signed cumulative counts for the neighbour (the next claim seq)."""
        s = self.state
        s.claim_seq_sent += 1
        received, sent, counted = self.claim_counts()
        unsigned = DebtClaim(
            self.identity.fingerprint,
            self.neighbor,
            s.claim_seq_sent,
            now,
            received,
            sent,
            counted,
            b"",
        )
        return sign(self.identity, CLAIM_DOMAIN, unsigned)

    def check_claim(self, claim: DebtClaim, now: int) -> None:
        """Raises RemoteProtocolError (nothing to apply) if the claim is forged or not between
        us ("bad_signature", "wrong_party"), malformed ("malformed_claim"), replayed or older
        than the last one ("replayed_claim"), or dated too far from `now` ("stale_claim")."""
        if claim.claimant != self.neighbor or claim.counterparty != self.identity.fingerprint:
            raise RemoteProtocolError("debt claim between other parties", "wrong_party")
        verify_signed(self.neighbor_public, CLAIM_DOMAIN, claim)
        for counts in (claim.received, claim.sent, claim.counted):
            if any(a.epoch >= b.epoch for a, b in pairwise(counts)):
                raise RemoteProtocolError("claim epochs are not in order", "malformed_claim")
        if claim.seq <= self.state.claim_seq_received:
            raise RemoteProtocolError("debt claim replayed or out of order", "replayed_claim")
        if abs(claim.timestamp - now) > MAX_CLOCK_SKEW_SECS:
            raise RemoteProtocolError("debt claim timestamp is too far off", "stale_claim")

    def on_claim(self, claim: DebtClaim, now: int, tolerance_packets: int) -> ClaimOutcome:
        """Apply the neighbour's claim, or find it a dispute (and freeze the account).

        Raises RemoteProtocolError as `check_claim`, changing nothing."""
        self.check_claim(claim, now)
        s = self.state
        s.claim_seq_received = claim.seq
        total = self.counters.packets_out
        ours = {e.epoch: e.count(total) for e in s.outbound}
        claimed = {c.epoch: c.packets for c in claim.received}
        # The epochs both of us still list: from the claim's oldest (older ones it folded)
        # and from our oldest (older ones we folded).
        low = max(min(claimed, default=0), s.outbound[0].epoch if s.outbound else 0)
        window = [seq for seq in ours if seq >= low]
        unknown = [seq for seq in claimed if seq >= low and seq not in ours]
        theirs_total = sum(claimed.get(seq, 0) for seq in window) + sum(
            claimed[seq] for seq in unknown
        )
        ours_total = sum(ours[seq] for seq in window)
        in_empty = sum(claimed.get(seq, 0) for seq in window if ours[seq] == 0) + sum(
            claimed[seq] for seq in unknown
        )
        uncounted = sum(max(0, ours[seq] - claimed.get(seq, 0)) for seq in window if ours[seq])
        if theirs_total - ours_total > tolerance_packets:
            s.frozen = "dispute"
            return Dispute("overclaim", theirs_total, ours_total)
        if in_empty > uncounted:
            s.frozen = "dispute"
            return Dispute("empty_epoch", in_empty, uncounted)
        before = self.debt_out_umel
        for index, epoch in enumerate(s.outbound):
            if epoch.epoch >= low:
                s.outbound[index] = msgspec.structs.replace(
                    epoch, claimed=claimed.get(epoch.epoch, 0), counted_at_claim=ours[epoch.epoch]
                )
        # What they counted as sent beyond our count, over the epochs both list: after our
        # crash, what it exceeds `unmatched_in` by is the counts we lost (re-learned once, up
        # to `recovery_in`). What they counted in an epoch we do not list (not opened here
        # yet, or never) we counted in the newest of ours before it; older than all ours,
        # we folded it. A claim made before packets that arrived ahead of it counts less
        # than we do: that is not a loss of theirs, hence never below 0.
        listed = [e.epoch for e in s.inbound]
        counted: dict[int, int] = {}
        for c in claim.counted:
            at = bisect_right(listed, c.epoch) - 1
            if at >= 0:
                counted[listed[at]] = counted.get(listed[at], 0) + c.packets
        total_in = self.counters.packets_in
        beyond = {
            e.epoch: counted[e.epoch] - e.count(total_in) for e in s.inbound if e.epoch in counted
        }
        relearn = min(self.recovery_in, max(0, sum(beyond.values()) - s.unmatched_in))
        for index, epoch in enumerate(s.inbound):
            extra = min(beyond.get(epoch.epoch, 0), relearn)
            if extra > 0:
                relearn -= extra
                beyond[epoch.epoch] -= extra
                s.inbound[index] = epoch.relearned(extra)
        # Bounded: 32 epochs of a hostile claim could sum past what the ledger can encode,
        # and beyond UNLIMITED it re-learns nothing either way.
        s.unmatched_in = min(max(0, sum(beyond.values())), UNLIMITED)
        self.recovery_in = 0
        self.unsure_out = (0, 0)  # adopted: our count of each epoch is theirs plus ours since
        return ClaimApplied(before, self.debt_out_umel)

    # --- debt limit notices -------------------------------------------------------------

    def make_limit_notice(self, now: int) -> DebtLimitNotice:
        offer = self.state.our_offer
        limit = offer.debt_limit_umel if offer is not None else 0
        unsigned = DebtLimitNotice(
            self.identity.fingerprint, self.neighbor, self.debt_in_umel, limit, now, b""
        )
        return sign(self.identity, LIMIT_NOTICE_DOMAIN, unsigned)

    def verify_limit_notice(self, notice: DebtLimitNotice) -> None:
        """Raises RemoteProtocolError unless the neighbour signed this notice to us."""
        if notice.creditor != self.neighbor or notice.debtor != self.identity.fingerprint:
            raise RemoteProtocolError("debt limit notice between other parties", "wrong_party")
        verify_signed(self.neighbor_public, LIMIT_NOTICE_DOMAIN, notice)


def _open_epoch(epochs: list[Epoch], offer: PriceOffer, total: int) -> int:
    """Close the open epoch at `total` and open `offer`'s; returns the charge (µMEL) of
    epochs folded away beyond MAX_EPOCHS, to add to the folded amount."""
    if epochs:
        epochs[-1] = msgspec.structs.replace(epochs[-1], packets=epochs[-1].count(total))
    epochs.append(Epoch(offer.seq, offer.price_umel, start=total))
    folded = 0
    while len(epochs) > MAX_EPOCHS:
        old = epochs.pop(0)
        folded += old.charged(old.count(total)) * old.price_umel
    return folded
