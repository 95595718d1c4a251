"""Two neighbours, each one `Neighbor`, pumped in memory with a virtual clock: prices, traffic,
claims, limits, settlements, audits, failed commits and crashes (tests/core/neighbor_pair.py)."""

from __future__ import annotations

import base64
import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from earendil_py.core.accounting import DebtClaim
from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.neighbor import (
    CALLS,
    PRICE_RETRY_MAX_SECS,
    REFUSED,
    AccountEntry,
    Neighbor,
    Refused,
    SettlementAnswer,
    unwire,
    wire,
)
from earendil_py.core.pricing import PriceTerms
from earendil_py.core.settlement import (
    RECENT,
    Attestation,
    SettlementState,
    make_proposal,
)
from tests.core.neighbor_pair import TOLERANCE, Message, Pair, Side, policy

COMPLETED = SettlementState.COMPLETED


def snapshot(side: Side) -> tuple[bytes, bytes, int, int, int]:
    """What a failed step must leave unchanged: the state, the ledger, the counters."""
    n = side.neighbor
    book = msgspec.msgpack.encode(n.book.state)
    account = msgspec.msgpack.encode(n.account.state)
    return account, book, len(side.ledger), n.counters.packets_in, n.counters.packets_out


def views(pair: Pair) -> tuple[int, int, int, int]:
    """(Alice owes Bob by Alice, by Bob; Bob owes Alice by Bob, by Alice)."""
    a, b = pair.a.neighbor.account, pair.b.neighbor.account
    return a.debt_out_umel, b.debt_in_umel, b.debt_out_umel, a.debt_in_umel


def restored_equal(side: Side) -> None:
    """The side rebuilt from its ledger alone is the side as it runs."""
    live = side.neighbor
    again = Neighbor.restore(
        side.identity,
        side.peer_public,
        side.policy,
        side.rng,
        side.ledger,
    )
    state, assumed = again.account.state, live.account.state.assumed_out
    assert msgspec.structs.replace(state, assumed_out=assumed) == live.account.state
    assert again.book.state == live.book.state
    # Counts since the last ones written are lost: inbound ones are learned back from the
    # neighbour's claim, outbound ones are counted up to the lease, all of it sent, and
    # that part of it assumed: never admitted as counted.
    assert again.counters.packets_in <= live.counters.packets_in
    assert again.counters.packets_out >= live.counters.packets_out
    if again.counters.packets_out > live.counters.packets_out:
        assert state.assumed_out[-1][1] == again.counters.packets_out


# --- prices ------------------------------------------------------------------------------


def test_both_offers_are_agreed_at_link_up_and_written_before_they_are_sent() -> None:
    pair = Pair(policy(2, 5_000), policy(3, 7_000))
    assert pair.a.neighbor.allowance() == (0, 0)
    effect = pair.a.neighbor.on_link_up(pair.now)
    # The outbound lease, then our offer: both on disk before anything is sent.
    assert [kind for kind, _ in effect.entries] == ["counts", "price_offer_sent"]
    assert effect.calls[0].method == "push_price"
    pair.execute(pair.a, effect)
    pair.execute(pair.b, pair.b.neighbor.on_link_up(pair.now))
    pair.linked = True
    pair.pump()
    prices = ["price_offer_sent", "price_answered", "price_answer_received"]
    for side, theirs in [(pair.a, 3), (pair.b, 2)]:
        assert side.neighbor.priced
        assert side.kinds()[0] == "counts"  # the outbound lease
        assert [kind for kind in side.kinds() if kind.startswith("price_")] == prices
        assert side.neighbor.summary()["their_price_umel"] == theirs
    # Bob lets Alice owe 7,000 at 3; her lease lets out 32 until she writes a higher one.
    assert pair.a.neighbor.allowance() == (5_000 // 2, 32)
    # A reconnect pushes the same offers again: no new offer or answer is written.
    pair.link_down()
    pair.link_up()
    for side in (pair.a, pair.b):
        assert [kind for kind in side.kinds() if kind.startswith("price_")] == prices


def test_a_rejected_price_means_no_traffic_either_way() -> None:
    pair = Pair(policy(101), policy(1))  # Alice asks more than Bob pays
    pair.link_up()
    assert not pair.a.neighbor.priced and not pair.b.neighbor.priced
    assert pair.a.named("price_rejected")
    assert pair.carry(pair.a, 10) == 0 and pair.carry(pair.b, 10) == 0
    assert pair.a.sent == pair.b.sent == 0
    pair.advance(20)  # a rejected offer is not pushed again by the timer
    assert len(pair.a.named("price_rejected")) == 1


def test_a_reprice_charges_old_packets_at_the_old_price_and_claims_agree() -> None:
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 100)
    pair.carry(pair.b, 40)
    pair.execute(pair.b, pair.b.neighbor.reprice(PriceTerms(7, 1_000_000, ("pow",)), pair.now))
    pair.pump()
    assert pair.b.done[("price", (2).to_bytes(8, "big"))] == ""  # accepted
    pair.carry(pair.a, 50)
    pair.carry(pair.b, 10)
    pair.advance(2)
    assert views(pair) == (100 * 3 + 50 * 7,) * 2 + ((40 + 10) * 2,) * 2
    assert not pair.a.neighbor.frozen and not pair.b.neighbor.frozen


def test_an_unanswered_offer_is_pushed_again_until_answered() -> None:
    pair = Pair()
    pair.linked = True
    for side in (pair.a, pair.b):
        pair.execute(side, side.neighbor.on_link_up(pair.now))
    pair.pump(lose=lambda m: m.method == "push_price")  # every first push is lost
    assert not pair.a.neighbor.priced
    pair.advance(6)
    assert pair.a.neighbor.priced and pair.b.neighbor.priced


def test_an_offer_never_answered_is_pushed_less_and_less_often() -> None:
    pair = Pair()
    pair.linked = True
    for side in (pair.a, pair.b):
        pair.execute(side, side.neighbor.on_link_up(pair.now))
    pushes: list[float] = []

    def lose_a_s_offers(message: Message) -> bool:
        if message.is_call and message.method == "push_price" and message.caller is pair.a:
            pushes.append(pair.now)
            return True
        return False

    for _ in range(3_600):  # an hour, a second at a time
        pair.pump(lose=lose_a_s_offers)
        pair.now += 1
    assert not pair.a.neighbor.priced
    gaps = [later - earlier for earlier, later in itertools.pairwise(pushes)]
    assert gaps[:4] == pytest.approx([5, 10, 20, 40], abs=1)
    assert max(gaps) == pytest.approx(PRICE_RETRY_MAX_SECS, abs=1)
    assert len(pushes) < 20  # every 5 s, it would have been 720
    # A new link starts again from the shortest gap.
    for side in (pair.a, pair.b):
        pair.execute(side, side.neighbor.on_link_down(pair.now))
        pair.execute(side, side.neighbor.on_link_up(pair.now))
    pushes.clear()
    for _ in range(12):
        pair.pump(lose=lose_a_s_offers)
        pair.now += 1
    assert len(pushes) == 2, pushes
    # The next push that arrives is answered.
    pair.advance(11)
    assert pair.a.neighbor.priced and pair.b.neighbor.priced


# --- traffic and claims ----------------------------------------------------------------


def test_a_lossy_link_agrees_to_the_umel_after_one_push_interval() -> None:
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 1_000, lost=100)
    pair.carry(pair.b, 500, lost=7)
    assert views(pair) == (3_000, 2_700, 1_000, 986)  # senders estimate from what they sent
    pair.advance(1)
    assert views(pair) == (2_700, 2_700, 986, 986)
    restored_equal(pair.a)
    restored_equal(pair.b)


def test_an_idle_neighbour_pushes_no_claims() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 10)
    pair.advance(3)
    written = len(pair.a.ledger) + len(pair.b.ledger)
    pair.advance(30)
    assert len(pair.a.ledger) + len(pair.b.ledger) == written
    assert pair.a.neighbor.get_timer() is not None  # the claim timer, one per interval


def test_forged_replayed_and_malformed_claims_change_nothing() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 20)
    pair.advance(1)
    claim_entry = [e for e in pair.b.ledger if e.kind == "claim_sent"][-1]
    assert claim_entry.body is not None
    evidence = msgspec.msgpack.decode(claim_entry.body, type=AccountEntry).evidence
    claim = msgspec.msgpack.decode(evidence, type=DebtClaim)
    before = snapshot(pair.a)
    a = pair.a.neighbor
    for params, reply in [
        (wire(claim), Refused(REFUSED, "debt claim replayed or out of order", "replayed_claim")),
        ({"msg": "%%%"}, None),
        ({"not": "a claim"}, None),
        (wire(msgspec.structs.replace(claim, seq=claim.seq + 1)), None),
    ]:
        effect = a.receive_call("push_debt", params, pair.now)
        assert isinstance(effect.reply, Refused)
        if reply is not None:
            assert effect.reply.data == reply.data
        assert not effect.entries
        pair.execute(pair.a, effect)
    assert snapshot(pair.a) == before
    assert a.statistics().refused == {
        "replayed_claim": 1,
        "invalid_params": 2,
        "bad_signature": 1,
    }


def test_packets_lost_after_the_last_claim_are_corrected_by_the_next_one() -> None:
    """The creditor's counts do not move (everything since its last claim was lost), yet the
    debtor's claim shows it thinks it sent more: the creditor's next claim corrects it."""
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 50)
    pair.advance(3)
    assert views(pair) == (150, 150, 0, 0)
    pair.carry(pair.a, 30, lost=30)
    pair.advance(1)
    assert views(pair)[0] == 80 * 3  # Alice's estimate: an upper bound
    pair.advance(3)
    assert views(pair) == (150, 150, 0, 0)


def test_a_crash_loses_counts_and_the_next_claim_recovers_them() -> None:
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 50)
    pair.carry(pair.b, 50)
    pair.checkpoint()
    pair.carry(pair.a, 30)  # counted after the last checkpoint: lost in Bob's crash
    pair.carry(pair.b, 30)
    pair.crash(pair.b)
    assert pair.b.neighbor.counters.packets_in == 50
    pair.advance(2)
    assert views(pair) == (80 * 3, 80 * 3, 80 * 2, 80 * 2)
    assert not pair.a.neighbor.frozen and not pair.b.neighbor.frozen


def test_packets_in_flight_at_the_creditors_claim_are_relearned_after_its_crash() -> None:
    """Bob claims; 12 packets Alice sent before his claim reached her arrive after he made
    it, so her adopted estimate leaves them out until his next claim. Bob crashes before
    writing them: he re-learns them from what Alice counted, not from her estimate."""
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 50)
    pair.advance(3)
    pair.checkpoint()
    pair.carry(pair.a, 10)  # Bob's counts moved: his next claim goes out
    pair.now = pair.b.neighbor._volatile.next_claim_at
    pair.a.neighbor._volatile.next_claim_at = pair.now + 0.5  # hers, after his is adopted
    pair.execute(pair.b, pair.b.neighbor.handle_timer(pair.now))
    assert [m.method for m in pair.network] == ["push_debt"]
    pair.carry(pair.a, 12)  # in flight when Bob claimed
    pair.deliver(pair.network.popleft())  # Alice adopts Bob's claim: the 12 are not in it
    assert views(pair)[0] == 60 * 3
    pair.deliver(pair.network.popleft())  # her answer
    assert not pair.network
    pair.crash(pair.b)  # it restarts with 60 written, and re-learns from Alice's claim
    pair.advance(3)
    assert views(pair)[:2] == (72 * 3, 72 * 3)


def test_a_creditor_that_crashed_relearns_what_it_lost_not_what_the_link_lost() -> None:
    """Alice counted 40 packets as sent that never reached Bob, and her claims say so. Bob
    crashes with 10 received but unwritten: he re-learns those 10, not the 40 as well."""
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 50, lost=40)
    pair.advance(3)
    assert views(pair)[:2] == (10 * 3, 10 * 3)
    pair.checkpoint()
    pair.carry(pair.a, 10)  # received, not written: lost in Bob's crash
    pair.crash(pair.b)
    pair.advance(3)
    assert views(pair)[:2] == (20 * 3, 20 * 3)


def test_crashes_on_both_sides_within_one_claim_interval_charge_nothing_unsent() -> None:
    """Alice restarts counting her unused lease as sent; Bob restarts before her estimate was
    corrected. Bob must not re-learn the lease from Alice's claim: her claims never admit as
    counted what a crash only assumed she sent."""
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 200)
    pair.checkpoint()
    pair.carry(pair.a, 20)  # counted after the last checkpoint: lost in both crashes
    pair.link_down()  # no claim crosses until the end
    pair.crash(pair.a)
    assert pair.a.neighbor.counters.packets_out > pair.a.sent  # the lease, counted as sent
    pair.crash(pair.b)
    pair.crash(pair.a)  # and Alice again, before any claim of Bob's corrected her
    pair.link_up()
    pair.advance(3)
    assert pair.a.neighbor.account.charged_out_packets() <= pair.a.sent
    # Neither knows of the last 20 any more: Bob re-learns only what Alice knows she sent.
    assert views(pair)[:2] == (3 * 200, 3 * 200)
    pair.carry(pair.a, 10)
    pair.advance(3)
    assert views(pair)[:2] == (3 * 210, 3 * 210)


def test_what_a_crash_counted_as_sent_stays_unadmitted_across_restarts() -> None:
    pair = Pair(policy(2), policy(3))
    pair.link_up()
    pair.carry(pair.a, 200)
    pair.checkpoint()
    pair.link_down()
    pair.crash(pair.a)
    pair.linked = True  # up again, but every claim is lost: Alice's estimate stays uncorrected
    for side in (pair.a, pair.b):
        pair.execute(side, side.neighbor.on_link_up(pair.now))
    pair.pump(lose=lambda message: message.method == "push_debt")
    pair.carry(pair.a, 10)
    pair.checkpoint()  # written with the totals: what the crash counted is still unsure
    pair.link_down()
    pair.crash(pair.b)
    pair.crash(pair.a)
    pair.link_up()
    pair.advance(3)
    assert pair.a.neighbor.account.charged_out_packets() <= pair.a.sent == 210
    assert views(pair)[:2] == (3 * 210, 3 * 210)
    # Bob's claims corrected her estimate; her raw count still holds the leases. Bob loses
    # counts again: he re-learns what she sent, never the leases.
    pair.carry(pair.a, 10)
    pair.crash(pair.b)
    pair.advance(3)
    assert pair.a.neighbor.counters.packets_out > pair.a.sent == 220
    assert views(pair)[:2] == (3 * 220, 3 * 220)


def test_after_a_clean_shutdown_nothing_extra_is_accepted() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 50)
    pair.execute(pair.a, pair.a.neighbor.checkpoint(pair.now, clean=True))
    pair.a.rebuild()
    assert pair.a.neighbor.account.recovery_in == 0
    assert pair.a.neighbor.counters.packets_out == 50  # not the lease: nothing was lost
    pair.b.neighbor.counters.packets_in += TOLERANCE + 1  # Bob claims more than arrived
    pair.link_down()
    pair.link_up()
    pair.advance(1)
    assert pair.a.neighbor.frozen == "dispute"


# --- limits ------------------------------------------------------------------------------


def test_limits_stop_traffic_and_a_neighbour_cut_off_is_told() -> None:
    pair = Pair(policy(1), policy(100, 10_000, methods=("manual",)))
    pair.link_up()
    assert pair.carry(pair.a, 120) == 100  # an honest sender stops itself at the limit
    assert pair.a.neighbor.allowance().outbound == 0
    # A sender that ignores the limit is refused by the receiver, and told once per 10 s.
    for _ in range(3):
        pair.a.neighbor.counters.packets_out += 5
        assert pair.b.neighbor.allowance().inbound == 0
        pair.b.neighbor.refusing = True
        pair.tick()
        pair.pump()
    assert len(pair.b.named("debt_limit_reached")) == 1
    (notice,) = pair.a.named("debt_limit_notice")
    assert notice.fields["their_view_umel"] == 10_000
    pair.advance(11)
    pair.b.neighbor.refusing = True
    pair.tick()
    assert len(pair.b.named("debt_limit_reached")) == 2


# --- settlements -------------------------------------------------------------------------


def test_automatic_settlement_keeps_traffic_flowing_at_a_small_limit() -> None:
    pair = Pair(bob_policy=policy(10, 20_000))
    pair.link_up()
    for _ in range(50):
        assert pair.carry(pair.a, 100) == 100  # 50,000 uMEL: 2.5 limits' worth
        pair.advance(0.1)
    pair.advance(2)
    completed = pair.a.named("settlement_completed")
    assert len(completed) >= 2
    paid = sum(e.fields["paid_out_umel"] for e in completed)
    assert views(pair)[:2] == (50_000 - paid, 50_000 - paid)
    assert pair.a.neighbor.book.head == pair.b.neighbor.book.head
    restored_equal(pair.a)
    restored_equal(pair.b)


def manual(pair: Pair, pay: int = 250, request: int = 0, **kw: object) -> bytes:
    effect = pair.a.neighbor.propose(
        pay_umel=pay, request_umel=request, method="manual", now=pair.now, **kw
    )
    pair.execute(pair.a, effect)
    pair.pump()
    settlement_id: bytes = effect.reply
    return settlement_id


def test_manual_settlement_accepted_by_the_other_operator() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 300)
    pair.carry(pair.b, 40)
    pair.advance(1)
    settlement_id = manual(pair, 250)
    record = pair.a.done[("settle", settlement_id)]
    assert record.state is SettlementState.PENDING  # type: ignore[attr-defined]
    assert views(pair) == (300, 300, 40, 40)  # nothing moves before acceptance
    effect = pair.b.neighbor.decide(settlement_id, approve=True, now=pair.now)
    pair.execute(pair.b, effect)
    pair.pump()
    assert views(pair) == (50, 50, 40, 40)
    for side in (pair.a, pair.b):
        assert side.neighbor.book.record(settlement_id).state is COMPLETED  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):  # accepting twice
        pair.b.neighbor.decide(settlement_id, approve=True, now=pair.now)
    restored_equal(pair.a)
    restored_equal(pair.b)


def test_manual_settlements_obey_the_minimum_and_do_not_overpay_unless_asked() -> None:
    pair = Pair(policy(min_settlement_umel=100))
    pair.link_up()
    pair.carry(pair.a, 300)
    pair.advance(1)
    for pay in (99, 301):
        with pytest.raises(LocalProtocolError):
            pair.a.neighbor.propose(pay_umel=pay, request_umel=0, method="manual", now=pair.now)
    settlement_id = manual(pair, 500, prepay=True)
    pair.execute(pair.b, pair.b.neighbor.decide(settlement_id, approve=True, now=pair.now))
    pair.pump()
    assert views(pair)[:2] == (-200, -200)


def test_the_responder_refuses_to_pay_more_than_it_owes_without_recording_it() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.b, 100)  # Bob owes Alice 100
    pair.advance(1)
    settlement_id = manual(pair, pay=0, request=500)
    record = pair.a.done[("settle", settlement_id)]
    assert record.state is SettlementState.REJECTED  # type: ignore[attr-defined]
    assert record.reason == "more_than_we_owe"  # type: ignore[attr-defined]
    assert "settlement_opened" not in pair.b.kinds()
    assert pair.b.neighbor.book.record(settlement_id) is None


def test_cancel_works_and_a_cancel_that_crosses_the_approval_loses() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 1_000)
    pair.advance(1)
    first = manual(pair, 200)
    pair.execute(pair.a, pair.a.neighbor.cancel(first, pair.now))
    pair.pump()
    for side in (pair.a, pair.b):
        assert side.neighbor.book.record(first).state is SettlementState.CANCELED  # type: ignore[union-attr]
        assert not side.neighbor.book.state.open
    second = manual(pair, 300)
    pair.execute(pair.b, pair.b.neighbor.decide(second, approve=True, now=pair.now))
    pair.execute(pair.a, pair.a.neighbor.cancel(second, pair.now))  # before the answer lands
    pair.pump()
    assert pair.a.neighbor.book.record(second).state is COMPLETED  # type: ignore[union-attr]
    assert views(pair)[:2] == (700, 700)


def test_an_unanswered_manual_settlement_expires_on_both_sides() -> None:
    pair = Pair(policy(expiry_secs=30), policy(expiry_secs=30))
    pair.link_up()
    pair.carry(pair.a, 500)
    pair.advance(1)
    settlement_id = manual(pair, 200)
    pair.advance(31)
    for side in (pair.a, pair.b):
        assert side.neighbor.book.record(settlement_id).state is SettlementState.EXPIRED  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        pair.b.neighbor.decide(settlement_id, approve=True, now=pair.now)


def test_finished_settlements_leave_memory_and_each_change_is_one_entry() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 10_000)
    pair.advance(1)
    written = len(pair.b.ledger)
    for _ in range(3 * RECENT):
        settlement_id = manual(pair, 200)
        pair.execute(pair.a, pair.a.neighbor.cancel(settlement_id, pair.now))
        pair.pump()
    for side in (pair.a, pair.b):
        assert not side.neighbor.book.state.open
        assert len(side.neighbor.book.state.finished) == RECENT
    assert len(pair.b.ledger) - written == 2 * 3 * RECENT  # opened, refused "canceled"
    assert pair.b.kinds()[-2:] == ["settlement_opened", "settlement_refused"]
    restored_equal(pair.b)


def test_proposals_crossing_or_following_a_stale_head_are_refused_unrecorded() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 1_000)
    pair.carry(pair.b, 1_000)
    pair.advance(1)
    a_effect = pair.a.neighbor.propose(pay_umel=200, request_umel=0, method="manual", now=pair.now)
    b_effect = pair.b.neighbor.propose(pay_umel=200, request_umel=0, method="manual", now=pair.now)
    pair.execute(pair.a, a_effect)
    pair.execute(pair.b, b_effect)
    pair.pump()
    for side, effect in [(pair.a, a_effect), (pair.b, b_effect)]:
        record = side.done[("settle", effect.reply)]
        assert record.reason == "settlement_in_flight"  # type: ignore[attr-defined]
        assert side.kinds().count("settlement_opened") == 1  # its own proposal only
    stale = make_proposal(
        pair.a.identity,
        pair.b.neighbor.identity.fingerprint,
        settlement_id=bytes(16),
        reduce_mine_umel=300,
        reduce_theirs_umel=0,
        method="manual",
        proof=b"",
        previous=bytes([1]) * 32,
        ledger_head=bytes(32),
        now=int(pair.now),
        expiry_secs=60,
    )
    effect = pair.b.neighbor.receive_call("start_settlement", wire(stale), pair.now)
    answer = unwire(effect.reply, SettlementAnswer)
    assert answer.rejection is not None and answer.rejection.reason == "stale_head"
    assert not effect.entries


def test_an_attestation_signed_by_one_side_only_changes_nothing() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 500)
    pair.advance(1)
    settlement_id = manual(pair, 200)
    record = pair.a.neighbor.book.record(settlement_id)
    assert record is not None
    before = snapshot(pair.a)
    fake = SettlementAnswer(COMPLETED, attestation=Attestation(record.proposal, bytes(64)))
    effect = pair.a.neighbor.receive_call("settlement_answer", wire(fake), pair.now)
    assert isinstance(effect.reply, Refused) and effect.reply.data == "bad_signature"
    pair.execute(pair.a, effect)
    assert snapshot(pair.a) == before


# --- failed commits ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pow", "manual"])
@pytest.mark.parametrize("failing", ["alice", "bob"])
def test_a_failed_commit_at_each_step_changes_nothing_and_a_retry_converges(
    method: str, failing: str
) -> None:
    """Each commit of a settlement, on either side, fails in turn: the failed step leaves that
    side's memory and ledger, and its neighbour, as they were (the harness checks it at every
    failed commit); then the settlement completes, once, on both sides or neither."""
    steps = 0
    for step in range(1, 12):
        pair = Pair()
        pair.link_up()
        pair.carry(pair.a, 1_000)
        pair.advance(1)
        side = pair.a if failing == "alice" else pair.b
        side.fail_at = side.commits + step
        effect = pair.a.neighbor.propose(pay_umel=600, request_umel=0, method=method, now=pair.now)
        if pair.execute(pair.a, effect):
            pair.pump()
        for _ in range(3):  # the operator accepts, whenever it is asked
            for record in list(pair.b.neighbor.book.state.open.values()):
                decided = pair.b.neighbor.decide(record.settlement_id, approve=True, now=pair.now)
                pair.execute(pair.b, decided)
            pair.advance(6)
        pair.link_down()
        pair.link_up()  # and the audits after a reconnect find both chains equal
        pair.advance(2)
        steps += side.failed
        assert pair.a.neighbor.book.head == pair.b.neighbor.book.head
        completed = [s.kinds().count("settlement_completed") for s in (pair.a, pair.b)]
        assert completed[0] == completed[1] <= 1
        assert views(pair)[:2] == ((400, 400) if completed[0] else (1_000, 1_000))
        assert not pair.a.neighbor.frozen and not pair.b.neighbor.frozen
        restored_equal(pair.a)
        restored_equal(pair.b)
    assert steps >= 3  # the settlement's own commits each failed once


# --- audits ------------------------------------------------------------------------------


def test_the_audit_after_a_reconnect_finds_a_ledger_that_lost_a_settlement() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 1_000)
    pair.advance(1)
    pair.execute(
        pair.a, pair.a.neighbor.propose(pay_umel=600, request_umel=0, method="pow", now=pair.now)
    )
    pair.pump()
    assert pair.b.kinds()[-1] == "settlement_completed"
    pair.link_down()
    # Bob's ledger is rolled back to before the settlement (an old backup).
    pair.b.ledger = pair.b.ledger[: pair.b.kinds().index("settlement_completed")]
    pair.b.rebuild()
    pair.link_up()
    assert pair.b.neighbor.frozen == "audit_mismatch"
    assert pair.b.named("settlement_audit_mismatch")[0].fields["detail"].startswith("extra at 0")
    assert not pair.a.neighbor.frozen  # Alice sees Bob lag behind her: his to find


def test_an_approval_never_heard_of_is_learned_from_the_audit() -> None:
    pair = Pair()
    pair.link_up()
    pair.carry(pair.a, 1_000)
    pair.advance(1)
    effect = pair.a.neighbor.propose(pay_umel=600, request_umel=0, method="pow", now=pair.now)
    pair.execute(pair.a, effect)
    pair.pump(lose=lambda m: m.method == "start_settlement" and not m.is_call)
    assert pair.b.neighbor.book.record(effect.reply).state is COMPLETED  # type: ignore[union-attr]
    assert pair.a.neighbor.book.record(effect.reply).state is SettlementState.PENDING  # type: ignore[union-attr]
    pair.link_down()
    pair.link_up()
    assert pair.a.neighbor.book.record(effect.reply).state is COMPLETED  # type: ignore[union-attr]
    assert views(pair)[:2] == (400, 400)


# --- the re-price-and-claim attack -------------------------------------------------------


def test_a_reprice_storm_with_phantom_claims_creates_no_debt() -> None:
    """Bob re-prices (a new epoch each time) then claims packets in the new, empty epoch,
    40 times. Alice accepts no excess: the first phantom claim is a dispute."""
    pair = Pair(policy(1), policy(5, 10_000))
    pair.link_up()
    pair.carry(pair.a, 100)
    pair.advance(1)
    for cycle in range(40):
        terms = PriceTerms(5, 10_001 + cycle, ("pow", "manual"))
        pair.execute(pair.b, pair.b.neighbor.reprice(terms, pair.now))
        pair.pump()
        pair.b.neighbor.counters.packets_in += 256  # claimed, never carried
        pair.advance(1)
    account = pair.a.neighbor.account
    assert account.charged_out_packets() - pair.a.sent <= TOLERANCE
    assert pair.a.neighbor.frozen == "dispute"
    assert account.debt_out_umel == 500  # the 100 packets Alice sent, at 5


def test_claims_just_under_the_tolerance_each_cycle_add_up_to_one_tolerance() -> None:
    pair = Pair(policy(1), policy(5, 1_000_000))
    pair.link_up()
    pair.carry(pair.a, 100)
    pair.advance(1)
    accepted = []
    for cycle in range(40):
        terms = PriceTerms(5, 1_000_001 + cycle, ("pow", "manual"))
        pair.execute(pair.b, pair.b.neighbor.reprice(terms, pair.now))
        pair.pump()
        pair.carry(pair.a, 10)  # the new epoch is not empty
        pair.b.neighbor.counters.packets_in += TOLERANCE // 4
        pair.advance(1)
        accepted.append(pair.a.neighbor.account.charged_out_packets() - pair.a.sent)
    assert max(accepted) <= TOLERANCE
    assert pair.a.neighbor.frozen == "dispute"


# --- any interleaving --------------------------------------------------------------------

CARRY = st.tuples(st.just("carry"), st.booleans(), st.integers(0, 60), st.integers(0, 5))
PROPOSE = st.tuples(
    st.just("propose"), st.booleans(), st.sampled_from(["pow", "manual"]), st.integers(100, 400)
)
DECIDE = st.tuples(st.just("decide"), st.booleans(), st.sampled_from([True, True, False]))
DELIVER = st.tuples(st.just("deliver"), st.integers(1, 6))
ACTIONS = st.lists(
    st.one_of(
        CARRY,
        CARRY,
        st.tuples(st.just("advance"), st.sampled_from([0.3, 1.0, 6.0])),
        st.tuples(st.just("reprice"), st.booleans(), st.integers(1, 4)),
        PROPOSE,
        PROPOSE,
        PROPOSE,
        DECIDE,
        DECIDE,
        DELIVER,
        st.tuples(st.just("cancel"), st.booleans()),
        DELIVER,
        st.tuples(st.just("lose"), st.integers(0, 3)),
        st.tuples(st.just("fail_commit"), st.booleans()),
        st.tuples(st.just("crash"), st.booleans()),
        st.tuples(st.just("flap")),
        st.tuples(st.just("lie"), st.integers(1, TOLERANCE)),
    ),
    min_size=5,
    max_size=60,
)


def completed_ids(side: Side) -> list[bytes]:
    out = []
    for entry in side.ledger:
        if entry.kind == "settlement_completed" and entry.body is not None:
            out.append(msgspec.msgpack.decode(entry.body, type=Attestation).proposal.settlement_id)
    return out


# Crashes of either side, many and close together, among traffic, losses and flaps.
CRASHES = st.lists(
    st.one_of(
        CARRY,
        CARRY,
        st.tuples(st.just("advance"), st.sampled_from([0.3, 1.0])),
        st.tuples(st.just("crash"), st.booleans()),
        st.tuples(st.just("crash"), st.booleans()),
        DELIVER,
        st.tuples(st.just("lose"), st.integers(0, 3)),
        st.tuples(st.just("fail_commit"), st.booleans()),
        st.tuples(st.just("flap")),
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS)
# Alice re-prices and fails to write Bob's acceptance, so she never opens the epoch Bob
# counts in; Bob crashes and counts his lease as sent in it. Alice carried nothing, so she
# claims only once Bob's claim shows the difference in that epoch.
@example(
    [("advance", 0.3), ("reprice", True, 1), ("fail_commit", True), ("flap",), ("crash", False)]
)
# Bob's packet is counted in Alice's old epoch and in his new one; Alice crashes and must not
# re-learn it in the new one as a count she lost.
@example([("reprice", True, 1), ("deliver", 1), ("carry", False, 1, 0), ("flap",), ("crash", True)])
def test_any_interleaving_ends_in_agreement_to_the_umel(actions: list[tuple[object, ...]]) -> None:
    """Random traffic, re-prices, claims, proposals, decisions, cancels, lost messages,
    failed commits, crashes and link flaps, then quiet: both sides agree to the µMEL (unless
    a lying creditor got the account frozen), every settlement is applied once and attested on
    both sides or neither, and no one is ever charged for more than it carried plus one
    tolerance — plus, after each of its own crashes, the part of its outbound lease it had not
    used (counted as sent: docs/accounting.md) until a claim of the other corrects it."""
    run_interleaving(actions)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CRASHES)
# Alice's claim, made before her packet, arrives after it: it counts one less than Bob did,
# which is no loss of hers; Bob crashes and must not re-learn that packet a second time.
@example(
    [
        ("carry", False, 1, 0),
        ("advance", 1.0),
        ("carry", True, 1, 0),
        ("deliver", 1),
        ("crash", False),
    ]
)
def test_crashes_close_together_never_charge_the_unused_lease(
    actions: list[tuple[object, ...]],
) -> None:
    """The same with crashes of both sides within one claim interval, often: once quiet, no
    one is charged for more than it sent."""
    run_interleaving(actions)


def run_interleaving(actions: list[tuple[object, ...]]) -> None:
    pair = Pair(policy(2, 5_000, expiry_secs=30), policy(3, 5_000, expiry_secs=30))
    pair.link_up()
    lied = 0

    def bound() -> None:
        for side in (pair.a, pair.b):
            charged = side.neighbor.account.charged_out_packets()
            assert charged <= side.sent + TOLERANCE + side.recovery

    for action in actions:
        name, *args = action
        side = pair.a if args and args[0] is True else pair.b
        if name == "carry":
            pair.carry(side, int(args[1]), min(int(args[1]), int(args[2])))  # type: ignore[call-overload]
            pair.checkpoint()
        elif name == "advance":
            pair.now += float(args[0])  # type: ignore[arg-type]
            pair.tick()
        elif name == "reprice":
            terms = PriceTerms(int(args[1]), 5_000 + len(side.ledger), ("pow", "manual"))  # type: ignore[call-overload]
            pair.execute(side, side.neighbor.reprice(terms, pair.now))
        elif name == "propose":
            try:
                effect = side.neighbor.propose(
                    pay_umel=int(args[2]), request_umel=0, method=str(args[1]), now=pair.now,  # type: ignore[call-overload]
                    prepay=True,
                )  # fmt: skip
            except LocalProtocolError:
                continue
            pair.execute(side, effect)
        elif name == "decide":
            for record in list(side.neighbor.book.state.open.values()):
                if record.role == "responder":
                    effect = side.neighbor.decide(
                        record.settlement_id, approve=bool(args[1]), now=pair.now
                    )
                    pair.execute(side, effect)
        elif name == "cancel":
            record = side.neighbor.book.outgoing_open()
            if record is not None and record.state is SettlementState.PENDING:
                pair.execute(side, side.neighbor.cancel(record.settlement_id, pair.now))
        elif name == "deliver":
            for _ in range(int(args[0])):  # type: ignore[call-overload]
                if pair.network:
                    pair.deliver(pair.network.popleft())
            pair.run_work()
        elif name == "lose":
            if len(pair.network) > int(args[0]):  # type: ignore[call-overload]
                pair.lose(int(args[0]))  # type: ignore[call-overload]
        elif name == "fail_commit":
            side.fail_commits += 1
        elif name == "crash":
            pair.crash(side)
        elif name == "flap":
            pair.link_down()
            pair.link_up()
        elif name == "lie":  # Bob, creditor, claims packets Alice never sent
            pair.b.neighbor.counters.packets_in += int(args[0])  # type: ignore[call-overload]
            lied += int(args[0])  # type: ignore[call-overload]
        bound()
    pair.quiesce()
    a, b = pair.a.neighbor, pair.b.neighbor
    if not (a.frozen or b.frozen):  # claims alone, no reconnect, made both books agree
        assert views(pair)[0] == views(pair)[1] and views(pair)[2] == views(pair)[3]
    pair.link_down()
    pair.link_up()  # the audits after a reconnect
    pair.quiesce()
    bound()
    if not lied:
        assert not a.frozen and not b.frozen
        for side in (pair.a, pair.b):  # claims corrected every crash's estimate
            assert side.neighbor.account.charged_out_packets() <= side.sent
    if not a.frozen and not b.frozen:
        assert views(pair)[0] == views(pair)[1] and views(pair)[2] == views(pair)[3]
    # Every settlement applied once, on both sides or neither.
    for side in (pair.a, pair.b):
        ids = completed_ids(side)
        assert len(ids) == len(set(ids))
        settled = side.neighbor.account.state
        paid = [0, 0]
        for entry in side.ledger:
            if entry.kind == "settlement_completed" and entry.body is not None:
                attestation = msgspec.msgpack.decode(entry.body, type=Attestation)
                reduction = attestation.proposal.reduction_for(side.identity.fingerprint)
                paid[0] += reduction.paid_in_umel
                paid[1] += reduction.paid_out_umel
        assert (settled.settled_in_umel, settled.settled_out_umel) == tuple(paid)
    assert set(completed_ids(pair.a)) == set(completed_ids(pair.b))
    assert a.book.head == b.book.head
    event(f"settlements completed: {min(len(completed_ids(pair.a)), 3)}+")
    event(f"crashes: {min(pair.a.life + pair.b.life, 2)}+")
    for record in pair.a.neighbor.book.state.finished.values():
        event(f"settlement {record.proposal.method} {record.state}")
    event(f"frozen: {bool(a.frozen or b.frozen)}")
    restored_equal(pair.a)
    restored_equal(pair.b)


# --- wire --------------------------------------------------------------------------------


@given(st.binary(max_size=300), st.sampled_from(sorted(CALLS)))
def test_any_params_are_refused_or_answered_never_raise(data: bytes, method: str) -> None:
    pair = Pair()
    neighbor = pair.a.neighbor
    before = snapshot(pair.a)
    for params in ({"msg": base64.b64encode(data).decode()}, data.decode("latin-1"), None):
        effect = neighbor.receive_call(method, params, pair.now)
        if isinstance(effect.reply, Refused):
            assert not effect.entries
        assert snapshot(pair.a) == before
