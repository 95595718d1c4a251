"""More idle TCP connections than the daemon may open files, as a port scanner leaves them.

The target starts under the usual `ulimit -n 1024` (a soft limit set in the child before it
starts; the hard limit stays what it is). 1,100 connections that never send a byte must
not stop it: its control API answers and its honest neighbour is served while they are
held, and a genuine neighbour gets a TCP link once they are gone.
"""

from __future__ import annotations

import os
import resource
import time

import pytest

from tests.hostile.harness import Pair
from tests.hostile.peer import tcp_idle

pytestmark = pytest.mark.timeout(90)

SOFT_LIMIT = 1024
IDLE_CONNECTIONS = 1100
PAIR = {"nofile": SOFT_LIMIT}


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled(pid: int, timeout: float = 10.0) -> None:
    """Until the daemon has taken what the kernel queued for it: its count of open files
    stands still for half a second (or it exited)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        try:
            count = open_files(pid)
        except FileNotFoundError:
            return
        if count == last:
            return
        last = count
        time.sleep(0.5)


def test_more_idle_connections_than_open_files(pair: Pair) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE_CONNECTIONS + 100:
        pytest.skip(f"this test process may hold only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    try:
        with pair.attacking():
            held = tcp_idle(pair.routes["tcp"].address, IDLE_CONNECTIONS)
            settled(pair.target_daemon.process.pid)
            pair.check_unharmed()
        for sock in held:
            sock.close()
        held = []
        with pair.peer("tcp") as peer:
            peer.connect()
        pair.check_unharmed()
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
