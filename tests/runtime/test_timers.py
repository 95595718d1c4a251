"""The node's one timer queue: objects fire when due, only then, and an idle one costs no
wake-up."""

from __future__ import annotations

import math

import anyio
import pytest

from earendil_py.runtime.timers import TimerQueue


class Clock:
    """A sans-IO object with one deadline, as a Link has: `handle_timer` records the call
    and asks for the next one `period` later, or for nothing after `times` calls."""

    def __init__(self, deadline: float | None, period: float = 1.0, times: int = 1) -> None:
        self.deadline = deadline
        self.period = period
        self.times = times
        self.fired: list[float] = []

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        assert self.deadline is not None and now >= self.deadline, "fired early"
        done = len(self.fired) >= self.times
        self.deadline = None if done else self.deadline + self.period


def add(queue: TimerQueue, clock: Clock) -> None:
    queue.add(clock.get_timer, clock.handle_timer)


def test_timers_fire_in_deadline_order_and_only_when_due() -> None:
    queue = TimerQueue()
    clocks = {name: Clock(deadline) for name, deadline in (("b", 2.0), ("a", 1.0), ("c", 3.0))}
    for clock in clocks.values():
        add(queue, clock)

    def fired() -> list[str]:
        return sorted((clock.fired[0], name) for name, clock in clocks.items() if clock.fired)

    assert queue.fire_due(0.5) == 1.0
    assert fired() == []
    assert queue.fire_due(2.0) == 3.0
    assert fired() == [(2.0, "a"), (2.0, "b")]
    assert queue.fire_due(10.0) == math.inf
    assert [name for _, name in fired()] == ["a", "b", "c"]
    assert len(queue) == 0


def test_a_deadline_that_moved_later_is_deferred_without_firing() -> None:
    queue = TimerQueue()
    clock = Clock(1.0)
    add(queue, clock)
    clock.deadline = 5.0  # e.g. a link heard from its peer: its timeout moved on
    assert queue.fire_due(1.0) == 5.0
    assert clock.fired == []
    assert queue.statistics()["deferred"] == 1
    queue.fire_due(5.0)
    assert clock.fired == [5.0]


def test_a_deadline_that_moved_earlier_is_taken_at_update() -> None:
    queue = TimerQueue()
    clock = Clock(10.0)
    timer = queue.add(clock.get_timer, clock.handle_timer)
    clock.deadline = 2.0
    assert queue.fire_due(2.0) == 10.0  # not told yet: the old deadline stands
    assert clock.fired == []
    timer.update()
    queue.fire_due(2.0)
    assert clock.fired == [2.0]
    assert len(queue) == 0
    assert queue.fire_due(10.0) == math.inf  # the entry left behind is stale
    assert clock.fired == [2.0]


def test_a_cancelled_timer_never_fires_and_lets_its_object_go() -> None:
    queue = TimerQueue()
    clock = Clock(1.0)
    timer = queue.add(clock.get_timer, clock.handle_timer)
    timer.cancel()
    timer.update()  # no effect once cancelled
    queue.fire_due(2.0)
    assert clock.fired == []
    assert len(queue) == 0


def test_stale_entries_do_not_pile_up() -> None:
    queue = TimerQueue()
    clock = Clock(1e6)
    timer = queue.add(clock.get_timer, clock.handle_timer)
    for step in range(10_000):  # each move earlier leaves the previous entry stale
        clock.deadline = 1e6 - step
        timer.update()
    assert queue.statistics()["heap"] < 200


def test_an_object_asking_again_for_a_past_time_waits_for_the_next_round() -> None:
    queue = TimerQueue()
    clock = Clock(1.0, period=0.0, times=1000)  # a bug: always due
    add(queue, clock)
    queue.fire_due(1.0)
    assert clock.fired == [1.0]  # once per round: the loop runs other tasks in between


@pytest.mark.anyio
async def test_the_task_sleeps_until_due_and_wakes_early_for_an_earlier_deadline() -> None:
    queue = TimerQueue()
    far = Clock(anyio.current_time() + 3600)
    add(queue, far)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.run)
            await anyio.sleep(0)
            wakeups = queue.statistics()["wakeups"]
            # Nothing is due for an hour: the task sleeps, whatever else runs meanwhile.
            for _ in range(50):
                await anyio.sleep(0)
            assert queue.statistics()["wakeups"] == wakeups
            soon = Clock(anyio.current_time())
            fired = anyio.Event()
            queue.add(soon.get_timer, lambda now: (soon.handle_timer(now), fired.set()))
            await fired.wait()
            assert soon.fired and far.fired == []
            tg.cancel_scope.cancel()
