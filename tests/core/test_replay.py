"""The replay filter: replays within the window are caught, memory never exceeds its bound."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.replay import ReplayFilter

TICK = 0.001


def _tag(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_fresh_then_replay() -> None:
    replays = ReplayFilter(window=10.0, max_entries=100)
    assert replays.check_and_insert(_tag(1), now=0.0)
    assert not replays.check_and_insert(_tag(1), now=0.0)
    assert replays.check_and_insert(_tag(2), now=0.0)
    stats = replays.statistics()
    assert (stats.entries, stats.inserted, stats.replays) == (2, 2, 1)


@pytest.mark.parametrize("buckets", [2, 3, 4, 8])
def test_replay_within_window_is_caught_and_forgotten_after(buckets: int) -> None:
    window = 10.0
    replays = ReplayFilter(window=window, max_entries=1000, buckets=buckets)
    # Keep the filter busy so it rotates on time all along.
    now, n = 0.0, 0
    while now < 3.3:
        n += 1
        now += TICK * 37
        replays.check_and_insert(_tag(n), now)
    inserted_at = now
    assert replays.check_and_insert(_tag(10**9), inserted_at)
    while now + TICK * 37 < inserted_at + window:
        now += TICK * 37
        assert not replays.check_and_insert(_tag(10**9), now)
    assert not replays.check_and_insert(_tag(10**9), inserted_at + window - 1e-9)
    assert replays.statistics().early_rotations == 0
    forgotten_by = inserted_at + window * buckets / (buckets - 1)
    assert replays.check_and_insert(_tag(10**9), forgotten_by)


def test_a_long_silence_forgets_everything() -> None:
    replays = ReplayFilter(window=1.0, max_entries=100)
    for n in range(50):
        replays.check_and_insert(_tag(n), now=0.5)
    assert replays.check_and_insert(_tag(0), now=1000.0)
    assert replays.statistics().entries == 1


def test_memory_stays_bounded_over_a_long_flood() -> None:
    """1,000,000 distinct tags arriving far faster than the filter can hold for a window."""
    max_entries = 40_000
    replays = ReplayFilter(window=30.0, max_entries=max_entries, buckets=4)
    guaranteed = 3 * (max_entries // 4)  # (k - 1) full buckets always survive a rotation
    recent: deque[bytes] = deque(maxlen=guaranteed)
    now = 0.0
    check = replays.check_and_insert
    for n in range(1_000_000):
        now += 1e-5
        tag = _tag(n)
        assert check(tag, now)
        recent.append(tag)
        if n % 10_000 == 9_999:
            assert replays.statistics().entries <= max_entries
            # The oldest tag the flood guarantee covers, and the newest, are still caught.
            assert not check(recent[0], now)
            assert not check(recent[-1], now)
    stats = replays.statistics()
    assert stats.entries <= max_entries
    assert stats.inserted == 1_000_000
    assert stats.early_rotations > 0  # the flood did shorten the window, visibly


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.integers(min_value=0, max_value=30)),
        max_size=200,
    ),
    buckets=st.integers(min_value=2, max_value=6),
)
def test_matches_the_window_bounds_when_not_flooded(
    steps: list[tuple[float, int]], buckets: int
) -> None:
    window = 5.0
    longest = window * buckets / (buckets - 1)
    replays = ReplayFilter(window=window, max_entries=1000 * buckets, buckets=buckets)
    first_seen: dict[int, float] = {}
    now = 0.0
    for delay, n in steps:
        now += delay
        fresh = replays.check_and_insert(_tag(n), now)
        seen = first_seen.get(n)
        if seen is not None and now - seen < window:
            assert not fresh, "a replay inside the window must be caught"
        if seen is None or now - seen >= longest:
            assert fresh, "a tag never seen, or older than the longest lifetime, is fresh"
        if fresh:
            first_seen[n] = now
    assert replays.statistics().early_rotations == 0


@pytest.mark.parametrize(
    ("window", "max_entries", "buckets"),
    [(0.0, 100, 4), (-1.0, 100, 4), (1.0, 3, 4), (1.0, 100, 1)],
)
def test_unusable_parameters_are_refused(window: float, max_entries: int, buckets: int) -> None:
    with pytest.raises(LocalProtocolError):
        ReplayFilter(window=window, max_entries=max_entries, buckets=buckets)
