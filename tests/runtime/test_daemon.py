"""Real `earendil-py daemon` processes on loopback: shutdown, crash and re-dial, strangers."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.config import parse_address
from earendil_py.runtime.node import MAX_PENDING_TCP_PER_SOURCE
from tests.helpers import (
    TCP_STRANGERS,
    DaemonProcess,
    closed_by_peer,
    daemon_api,
    move_route_to_ipv6,
    silent_tcp_connections,
    tcp_stranger,
)

TIMING = """
[links]
keepalive_secs = 0.3
dead_after_secs = 1.5
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.4

[logging]
format = "json"
"""


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_sigkilled_neighbour_goes_down_then_comes_back(tmp_path: Path, protocol: str) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, protocol)], extra_toml=TIMING)
    dialer, listener = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        dialer.wait_for("link_up", 5, link=b.fingerprint[:8])
        listener.wait_for("link_up", 5, link=a.fingerprint[:8])
        mark = dialer.mark()
        listener.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        dialer.wait_for("link_down", 5, after=mark, link=b.fingerprint[:8])
        # Detected within the keepalive timeout (TCP sees the reset at once).
        assert time.monotonic() - killed_at < 1.5 + 1.0
        listener = DaemonProcess(b.config_path)
        dialer.wait_for("link_up", 5, after=mark, link=b.fingerprint[:8])
    finally:
        for daemon in (dialer, listener):
            daemon.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("stopped", ["dialer", "listener"])
def test_signal_shuts_down_cleanly_and_tells_the_neighbour(
    tmp_path: Path, sig: int, stopped: str
) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=TIMING)
    dialer, listener = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    daemon, neighbour = (dialer, listener) if stopped == "dialer" else (listener, dialer)
    try:
        dialer.wait_for("link_up", 5)
        listener.wait_for("link_up", 5)
        mark = neighbour.mark()
        started = time.monotonic()
        assert daemon.stop(sig) == 0, daemon.events
        assert time.monotonic() - started < 2.0
        assert not [e for e in daemon.events if e.get("level") == "error"]
        daemon.wait_for("shutdown", 0, signal=signal.Signals(sig).name)
        down = neighbour.wait_for("link_down", 1.0, after=mark)
        assert down["by_peer"] is True  # told by a CLOSE frame, not a timeout
    finally:
        for each in (dialer, listener):
            each.stop()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    a, _ = generate_network(tmp_path, 2, [Edge(1, 0, "udp")], extra_toml=TIMING)
    host, port = a.config.in_routes["from_node1_udp"].listen.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((host, int(port)))
        result = subprocess.run(
            [sys.executable, "-m", "earendil_py", "daemon", "--config", str(a.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr == (
        f"earendil-py: error: {a.config_path}: in_routes.from_node1_udp.listen: "
        f"cannot listen on {host}:{port}: Address already in use\n"
    )


def test_strangers_and_a_slow_loris_cannot_stop_the_daemon(tmp_path: Path) -> None:
    generated = generate_network(
        tmp_path, 3, [Edge(0, 1, "tcp"), Edge(2, 1, "tcp")], extra_toml=TIMING
    )
    move_route_to_ipv6(generated, 1, "from_node0_tcp")  # the honest neighbour comes from ::1
    a, b = generated[:2]
    knocked = parse_address(b.config.in_routes["from_node2_tcp"].listen)
    listener = DaemonProcess(b.config_path)
    held: list[socket.socket] = []
    try:
        listener.wait_for("node_started", 5)
        for attack in TCP_STRANGERS:
            for _ in range(3):
                assert tcp_stranger(knocked, attack) == b""
        held = silent_tcp_connections(knocked, MAX_PENDING_TCP_PER_SOURCE + 4)
        dialer = DaemonProcess(a.config_path)
        try:
            dialer.wait_for("link_up", 5)
            listener.wait_for("link_up", 5)
            assert all(closed_by_peer(sock) for sock in held)  # at the handshake deadline
            drops = daemon_api(b.config_path, "GET", "/api/status")["drops"]
        finally:
            dialer.stop()
        assert drops["tcp_pending_full"] == 4
        assert drops["bad_frame"] == 6
        assert drops["tcp_probe"] == 9 + MAX_PENDING_TCP_PER_SOURCE
        assert listener.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        assert listener.stop() == 0
    assert not [e for e in listener.events if e.get("level") == "error"]


def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "tcp")], extra_toml=TIMING)
    address = parse_address(b.config.in_routes["from_node0_tcp"].listen)
    listener = DaemonProcess(b.config_path)
    held: list[socket.socket] = []
    try:
        listener.wait_for("node_started", 5)
        pid = listener.process.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, in_use + 3))
        # The daemon takes 3; the kernel queues the rest, which accept() cannot take.
        held = silent_tcp_connections(address, 10)
        listener.wait_for("accept_failed", 5, error="EMFILE")
        for sock in held:
            sock.close()
        # Once it closed the 3 at their handshake deadline, it takes the others from the
        # queue (closed by now), then the honest neighbour, under the same limit.
        dialer = DaemonProcess(a.config_path)
        try:
            listener.wait_for("link_up", 10)
            dialer.wait_for("link_up", 5)
        finally:
            dialer.stop()
        assert listener.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        assert listener.stop() == 0
    assert len([e for e in listener.events if e["event"] == "accept_failed"]) == 1


def test_soft_open_files_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=TIMING)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard limit above 256 (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon
    try:
        daemon = DaemonProcess(node.config_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        daemon.wait_for("node_started", 5)
        logged = daemon.wait_for("open_files_limit", 0)
        assert (logged["raised_from"], logged["soft"], logged["hard"]) == (256, hard, hard)
        assert resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        assert daemon.stop() == 0


# The daemon's ledger fails under it (as a full or failing disk would make it): the node
# stops with one log line and exit status 1.
FAILING_LEDGER = """
import sqlite3, sys
from earendil_py.cli import main
from earendil_py.runtime.accounting import Accounting

async def run(self):
    raise sqlite3.OperationalError("disk I/O error")

Accounting.run = run
sys.exit(main(["daemon", "--config", sys.argv[1]]))
"""


def test_the_nodes_own_failure_is_one_log_line_and_exit_status_1(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=TIMING)
    result = subprocess.run(
        [sys.executable, "-c", FAILING_LEDGER, str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # nothing but log lines
    errors = [line for line in lines if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["node_failed"]
    assert errors[0]["error"] == "OperationalError: disk I/O error"
    assert errors[0]["ledger"] == str(node.config.db_path)
    assert "exception" not in errors[0]  # no traceback: not a bug
