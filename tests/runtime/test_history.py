"""The dashboard's history ring: the last hour of each neighbour, bounded in memory."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.netgen import Edge
from earendil_py.runtime import history as history_module
from earendil_py.runtime.history import FIELDS, History
from earendil_py.runtime.http import ControlApiError, call_api
from tests.helpers import converged, make_nodes, running
from tests.runtime.test_settlement import owe

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


@dataclass(eq=False)
class FakeLink:
    packets_sent: int = 0
    packets_received: int = 0


def test_an_hour_at_ten_seconds_is_360_samples() -> None:
    assert History().size == 360
    assert History(interval_secs=0.5, window_secs=60).size == 120
    with pytest.raises(ValueError):
        History(interval_secs=0)


def test_packets_are_counted_per_interval_across_a_new_link() -> None:
    history = History(interval_secs=10, window_secs=100)
    first = FakeLink(packets_sent=5, packets_received=2)
    history.sample(1000.0, [(A, 7, 1)], {A: [first]})
    first.packets_sent, first.packets_received = 12, 2
    history.sample(1010.0, [(A, 9, 3)], {A: [first]})
    # The link went down and a new one came up, which has carried 4 packets in so far.
    history.sample(1020.0, [(A, 9, 3)], {A: [FakeLink(packets_received=4)]})
    history.sample(1030.5, [(A, 9, 3)], {})
    assert history.series(A) == {
        "at": [1000.0, 1010.0, 1020.0, 1030.5],
        "debt_in_umel": [7, 9, 9, 9],
        "debt_out_umel": [1, 3, 3, 3],
        "packets_in": [2, 0, 4, 0],
        "packets_out": [5, 7, 0, 0],
    }


@given(
    size=st.integers(1, 8),
    debts=st.lists(st.integers(-(2**70), 2**70), min_size=0, max_size=30),
)
def test_the_ring_keeps_the_newest_samples_in_order(size: int, debts: list[int]) -> None:
    history = History(interval_secs=1, window_secs=size)
    for i, debt in enumerate(debts):
        history.sample(float(i), [(A, debt, -debt)], {})
    kept = debts[-size:]
    clamped = [min(max(d, -(2**63)), 2**63 - 1) for d in kept]
    series = history.series(A)
    assert series["at"] == [float(i) for i in range(len(debts))][-size:]
    assert series["debt_in_umel"] == clamped
    assert set(series) == set(FIELDS)
    assert all(len(column) == len(kept) for column in series.values())


@given(
    size=st.integers(1, 6),
    samples=st.lists(
        st.dictionaries(st.sampled_from([A, B, C]), st.tuples(*[st.integers(0, 2)] * 4)),
        max_size=20,
    ),
)
def test_each_neighbour_gets_back_its_newest_samples_steady_or_not(
    size: int, samples: list[dict[bytes, tuple[int, int, int, int]]]
) -> None:
    # Few distinct values: neighbours stay steady for a while, change, come and go.
    history = History(interval_secs=1, window_secs=size)
    given: dict[bytes, list[tuple[float, int, int, int, int]]] = {}
    for at, sample in enumerate(samples):
        links = {fp: [FakeLink(sent, received)] for fp, (_, _, received, sent) in sample.items()}
        history.sample(float(at), [(fp, v[0], v[1]) for fp, v in sample.items()], links)
        given = {fp: [*given.get(fp, []), (float(at), *v)] for fp, v in sample.items()}
    for fp in (A, B, C):
        kept = given.get(fp, [])[-size:]
        series = history.series(fp)
        assert list(zip(*(series[name] for name in FIELDS), strict=True)) == kept


def test_an_idle_neighbour_holds_no_ring_however_long_it_stays() -> None:
    history = History(interval_secs=1, window_secs=360)
    neighbors = [i.to_bytes(32, "big") for i in range(200)]
    links = {fp: [FakeLink()] for fp in neighbors}
    for at in range(10):  # and the interpreter's free lists hold what a sample needs
        history.sample(float(at), [(fp, 5, 0) for fp in neighbors], links)
    # Only what the history's own code allocates: other threads of the test process (a
    # worker left by an earlier test) allocate meanwhile too.
    only = [tracemalloc.Filter(True, history_module.__file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only)
        for at in range(10, 360):
            history.sample(float(at), [(fp, 5, 0) for fp in neighbors], links)
        after = tracemalloc.take_snapshot().filter_traces(only)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # The shared ring of times grew: under 100 bytes a neighbour, where a ring each would
    # have taken 11.5 KB apiece.
    assert 0 < grown < 100 * len(neighbors)
    assert history.series(neighbors[0])["debt_in_umel"] == [5] * 360


def test_neighbours_are_bounded_and_forgotten_without_an_account() -> None:
    history = History(interval_secs=1, window_secs=10, max_neighbors=2)
    history.sample(1.0, [(A, 1, 0), (B, 2, 0), (C, 3, 0)], {})
    assert history.neighbors() == [A, B]
    assert history.series(C)["at"] == []
    history.sample(2.0, [(B, 2, 0), (C, 3, 0)], {})  # A's account is gone: C takes its place
    assert history.neighbors() == [B, C]
    assert history.series(A)["at"] == []
    assert history.series(C)["at"] == [2.0]


@pytest.mark.anyio
async def test_a_running_node_serves_each_neighbours_history(tmp_path: Path) -> None:
    a, b = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    for node in (a, b):
        node.history = History(interval_secs=0.05, window_secs=60)
    async with running([a, b]):
        with anyio.fail_after(10):
            await converged([a, b], [Edge(0, 1, "udp")])
            await owe(a, b, 50)
            sent = sum(r.packets_sent for r in a.links[b.fingerprint])
            while True:  # until a sample after the last packet
                answer = await anyio.to_thread.run_sync(
                    call_api, a.config, "GET", f"/api/history/{b.fingerprint.hex()}"
                )
                samples = answer["samples"]
                if samples["debt_out_umel"] and samples["debt_out_umel"][-1] == 50:
                    break
                await anyio.sleep(0.05)
        assert (answer["neighbor"], answer["interval_secs"]) == (b.fingerprint.hex(), 0.05)
        assert set(samples) == set(FIELDS)
        assert len({len(column) for column in samples.values()}) == 1
        assert samples["at"] == sorted(samples["at"])
        # Every packet over the link is in exactly one sample (the link stayed up).
        assert sum(samples["packets_out"]) == sent >= 50
        with pytest.raises(ControlApiError) as caught:
            await anyio.to_thread.run_sync(call_api, a.config, "GET", f"/api/history/{'ab' * 32}")
        assert caught.value.status == 404
