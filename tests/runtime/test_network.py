"""Ten nodes through bench/network.py's code: routing, delivery and balances."""

from __future__ import annotations

import time
from pathlib import Path

from earendil_py.netgen import (
    RANDOM_PUSH_SECS,
    Daemons,
    TrafficPlan,
    TrafficReport,
    balance_mismatches,
    disputes,
    random_network,
    wait_answering,
    wait_routed,
)


def test_ten_nodes_route_deliver_everything_and_agree_on_every_balance(tmp_path: Path) -> None:
    nodes, edges = random_network(tmp_path, 10, seed=7)
    assert {e.protocol for e in edges} == {"udp", "tcp"}
    plan = TrafficPlan(rate=5.0, seconds=3.0, seed=7)
    runner = Daemons(nodes, traffic=plan)
    with runner as daemons:
        wait_answering(daemons, timeout=60)
        wait_routed(daemons, len(nodes), len(edges), timeout=60)
        runner.start_traffic()
        time.sleep(plan.seconds + RANDOM_PUSH_SECS + 2)  # sent, and claims pushed since
        pairs, mismatches = balance_mismatches(daemons)
        assert pairs == len(edges) and mismatches == []
    assert runner.stop() == [0] * 10  # every one stopped by its signal, none killed
    traffic = TrafficReport.read(nodes)
    assert traffic.offered == 10 * plan.count == 150
    assert traffic.refused == 0 and traffic.delivered == traffic.offered
    assert disputes(nodes) == 0
