"""The last hour of every neighbour, for the dashboard's charts: a bounded ring in memory.

Every `interval_secs` the node takes one sample per neighbour with an account: what each side
owes (µMEL) and how many onion packets went each way over its links since the previous sample.
A link's counters start at 0 with each link, so the packets of a sample are the growth of each
link's counters since that link was last seen (all of them for a link that came up since);
what a link that ended between two samples carried after the first of them is not counted.

What it holds is bounded in both directions: `size` samples per neighbour (the window over
the interval, 360 for an hour at 10 s), kept in one flat `array` of 64-bit integers per
neighbour (40 bytes a sample: 14.4 KB for an hour at 10 s), and at most `max_neighbors`
neighbours (15 MB for 1024), first come first kept; a neighbour that no longer has an
account is forgotten at the next sample. Nothing here is persisted: a restart starts an
empty chart.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import anyio

SAMPLE_SECS = 10.0
WINDOW_SECS = 3600.0
MAX_NEIGHBORS = 1024
FIELDS = ("at", "debt_in_umel", "debt_out_umel", "packets_in", "packets_out")
_WIDTH = len(FIELDS)
_INT64 = (-(2**63), 2**63 - 1)


class CountedLink(Hashable, Protocol):
    """A link's onion packet counters (`LinkRunner` has them)."""

    @property
    def packets_sent(self) -> int: ...

    @property
    def packets_received(self) -> int: ...


# (neighbour, what it owes us, what we owe it), in µMEL.
Debts = Iterable[tuple[bytes, int, int]]


class History:
    """Per neighbour, the newest `size` samples of (time, debts both ways, packets each way
    during the interval). `sample` takes one; `run` takes one every `interval_secs`."""

    def __init__(
        self,
        interval_secs: float = SAMPLE_SECS,
        window_secs: float = WINDOW_SECS,
        max_neighbors: int = MAX_NEIGHBORS,
    ) -> None:
        if not 0 < interval_secs <= window_secs:
            raise ValueError("the interval is positive and at most the window")
        self.interval_secs = interval_secs
        self.window_secs = window_secs
        self.size = round(window_secs / interval_secs)
        self.max_neighbors = max_neighbors
        # Per neighbour, samples as consecutive groups of _WIDTH ints (time in unix ms), and
        # the index of its oldest sample once the ring is full.
        self._rings: dict[bytes, array[int]] = {}
        self._oldest: dict[bytes, int] = {}
        self._link_counts: dict[CountedLink, tuple[int, int]] = {}

    def sample(self, at: float, debts: Debts, links: Mapping[bytes, Sequence[CountedLink]]) -> None:
        """Record one sample at unix time `at` for every neighbour in `debts` (and forget
        those not in it), with the packets each way that `links` carried since the last."""
        packets, counts = {}, {}
        for neighbor, runners in links.items():
            total_in = total_out = 0
            for runner in runners:
                now = counts[runner] = (runner.packets_received, runner.packets_sent)
                seen_in, seen_out = self._link_counts.get(runner, (0, 0))
                total_in += now[0] - seen_in
                total_out += now[1] - seen_out
            packets[neighbor] = (total_in, total_out)
        self._link_counts = counts  # links gone since the last sample are let go
        debts = list(debts)
        for neighbor in self._rings.keys() - {neighbor for neighbor, _, _ in debts}:
            del self._rings[neighbor], self._oldest[neighbor]
        at_ms = round(at * 1000)
        for neighbor, debt_in, debt_out in debts:
            ring = self._rings.get(neighbor)
            if ring is None:
                if len(self._rings) >= self.max_neighbors:
                    continue
                ring = self._rings[neighbor] = array("q")
                self._oldest[neighbor] = 0
            packets_in, packets_out = packets.get(neighbor, (0, 0))
            values = array("q", map(_clamp, (at_ms, debt_in, debt_out, packets_in, packets_out)))
            if len(ring) < self.size * _WIDTH:
                ring.extend(values)
            else:
                oldest = self._oldest[neighbor]
                ring[oldest * _WIDTH : (oldest + 1) * _WIDTH] = values
                self._oldest[neighbor] = (oldest + 1) % self.size

    def neighbors(self) -> list[bytes]:
        """The neighbours with a ring, in the order they were first sampled."""
        return list(self._rings)

    def series(self, neighbor: bytes) -> dict[str, list[Any]]:
        """`neighbor`'s samples oldest first, one list per field of FIELDS (`at` in unix
        seconds); empty lists for a neighbour never sampled."""
        ring = self._rings.get(neighbor, array("q"))
        start = self._oldest.get(neighbor, 0) * _WIDTH
        ordered = ring[start:] + ring[:start]
        columns: dict[str, list[Any]] = {
            name: ordered[i::_WIDTH].tolist() for i, name in enumerate(FIELDS)
        }
        columns["at"] = [ms / 1000 for ms in columns["at"]]
        return columns

    async def run(
        self,
        debts: Callable[[], Debts],
        links: Mapping[bytes, Sequence[CountedLink]],
        boundary: AbstractContextManager[object],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Take a sample every `interval_secs` until cancelled, the first one an interval
        after the start, each inside `boundary` (a fault there loses one sample, not the
        node). Each sleep runs to the next due time, so samples do not drift."""
        due = anyio.current_time()
        while True:
            due += self.interval_secs
            await anyio.sleep_until(due)
            with boundary:
                self.sample(clock(), debts(), links)
            due = max(due, anyio.current_time() - self.interval_secs)  # skip what was missed


def _clamp(value: int) -> int:
    """Into a signed 64-bit slot: no value a neighbour's claims can produce is beyond it,
    but a chart must not be what stops the node."""
    return min(max(value, _INT64[0]), _INT64[1])
