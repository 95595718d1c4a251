"""A replay filter bounded both in time and in memory.

Onion keys are long-term in this design, so a packet recorded off the wire peels again, to the
same next hop, with the same result, for as long as the key lives. What stops an attacker from
replaying it (to count how often a flow goes through us, or to bill our neighbour twice) is this
filter, keyed by the per-hop `replay_tag` that `peel_packet` derives from the packet's shared
secret. Earendil's reference node keeps such tags in a set that grows without bound; this one
rotates buckets, so memory has a hard ceiling.

The guarantees, with `k = buckets` and `span = window / (k - 1)`:

* Time: a tag stays remembered for at least `window` seconds after it was inserted (and is
  forgotten after at most `window * k / (k - 1)`), **provided** the filter is not full. A replay
  older than that is not caught; only onion-key rotation (a future issue) would bound it.
* Memory: at most `max_entries` tags are held, ever (`k` sets of `max_entries // k`).
* Under a flood: when the newest bucket is full the filter rotates early and drops its oldest
  bucket, so the time guarantee shrinks to "the last `(k - 1) * (max_entries // k)` tags". An
  attacker who can make us peel that many distinct packets within the window can therefore
  replay a packet recorded before the flood. That is the unavoidable trade-off of a bounded
  filter (the alternative, unbounded memory, is a denial of service). It is acceptable because
  the flood itself is costly and visible: every flooding packet must be a valid onion for our
  key, is paid for under the per-link price, and shows up in `early_rotations`; the
  operator should size `max_entries` above the peak packet rate times the window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from earendil_py.core.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class ReplayFilterStatistics:
    """A snapshot of a ReplayFilter's state and counters."""

    entries: int  # tags currently remembered
    max_entries: int
    buckets: int  # buckets currently allocated (at most the configured count)
    inserted: int  # fresh tags accepted since creation
    replays: int  # replays rejected since creation
    rotations: int  # all rotations, timed and early
    early_rotations: int  # rotations forced by a full bucket: the window was shortened


class ReplayFilter:
    """Remembers replay tags for at least `window` seconds, in at most `max_entries` slots.

    `window` is in the same monotonic seconds as the `now` passed to `check_and_insert`.
    See the module docstring for the exact bound and the flood trade-off.
    Raises LocalProtocolError on construction if the parameters are unusable.
    """

    __slots__ = (
        "_bucket_capacity",
        "_buckets",
        "_current",
        "_current_start",
        "_early_rotations",
        "_inserted",
        "_max_buckets",
        "_max_entries",
        "_replays",
        "_rotations",
        "_span",
        "_window",
    )

    def __init__(self, window: float, max_entries: int, *, buckets: int = 4) -> None:
        if not window > 0:
            raise LocalProtocolError("replay window must be positive")
        if buckets < 2:
            raise LocalProtocolError("a rotating replay filter needs at least 2 buckets")
        if max_entries < buckets:
            raise LocalProtocolError("max_entries must be at least the number of buckets")
        self._window = window
        self._max_entries = max_entries
        self._max_buckets = buckets
        self._span = window / (buckets - 1)
        self._bucket_capacity = max_entries // buckets
        self._current: set[bytes] = set()
        # Oldest first; the current bucket is always the last one.
        self._buckets: deque[set[bytes]] = deque([self._current])
        self._current_start: float | None = None
        self._inserted = 0
        self._replays = 0
        self._rotations = 0
        self._early_rotations = 0

    @property
    def window(self) -> float:
        return self._window

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def check_and_insert(self, tag: bytes, now: float) -> bool:
        """True if `tag` is fresh (and now remembered), False if it is a replay."""
        start = self._current_start
        if start is None:
            self._current_start = now
        elif now - start >= self._span:
            self._advance(now, start)
        for bucket in self._buckets:
            if tag in bucket:
                self._replays += 1
                return False
        if len(self._current) >= self._bucket_capacity:
            self._early_rotations += 1
            self._rotate(now)
        self._current.add(tag)
        self._inserted += 1
        return True

    def _advance(self, now: float, start: float) -> None:
        steps = int((now - start) // self._span)
        if steps >= self._max_buckets:
            # Everything held is older than the window: forget it all at once.
            self._rotations += steps
            self._current = set()
            self._buckets = deque([self._current])
            self._current_start = now
            return
        # Bucket starts stay on the span grid so that a bucket never takes inserts for more than
        # `span` seconds; that is what the "at least `window`" bound rests on.
        for _ in range(steps):
            start += self._span
            self._rotate(start)

    def _rotate(self, start: float) -> None:
        self._rotations += 1
        self._current = set()
        self._buckets.append(self._current)
        if len(self._buckets) > self._max_buckets:
            self._buckets.popleft()
        self._current_start = start

    def statistics(self) -> ReplayFilterStatistics:
        return ReplayFilterStatistics(
            entries=sum(len(bucket) for bucket in self._buckets),
            max_entries=self._max_entries,
            buckets=len(self._buckets),
            inserted=self._inserted,
            replays=self._replays,
            rotations=self._rotations,
            early_rotations=self._early_rotations,
        )
