"""How the target takes signals: SIGHUP never kills it (it stops as cleanly as on SIGTERM,
or reloads its config and keeps serving, and a config that fails its checks on reload
leaves it running as it was), and a stopped UDP listener tells its neighbours at once with
a CLOSE, so they do not wait for a keepalive timeout to see the link down.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.harness import Pair, route_toml

pytestmark = pytest.mark.timeout(60)

TOLD_SECS = 2.0  # well under the neighbour's keepalive timeout (dead_after_secs = 5)
RELOAD_SECS = 10.0


def assert_neighbour_told(pair: Pair, mark: int) -> None:
    down = pair.honest_daemon.wait_for(
        "link_down", TOLD_SECS, after=mark, link=pair.target.fingerprint[:8]
    )
    assert down["by_peer"] is True, down  # a CLOSE frame, not a timeout


def test_sighup_stops_cleanly_or_reloads(pair: Pair) -> None:
    t = pair.target_daemon
    mark, honest_mark = t.mark(), pair.honest_daemon.mark()
    t.process.send_signal(signal.SIGHUP)
    try:
        code = t.process.wait(3)
    except subprocess.TimeoutExpired:
        code = None
    if code is None:  # it reloaded: it must serve as before
        pair.check_unharmed()
        pair.assert_no_errors(mark)
        return
    assert code == 0, t.events[mark:]
    assert t.errors(mark) == [], t.events[mark:]
    assert any(e.get("event") == "shutdown" for e in t.events[mark:]), t.events[mark:]
    assert_neighbour_told(pair, honest_mark)


def test_stopped_udp_listener_tells_its_neighbour(pair: Pair) -> None:
    mark = pair.honest_daemon.mark()
    assert pair.target_daemon.stop(signal.SIGTERM) == 0
    assert_neighbour_told(pair, mark)


def append_route_on_a_taken_port(config: Path, port: int) -> None:
    config.write_text(config.read_text() + "\n" + route_toml("late", "udp", port, "s" * 32))


BAD_RELOADS: dict[str, Callable[[Path, int], object]] = {
    "infinite timer": lambda config, _: config.write_text(
        config.read_text().replace("dead_after_secs = 5.0", "dead_after_secs = inf")
    ),
    "readable by others": lambda config, _: config.chmod(0o644),
    "not TOML": lambda config, _: config.write_bytes(b"\xff\xfe not toml ["),
    "gone": lambda config, _: config.unlink(),
    "new route on a taken port": append_route_on_a_taken_port,
}


@pytest.mark.parametrize("case", list(BAD_RELOADS))
def test_bad_config_on_reload_keeps_the_running_one(pair: Pair, case: str) -> None:
    """SIGHUP with a config that fails its checks: one line saying why, and the node goes on
    with the config it had; with the config put back, the next SIGHUP reloads it."""
    config = pair.target.config_path
    good, t = config.read_bytes(), pair.target_daemon
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        try:
            mark = t.mark()
            BAD_RELOADS[case](config, squatter.getsockname()[1])
            t.process.send_signal(signal.SIGHUP)
            failed = t.wait_for("reload_failed", RELOAD_SECS, after=mark)
            assert "\n" not in failed["error"] and "Traceback" not in failed["error"]
            pair.check_unharmed()
        finally:
            config.write_bytes(good)
            config.chmod(0o600)
    mark = t.mark()
    t.process.send_signal(signal.SIGHUP)
    t.wait_for("reloaded", RELOAD_SECS, after=mark)
    pair.check_unharmed()
    assert [e for e in t.errors(mark)] == []
