"""netgen: ports that cannot collide, and daemons that are always stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from earendil_py.netgen import (
    PORT_LOW,
    Daemons,
    Edge,
    ephemeral_port_low,
    generate_network,
    reserve_ports,
)
from earendil_py.runtime.config import parse_address
from earendil_py.runtime.http import ControlApiError


def test_reserved_ports_are_distinct_below_the_ephemeral_range_and_not_handed_out_twice() -> None:
    first = reserve_ports(200)
    second = reserve_ports(200)
    assert len(set(first)) == 200 and len(set(second)) == 200
    assert not set(first) & set(second)  # reserved across calls (and processes)
    assert all(PORT_LOW <= port < ephemeral_port_low() for port in first + second)


def test_every_route_and_control_address_of_a_network_has_a_port_of_its_own(
    tmp_path: Path,
) -> None:
    edges = [Edge(i, (i + 1) % 6, "udp" if i % 2 else "tcp") for i in range(6)]
    edges += [Edge(i, (i + 3) % 6, "udp") for i in range(3)]
    nodes = generate_network(tmp_path, 6, edges)
    ports = [node.config.control_listen[1] for node in nodes]
    for node in nodes:
        ports += [parse_address(route.listen)[1] for route in node.config.in_routes.values()]
    assert len(ports) == len(set(ports)) == 6 + len(edges)


def test_daemons_are_stopped_when_the_block_that_runs_them_fails(tmp_path: Path) -> None:
    nodes = generate_network(tmp_path, 2, [Edge(0, 1, "udp")])
    runner = Daemons(nodes)
    with pytest.raises(RuntimeError), runner as daemons:
        deadline = time.monotonic() + 30
        for daemon in daemons:
            while True:
                try:
                    daemon.call("GET", "/api/status")
                    break
                except ControlApiError:
                    assert time.monotonic() < deadline, "the daemon did not start"
                    time.sleep(0.1)
        raise RuntimeError("the benchmark failed")
    assert [daemon.process.poll() for daemon in runner.running] == [0, 0]  # by SIGTERM
