"""The README's main command: the demo network runs, delivers everything and cleans up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
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
