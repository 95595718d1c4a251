"""Fault boundaries and bounded pre-handshake state, with in-process nodes on loopback.

Whatever a stranger or a neighbour sends, and whatever bug its input hits, ends at most its
connection or its link: the node keeps running and an honest neighbour keeps its link.
"""

from __future__ import annotations

import errno
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.core.identity import Identity
from earendil_py.core.ledger import LedgerCorrupt
from earendil_py.core.link import HS_INIT, Endpoint, Link, source_key
from earendil_py.core.messages import GLOBAL_RPC_DOCK, DockMessage, GraphPull, encode_control
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime import node as node_module
from earendil_py.runtime.config import load_config
from earendil_py.runtime.faults import Faults
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import LinkRunner, Node, PendingHandshakes
from tests.helpers import (
    TCP_STRANGERS,
    closed_by_peer,
    move_route_to_ipv6,
    running,
    seeded_rng,
    silent_tcp_connections,
    tcp_stranger,
)

FAST = """
[links]
keepalive_secs = 0.2
dead_after_secs = 1.0
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.3
"""


def nodes_with_a_knocked_route(tmp_path: Path, honest: str = "tcp") -> list[Node]:
    """node1 listens for node0 (`honest` protocol, over ::1) and on a TCP route for node2,
    which never dials: strangers knock there, from 127.0.0.1, another source than node0's."""
    generated = generate_network(
        tmp_path, 3, [Edge(0, 1, honest), Edge(2, 1, "tcp")], extra_toml=FAST
    )
    move_route_to_ipv6(generated, 1, f"from_node0_{honest}")
    return [
        Node(load_config(g.config_path), load_identity_file(g.config.identity_file))
        for g in generated[:2]
    ]


def make_nodes(tmp_path: Path, count: int, edges: list[Edge]) -> list[Node]:
    generated = generate_network(tmp_path, count, edges, extra_toml=FAST)
    return [Node(g.config, load_identity_file(g.config.identity_file)) for g in generated]


async def stranger(address: tuple[str, int], attack: str) -> bytes:
    return await anyio.to_thread.run_sync(tcp_stranger, address, attack)


async def until(check: Any) -> None:
    while not check():
        await anyio.sleep(0.02)


# --- strangers before any handshake --------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("attack", list(TCP_STRANGERS))
async def test_tcp_stranger_before_any_handshake_cannot_stop_the_node(
    tmp_path: Path, attack: str
) -> None:
    dialer, listener = nodes_with_a_knocked_route(tmp_path)
    async with running([listener]) as tg:
        knocked = listener.listening["from_node2_tcp"]
        for _ in range(5):
            assert await stranger(knocked, attack) == b""  # not a byte back
        with anyio.fail_after(3):
            await until(lambda: listener.drop_counts()[TCP_STRANGERS[attack]] == 5)
        await tg.start(dialer.run)
        with anyio.fail_after(3):
            await listener.wait_neighbors({dialer.fingerprint})
        assert await stranger(knocked, attack) == b""  # still listening, still silent
    assert len(listener._pending_tcp) == 0


@pytest.mark.anyio
async def test_slow_loris_is_bounded_per_source_and_in_time(tmp_path: Path) -> None:
    dialer, listener = nodes_with_a_knocked_route(tmp_path)
    per_source = node_module.MAX_PENDING_TCP_PER_SOURCE
    async with running([listener]) as tg:
        knocked = listener.listening["from_node2_tcp"]
        held = await anyio.to_thread.run_sync(silent_tcp_connections, knocked, per_source + 4)
        try:
            with anyio.fail_after(3):
                await until(lambda: listener.drop_counts()["tcp_pending_full"] == 4)
            assert len(listener._pending_tcp) == per_source
            # The honest neighbour comes from ::1, a source of its own: it gets in.
            await tg.start(dialer.run)
            with anyio.fail_after(3):
                await listener.wait_neighbors({dialer.fingerprint})
            # Past the handshake deadline (dead_after_secs = 1.0 here) every one is closed.
            with anyio.fail_after(5):
                closed = [await anyio.to_thread.run_sync(closed_by_peer, s) for s in held]
            assert all(closed)
            assert listener.drop_counts()["tcp_probe"] == per_source
            assert len(listener._pending_tcp) == 0
            assert listener.neighbors() == {dialer.fingerprint}
        finally:
            for sock in held:
                sock.close()


def test_pending_handshakes_are_bounded_in_all_and_per_source() -> None:
    pending = PendingHandshakes(limit=4, per_source=2)
    first = pending.admit("127.0.0.1")
    assert first is not None and pending.admit("127.0.0.1") is not None
    assert pending.admit("127.0.0.1") is None  # that source's share is used up
    assert pending.admit("2001:db8::1") is not None
    assert pending.admit("2001:db8::2") is not None  # the same /64
    assert pending.admit("2001:db8::3") is None
    assert pending.admit("2001:db8:0:1::1") is None  # another /64, but the total is reached
    first.release()
    first.release()  # once only
    assert len(pending) == 3
    assert pending.admit("::ffff:127.0.0.1") is not None  # 127.0.0.1 had a place again
    assert pending.admit("10.0.0.1") is None


def test_source_key_groups_an_ipv6_64_and_unmaps_ipv4() -> None:
    assert source_key("127.0.0.1") == "127.0.0.1"
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::1") == "::/64"


def test_udp_endpoint_bounds_handshaking_sessions_per_source() -> None:
    rng = seeded_rng(5)
    secret = "cookie"
    endpoint = Endpoint(
        identity=Identity.generate(rng),
        static_private=rng(32),
        secret=secret,
        rng=rng,
        max_handshaking_per_source=3,
    )

    def hs_init(index: int) -> bytes:
        link = Link(
            initiator=True,
            identity=Identity.generate(rng),
            static_private=rng(32),
            secret=secret,
            local_index=index,
            now=0.0,
            rng=rng,
            expected_fingerprint=b"\0" * 32,
        )
        message = link.datagrams_to_send()[0]
        assert message[0] == HS_INIT
        return message

    opened = [endpoint.route(hs_init(i), ("127.0.0.1", 4000 + i), 0.0) for i in range(3)]
    assert all(link is not None for link in opened)
    assert endpoint.route(hs_init(3), ("127.0.0.1", 5000), 0.0) is None
    assert endpoint.statistics().drops["too_many_handshakes"] == 1
    assert endpoint.route(hs_init(4), ("::1", 5000), 0.0) is not None  # another source
    retransmitted = hs_init(5)
    endpoint.remove(opened[0])  # a session ends: its place is free again
    assert endpoint.route(retransmitted, ("127.0.0.1", 6000), 0.0) is not None
    assert endpoint.route(retransmitted, ("127.0.0.1", 6000), 0.0) is not None  # the same one
    assert endpoint.statistics().sessions == 4
    for link in list(endpoint.sessions.values()):
        endpoint.remove(link[0])
    assert endpoint.sessions == {} and endpoint._by_source == {} and endpoint._inits == {}


# --- accept() errors -----------------------------------------------------------------


@pytest.mark.anyio
async def test_accept_survives_running_out_of_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialer, listener = make_nodes(tmp_path, 2, [Edge(0, 1, "tcp")])
    await listener.bind()
    accept = node_module.accept_tcp
    failures = 6

    async def out_of_descriptors(listening: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await accept(listening)

    monkeypatch.setattr(node_module, "accept_tcp", out_of_descriptors)
    with capture_logs() as logs:
        async with running([listener, dialer]):
            with anyio.fail_after(5):
                await listener.wait_neighbors({dialer.fingerprint})
    assert listener.drop_counts()["accept_failed"] == 6
    logged = [e for e in logs if e["event"] == "accept_failed"]
    assert len(logged) == 1 and logged[0]["error"] == "EMFILE"  # rate-limited


@pytest.mark.anyio
async def test_a_listening_socket_gone_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (listener,) = make_nodes(tmp_path, 2, [Edge(1, 0, "tcp")])[:1]
    await listener.bind()

    async def gone(listening: Any) -> Any:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(node_module, "accept_tcp", gone)
    with anyio.fail_after(5), pytest.raises(ExceptionGroup) as caught:
        async with running([listener]):
            await anyio.sleep_forever()
    assert caught.group_contains(OSError)


# --- bugs reached by a neighbour's input ---------------------------------------------


def runner_of(node: Node, peer: Node) -> LinkRunner:
    return node.links[peer.fingerprint][0]


@pytest.mark.anyio
async def test_a_bug_in_one_link_ends_that_link_only(tmp_path: Path) -> None:
    # node0 and node2 both dial node1's one UDP socket: their sessions share its batches.
    nodes = make_nodes(tmp_path, 3, [Edge(0, 1, "udp"), Edge(2, 1, "udp")])
    a, hub, c = nodes
    with capture_logs() as logs:
        async with running(nodes):
            with anyio.fail_after(3):
                await hub.wait_neighbors({a.fingerprint, c.fingerprint})
            broken, healthy = runner_of(hub, a), runner_of(hub, c)

            class BuggyLink(Link):  # a Link has no __dict__: its class is swapped instead
                __slots__ = ()

                def receive_datagrams(self, *args: object, **kwargs: object) -> list[bytes]:
                    raise KeyError("a bug")

            broken.link.__class__ = BuggyLink
            healthy_in = healthy.statistics().frames_in
            with anyio.fail_after(3):
                await broken.closed.wait()
                # node0 is told (CLOSE) and re-dials; the new link has no bug.
                await until(lambda: a.fingerprint in hub.links and runner_of(hub, a) is not broken)
                await until(lambda: healthy.statistics().frames_in > healthy_in + 2)
            assert runner_of(hub, c) is healthy  # the other session never noticed
            assert broken.statistics().drops["internal_error"] >= 1
    bugs = [e for e in logs if e["event"] == "internal_error"]
    assert len(bugs) == 1 and bugs[0]["where"] == "link"
    assert isinstance(bugs[0]["exc_info"], KeyError)
    down = [e for e in logs if e["event"] == "link_down" and e["reason"] == "internal_error"]
    # Closed by the hub, and node0 was told why (by a CLOSE).
    assert {(e["link"], e["by_peer"]) for e in down} == {
        (a.fingerprint.hex()[:8], False),
        (hub.fingerprint.hex()[:8], True),
    }


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
@pytest.mark.parametrize("upcall", ["gossip", "rpc"])
async def test_a_bug_in_a_control_upcall_drops_that_message_only(
    tmp_path: Path, protocol: str, upcall: str
) -> None:
    dialer, listener = make_nodes(tmp_path, 2, [Edge(0, 1, protocol)])
    calls = 0

    def bug(*args: object) -> None:
        nonlocal calls
        calls += 1
        raise RecursionError("maximum recursion depth exceeded")

    with capture_logs() as logs:
        async with running([dialer, listener]):
            with anyio.fail_after(3):
                await listener.wait_neighbors({dialer.fingerprint})
                await dialer.wait_neighbors({listener.fingerprint})
            if upcall == "gossip":
                listener.gossip.on_message = bug  # type: ignore[method-assign]
            else:
                listener.rpc.receive = bug  # type: ignore[method-assign]
            runner = runner_of(listener, dialer)
            message = (
                GraphPull() if upcall == "gossip" else DockMessage(GLOBAL_RPC_DOCK, b'{"id":1}')
            )
            for _ in range(3):
                assert runner_of(dialer, listener).send_control(encode_control(message))
            with anyio.fail_after(3):
                await until(lambda: calls >= 3)
            assert runner_of(listener, dialer) is runner  # the link is still up
            assert runner.statistics().drops["internal_error"] == calls
    bugs = [e for e in logs if e["event"] == "internal_error"]
    assert len(bugs) == 1 and bugs[0]["where"] == "control"


@pytest.mark.anyio
async def test_a_bug_in_the_relay_loop_drops_that_batch_only(tmp_path: Path) -> None:
    dialer, listener = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    async with running([dialer, listener]):
        with anyio.fail_after(3):
            await listener.wait_priced({dialer.fingerprint})
            await dialer.wait_priced({listener.fingerprint})
        real = listener.relay_batch
        broken = True

        def relay_batch(*args: Any) -> None:
            if broken:
                raise IndexError("a bug")
            real(*args)

        listener.relay_batch = relay_batch  # type: ignore[method-assign]
        runner = runner_of(dialer, listener)
        runner.send_onions([runner.link.encrypt_onion(b"\x01" * 32, b"x" * 100)])
        with anyio.fail_after(3):
            await until(lambda: listener.drop_counts()["internal_error"] >= 1)
        broken = False
        runner.send_onions([runner.link.encrypt_onion(b"\x01" * 32, b"x" * 100)])
        with anyio.fail_after(3):
            await until(lambda: listener.drop_counts()["no_route"] == 1)  # relayed as usual
        assert listener.neighbors() == {dialer.fingerprint}


@pytest.mark.anyio
async def test_a_bug_in_a_spawned_task_ends_that_task_only(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1, [])

    async def bug() -> None:
        raise ValueError("a bug")

    async with running([node]):
        node.spawn(bug)
        with anyio.fail_after(3):
            await until(lambda: node.drops["internal_error"] == 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [
        sqlite3.OperationalError("disk I/O error"),
        LedgerCorrupt("ledger: seq gap", reason="seq_gap"),
    ],
)
async def test_the_nodes_own_failure_is_not_contained(tmp_path: Path, failure: Exception) -> None:
    (node,) = make_nodes(tmp_path, 1, [])

    async def ledger_fails() -> None:
        raise failure

    with anyio.fail_after(3), pytest.raises(ExceptionGroup) as caught:
        async with running([node]):
            node.spawn(ledger_fails)
            await anyio.sleep_forever()
    assert caught.group_contains(type(failure))


def test_bugs_are_logged_once_per_interval_and_counted_each_time() -> None:
    now = 0.0
    faults = Faults(_Recorder(), clock=lambda: now)
    drops: Counter[str] = Counter()
    for _ in range(5):
        with faults.boundary(drops, "link"):
            raise KeyError("x")
    now += 61
    with faults.boundary(drops, "link"):
        raise KeyError("x")
    assert drops == {"internal_error": 6}
    logged = faults._log.lines  # type: ignore[attr-defined]
    assert [(event, fields.get("unlogged")) for event, fields in logged] == [
        ("internal_error", None),
        ("internal_error", 4),
    ]


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


# --- neighbours ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_link_up_beyond_max_neighbors_is_refused(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, [Edge(0, 1, "udp"), Edge(2, 1, "tcp")])
    hub = nodes[1]
    hub.max_neighbors = 1
    with capture_logs() as logs:
        async with running(nodes):
            with anyio.fail_after(3):
                await until(lambda: hub.drop_counts()["too_many_neighbors"] >= 2)
            assert len(hub.neighbors()) == 1
    refused = [e for e in logs if e["event"] == "link_refused"]
    assert refused and {e["reason"] for e in refused} == {"too_many_neighbors"}


# --- clean stop ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_a_stopped_listener_tells_its_neighbours(tmp_path: Path, protocol: str) -> None:
    nodes = make_nodes(tmp_path, 3, [Edge(0, 1, protocol), Edge(2, 1, protocol)])
    a, hub, c = nodes
    with capture_logs() as logs:
        async with running([a, c]):
            async with anyio.create_task_group() as hub_scope:
                await hub_scope.start(hub.run)
                with anyio.fail_after(3):
                    await hub.wait_neighbors({a.fingerprint, c.fingerprint})
                    await a.wait_neighbors({hub.fingerprint})
                    await c.wait_neighbors({hub.fingerprint})
                hub_scope.cancel_scope.cancel()
            with anyio.fail_after(3):
                await a.wait_neighbors(set())
                await c.wait_neighbors(set())
    hub_short = hub.fingerprint.hex()[:8]
    down = [e for e in logs if e["event"] == "link_down" and e.get("link") == hub_short]
    # Told by a CLOSE, not by a keepalive timeout (which would not say by_peer).
    assert len(down) == 2 and all(e["by_peer"] for e in down), down
    assert hub.links == {}
    assert all(endpoint.sessions == {} for endpoint in hub._endpoints)
