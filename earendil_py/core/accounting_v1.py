"""Debt between two neighbours: price epochs, conservative estimates, signed claims.

One `Account` per neighbour holds both directions, never netted:

* **inbound** — packets the neighbour sent us, charged at *our* accepted price: what they owe
  us. Our own count is authoritative (we charge for what arrived).
* **outbound** — packets we sent them, charged at *their* accepted price: what we owe. We
  estimate it from our count (an upper bound: some may be lost) and correct it down to their
  signed claim (`push_debt`) of what actually arrived.

Each accepted offer opens a price epoch (named by the offer's `seq`); counts are kept per
epoch, so a re-price never re-charges old packets. Claims carry *cumulative* per-epoch counts
and a strictly increasing `seq`, so a replayed or reordered claim changes nothing.

A claim above what we sent plus a tolerance (in-flight packets, and after a crash the counts
we may have lost since our last checkpoint) is a **dispute**: nothing of it is applied, both
views are returned for the record, and the account is frozen — no traffic either way — until
the operator unfreezes it (docs/accounting.md has the policy).

The relay loop touches only `sent`, `received`, `inbound_allowance()` and
`outbound_allowance()`, once per batch; everything else runs per message. Pure: `now` is
integer unix seconds.

The pre-`Neighbor` version, kept only for runtime/accounting.py and runtime/settlement.py
until the neighbour service replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Fingerprint, Identity, Int, Signature, Uint, verify
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

CLAIM_DOMAIN = b"earendil_py push_debt v1"
LIMIT_NOTICE_DOMAIN = b"earendil_py debt limit notice v1"

# Claims whose timestamp is further than this from our clock are refused as stale. Timestamps
# are advisory (ordering is by seq), so this only bounds how long a captured claim stays usable.
MAX_CLOCK_SKEW_SECS = 300
# Epochs kept per direction; older ones are folded into a fixed amount. A claim lists at most
# this many, so it stays far below the link's control frame size.
MAX_EPOCHS = 32
# "No limit": the allowance of a free (price 0) direction.
UNLIMITED = 2**62


_encoder = msgspec.msgpack.Encoder()


class EpochCount(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    epoch: Uint
    packets: Uint


EpochCounts = Annotated[list[EpochCount], msgspec.Meta(max_length=MAX_EPOCHS)]


class DebtClaim(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """`push_debt`: the claimant's cumulative counts, per price epoch.

    `received`: packets the claimant received from the counterparty (epochs of the claimant's
    offers) — what the counterparty owes. `sent`: packets the claimant sent (epochs of the
    counterparty's offers), which lets a counterparty that lost counts in a crash recover them.
    """

    claimant: Fingerprint
    counterparty: Fingerprint
    seq: Uint
    timestamp: Uint
    received: EpochCounts
    sent: EpochCounts
    signature: Signature

    def signed_part(self) -> bytes:
        return _encoder.encode(
            (
                self.claimant,
                self.counterparty,
                self.seq,
                self.timestamp,
                self.received,
                self.sent,
            )
        )


class DebtLimitNotice(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The creditor tells the debtor it stopped relaying for it: debt reached the limit."""

    creditor: Fingerprint
    debtor: Fingerprint
    debt_umel: Int  # the creditor's view of debt_in_umel: negative after an overpayment
    limit_umel: Uint
    timestamp: Uint
    signature: Signature

    def signed_part(self) -> bytes:
        return _encoder.encode(
            (self.creditor, self.debtor, self.debt_umel, self.limit_umel, self.timestamp)
        )


class Epoch(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Counts in one price epoch. For outbound epochs `claimed` is the creditor's last claimed
    count (-1: none yet) and `counted_at_claim` our own count when that claim arrived."""

    epoch: int
    price_umel: int
    packets: int = 0
    claimed: int = -1
    counted_at_claim: int = 0

    def charged(self, packets: int) -> int:
        """Packets charged, given our current count (the live one for the open epoch)."""
        if self.claimed < 0:
            return packets
        return self.claimed + packets - self.counted_at_claim


class AccountState(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an account needs to resume after a restart (a ledger checkpoint)."""

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
    peak_packets: int = 0  # most packets counted between two checkpoints, either way
    checkpoint_packets: int = 0  # total packets counted at the last checkpoint
    clean: bool = False  # written by a clean shutdown: no counts were lost


@dataclass(frozen=True, slots=True)
class ClaimApplied:
    debt_out_before_umel: int
    debt_out_after_umel: int


@dataclass(frozen=True, slots=True)
class Dispute:
    """A claim above what we could have sent: both views, for the ledger and the operator."""

    reason: str
    epoch: int
    their_packets: int
    our_packets: int


ClaimOutcome = ClaimApplied | Dispute


class Account:
    """Both debt directions with one neighbour. See the module docstring.

    `sent` and `received` are the live counts of the open outbound and inbound epochs; the
    relay loop adds to them directly.
    """

    __slots__ = (
        "_in_closed_umel",
        "_out_closed_umel",
        "identity",
        "neighbor",
        "neighbor_public",
        "received",
        "recovery_packets",
        "sent",
        "state",
    )

    def __init__(
        self,
        identity: Identity,
        neighbor_public: bytes,
        state: AccountState,
        *,
        recovering: bool = False,
    ) -> None:
        self.identity = identity
        self.neighbor_public = neighbor_public
        self.neighbor = state.neighbor
        self.state = state
        self.sent = state.outbound[-1].packets if state.outbound else 0
        self.received = state.inbound[-1].packets if state.inbound else 0
        # After a crash, counts since the last checkpoint are lost: accept claims that far
        # above our count (twice the busiest interval seen), once, to re-learn them.
        self.recovery_packets = 2 * state.peak_packets if recovering and not state.clean else 0
        state.clean = False
        self._in_closed_umel = 0
        self._out_closed_umel = 0
        self._recompute()

    # --- the hot path -------------------------------------------------------------------

    def inbound_allowance(self) -> int:
        """Packets the neighbour may still send us before its debt passes our limit."""
        offer = self.state.our_offer
        if offer is None or self.state.their_offer is None or self.state.frozen:
            return 0
        price = offer.price_umel
        if price == 0:
            return UNLIMITED
        debt = self._in_closed_umel + self.received * price
        return max(0, (offer.debt_limit_umel - debt) // price)

    def outbound_allowance(self) -> int:
        """Packets we may still send before our estimated debt passes their limit."""
        offer = self.state.their_offer
        if offer is None or self.state.our_offer is None or self.state.frozen:
            return 0
        price = offer.price_umel
        if price == 0:
            return UNLIMITED
        current = self.state.outbound[-1]
        debt = self._out_closed_umel + current.charged(self.sent) * price
        return max(0, (offer.debt_limit_umel - debt) // price)

    # --- balances -----------------------------------------------------------------------

    @property
    def priced(self) -> bool:
        return self.state.our_offer is not None and self.state.their_offer is not None

    @property
    def debt_in_umel(self) -> int:
        """What the neighbour owes us now (negative: we owe them a refund of overpayment)."""
        if not self.state.inbound:
            return self._in_closed_umel
        return self._in_closed_umel + self.received * self.state.inbound[-1].price_umel

    @property
    def debt_out_umel(self) -> int:
        """What we owe the neighbour now, by our best estimate."""
        if not self.state.outbound:
            return self._out_closed_umel
        current = self.state.outbound[-1]
        return self._out_closed_umel + current.charged(self.sent) * current.price_umel

    def _recompute(self) -> None:
        """Cache everything but the open epochs' live counts (run after any change)."""
        s = self.state
        self._in_closed_umel = (
            s.folded_in_umel
            - s.settled_in_umel
            + sum(e.packets * e.price_umel for e in s.inbound[:-1])
        )
        self._out_closed_umel = (
            s.folded_out_umel
            - s.settled_out_umel
            + sum(e.charged(e.packets) * e.price_umel for e in s.outbound[:-1])
        )

    def settle(self, paid_in_umel: int, paid_out_umel: int) -> None:
        """Apply a completed settlement: they paid us `paid_in_umel`, we paid `paid_out_umel`."""
        if paid_in_umel < 0 or paid_out_umel < 0:
            raise LocalProtocolError("settlement amounts are never negative")
        self.state.settled_in_umel += paid_in_umel
        self.state.settled_out_umel += paid_out_umel
        self._recompute()

    def unfreeze(self) -> None:
        self.state.frozen = ""

    def checkpoint(self, *, clean: bool = False) -> bytes:
        """Bring the state up to date with the live counts and encode it (a ledger
        checkpoint). Also tracks the busiest interval between checkpoints, for crash
        recovery."""
        s = self.state
        self._sync_live()
        total = sum(e.packets for e in s.inbound) + sum(e.packets for e in s.outbound)
        s.peak_packets = max(s.peak_packets, total - s.checkpoint_packets)
        s.checkpoint_packets = total
        s.clean = clean
        encoded = _encoder.encode(s)
        s.clean = False
        return encoded

    def snapshot(self, *, clean: bool = False) -> AccountState:
        """`checkpoint`, as a copy of the state."""
        return msgspec.msgpack.decode(self.checkpoint(clean=clean), type=AccountState)

    def _sync_live(self) -> None:
        """Copy the live counts into the open epochs."""
        s = self.state
        if s.outbound:
            s.outbound[-1].packets = self.sent
        if s.inbound:
            s.inbound[-1].packets = self.received

    # --- push_price ---------------------------------------------------------------------

    def propose(self, terms: PriceTerms, now: int) -> PriceOffer:
        """The offer to push now: the one in force or pending if its terms are `terms`, else a
        new one with the next seq. The caller persists the state before sending it."""
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
            self.received = self._open_epoch(s.inbound, s.proposed, self.received, inbound=True)
        return PriceAccepted(s.proposed)

    def on_offer(self, offer: PriceOffer, rule: AcceptanceRule, now: int) -> PriceAnswer:
        """Answer the neighbour's offer (signed). Accepting opens a new outbound epoch at its
        price. An offer already answered gets the same verdict again. Raises
        RemoteProtocolError if the offer is forged or not addressed to us."""
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
        reason = rule.evaluate(offer.terms())
        s.their_answer = make_answer(self.identity, offer, reason, now)
        if not reason:
            s.their_offer = offer
            self.sent = self._open_epoch(s.outbound, offer, self.sent, inbound=False)
        return s.their_answer

    def _open_epoch(
        self, epochs: list[Epoch], offer: PriceOffer, live: int, *, inbound: bool
    ) -> int:
        if epochs:
            epochs[-1].packets = live
        epochs.append(Epoch(offer.seq, offer.price_umel))
        while len(epochs) > MAX_EPOCHS:
            old = epochs.pop(0)
            if inbound:
                self.state.folded_in_umel += old.packets * old.price_umel
            else:
                self.state.folded_out_umel += old.charged(old.packets) * old.price_umel
        self._recompute()
        return 0

    # --- push_debt ----------------------------------------------------------------------

    def make_claim(self, now: int) -> DebtClaim:
        """Our signed cumulative counts for the neighbour."""
        s = self.state
        self._sync_live()
        s.claim_seq_sent += 1
        unsigned = DebtClaim(
            self.identity.fingerprint,
            self.neighbor,
            s.claim_seq_sent,
            now,
            [EpochCount(e.epoch, e.packets) for e in s.inbound],
            [EpochCount(e.epoch, e.packets) for e in s.outbound],
            bytes(64),
        )
        return msgspec.structs.replace(
            unsigned, signature=self.identity.sign(CLAIM_DOMAIN, unsigned.signed_part())
        )

    def on_claim(self, claim: DebtClaim, now: int, tolerance_packets: int) -> ClaimOutcome:
        """Apply the neighbour's claim, or find it a dispute (and freeze the account).

        Raises RemoteProtocolError (nothing applied) if it is forged or not between us
        ("bad_signature", "wrong_party"), replayed or older than the last one
        ("replayed_claim"), or dated too far from `now` ("stale_claim").
        """
        s = self.state
        if claim.claimant != self.neighbor or claim.counterparty != self.identity.fingerprint:
            raise RemoteProtocolError("debt claim between other parties", "wrong_party")
        verify(self.neighbor_public, CLAIM_DOMAIN, claim.signed_part(), claim.signature)
        if claim.seq <= s.claim_seq_received:
            raise RemoteProtocolError("debt claim replayed or out of order", "replayed_claim")
        if abs(claim.timestamp - now) > MAX_CLOCK_SKEW_SECS:
            raise RemoteProtocolError("debt claim timestamp is too far off", "stale_claim")
        s.claim_seq_received = claim.seq
        self._sync_live()
        # What they received from us is what we owe: adopt it, unless it exceeds what we sent.
        slack = tolerance_packets + self.recovery_packets
        outbound = {e.epoch: e for e in s.outbound}
        for count in claim.received:
            epoch = outbound.get(count.epoch)
            ours = epoch.packets if epoch is not None else 0
            if count.packets > ours + slack:
                s.frozen = "dispute"
                return Dispute("overclaim", count.epoch, count.packets, ours)
        before = self.debt_out_umel
        for count in claim.received:
            if (epoch := outbound.get(count.epoch)) is not None:
                epoch.claimed, epoch.counted_at_claim = count.packets, epoch.packets
        # After a crash we may have lost inbound counts: re-learn them from what they sent.
        if self.recovery_packets:
            inbound = {e.epoch: e for e in s.inbound}
            for count in claim.sent:
                if (
                    epoch := inbound.get(count.epoch)
                ) is not None and count.packets > epoch.packets:
                    epoch.packets = min(count.packets, epoch.packets + self.recovery_packets)
            self.received = s.inbound[-1].packets if s.inbound else 0
            self.recovery_packets = 0
        self._recompute()
        return ClaimApplied(before, self.debt_out_umel)

    # --- debt limit notices -------------------------------------------------------------

    def make_limit_notice(self, now: int) -> DebtLimitNotice:
        offer = self.state.our_offer
        limit = offer.debt_limit_umel if offer is not None else 0
        unsigned = DebtLimitNotice(
            self.identity.fingerprint, self.neighbor, self.debt_in_umel, limit, now, bytes(64)
        )
        return msgspec.structs.replace(
            unsigned,
            signature=self.identity.sign(LIMIT_NOTICE_DOMAIN, unsigned.signed_part()),
        )

    def verify_limit_notice(self, notice: DebtLimitNotice) -> None:
        """Raises RemoteProtocolError unless the neighbour signed this notice to us."""
        if notice.creditor != self.neighbor or notice.debtor != self.identity.fingerprint:
            raise RemoteProtocolError("debt limit notice between other parties", "wrong_party")
        verify(self.neighbor_public, LIMIT_NOTICE_DOMAIN, notice.signed_part(), notice.signature)
