"""The node's timer queue: every link's `get_timer()` in one heap, one wake-up when due.

A protocol object says when it next needs the clock (`get_timer()`: a deadline in the
`anyio.current_time()` clock, or None) and acts when given it (`handle_timer(now)`), as in
aioquic. The node does not give each object a task that sleeps until that deadline: a task
costs ~7 KB and a wake-up of the event loop, and a node with a thousand idle links would
spend more on them than on its traffic. Instead every object registers with one
`TimerQueue`, which sleeps until the earliest deadline of all (one callback in the event
loop's timer heap on asyncio, see `TimerQueue.run`), fires what is due, and sleeps again;
it is woken early only when a deadline moves earlier than the one it sleeps until. An idle
object costs a heap entry and nothing else.

Deadlines are read back lazily. After anything that can move an object's deadline earlier
(for a link: it queued a message or an event), its owner calls `Timer.update()`, which
schedules the new deadline if it is earlier than the one scheduled. A deadline that moved
later (a link heard from its peer, so its keepalive timeout moved on) is not rescheduled
then: when the old deadline comes, the queue reads `get_timer()` again and, if that is still
in the future, schedules it without firing. So the hot path never touches the heap for a
deadline that only moved later, which is what traffic does to a link's timers.

A fired callback runs inside the queue's task, so it must not raise: the node wraps each in
the fault boundary of the object it serves (a link's failure closes that link).

Neighbours (`core.neighbor.Neighbor`) keep their own heap of the same kind, in
`runtime/neighbors.py`: it also sleeps until the earliest deadline and is woken only when one
moves earlier, but its due neighbours are handled together and their ledger entries committed
in one transaction, which needs an async step and the wall clock that signed claims carry.
A link's timer is synchronous and monotonic. So there are two heaps of one design, and no
object of either kind is ever polled.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable

import anyio

# Stale entries (left behind by deadlines that moved earlier, or by cancelled timers) are
# dropped by rebuilding the heap once they outnumber the live ones by this factor; until
# then each is discarded when it comes up.
_STALE_FACTOR = 2
_MIN_REBUILD = 64


class Timer:
    """One object's place in a `TimerQueue`. See the module docstring."""

    __slots__ = ("_fire", "_get", "_queue", "_seq", "deadline")

    def __init__(
        self,
        queue: TimerQueue,
        get_timer: Callable[[], float | None],
        fire: Callable[[float], None],
    ) -> None:
        self._queue: TimerQueue | None = queue
        self._get = get_timer
        self._fire = fire
        self._seq = -1  # the heap entry that is this timer's live one
        self.deadline: float | None = None  # when that entry is due (None: none is)

    def update(self) -> None:
        """Read `get_timer()` again and schedule it if it is earlier than what is scheduled.
        Cheap when it is not. Does nothing once cancelled."""
        queue = self._queue
        if queue is None:
            return
        deadline = self._get()
        if deadline is not None and (self.deadline is None or deadline < self.deadline):
            queue._schedule(self, deadline)

    def cancel(self) -> None:
        """Never fire again (idempotent). The object is let go at once: a stale heap entry
        may hold this handle until its deadline comes."""
        if self._queue is not None:
            self._queue._unschedule(self)
            self._queue = None
            self._get, self._fire = _no_deadline, _no_fire


def _no_deadline() -> None:
    return None


def _no_fire(now: float) -> None:
    return None


class TimerQueue:
    """The node's timers: `add` registers an object, `run` fires what is due until cancelled.

    `statistics()` counts what the queue did, for tests and benchmarks: `fired` callbacks,
    `deferred` entries that found their deadline had moved later and were rescheduled
    without firing, and `wakeups` of the task.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0
        self._live = 0  # timers with a scheduled entry
        self._sleeping_until = math.inf
        self._wakeup = anyio.Event()
        # On asyncio: the loop and its call_at handle for `_sleeping_until` (see `run`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._failed: asyncio.Future[None] | None = None
        self.fired = 0
        self.deferred = 0
        self.wakeups = 0

    def __len__(self) -> int:
        """How many timers have a deadline scheduled."""
        return self._live

    def add(self, get_timer: Callable[[], float | None], fire: Callable[[float], None]) -> Timer:
        """Register an object: `fire(now)` is called once `get_timer()` is due (it should call
        the object's `handle_timer(now)`); afterwards `get_timer()` is read again. Schedules
        the current deadline at once."""
        timer = Timer(self, get_timer, fire)
        timer.update()
        return timer

    def statistics(self) -> dict[str, int]:
        return {
            "scheduled": self._live,
            "heap": len(self._heap),
            "fired": self.fired,
            "deferred": self.deferred,
            "wakeups": self.wakeups,
        }

    def _schedule(self, timer: Timer, deadline: float) -> None:
        if timer.deadline is None:
            self._live += 1
        self._seq += 1
        timer._seq, timer.deadline = self._seq, deadline
        heapq.heappush(self._heap, (deadline, self._seq, timer))
        if deadline < self._sleeping_until:
            if self._loop is None:
                self._wakeup.set()
            else:
                self._arm(deadline)
        if len(self._heap) > _MIN_REBUILD + _STALE_FACTOR * self._live:
            self._rebuild()

    def _unschedule(self, timer: Timer) -> None:
        if timer.deadline is not None:
            self._live -= 1
            timer.deadline = None
            timer._seq = -1

    def _rebuild(self) -> None:
        self._heap = [entry for entry in self._heap if entry[1] == entry[2]._seq]
        heapq.heapify(self._heap)

    def fire_due(self, now: float) -> float:
        """Fire every timer due at `now`; returns the next deadline (inf if none). A timer
        whose object asks again for a time already past fires at the next call, not in this
        one, so no object can keep the loop from running other tasks."""
        heap, due = self._heap, []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for _, seq, timer in due:
            if seq != timer._seq:
                continue  # stale: moved earlier since, or cancelled
            self._unschedule(timer)
            deadline = timer._get()
            if deadline is not None and deadline > now:
                self.deferred += 1  # it moved later since it was scheduled
                self._schedule(timer, deadline)
                continue
            self.fired += 1
            timer._fire(now)
            timer.update()
        return heap[0][0] if heap else math.inf

    async def run(self) -> None:
        """Fire timers when they are due, until cancelled.

        On asyncio, the node's loop, the queue is a callback in the loop's own timer heap,
        moved with `call_at` when the earliest deadline changes: a wake-up is one callback.
        A task sleeping in a cancel scope until due costs a cancellation delivered, a task
        step and a new Event besides, ~45 us more per wake-up on the development VM, where
        1,000 idle links wake the queue ~400 times a second (bench/links.py). Elsewhere, that
        task.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another event loop than asyncio
            await self._run_task()
            return
        self._loop, self._failed = loop, loop.create_future()
        try:
            self._on_due()
            await self._failed  # only a callback that raised ends it, with its error
        finally:
            if self._handle is not None:
                self._handle.cancel()
            self._loop = self._handle = self._failed = None
            self._sleeping_until = math.inf

    def _arm(self, deadline: float) -> None:
        assert self._loop is not None
        if self._handle is not None:
            self._handle.cancel()
        self._sleeping_until = deadline
        self._handle = None if deadline == math.inf else self._loop.call_at(deadline, self._on_due)

    def _on_due(self) -> None:
        assert self._loop is not None and self._failed is not None
        self._handle = None
        self.wakeups += 1
        # While firing, nothing scheduled needs to re-arm: the next deadline is read after.
        self._sleeping_until = -math.inf
        try:
            next_deadline = self.fire_due(self._loop.time())
        except Exception as exc:
            if not self._failed.done():
                self._failed.set_exception(exc)
            return
        self._arm(next_deadline)

    async def _run_task(self) -> None:
        while True:
            # While firing, nothing scheduled needs to wake us: the next deadline is read after.
            self._sleeping_until = -math.inf
            next_deadline = self.fire_due(anyio.current_time())
            self._wakeup = anyio.Event()
            self._sleeping_until = next_deadline
            self.wakeups += 1
            with anyio.CancelScope(deadline=next_deadline):
                await self._wakeup.wait()
