"""Ten daemons through bench/network.py's code: routing, delivery and balances."""

from __future__ import annotations

import time
from pathlib import Path

from earendil_py.netgen import (
    RANDOM_PUSH_SECS,
    Daemons,
    Traffic,
    balance_mismatches,
    disputes,
    random_network,
    wait_answering,
    wait_routed,
)


def test_ten_daemons_route_deliver_everything_and_agree_on_every_balance(
    tmp_path: Path,
) -> None:
    nodes, edges = random_network(tmp_path, 10, seed=7)
    assert {e.protocol for e in edges} == {"udp", "tcp"}
    runner = Daemons(nodes)
    with runner as daemons:
        wait_answering(daemons, timeout=60)
        wait_routed(daemons, len(nodes), len(edges), timeout=60)
        traffic = Traffic(daemons, rate=5.0, hops=3, dock=7, seed=7)
        traffic.run(3.0)
        deadline = time.monotonic() + 20
        while len(traffic.delivered) < traffic.offered and time.monotonic() < deadline:
            traffic.collect()
            time.sleep(0.2)
        assert traffic.refused == 0
        assert len(traffic.delivered) == traffic.offered == 150
        time.sleep(RANDOM_PUSH_SECS + 2)  # every side pushed its claims since the traffic
        pairs, mismatches = balance_mismatches(daemons)
        assert pairs == len(edges) and mismatches == []
    assert runner.stop() == [0] * 10  # every one stopped by its signal, none killed
    assert disputes(nodes) == 0
