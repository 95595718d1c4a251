"""The README's main command: the demo network runs, delivers everything and cleans up.

The demo waits on conditions, not for fixed times (traffic goes on until an automatic
settlement completed, deliveries are counted once all arrived), so a loaded machine makes it
slower, not fail; run it beside busy loops to see (`python -c "while True: pass" &`, twice).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO_TIMEOUT_SECS = 60  # the demo's own bound on each of its waits


@pytest.mark.timeout(4 * DEMO_TIMEOUT_SECS)
def test_demo_delivers_everything_settles_and_stops_its_daemons(tmp_path: Path) -> None:
    network = tmp_path / "net"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "earendil_py.demo",
            "--dir",
            str(network),
            "--seconds",
            "5",
            "--rate",
            "100",
            "--timeout",
            str(DEMO_TIMEOUT_SECS),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=3 * DEMO_TIMEOUT_SECS + 30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAILED" not in out
    assert "Relay graphs converged" in out
    assert "Chat: every node greeted its neighbours, 10 of 10 messages delivered." in out
    assert "(100%)" in out
    assert "packets dropped at a debt limit: 0." in out
    assert "Automatic settlements completed: 0 " not in out
    assert out.rstrip().endswith("All nodes stopped.")
    # Every daemon was stopped by its signal, not left running or killed.
    logs = sorted(network.glob("node*/daemon.log"))
    assert len(logs) == 5
    for log in logs:
        assert '"signal": "SIGTERM", "event": "shutdown"' in log.read_text()


def test_a_failed_expectation_is_named_with_what_each_node_saw(tmp_path: Path) -> None:
    network = tmp_path / "net"
    result = subprocess.run(
        [sys.executable, "-m", "earendil_py.demo", "--dir", str(network), "--timeout", "0.01"],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECS,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (failure,) = [line for line in result.stdout.splitlines() if line.startswith("FAILED: ")]
    assert failure.startswith("FAILED: the relay graphs did not converge within 0.01s: node0")
    for name in ("node0", "node1", "node2", "node3", "node4"):
        assert f"; {name}" in failure or f": {name}" in failure
    assert failure.endswith(f"; see {network}/node*/daemon.log")
    assert result.stdout.rstrip().endswith("All nodes stopped.")
