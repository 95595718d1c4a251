"""The last hour of every neighbour, for the dashboard's charts: a bounded ring in memory.

Every `interval_secs` the node takes one sample per neighbour with an account: what each side
owes (µMEL) and how many onion packets went each way over its links since the previous sample.
A link's counters start at 0 with each link, so the packets of a sample are the growth of each
link's counters since that link was last seen (all of them for a link that came up since);
what a link that ended between two samples carried after the first of them is not counted.

What it holds is bounded in both directions: `size` samples per neighbour (the window over
the interval, 360 for an hour at 10 s), and at most `max_neighbors` neighbours, first come
first kept; a neighbour that no longer has an account is forgotten at the next sample. The
samples' times are one ring for all neighbours (every sample takes them all). Most
neighbours of a relay are idle most of the time, their every sample the same (the same
debts, no packet), so a neighbour holds only its first sample until one differs; from then
on it holds a ring of its own, one flat `array` of 64-bit integers (32 bytes a sample:
11.5 KB for an hour at 10 s, 11.8 MB for 1024 such neighbours). Nothing here is persisted:
a restart starts an empty chart.
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
_WIDTH = len(FIELDS) - 1  # the values of a neighbour's sample; the time is shared
_IDLE = (0,) * _WIDTH  # no debt, no packet: the one tuple all such neighbours hold
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
        # Sample number n (counted from 0) is in slot n % size of each ring.
        self._taken = 0
        self._times = array("q")  # unix ms
        # Per neighbour, the number of its first sample; while its samples are all the same,
        # that sample (`_steady`), and after, a ring of _WIDTH ints per sample (`_rings`).
        self._since: dict[bytes, int] = {}
        self._steady: dict[bytes, tuple[int, ...]] = {}
        self._rings: dict[bytes, array[int]] = {}
        self._link_counts: dict[CountedLink, tuple[int, int]] = {}  # those not (0, 0)

    def sample(self, at: float, debts: Debts, links: Mapping[bytes, Sequence[CountedLink]]) -> None:
        """Record one sample at unix time `at` for every neighbour in `debts` (and forget
        those not in it), with the packets each way that `links` carried since the last."""
        packets, counts = {}, {}
        for neighbor, runners in links.items():
            total_in = total_out = 0
            for runner in runners:
                now = (runner.packets_received, runner.packets_sent)
                if now != (0, 0):
                    counts[runner] = now
                seen_in, seen_out = self._link_counts.get(runner, (0, 0))
                total_in += now[0] - seen_in
                total_out += now[1] - seen_out
            packets[neighbor] = (total_in, total_out)
        self._link_counts = counts  # links gone since the last sample are let go
        debts = list(debts)
        for neighbor in self._since.keys() - {neighbor for neighbor, _, _ in debts}:
            del self._since[neighbor]
            self._steady.pop(neighbor, None)
            self._rings.pop(neighbor, None)
        number, slot = self._taken, self._taken % self.size
        at_ms = _clamp(round(at * 1000))
        if len(self._times) < self.size:
            self._times.append(at_ms)
        else:
            self._times[slot] = at_ms
        self._taken += 1
        for neighbor, debt_in, debt_out in debts:
            if neighbor not in self._since:
                if len(self._since) >= self.max_neighbors:
                    continue
                self._since[neighbor] = number
            values = tuple(map(_clamp, (debt_in, debt_out, *packets.get(neighbor, (0, 0)))))
            ring = self._rings.get(neighbor)
            if ring is None:
                steady = self._steady.setdefault(neighbor, _IDLE if values == _IDLE else values)
                if values == steady:
                    continue
                # The first change: every slot gets the steady sample, which the samples
                # before this one were (slots from before the neighbour are never read).
                ring = self._rings[neighbor] = array("q", steady * self.size)
                del self._steady[neighbor]
            ring[slot * _WIDTH : (slot + 1) * _WIDTH] = array("q", values)

    def neighbors(self) -> list[bytes]:
        """The neighbours sampled, in the order they were first sampled."""
        return list(self._since)

    def series(self, neighbor: bytes) -> dict[str, list[Any]]:
        """`neighbor`'s samples oldest first, one list per field of FIELDS (`at` in unix
        seconds); empty lists for a neighbour never sampled."""
        since = self._since.get(neighbor, self._taken)
        numbers = range(max(since, self._taken - self.size), self._taken)
        size, times = self.size, self._times
        columns: dict[str, list[Any]] = {"at": [times[n % size] / 1000 for n in numbers]}
        ring, steady = self._rings.get(neighbor), self._steady.get(neighbor, _IDLE)
        for i, name in enumerate(FIELDS[1:]):
            if ring is None:
                columns[name] = [steady[i]] * len(numbers)
            else:
                columns[name] = [ring[n % size * _WIDTH + i] for n in numbers]
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
