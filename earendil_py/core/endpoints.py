"""Anonymous endpoints: the reply blocks a sender has given away, and those a receiver holds.

A sender talks from an *anonymous endpoint*, a random id, and ships reply blocks
(core/packet.py) with its messages so that the receiver can answer that id. Both sides keep
state per conversation, bounded and expiring, because neither can trust the other:

* `SentBlocks`, the sender's side: the opener of every block it gave away, found by the
  replay tag its own peel of the reply yields. Single use (an opener is forgotten when its
  reply arrives), expiring OPENER_SECS after it was made, at most `per_conversation` per
  (our endpoint, their fingerprint, their dock) and `max_total` in all, the oldest evicted.
  It also estimates how many blocks the receiver holds, to send more as they are used.
* `HeldBlocks`, the receiver's side: blocks per (our dock, their endpoint), used oldest first,
  each at most REPLY_BLOCK_SECS after it arrived, at most `per_endpoint` per endpoint (the
  oldest evicted) and `max_total` in all (the least recently used endpoint's oldest evicted).
* `WaitingAnswers`, the receiver's side too: answers its application gave for an endpoint it
  holds no block for, kept a few seconds (bounded likewise) until one comes.

A sender never has more than `per_conversation` blocks outstanding in one conversation, and
a receiver holds no more than that for one endpoint: with equal bounds neither evicts a
block the other still counts on, however stale the reports.

Replenishing, as Earendil's anonymous sockets do (its receiver reports `remaining_surbs` in
every reply; its sender tops up with batches of 10 SURBs while the count is below 50, each
batch in one 8 KB packet). Here a packet has room for one block, so: a message carries one
while the estimate is below `target` (and the data leaves room), and after a reply whose
`remaining` is below `refill_below` the sender sends at most `refill_per_reply` more in
blocks-only packets. The estimate is the smaller of the blocks outstanding (given away, not
used, not expired) and the last reported `remaining` plus the blocks sent since. A report
older than blocks sent since makes it low and costs a block or two extra; at most
`refill_per_reply` per reply, so a replier that lies about `remaining` makes its sender build
at most that many blocks per reply it sends, and it pays for the reply's packets.

Memory is bounded by the counts; expired entries are dropped when their conversation is next
touched or when they are the oldest, so no timer is needed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.packet import ReplyBlock, ReplyOpener
from earendil_py.core.relay import REPLAY_WINDOW_SECS

# A receiver uses a block at most this long after it arrived. Shorter than the peelers'
# replay window, so that a block used twice within its life is always caught at its first
# peeler (docs/packet-format.md, "Reply blocks").
REPLY_BLOCK_SECS = 300.0
# The sender keeps an opener this long: the block's life, plus its way there and the reply's
# way back.
OPENER_SECS = REPLY_BLOCK_SECS + 60.0
assert OPENER_SECS < REPLAY_WINDOW_SECS
BLOCKS_PER_CONVERSATION = 16  # both sides: what one conversation may hold
MAX_BLOCKS = 4096  # both sides: ~2.4 MB of held blocks, ~0.8 MB of openers
STOCK_TARGET = 8  # blocks the sender wants the receiver to hold
REFILL_BELOW = 4
REFILL_PER_REPLY = 2

# (our anonymous endpoint, their fingerprint, their dock)
Conversation = tuple[bytes, bytes, int]
# (our dock, their anonymous endpoint)
Holder = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class SentBlocksStatistics:
    openers: int  # outstanding: given away, not used, not expired
    conversations: int
    used: int  # replies that found their opener
    expired: int
    evicted: int  # dropped for a bound before they expired


@dataclass(slots=True)
class _Stock:
    tags: deque[bytes] = field(default_factory=deque)  # outstanding openers, oldest first
    reported: int | None = None  # last `remaining`, plus blocks sent since; None: no reply yet


class SentBlocks:
    """The openers of the reply blocks we gave away; see the module docstring. Raises
    LocalProtocolError on construction for unusable bounds."""

    def __init__(
        self,
        *,
        per_conversation: int = BLOCKS_PER_CONVERSATION,
        max_total: int = MAX_BLOCKS,
        lifetime: float = OPENER_SECS,
        target: int = STOCK_TARGET,
        refill_below: int = REFILL_BELOW,
        refill_per_reply: int = REFILL_PER_REPLY,
    ) -> None:
        if not 0 < target <= per_conversation <= max_total or not 0 <= refill_below <= target:
            raise LocalProtocolError("reply block bounds must be positive and nested")
        self._per_conversation = per_conversation
        self._max_total = max_total
        self._lifetime = lifetime
        self._target = target
        self._refill_below = refill_below
        self._refill_per_reply = refill_per_reply
        # Insertion order is expiry order: every opener lives `lifetime`.
        self._openers: OrderedDict[bytes, tuple[Conversation, ReplyOpener, float]] = OrderedDict()
        self._stocks: dict[Conversation, _Stock] = {}
        self._used = self._expired = self._evicted = 0

    def wanted(self, conversation: Conversation, now: float) -> int:
        """How many more blocks the receiver should get (0: it holds enough, or a
        conversation may have no more outstanding)."""
        estimate = self.estimate(conversation, now)
        return max(0, min(self._target - estimate, self._room(conversation)))

    def estimate(self, conversation: Conversation, now: float) -> int:
        """How many of our blocks the receiver holds, as far as we can tell."""
        self._expire(now)
        stock = self._stocks.get(conversation)
        if stock is None:
            return 0
        held = len(stock.tags)
        return held if stock.reported is None else min(held, stock.reported)

    def add(self, conversation: Conversation, opener: ReplyOpener, now: float) -> None:
        """Remember the opener of a block we are sending in `conversation`."""
        self._expire(now)
        stock = self._stocks.get(conversation)
        if stock is not None and len(stock.tags) >= self._per_conversation:
            self._drop(stock.tags[0])
            self._evicted += 1
        if len(self._openers) >= self._max_total:
            self._drop(next(iter(self._openers)))
            self._evicted += 1
        stock = self._stocks.setdefault(conversation, _Stock())
        self._openers[opener.replay_tag] = (conversation, opener, now + self._lifetime)
        stock.tags.append(opener.replay_tag)
        if stock.reported is not None:
            stock.reported += 1

    def pop(self, replay_tag: bytes, now: float) -> tuple[Conversation, ReplyOpener] | None:
        """The conversation and opener of the block a reply came through, forgotten now (a
        block is single use); None if we never made it, or it expired or was used."""
        self._expire(now)
        entry = self._openers.get(replay_tag)
        if entry is None:
            return None
        self._drop(replay_tag)
        self._used += 1
        return entry[0], entry[1]

    def refills(
        self, conversation: Conversation, remaining: int, now: float, pending: int = 0
    ) -> int:
        """After a reply in `conversation` saying the receiver still holds `remaining`: how
        many blocks to send it now in blocks-only packets, beyond `pending` being built."""
        self._expire(now)
        stock = self._stocks.get(conversation)
        if stock is not None:
            stock.reported = remaining
        estimate = (min(len(stock.tags), remaining) if stock is not None else 0) + pending
        if estimate >= self._refill_below:
            return 0
        room = self._room(conversation) - pending
        return max(0, min(self._target - estimate, self._refill_per_reply, room))

    def _room(self, conversation: Conversation) -> int:
        # Never more outstanding than a conversation may hold: the oldest would be evicted,
        # and those are the ones the receiver uses first.
        stock = self._stocks.get(conversation)
        return self._per_conversation - (len(stock.tags) if stock is not None else 0)

    def statistics(self) -> SentBlocksStatistics:
        return SentBlocksStatistics(
            openers=len(self._openers),
            conversations=len(self._stocks),
            used=self._used,
            expired=self._expired,
            evicted=self._evicted,
        )

    def _expire(self, now: float) -> None:
        openers = self._openers
        while openers:
            tag, (_, _, expires) = next(iter(openers.items()))
            if expires > now:
                return
            self._drop(tag)
            self._expired += 1

    def _drop(self, tag: bytes) -> None:
        conversation, _, _ = self._openers.pop(tag)
        stock = self._stocks[conversation]
        stock.tags.remove(tag)
        if not stock.tags:  # what was reported is moot once nothing is outstanding
            del self._stocks[conversation]


@dataclass(frozen=True, slots=True)
class HeldBlocksStatistics:
    blocks: int
    holders: int  # (dock, endpoint) pairs holding blocks
    used: int
    expired: int
    evicted: int  # dropped for a bound before they expired


class HeldBlocks:
    """Reply blocks received, per (our dock, their endpoint); see the module docstring.
    Raises LocalProtocolError on construction for unusable bounds."""

    def __init__(
        self,
        *,
        per_endpoint: int = BLOCKS_PER_CONVERSATION,
        max_total: int = MAX_BLOCKS,
        lifetime: float = REPLY_BLOCK_SECS,
    ) -> None:
        if not 0 < per_endpoint <= max_total:
            raise LocalProtocolError("reply block bounds must be positive and nested")
        self._per_endpoint = per_endpoint
        self._max_total = max_total
        self._lifetime = lifetime
        # Least recently used first; each holder's blocks oldest first, with their expiry.
        self._held: OrderedDict[Holder, deque[tuple[float, ReplyBlock]]] = OrderedDict()
        self._total = 0
        self._used = self._expired = self._evicted = 0

    def add(self, holder: Holder, blocks: tuple[ReplyBlock, ...], now: float) -> None:
        """Keep `blocks` for answering `holder`."""
        if not blocks:
            return
        queue = self._fresh(holder, now)
        if queue is None:
            queue = self._held[holder] = deque()
        self._held.move_to_end(holder)
        for block in blocks:
            if len(queue) >= self._per_endpoint:
                queue.popleft()
                self._total -= 1
                self._evicted += 1
            queue.append((now + self._lifetime, block))
            self._total += 1
        while self._total > self._max_total:
            oldest_holder, oldest = next(iter(self._held.items()))
            oldest.popleft()
            self._total -= 1
            self._evicted += 1
            if not oldest:
                del self._held[oldest_holder]

    def pop(self, holder: Holder, now: float) -> tuple[ReplyBlock, int] | None:
        """The oldest unexpired block for answering `holder`, taken (single use), and how many
        are left; None if there is none."""
        queue = self._fresh(holder, now)
        if not queue:
            return None
        _, block = queue.popleft()
        self._total -= 1
        self._used += 1
        if queue:
            self._held.move_to_end(holder)
        else:
            del self._held[holder]
        return block, len(queue)

    def count(self, holder: Holder, now: float) -> int:
        queue = self._fresh(holder, now)
        return len(queue) if queue else 0

    def statistics(self) -> HeldBlocksStatistics:
        return HeldBlocksStatistics(
            blocks=self._total,
            holders=len(self._held),
            used=self._used,
            expired=self._expired,
            evicted=self._evicted,
        )

    def _fresh(self, holder: Holder, now: float) -> deque[tuple[float, ReplyBlock]] | None:
        """`holder`'s queue with its expired blocks dropped (None, and forgotten, if empty)."""
        queue = self._held.get(holder)
        if queue is None:
            return None
        while queue and queue[0][0] <= now:
            queue.popleft()
            self._total -= 1
            self._expired += 1
        if not queue:
            del self._held[holder]
            return None
        return queue


# An answer to an endpoint we hold no block for waits this long for one: a burst of requests
# can outrun the blocks that came with them, and the replies sent meanwhile ask for more.
ANSWER_WAIT_SECS = 10.0
ANSWERS_PER_ENDPOINT = 16
MAX_ANSWERS = 1024


@dataclass(frozen=True, slots=True)
class WaitingAnswersStatistics:
    answers: int
    holders: int


class WaitingAnswers:
    """Answers waiting for a reply block, per (our dock, their endpoint), oldest first:
    at most `per_endpoint` per endpoint and `max_total` in all, each for `lifetime` seconds.
    An answer refused for a bound, or that waited too long, is counted in `drops` as
    `no_reply_block`. Raises LocalProtocolError on construction for unusable bounds."""

    def __init__(
        self,
        *,
        per_endpoint: int = ANSWERS_PER_ENDPOINT,
        max_total: int = MAX_ANSWERS,
        lifetime: float = ANSWER_WAIT_SECS,
    ) -> None:
        if not 0 < per_endpoint <= max_total:
            raise LocalProtocolError("waiting answer bounds must be positive and nested")
        self._per_endpoint = per_endpoint
        self._max_total = max_total
        self._lifetime = lifetime
        self._waiting: dict[Holder, deque[tuple[float, bytes]]] = {}
        self._total = 0
        self.drops: Counter[str] = Counter()

    def __contains__(self, holder: Holder) -> bool:
        return holder in self._waiting

    def add(self, holder: Holder, answer: bytes, now: float) -> None:
        """Keep `answer` until a block for `holder` comes (or drop it, counted)."""
        if self._total >= self._max_total:
            for other in list(self._waiting):  # answers nobody released, gone for good
                self._fresh(other, now)
        queue = self._fresh(holder, now)
        if self._total >= self._max_total or (queue and len(queue) >= self._per_endpoint):
            self.drops["no_reply_block"] += 1
            return
        if queue is None:
            queue = self._waiting[holder] = deque()
        queue.append((now + self._lifetime, answer))
        self._total += 1

    def take(self, holder: Holder, now: float) -> bytes | None:
        """`holder`'s oldest answer still waiting, taken; None if there is none."""
        queue = self._fresh(holder, now)
        if queue is None:
            return None
        _, answer = queue.popleft()
        self._total -= 1
        if not queue:
            del self._waiting[holder]
        return answer

    def statistics(self) -> WaitingAnswersStatistics:
        return WaitingAnswersStatistics(answers=self._total, holders=len(self._waiting))

    def _fresh(self, holder: Holder, now: float) -> deque[tuple[float, bytes]] | None:
        queue = self._waiting.get(holder)
        if queue is None:
            return None
        while queue and queue[0][0] <= now:
            queue.popleft()
            self._total -= 1
            self.drops["no_reply_block"] += 1
        if not queue:
            del self._waiting[holder]
            return None
        return queue
