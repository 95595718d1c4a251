"""Real `earendil-py daemon` processes on loopback: shutdown, crash and re-dial."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earendil_py.netgen import Edge, generate_network
from tests.helpers import DaemonProcess

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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_shuts_down_cleanly_and_tells_the_neighbour(tmp_path: Path, sig: int) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=TIMING)
    dialer, listener = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        listener.wait_for("link_up", 5)
        mark = listener.mark()
        started = time.monotonic()
        assert dialer.stop(sig) == 0, dialer.events
        assert time.monotonic() - started < 2.0
        assert not [e for e in dialer.events if e.get("level") == "error"]
        down = listener.wait_for("link_down", 1.0, after=mark)
        assert down["by_peer"] is True  # told by a CLOSE frame, not a timeout
    finally:
        for daemon in (dialer, listener):
            daemon.stop()


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
