"""Anonymous endpoints' bookkeeping: single use, expiry, bounds on both sides, and a stock of
reply blocks that keeps a conversation able to answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core.endpoints import (
    BLOCKS_PER_CONVERSATION,
    OPENER_SECS,
    REPLY_BLOCK_SECS,
    STOCK_TARGET,
    HeldBlocks,
    SentBlocks,
    WaitingAnswers,
)
from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.packet import ReplyBlock, ReplyOpener

TICK = 0.001
ME = b"e" * 16
THEM = (ME, b"f" * 32, 7)


def opener(n: int) -> ReplyOpener:
    return ReplyOpener(replay_tag=n.to_bytes(16, "big"), stream_keys=(), e2e_key=b"")


def block(n: int) -> ReplyBlock:
    return ReplyBlock(first_peeler=n.to_bytes(32, "big"), header=b"", body_keys=(), e2e_key=b"")


# --- the sender's side ---------------------------------------------------------------------


def test_an_opener_is_found_once() -> None:
    sent = SentBlocks()
    sent.add(THEM, opener(1), now=0.0)
    assert sent.pop(opener(1).replay_tag, now=1.0) == (THEM, opener(1))
    assert sent.pop(opener(1).replay_tag, now=1.0) is None
    assert sent.pop(opener(2).replay_tag, now=1.0) is None  # never made
    assert sent.statistics().used == 1


def test_an_opener_expires() -> None:
    sent = SentBlocks()
    sent.add(THEM, opener(1), now=0.0)
    sent.add(THEM, opener(2), now=10.0)
    assert sent.pop(opener(1).replay_tag, now=OPENER_SECS - TICK) is not None
    assert sent.pop(opener(2).replay_tag, now=10.0 + OPENER_SECS) is None
    assert sent.statistics().expired == 1
    assert sent.statistics().openers == 0


def test_a_conversation_holds_at_most_its_share_the_oldest_evicted() -> None:
    sent = SentBlocks()
    for n in range(BLOCKS_PER_CONVERSATION + 3):
        sent.add(THEM, opener(n), now=n * TICK)
    assert sent.statistics().openers == BLOCKS_PER_CONVERSATION
    assert sent.statistics().evicted == 3
    assert sent.pop(opener(0).replay_tag, now=1.0) is None
    assert sent.pop(opener(BLOCKS_PER_CONVERSATION + 2).replay_tag, now=1.0) is not None


def test_all_conversations_hold_at_most_max_total() -> None:
    sent = SentBlocks(per_conversation=4, max_total=10, target=2, refill_below=1)
    for n in range(30):
        sent.add((ME, n.to_bytes(32, "big"), 1), opener(n), now=n * TICK)
        assert sent.statistics().openers <= 10
    assert sent.pop(opener(19).replay_tag, now=1.0) is None
    assert sent.pop(opener(29).replay_tag, now=1.0) is not None


def test_the_estimate_is_the_smaller_of_outstanding_and_reported() -> None:
    sent = SentBlocks()
    assert sent.wanted(THEM, now=0.0) == STOCK_TARGET
    for n in range(6):
        sent.add(THEM, opener(n), now=0.0)
    assert sent.estimate(THEM, now=0.0) == 6
    sent.pop(opener(0).replay_tag, now=0.0)
    # The receiver says it holds 2 (it lost some, or evicted them): believe the smaller.
    assert sent.refills(THEM, remaining=2, now=0.0) == 2
    assert sent.estimate(THEM, now=0.0) == 2
    sent.add(THEM, opener(10), now=0.0)  # sent since the report
    assert sent.estimate(THEM, now=0.0) == 3


def test_refills_follow_the_report_and_are_bounded_per_reply() -> None:
    sent = SentBlocks()
    for n in range(STOCK_TARGET):
        sent.add(THEM, opener(n), now=0.0)
    sent.pop(opener(0).replay_tag, now=0.0)
    assert sent.refills(THEM, remaining=STOCK_TARGET - 1, now=0.0) == 0
    # A replier that always claims to hold nothing gets at most two blocks per reply.
    for n in range(1, 5):
        sent.pop(opener(n).replay_tag, now=0.0)
        assert sent.refills(THEM, remaining=0, now=0.0) == 2


def test_unusable_bounds_are_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        SentBlocks(per_conversation=4, target=8)
    with pytest.raises(LocalProtocolError):
        HeldBlocks(per_endpoint=0)


# --- the receiver's side ---------------------------------------------------------------------

HOLDER = (7, b"a" * 16)


def test_blocks_are_used_oldest_first_and_once() -> None:
    held = HeldBlocks()
    held.add(HOLDER, (block(1), block(2)), now=0.0)
    assert held.pop(HOLDER, now=0.0) == (block(1), 1)
    assert held.pop(HOLDER, now=0.0) == (block(2), 0)
    assert held.pop(HOLDER, now=0.0) is None
    assert held.pop((8, HOLDER[1]), now=0.0) is None  # another dock's: not these


def test_a_held_block_expires() -> None:
    held = HeldBlocks()
    held.add(HOLDER, (block(1),), now=0.0)
    held.add(HOLDER, (block(2),), now=100.0)
    assert held.pop(HOLDER, now=REPLY_BLOCK_SECS + 1.0) == (block(2), 0)
    assert held.statistics().expired == 1
    assert held.statistics().blocks == 0


def test_an_endpoint_holds_at_most_its_share_the_oldest_evicted() -> None:
    held = HeldBlocks(per_endpoint=3)
    held.add(HOLDER, tuple(block(n) for n in range(5)), now=0.0)
    assert held.count(HOLDER, now=0.0) == 3
    assert held.pop(HOLDER, now=0.0) == (block(2), 2)


def test_a_flood_of_endpoints_evicts_the_least_recently_used() -> None:
    held = HeldBlocks(per_endpoint=4, max_total=8)
    held.add(HOLDER, (block(0), block(1)), now=0.0)
    for n in range(10):
        held.add((7, n.to_bytes(16, "big")), (block(n),), now=TICK * n)
        assert held.statistics().blocks <= 8
    assert held.pop(HOLDER, now=1.0) is None


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 3), st.integers(0, 400)),
        max_size=80,
    )
)
def test_held_blocks_stay_within_bounds_and_counted(
    operations: list[tuple[bool, int, int, int]],
) -> None:
    held = HeldBlocks(per_endpoint=3, max_total=7, lifetime=100.0)
    now, popped = 0.0, 0
    for add, endpoint, count, step in operations:
        now += step
        holder = (1, endpoint.to_bytes(16, "big"))
        if add:
            held.add(holder, tuple(block(i) for i in range(count)), now)
        elif held.pop(holder, now) is not None:
            popped += 1
        stats = held.statistics()
        assert stats.blocks <= 7
        assert stats.used == popped
        # Expired blocks go when their holder is next touched: then the counts agree.
        live = sum(held.count((1, e.to_bytes(16, "big")), now) for e in range(6))
        assert held.statistics().blocks == live


# --- both sides, replenishing ------------------------------------------------------------


class Conversation:
    """A sender and a receiver trading blocks without crypto: messages carry a block while
    the sender wants one; every reply reports what is left and may trigger refills."""

    def __init__(self) -> None:
        self.sent, self.held = SentBlocks(), HeldBlocks()
        self.next = 0
        self.sender_packets = 0

    def ship(self, now: float) -> None:
        self.sent.add(THEM, opener(self.next), now)
        self.held.add(HOLDER, (block(self.next),), now)
        self.next += 1

    def request(self, now: float) -> None:
        self.sender_packets += 1
        if self.sent.wanted(THEM, now):
            self.ship(now)

    def reply(self, now: float) -> bool:
        taken = self.held.pop(HOLDER, now)
        if taken is None:
            return False
        used, remaining = taken
        assert self.sent.pop(int.from_bytes(used.first_peeler, "big").to_bytes(16, "big"), now)
        for _ in range(self.sent.refills(THEM, remaining, now)):
            self.sender_packets += 1
            self.ship(now)
        return True


def test_request_response_never_runs_out_and_needs_no_refill_packets() -> None:
    talk, now = Conversation(), 0.0
    for _ in range(200):
        talk.request(now)
        assert talk.reply(now)
        now += 1.0
    assert talk.sender_packets <= 200 + 2 * 2  # a refill or two while the stock builds up


def test_a_receiver_that_pushes_is_kept_supplied() -> None:
    talk, now = Conversation(), 0.0
    talk.request(now)
    replies = 0
    for _ in range(300):
        replies += talk.reply(now)
        now += 0.1
    assert replies == 300
    assert talk.sent.statistics().openers <= BLOCKS_PER_CONVERSATION


def test_blocks_outliving_their_life_are_not_used_and_the_stock_recovers() -> None:
    talk, now = Conversation(), 0.0
    for _ in range(5):
        talk.request(now)
    now += OPENER_SECS + 1.0  # everything given away has expired on both sides
    assert not talk.reply(now)
    talk.request(now)
    assert talk.reply(now)


# --- answers waiting for a block -----------------------------------------------------------


def test_answers_wait_in_order_and_are_taken_once() -> None:
    waiting = WaitingAnswers()
    waiting.add(HOLDER, b"one", now=0.0)
    waiting.add(HOLDER, b"two", now=1.0)
    assert HOLDER in waiting
    assert waiting.take(HOLDER, now=2.0) == b"one"
    assert waiting.take(HOLDER, now=2.0) == b"two"
    assert waiting.take(HOLDER, now=2.0) is None
    assert HOLDER not in waiting
    assert waiting.drops == {}


def test_an_answer_waits_only_so_long() -> None:
    waiting = WaitingAnswers(lifetime=5.0)
    waiting.add(HOLDER, b"late", now=0.0)
    waiting.add(HOLDER, b"in time", now=4.0)
    assert waiting.take(HOLDER, now=5.0) == b"in time"
    assert waiting.drops == {"no_reply_block": 1}


def test_waiting_answers_are_bounded_per_endpoint_and_in_all() -> None:
    waiting = WaitingAnswers(per_endpoint=2, max_total=3, lifetime=5.0)
    for n in range(3):
        waiting.add(HOLDER, b"%d" % n, now=0.0)
    assert waiting.drops == {"no_reply_block": 1}
    waiting.add((7, b"b" * 16), b"other", now=0.0)
    waiting.add((7, b"c" * 16), b"refused", now=0.0)
    assert waiting.drops == {"no_reply_block": 2}
    assert waiting.statistics().answers == 3
    # Once they are stale, answers nobody released give their room back.
    waiting.add((7, b"c" * 16), b"later", now=6.0)
    assert waiting.statistics().answers == 1
    assert waiting.drops == {"no_reply_block": 5}
