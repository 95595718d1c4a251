"""Strangers against a running daemon: what anyone who finds the port can send, without the
route cookie. And a cookie holder's HS_INIT that passes the MAC but not Noise.

Each test ends by proving the node unharmed (`Pair.check_unharmed`) and, for the TCP
listener, by a genuine neighbour completing a handshake on it: the listener still serves.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from earendil_py.core.link import MAX_MESSAGE_SIZE
from earendil_py.runtime.config import parse_address
from tests.hostile.harness import Pair
from tests.hostile.peer import (
    garbage_datagrams,
    length_prefix,
    poisoned_hs_init,
    send_datagrams,
    tcp_connect_close,
    tcp_idle,
    tcp_reset,
    tcp_send,
)

pytestmark = pytest.mark.timeout(60)

PROBES = 20
POISONED_FLOOD = 1100  # more than the UDP listener's 1,024 sessions
CLOSED_BY_DAEMON_SECS = 30.0  # far above any handshake deadline the daemon may set


def genuine_tcp_handshake(pair: Pair) -> None:
    """A neighbour with the cookie still gets a link on the TCP listener."""
    with pair.peer("tcp") as peer:
        peer.connect()


def test_connect_and_close(pair: Pair) -> None:
    with pair.attacking() as mark:
        for _ in range(PROBES):
            tcp_connect_close(pair.routes["tcp"].address)
    genuine_tcp_handshake(pair)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_connect_and_reset(pair: Pair) -> None:
    with pair.attacking() as mark:
        for _ in range(PROBES):
            tcp_reset(pair.routes["tcp"].address)
    genuine_tcp_handshake(pair)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("size", [0, 0xFFFF, MAX_MESSAGE_SIZE + 1])
def test_bad_length_prefix_gets_no_answer(pair: Pair, size: int) -> None:
    with pair.attacking() as mark:
        for tail in (b"", b"\x01" * 64):
            assert tcp_send(pair.routes["tcp"].address, length_prefix(size) + tail) == b""
    genuine_tcp_handshake(pair)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_frame_without_cookie_gets_no_answer(pair: Pair) -> None:
    hello = bytes([1]) + bytes(100)  # an HS_INIT-shaped frame with a wrong MAC
    with pair.attacking() as mark:
        assert tcp_send(pair.routes["tcp"].address, length_prefix(len(hello)) + hello) == b""
    genuine_tcp_handshake(pair)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_idle_and_slow_connections_are_dropped_and_cost_nothing(pair: Pair) -> None:
    address = pair.routes["tcp"].address
    with pair.attacking() as mark:
        idle = tcp_idle(address, 50)
        slow = tcp_idle(address, 50, first_byte=True)  # one byte of a frame header, then nothing
    try:
        pair.check_unharmed()  # while they are held
        # Each gets a handshake deadline: the daemon ends the connection, unanswered.
        deadline = time.monotonic() + CLOSED_BY_DAEMON_SECS
        for sock in slow[:5] + idle[:5]:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # closed, or reset: either
                assert sock.recv(1) == b""
    finally:
        for sock in idle + slow:
            sock.close()
    genuine_tcp_handshake(pair)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_garbage_datagrams(pair: Pair) -> None:
    honest_port = parse_address(pair.target.config.in_routes["from_node1_udp"].listen)
    with pair.attacking() as mark:
        for address in (honest_port, pair.routes["udp"].address):
            sent = send_datagrams(address, garbage_datagrams(10_000, seed=12))
            assert sent > 9_000
    pair.check_unharmed()
    with pair.peer("udp") as peer:  # the UDP listener still takes new neighbours
        peer.connect()
    pair.assert_no_errors(mark)


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
@pytest.mark.parametrize("kind", ["bad_tag", "short", "low_order"])
def test_poisoned_hs_init_then_the_genuine_one(pair: Pair, protocol: str, kind: str) -> None:
    """An HS_INIT with a valid cookie MAC and a bad Noise body, then a genuine HS_INIT on the
    same socket: the genuine one still gets its link."""
    with pair.attacking() as mark, pair.peer(protocol) as peer:
        peer.connect(poison=kind, timeout=5.0)
        assert peer.up
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_a_flood_of_poisoned_hs_inits_is_bounded_by_the_handshake_deadline(pair: Pair) -> None:
    """More HS_INITs with a valid cookie MAC and a bad Noise body than the UDP listener keeps
    sessions for, from one source. A session whose HS_INIT does not read ends at once, so
    they hold nothing: the target serves its neighbour meanwhile, and a genuine neighbour
    from the same source gets its link without waiting for a handshake deadline."""
    route = pair.routes["udp"]
    with pair.attacking() as mark:
        poison = [poisoned_hs_init(route.secret) for _ in range(POISONED_FLOOD)]
        assert send_datagrams(route.address, poison) == POISONED_FLOOD
        pair.check_unharmed()
        with pair.peer("udp") as peer:
            peer.connect(timeout=5.0)
    pair.check_unharmed()
    pair.assert_no_errors(mark)


def test_stranger_udp_socket_learns_nothing(pair: Pair) -> None:
    """Garbage to the UDP listener is never answered: a prober cannot tell it is there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(pair.routes["udp"].address)
        for data in garbage_datagrams(200, seed=3):
            sock.send(data)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(65_536)
