"""How the target stops: on SIGHUP as cleanly as on SIGTERM (or it reloads and keeps
serving), and a stopped UDP listener tells its neighbours at once with a CLOSE, so they do
not wait for a keepalive timeout to see the link down.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.hostile.harness import Pair

pytestmark = pytest.mark.timeout(60)

TOLD_SECS = 2.0  # well under the neighbour's keepalive timeout (dead_after_secs = 5)


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
