"""Price agreements and debt accounting between two neighbours, in memory."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.core.accounting import (
    CLAIM_DOMAIN,
    MAX_CLOCK_SKEW_SECS,
    MAX_EPOCHS,
    UNLIMITED,
    Account,
    AccountState,
    ClaimApplied,
    Counters,
    DebtClaim,
    DebtLimitNotice,
    Dispute,
    EpochCount,
)
from earendil_py.core.errors import RemoteProtocolError, convert_remote
from earendil_py.core.identity import Identity
from earendil_py.core.neighbor import wire
from earendil_py.core.pricing import AcceptanceRule, PriceAccepted, PriceRejected, PriceTerms
from earendil_py.core.rpc import MAX_PAYLOAD_SIZE, encode_request
from earendil_py.core.signed import sign
from tests.core.neighbor_pair import seeded_rng

NOW = 1_800_000_000
ALICE = Identity.generate(seeded_rng(1))
BOB = Identity.generate(seeded_rng(2))
MALLORY = Identity.generate(seeded_rng(3))
RULE = AcceptanceRule(max_price_umel=10, min_debt_limit_umel=1_000, methods=("pow", "manual"))
TOLERANCE = 8


def account(me: Identity, them: Identity, state: AccountState | None = None) -> Account:
    return Account(me, them.identity_public, state or AccountState(them.fingerprint), Counters())


def agree(
    a: Account, b: Account, a_terms: PriceTerms, b_terms: PriceTerms
) -> tuple[object, object]:
    """Each side offers its terms; each answers the other's offer."""
    a_offer, b_offer = a.propose(a_terms, NOW), b.propose(b_terms, NOW)
    return a.on_answer(b.on_offer(a_offer, RULE, NOW)), b.on_answer(a.on_offer(b_offer, RULE, NOW))


def pair(price_a: int = 2, price_b: int = 3, limit: int = 10_000) -> tuple[Account, Account]:
    a, b = account(ALICE, BOB), account(BOB, ALICE)
    outcomes = agree(
        a, b, PriceTerms(price_a, limit, ("pow",)), PriceTerms(price_b, limit, ("pow",))
    )
    assert all(isinstance(o, PriceAccepted) for o in outcomes)
    return a, b


def carry(sender: Account, receiver: Account, sent: int, arrived: int | None = None) -> None:
    """`sent` packets leave `sender`; `arrived` of them (default all) reach `receiver`."""
    sender.counters.packets_out += sent
    receiver.counters.packets_in += sent if arrived is None else arrived


def reprice(creditor: Account, debtor: Account, price: int, limit: int = 10_000) -> None:
    """The creditor offers new terms and the debtor accepts: a new epoch both ways."""
    offer = creditor.propose(PriceTerms(price, limit, ("pow",)), NOW)
    assert isinstance(creditor.on_answer(debtor.on_offer(offer, RULE, NOW)), PriceAccepted)


def forged_claim(claimant: Identity, counterparty: Identity, **fields: object) -> DebtClaim:
    """A claim signed by `claimant`, saying whatever `fields` say."""
    unsigned = DebtClaim(claimant.fingerprint, counterparty.fingerprint, 1, NOW, [], [], [], b"")
    return sign(claimant, CLAIM_DOMAIN, msgspec.structs.replace(unsigned, **fields))


# --- push_price ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        (PriceTerms(11, 5_000, ("pow",)), "price_too_high"),
        (PriceTerms(5, 999, ("pow",)), "debt_limit_too_low"),
        (PriceTerms(5, 5_000, ("onchain",)), "no_shared_payment_method"),
    ],
)
def test_each_acceptance_rule_rejects(terms: PriceTerms, reason: str) -> None:
    a, b = account(ALICE, BOB), account(BOB, ALICE)
    answer = b.on_offer(a.propose(terms, NOW), RULE, NOW)
    assert (answer.accepted, answer.reason) == (False, reason)
    assert a.on_answer(answer) == PriceRejected(a.state.proposed, reason)  # type: ignore[arg-type]
    assert not a.priced and not b.priced
    assert a.inbound_allowance() == 0 and b.outbound_allowance() == 0


def test_limits_are_inclusive_and_a_free_offer_needs_no_shared_method() -> None:
    for terms in [PriceTerms(10, 1_000, ("pow",)), PriceTerms(0, 1_000, ())]:
        a, b = account(ALICE, BOB), account(BOB, ALICE)
        answer = b.on_offer(a.propose(terms, NOW), RULE, NOW)
        assert answer.accepted and answer.reason == ""


def test_no_traffic_until_both_offers_are_accepted() -> None:
    a, b = account(ALICE, BOB), account(BOB, ALICE)
    terms = PriceTerms(1, 5_000, ("pow",))
    a.on_answer(b.on_offer(a.propose(terms, NOW), RULE, NOW))  # only Alice's price agreed
    assert not a.priced and not b.priced
    assert a.inbound_allowance() == a.outbound_allowance() == 0
    assert b.inbound_allowance() == b.outbound_allowance() == 0
    b.on_answer(a.on_offer(b.propose(terms, NOW), RULE, NOW))
    assert a.priced and b.priced
    assert a.inbound_allowance() == 5_000 and b.outbound_allowance() == 5_000


def test_free_links_have_no_limit() -> None:
    a, b = pair(price_a=0, price_b=0)
    carry(a, b, 10**9)
    assert a.outbound_allowance() == b.inbound_allowance() == UNLIMITED
    assert a.debt_out_umel == b.debt_in_umel == 0


def test_forged_and_misaddressed_offers_and_answers_are_refused() -> None:
    a, b = account(ALICE, BOB), account(BOB, ALICE)
    offer = a.propose(PriceTerms(1, 5_000, ("pow",)), NOW)
    forged = msgspec.structs.replace(offer, price_umel=0)
    with pytest.raises(RemoteProtocolError) as caught:
        b.on_offer(forged, RULE, NOW)
    assert caught.value.reason == "bad_signature"
    with pytest.raises(RemoteProtocolError) as caught:
        account(MALLORY, ALICE).on_offer(offer, RULE, NOW)  # addressed to Bob
    assert caught.value.reason == "wrong_party"
    answer = b.on_offer(offer, RULE, NOW)
    with pytest.raises(RemoteProtocolError) as caught:
        a.on_answer(msgspec.structs.replace(answer, accepted=True, reason="", timestamp=NOW + 1))
    assert caught.value.reason == "bad_signature"
    assert not a.priced


def test_a_repeated_offer_gets_the_same_answer_and_stale_or_reused_seqs_are_rejected() -> None:
    a, b = pair()
    first = a.state.our_offer
    assert first is not None
    # A retransmission after a reconnect: same answer, nothing reopened.
    carry(b, a, 5)
    epochs = list(b.state.outbound)
    assert b.on_offer(first, RULE, NOW) is b.state.their_answer
    assert b.state.outbound == epochs
    newer = a.propose(PriceTerms(4, 10_000, ("pow",)), NOW)
    assert b.on_offer(newer, RULE, NOW).accepted
    assert b.on_offer(first, RULE, NOW).reason == "stale_seq"
    reused = a.propose(PriceTerms(4, 10_000, ("pow",)), NOW)  # same terms: same offer
    assert reused is newer
    a.state.proposed = first  # an offerer that lost its state re-uses seq 1 with new terms
    clash = a.propose(PriceTerms(9, 10_000, ("pow",)), NOW)
    assert clash.seq == 2 and b.on_offer(clash, RULE, NOW).reason == "seq_reused"


def test_a_reprice_charges_old_packets_at_the_old_price() -> None:
    a, b = pair(price_a=2, price_b=3)
    carry(a, b, 100)  # Bob's price is 3
    carry(b, a, 40)  # Alice's price is 2
    outcome = agree(
        a, b, PriceTerms(5, 10_000, ("pow",)), PriceTerms(7, 10_000, ("pow",))
    )  # both re-price
    assert all(isinstance(o, PriceAccepted) for o in outcome)
    carry(a, b, 10)
    carry(b, a, 20)
    assert a.debt_out_umel == b.debt_in_umel == 100 * 3 + 10 * 7
    assert b.debt_out_umel == a.debt_in_umel == 40 * 2 + 20 * 5
    # And a rejected re-offer leaves the agreement in force.
    answer = b.on_offer(a.propose(PriceTerms(50, 10_000, ("pow",)), NOW), RULE, NOW)
    assert isinstance(a.on_answer(answer), PriceRejected)
    carry(b, a, 1)
    assert a.debt_in_umel == 40 * 2 + 21 * 5


# --- debt limits -----------------------------------------------------------------------


def test_allowances_stop_at_the_limit_and_resume_after_settlement() -> None:
    a, b = pair(price_a=3, price_b=3, limit=1_000)
    assert a.outbound_allowance() == b.inbound_allowance() == 333
    carry(a, b, 333)
    assert a.outbound_allowance() == b.inbound_allowance() == 0
    assert a.debt_out_umel == b.debt_in_umel == 999
    a.settle(0, 600)
    b.settle(600, 0)
    assert a.outbound_allowance() == b.inbound_allowance() == 200
    assert a.debt_out_umel == b.debt_in_umel == 399


# --- push_debt -------------------------------------------------------------------------


def test_a_claim_corrects_the_debtor_down_to_what_arrived() -> None:
    a, b = pair(price_b=3)
    carry(a, b, 1_000, arrived=900)  # 10 % lost on the way
    assert (a.debt_out_umel, b.debt_in_umel) == (3_000, 2_700)
    outcome = a.on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert outcome == ClaimApplied(3_000, 2_700)
    carry(a, b, 10)  # later traffic adds on top of the corrected count
    assert a.debt_out_umel == b.debt_in_umel == 2_730


def test_totals_a_crash_assumed_sent_are_never_counted_and_stay_bounded() -> None:
    a, _ = pair()
    for _ in range(MAX_EPOCHS + 8):  # each sends 10, then assumes the next 5 sent
        carry(a, account(BOB, ALICE), 10)
        a.assume_sent(a.counters.packets_out, a.counters.packets_out + 5)
        a.counters.packets_out += 5
    a.assume_sent(a.counters.packets_out - 2, a.counters.packets_out + 1)  # overlapping
    a.counters.packets_out += 1
    assumed = a.state.assumed_out
    assert len(assumed) == MAX_EPOCHS
    # The oldest merged, swallowing what was really sent between them: never more counted.
    assert assumed[0] == (0 * 15 + 10, 8 * 15 + 15) and assumed[-1][1] == a.counters.packets_out
    _, sent, counted = a.claim_counts()
    assert [c.packets for c in counted] == [(MAX_EPOCHS + 8) * 10 - 8 * 10]
    assert [c.packets for c in sent] == [a.counters.packets_out]


def test_a_claim_listing_every_epoch_at_the_largest_counts_fits_one_request() -> None:
    top = 2**64 - 1
    full = [EpochCount(top - MAX_EPOCHS + i, top) for i in range(MAX_EPOCHS)]
    claim = forged_claim(BOB, ALICE, seq=top, received=full, sent=full, counted=full)
    assert len(encode_request(top, "push_debt", wire(claim))) < MAX_PAYLOAD_SIZE // 2


def test_forged_replayed_malformed_and_stale_claims_change_nothing() -> None:
    a, b = pair()
    carry(a, b, 100, arrived=50)
    claim = b.make_claim(NOW)
    forged = msgspec.structs.replace(claim, received=[EpochCount(1, 0)])
    stale = b.make_claim(NOW - MAX_CLOCK_SKEW_SECS - 1)
    disordered = forged_claim(BOB, ALICE, seq=9, received=[EpochCount(1, 5), EpochCount(1, 5)])
    for bad, reason in [
        (forged, "bad_signature"),
        (stale, "stale_claim"),
        (disordered, "malformed_claim"),
    ]:
        with pytest.raises(RemoteProtocolError) as caught:
            a.on_claim(bad, NOW, TOLERANCE)
        assert caught.value.reason == reason
    assert a.debt_out_umel == 300
    newer = b.make_claim(NOW)
    a.on_claim(newer, NOW, TOLERANCE)
    for replay in [newer, claim]:  # the same one again, or an older one arriving late
        with pytest.raises(RemoteProtocolError) as caught:
            a.on_claim(replay, NOW, TOLERANCE)
        assert caught.value.reason == "replayed_claim"
    with pytest.raises(RemoteProtocolError) as caught:
        account(MALLORY, BOB).on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert caught.value.reason == "wrong_party"


def test_an_overclaim_is_a_dispute_that_freezes_the_account() -> None:
    a, b = pair()
    carry(a, b, 100)
    b.counters.packets_in += TOLERANCE + 1  # Bob claims packets Alice never sent
    outcome = a.on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert outcome == Dispute("overclaim", 100 + TOLERANCE + 1, 100)
    assert a.state.frozen == "dispute"
    assert a.debt_out_umel == 300  # nothing of it applied
    assert a.inbound_allowance() == a.outbound_allowance() == 0
    a.unfreeze()
    assert a.outbound_allowance() > 0


def test_a_claim_within_the_tolerance_is_adopted() -> None:
    a, b = pair(price_b=1)
    carry(a, b, 100)
    b.counters.packets_in += TOLERANCE  # counted at Bob before Alice's batch counted them
    assert isinstance(a.on_claim(b.make_claim(NOW), NOW, TOLERANCE), ClaimApplied)
    assert a.debt_out_umel == b.debt_in_umel == 108


def test_the_tolerance_bounds_the_excess_over_every_epoch_together() -> None:
    """A claim just under the tolerance in each of many epochs is refused as a whole: the
    bound is on the total, however many epochs a re-pricing neighbour opens."""
    a, b = pair(price_b=1)
    carry(a, b, 100)
    for price in range(2, 6):
        reprice(b, a, price)
        carry(a, b, 10)
    assert len(a.state.outbound) == 5
    b.counters.packets_in += TOLERANCE // 2
    assert isinstance(a.on_claim(b.make_claim(NOW), NOW, TOLERANCE), ClaimApplied)
    excess = a.charged_out_packets() - a.counters.packets_out
    assert excess == TOLERANCE // 2
    b.counters.packets_in += TOLERANCE // 2 + 1  # now over the one tolerance, in all
    assert isinstance(a.on_claim(b.make_claim(NOW), NOW, TOLERANCE), Dispute)
    assert a.charged_out_packets() - a.counters.packets_out == excess


def test_an_epoch_in_which_nothing_was_carried_holds_no_claimed_debt() -> None:
    a, b = pair(price_b=1)
    carry(a, b, 100)
    reprice(b, a, 9)  # a new epoch, in which Alice sends nothing
    b.counters.packets_in += 1  # Bob claims a single packet in it
    outcome = a.on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert outcome == Dispute("empty_epoch", 1, 0)
    assert a.debt_out_umel == 100


def test_packets_counted_in_another_epoch_in_flight_are_charged_as_the_receiver_says() -> None:
    """Alice accepts Bob's new price and sends at once; Bob has not heard of the acceptance
    yet and counts those packets in the old epoch. The receiver's per-epoch counts win: the
    claim is honest, nothing is disputed, both sides agree."""
    a, b = pair(price_b=1)
    carry(a, b, 100)
    offer = b.propose(PriceTerms(4, 10_000, ("pow",)), NOW)
    answer = a.on_offer(offer, RULE, NOW)  # Alice opens the new epoch...
    carry(a, b, 30)  # ...and sends; Bob still counts in the old one
    assert isinstance(a.on_claim(b.make_claim(NOW), NOW, TOLERANCE), ClaimApplied)
    assert a.debt_out_umel == b.debt_in_umel == 130
    b.on_answer(answer)  # the acceptance arrives
    carry(a, b, 10)
    a.on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert a.debt_out_umel == b.debt_in_umel == 130 + 40


def test_a_creditor_that_lost_counts_learns_them_back_from_the_debtors_claim() -> None:
    a, b = pair(price_a=2, price_b=3)
    carry(a, b, 50)
    carry(b, a, 50)
    b.counters.packets_in -= 30  # Bob crashed: the counts since his last write are lost
    restarted = Account(BOB, ALICE.identity_public, b.state, b.counters, recovery_in=100)
    assert isinstance(restarted.on_claim(a.make_claim(NOW), NOW, TOLERANCE), ClaimApplied)
    assert restarted.debt_in_umel == a.debt_out_umel == 50 * 3
    assert restarted.recovery_in == 0  # once only


def test_a_debtor_that_inflates_what_it_counted_teaches_a_crashed_creditor_a_bounded_amount() -> (
    None
):
    a, b = pair(price_a=2, price_b=3)
    carry(a, b, 50)
    b.counters.packets_in -= 30  # Bob crashed
    restarted = Account(BOB, ALICE.identity_public, b.state, b.counters, recovery_in=100)
    received, sent, _ = a.claim_counts()
    epoch = sent[0].epoch
    claim = forged_claim(
        ALICE, BOB, seq=1, received=received, sent=sent, counted=[EpochCount(epoch, 10**9)]
    )
    assert isinstance(restarted.on_claim(claim, NOW, TOLERANCE), ClaimApplied)
    assert restarted.counters.packets_in == 20 and restarted.debt_in_umel == (20 + 100) * 3
    assert restarted.recovery_in == 0


def test_a_claim_counting_the_most_in_every_epoch_leaves_a_state_the_ledger_can_write() -> None:
    a, b = pair()
    carry(a, b, 10)
    received, sent, _ = a.claim_counts()
    top, epoch = 2**64 - 1, sent[0].epoch
    counted = [EpochCount(epoch + i, top) for i in range(MAX_EPOCHS)]  # all ours: one epoch
    claim = forged_claim(ALICE, BOB, seq=1, received=received, sent=sent, counted=counted)
    assert isinstance(b.on_claim(claim, NOW, TOLERANCE), ClaimApplied)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(b.state), type=AccountState) == b.state


@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.integers(0, 100), st.booleans(), st.integers(0, 9)),
        min_size=1,
        max_size=12,
    )
)
def test_after_claims_both_sides_agree_to_the_last_umel(
    rounds: list[tuple[int, int, bool, int]],
) -> None:
    """Any mix of traffic, loss, re-prices and claims: after a final exchange of claims each
    side's estimate of each direction equals the other's, and is the exact integer sum."""
    a, b = pair(price_a=1, price_b=1)
    expected_a_owes = 0
    price_b = 1
    for sent, lost_percent, repriced, new_price in rounds:
        arrived = sent * (100 - lost_percent) // 100
        carry(a, b, sent, arrived)
        expected_a_owes += arrived * price_b
        if repriced:
            reprice(b, a, new_price, 10**12)
            price_b = new_price
        a.on_claim(b.make_claim(NOW), NOW, TOLERANCE)
    assert a.debt_out_umel == b.debt_in_umel == expected_a_owes
    assert a.debt_in_umel == b.debt_out_umel == 0
    assert not a.state.frozen


def test_state_round_trips_through_msgpack() -> None:
    a, b = pair()
    carry(a, b, 7)
    state = a.state
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=AccountState)
    assert again == state


@pytest.mark.parametrize("debt", [2**63, 2**64, -(2**63) - 1])
def test_a_limit_notice_with_a_debt_outside_int64_is_refused_as_params(debt: int) -> None:
    """Such a debt used to convert, then raise OverflowError when the notice's signed part was
    encoded to check its signature."""
    a, b = pair()
    params = msgspec.to_builtins(a.make_limit_notice(NOW))
    params[2] = debt
    with pytest.raises(RemoteProtocolError):
        convert_remote(params, DebtLimitNotice, "invalid params", "invalid_params")
    for edge in (-(2**63), 2**63 - 1):  # the bounds themselves reach the signature check
        params[2] = edge
        notice = convert_remote(params, DebtLimitNotice, "invalid params", "invalid_params")
        with pytest.raises(RemoteProtocolError, match="does not verify"):
            b.verify_limit_notice(notice)
