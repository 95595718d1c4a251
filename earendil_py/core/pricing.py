"""Price agreements between neighbours: signed offers and signed answers (`push_price`).

Each side offers the price it charges per packet it receives from the other (and the debt it
lets the other run up); the other side answers accept or reject, both signed. A link carries
traffic only once both offers are accepted. An offer's `seq` strictly increases per
(offerer, payer) and names the *price epoch* it opens: packets are always charged at the
price of the epoch they were counted in.

The acceptance rule (the payer's side): accept iff price <= our `outbound_max_price_umel`,
debt limit >= our `outbound_min_debt_limit_umel`, and the offer shares a payment method with
us — except that a free offer (price 0) needs no payment method.

Pure: `now` is integer unix seconds, given by the caller. Formats in docs/accounting.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.identity import Fingerprint, Identity, Signature, Uint
from earendil_py.core.signed import sign, verify_signed

# v2: the signed part is the struct with its signature emptied (core/signed.py).
OFFER_DOMAIN = b"earendil_py push_price offer v2"
ANSWER_DOMAIN = b"earendil_py push_price answer v2"

MethodName = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Methods = Annotated[list[MethodName], msgspec.Meta(max_length=16)]
Reason = Annotated[str, msgspec.Meta(max_length=64)]


class PriceOffer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """`offerer` will charge `payer` `price_umel` per packet it receives from `payer`."""

    offerer: Fingerprint
    payer: Fingerprint
    seq: Uint
    price_umel: Uint
    debt_limit_umel: Uint
    methods: Methods
    timestamp: Uint
    signature: Signature

    def terms(self) -> PriceTerms:
        return PriceTerms(self.price_umel, self.debt_limit_umel, tuple(self.methods))


class PriceAnswer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The payer's signed answer to the offer with `seq` (and `offer_signature`, pinning the
    exact offer). `reason` is empty when accepted."""

    offerer: Fingerprint
    payer: Fingerprint
    seq: Uint
    offer_signature: Signature
    accepted: bool
    reason: Reason
    timestamp: Uint
    signature: Signature


@dataclass(frozen=True, slots=True)
class PriceTerms:
    """What an offer asks for."""

    price_umel: int
    debt_limit_umel: int
    methods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcceptanceRule:
    """What we, as payer, accept (a route's `outbound_*` config and our payment methods)."""

    max_price_umel: int
    min_debt_limit_umel: int
    methods: tuple[str, ...]

    def evaluate(self, terms: PriceTerms) -> str:
        """'' to accept, else the reason to reject."""
        if terms.price_umel > self.max_price_umel:
            return "price_too_high"
        if terms.debt_limit_umel < self.min_debt_limit_umel:
            return "debt_limit_too_low"
        if terms.price_umel > 0 and not set(terms.methods) & set(self.methods):
            return "no_shared_payment_method"
        return ""


@dataclass(frozen=True, slots=True)
class PriceAccepted:
    offer: PriceOffer


@dataclass(frozen=True, slots=True)
class PriceRejected:
    offer: PriceOffer
    reason: str


def make_offer(
    identity: Identity, payer: bytes, seq: int, terms: PriceTerms, now: int
) -> PriceOffer:
    unsigned = PriceOffer(
        identity.fingerprint,
        payer,
        seq,
        terms.price_umel,
        terms.debt_limit_umel,
        list(terms.methods),
        now,
        bytes(64),
    )
    return sign(identity, OFFER_DOMAIN, unsigned)


def make_answer(identity: Identity, offer: PriceOffer, reason: str, now: int) -> PriceAnswer:
    unsigned = PriceAnswer(
        offer.offerer, offer.payer, offer.seq, offer.signature, not reason, reason, now, bytes(64)
    )
    return sign(identity, ANSWER_DOMAIN, unsigned)


def verify_offer(offer: PriceOffer, offerer_public: bytes, payer: bytes) -> None:
    """Raises RemoteProtocolError unless `offer` is to `payer` and signed by its offerer."""
    if offer.payer != payer:
        raise RemoteProtocolError("price offer addressed to someone else", "wrong_party")
    verify_signed(offerer_public, OFFER_DOMAIN, offer)


def verify_answer(answer: PriceAnswer, offer: PriceOffer, payer_public: bytes) -> None:
    """Raises RemoteProtocolError unless `answer` answers exactly `offer`, signed by its payer."""
    if (answer.offerer, answer.payer, answer.seq, answer.offer_signature) != (
        offer.offerer,
        offer.payer,
        offer.seq,
        offer.signature,
    ):
        raise RemoteProtocolError("price answer is for another offer", "wrong_party")
    if answer.accepted == bool(answer.reason):
        raise RemoteProtocolError("price answer: accepted with a reason", "malformed")
    verify_signed(payer_public, ANSWER_DOMAIN, answer)
