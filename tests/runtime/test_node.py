"""In-process nodes on real loopback sockets: links come up, bad peers are refused."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.core.identity import Identity
from earendil_py.core.link import HS_INIT, Link
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.config import load_config
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import Node
from tests.helpers import UdpProxy, running, seeded_rng

FAST = """
[links]
keepalive_secs = 0.2
dead_after_secs = 1.0
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.5
"""


def make_nodes(tmp_path: Path, count: int, edges: list[Edge]) -> list[Node]:
    generated = generate_network(tmp_path, count, edges, extra_toml=FAST)
    return [Node(g.config, load_identity_file(g.config.identity_file)) for g in generated]


async def wait_all_up(nodes: list[Node], expected: dict[int, set[int]]) -> None:
    for index, neighbours in expected.items():
        await nodes[index].wait_neighbors({nodes[n].fingerprint for n in neighbours})


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_two_nodes_link_up_within_two_seconds(tmp_path: Path, protocol: str) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, protocol)])
    async with running(nodes):
        with anyio.fail_after(2):
            await wait_all_up(nodes, {0: {1}, 1: {0}})
        runner = nodes[0].links[nodes[1].fingerprint][0]
        assert runner.route.protocol == protocol
        await anyio.sleep(0.5)  # a few keepalives
        assert runner.statistics().rtt is not None


@pytest.mark.anyio
async def test_three_nodes_mixed_transports(tmp_path: Path) -> None:
    edges = [Edge(0, 1, "udp"), Edge(1, 2, "tcp"), Edge(2, 0, "udp")]
    nodes = make_nodes(tmp_path, 3, edges)
    async with running(nodes):
        with anyio.fail_after(2):
            await wait_all_up(nodes, {0: {1, 2}, 1: {0, 2}, 2: {0, 1}})


def probe_udp(address: tuple[str, int], message: bytes, wait: float = 0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.sendto(message, address)
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def handshake_init(secret: str) -> bytes:
    rng = seeded_rng(9)
    link = Link(
        initiator=True,
        identity=Identity.generate(rng),
        static_private=rng(32),
        secret=secret,
        local_index=1,
        now=0.0,
        rng=rng,
        expected_fingerprint=b"\0" * 32,
    )
    return link.datagrams_to_send()[0]


@pytest.mark.anyio
async def test_prober_without_cookie_gets_no_reply(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 3, [Edge(0, 1, "udp"), Edge(2, 1, "tcp")])
    listener = nodes[1]
    right_secret = listener.config.in_routes["from_node0_udp"].secret
    async with running([listener]):
        udp_address = listener.listening["from_node0_udp"]
        wrong = await anyio.to_thread.run_sync(
            probe_udp, udp_address, handshake_init("not-the-right-cookie-at-all")
        )
        assert wrong is None
        right = await anyio.to_thread.run_sync(probe_udp, udp_address, handshake_init(right_secret))
        assert right is not None and right[0] == 2  # the cookie holder gets HS_RESP
        assert await anyio.to_thread.run_sync(probe_udp, udp_address, b"\x04" + b"x" * 60) is None


@pytest.mark.anyio
async def test_tcp_prober_without_cookie_is_closed_silently(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, "tcp")])
    listener = nodes[1]
    async with running([listener]):
        host, port = listener.listening["from_node0_tcp"]
        async with await anyio.connect_tcp(host, port) as stream:
            init = handshake_init("not-the-right-cookie-at-all")
            await stream.send(len(init).to_bytes(2, "big") + init)
            with anyio.fail_after(2), pytest.raises(anyio.EndOfStream):
                await stream.receive()
        assert listener.drop_counts()["tcp_probe"] == 1


@pytest.mark.anyio
async def test_wrong_fingerprint_is_refused_with_a_clear_log_line(tmp_path: Path) -> None:
    generated = generate_network(tmp_path, 3, [Edge(0, 1, "udp")], extra_toml=FAST)
    # node0 believes node1's route belongs to node2.
    config_path = generated[0].config_path
    config_path.write_text(
        config_path.read_text().replace(generated[1].fingerprint, generated[2].fingerprint)
    )
    dialer = Node(load_config(config_path), load_identity_file(generated[0].config.identity_file))
    listener = Node(generated[1].config, load_identity_file(generated[1].config.identity_file))
    with capture_logs() as logs:
        async with running([dialer, listener]):
            await anyio.sleep(1.0)
            assert dialer.neighbors() == set()
    refused = [e for e in logs if e["event"] == "link_refused"]
    assert refused and refused[0]["reason"] == "wrong_fingerprint"
    assert refused[0]["proven"] == generated[1].fingerprint


@pytest.mark.anyio
async def test_garbage_flood_does_not_hurt_the_good_link(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    target = ("127.0.0.1", 0)

    def flood() -> int:
        """20,000 garbage datagrams of every message type, paced at ~10k/s."""
        rng = seeded_rng(3)
        count = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            start = time.monotonic()
            for millisecond in range(2000):
                for kind in (HS_INIT, 2, 3, 4, 9, HS_INIT, 2, 3, 4, 9):
                    sock.sendto(bytes([kind]) + rng(100), target)
                    count += 1
                if (ahead := start + millisecond / 1000 - time.monotonic()) > 0:
                    time.sleep(ahead)
        return count

    async with running(nodes):
        target = nodes[1].listening["from_node0_udp"]
        with anyio.fail_after(2):
            await wait_all_up(nodes, {0: {1}, 1: {0}})
        sent = await anyio.to_thread.run_sync(flood)
        runner = nodes[0].links[nodes[1].fingerprint][0]
        pings_before = runner.statistics().frames_in
        await anyio.sleep(0.5)
        assert nodes[0].neighbors() == {nodes[1].fingerprint}
        assert runner.statistics().frames_in > pings_before  # keepalives still answered
    assert sent == 20_000
    assert nodes[1].drop_counts().total() >= 10_000


@pytest.mark.anyio
async def test_duplicated_and_reordered_udp_frames_are_dropped_and_counted(
    tmp_path: Path,
) -> None:
    generated = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=FAST)
    listener = Node(generated[1].config, load_identity_file(generated[1].config.identity_file))
    async with anyio.create_task_group() as outer:
        await outer.start(listener.run)
        proxy = UdpProxy(listener.listening["from_node0_udp"], duplicate=True, reorder=True)
        outer.start_soon(proxy.serve)
        path = generated[0].config_path
        route = generated[0].config.out_routes["node1_udp"]
        path.write_text(path.read_text().replace(route.connect, f"127.0.0.1:{proxy.address[1]}"))
        dialer = Node(load_config(path), load_identity_file(generated[0].config.identity_file))
        await outer.start(dialer.run)
        with anyio.fail_after(3):
            await dialer.wait_priced({listener.fingerprint})
            await listener.wait_priced({dialer.fingerprint})
        runner = dialer.links[listener.fingerprint][0]
        peer = listener.links[dialer.fingerprint][0]
        for i in range(200):
            frame = runner.link.encrypt_onion(b"\x01" * 32, bytes([i % 256]) * 100)
            runner.send(frame)
            if i % 5 == 0:
                await anyio.sleep(0.005)  # gentle pacing: the proxy must not lose any
        await anyio.sleep(0.5)
        assert peer.packets_received == 200  # every frame exactly once
        assert listener.drop_counts()["no_route"] == 200  # nobody is called 0x0101...
        drops = peer.statistics().drops
        assert proxy.reordered > 50
        assert drops["replay"] >= 100  # frames the proxy duplicated (not those it reordered)
        assert dialer.neighbors() == {listener.fingerprint}
        outer.cancel_scope.cancel()
