"""End-to-end relaying over real loopback sockets: multi-hop delivery and exact counters."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from earendil_py.core.link import onion_frame
from earendil_py.core.packet import build_packet
from earendil_py.core.relay import encode_datagram
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import Node
from earendil_py.runtime.peeling import ParallelPeeler
from tests.helpers import FAST, LINE, RING, DaemonProcess, converged, make_nodes, running


def link_between(a: Node, b: Node):  # type: ignore[no-untyped-def]
    return a.links[b.fingerprint][0]


def assert_counters_agree(nodes: list[Node], edges: list[Edge]) -> None:
    for edge in edges:
        a, b = nodes[edge.dialer], nodes[edge.listener]
        assert link_between(a, b).packets_sent == link_between(b, a).packets_received
        assert link_between(b, a).packets_sent == link_between(a, b).packets_received


async def send_paced(node: Node, destination: bytes, payloads: list[bytes], hops: int) -> None:
    for i, payload in enumerate(payloads):
        node.send_datagram(destination, 7, payload, hops=hops)
        if i % 25 == 24:
            await anyio.sleep(0.02)  # lossless loopback: never outrun a socket buffer


def diagnose(nodes: list[Node]) -> str:
    """Where packets went, for a failure message."""
    lines = []
    for i, node in enumerate(nodes):
        links = {
            r.route.name: (r.packets_sent, r.packets_received, dict(r.statistics().drops))
            for runners in node.links.values()
            for r in runners
        }
        lines.append(f"node{i}: {node.relay} drops={dict(node.drop_counts())} links={links}")
    return "\n".join(lines)


async def receive_all(node: Node, count: int) -> list[bytes]:
    got = []
    while len(got) < count:
        got.append((await node.receive_datagram(7)).data)
    return got


@pytest.mark.anyio
@pytest.mark.parametrize("topology", ["line", "ring"])
async def test_thousand_datagrams_through_five_nodes(tmp_path: Path, topology: str) -> None:
    edges = LINE if topology == "line" else RING
    nodes = make_nodes(tmp_path, 5, edges)
    payloads = [i.to_bytes(4, "big") + os.urandom(200) for i in range(1000)]
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, edges)
        got: list[bytes] = []
        with anyio.move_on_after(30):
            await send_paced(nodes[0], nodes[4].fingerprint, payloads, hops=3)
            got = await receive_all(nodes[4], len(payloads))
        assert len(got) == len(payloads), diagnose(nodes)
        await anyio.sleep(0.2)
        assert sorted(got) == sorted(payloads)
        assert nodes[0].relay.originated == 1000
        assert nodes[4].relay.delivered == 1000
        # Three peelers per packet: two intermediate ones and the destination.
        assert sum(n.relay.peeled for n in nodes) == 3000
        assert_counters_agree(nodes, edges)
        assert (
            sum(
                link_between(nodes[4], n).packets_received
                for n in nodes
                if n.fingerprint in nodes[4].links
            )
            >= 1000
        )


@pytest.mark.anyio
async def test_relays_that_are_not_the_next_peeler_do_no_onion_crypto(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 5, LINE)

    def no_crypto(packet: bytes) -> None:
        raise AssertionError("a plain relay peeled a packet")

    for plain in (nodes[1], nodes[3]):
        plain.peeling = ParallelPeeler(no_crypto, threads=1)  # type: ignore[arg-type]
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, LINE)
        route = [(n.fingerprint, n.identity.onion_public) for n in (nodes[2], nodes[4])]
        first, packet = build_packet(route, encode_datagram(7, b"hello"), os.urandom)
        nodes[0].relay_batch([(None, [onion_frame(first, packet)])], anyio.current_time())
        # The same packet again: the peeler at node 2 must refuse the replay.
        nodes[0].relay_batch([(None, [onion_frame(first, packet)])], anyio.current_time())
        with anyio.fail_after(5):
            assert (await nodes[4].receive_datagram(7)).data == b"hello"
        await anyio.sleep(0.3)
        assert nodes[4].receive_datagrams_nowait(7) == []
        assert nodes[2].peeler.drops["replay"] == 1
        assert nodes[1].relay.forwarded == 2 and nodes[1].relay.peeled == 0
        assert nodes[3].relay.forwarded == 1 and nodes[3].relay.peeled == 0
        assert nodes[2].relay.peeled == 1


@pytest.mark.anyio
async def test_restarted_node_is_routed_through_again(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 5, RING)
    async with anyio.create_task_group() as tg:
        scopes = []
        for node in nodes:
            scope = anyio.CancelScope()
            scopes.append(scope)

            async def run(
                node: Node = node,
                scope: anyio.CancelScope = scope,
                *,
                task_status: anyio.abc.TaskStatus[None],
            ) -> None:
                with scope:
                    await node.run(task_status=task_status)

            await tg.start(run)
        with anyio.fail_after(5):
            await converged(nodes, RING)
        scopes[2].cancel()  # node 2 goes away...
        await anyio.sleep(0.5)
        restarted = Node(nodes[2].config, nodes[2].identity)  # ...and comes back
        nodes[2] = restarted
        await tg.start(restarted.run)
        with anyio.fail_after(5):
            await nodes[1].wait_neighbors({nodes[0].fingerprint, restarted.fingerprint})
            await nodes[3].wait_neighbors({nodes[4].fingerprint, restarted.fingerprint})
            # And both ends of each new link priced: a node sends nothing to a neighbour
            # before it is priced itself (`not_priced_out`).
            await converged(nodes, RING)
        payloads = [i.to_bytes(4, "big") for i in range(200)]
        with anyio.fail_after(20):
            await send_paced(nodes[1], nodes[3].fingerprint, payloads, hops=2)
            got = await receive_all(nodes[3], len(payloads))
        assert sorted(got) == sorted(payloads)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_stalled_neighbour_does_not_block_the_others(tmp_path: Path) -> None:
    generated = generate_network(
        tmp_path,
        3,
        [Edge(0, 1, "tcp"), Edge(0, 2, "tcp")],
        extra_toml=FAST.replace("dead_after_secs = 3.0", "dead_after_secs = 30.0"),
    )
    nodes = [Node(g.config, load_identity_file(g.config.identity_file)) for g in generated[:2]]
    stalled = DaemonProcess(generated[2].config_path)
    try:
        async with running(nodes):
            stalled_fp = bytes.fromhex(generated[2].fingerprint)
            with anyio.fail_after(5):
                await nodes[0].wait_neighbors({nodes[1].fingerprint, stalled_fp})
                await nodes[0].wait_priced({nodes[1].fingerprint, stalled_fp})
                while nodes[0].graph.statistics().adjacencies < 2:
                    await anyio.sleep(0.05)
            stalled.process.send_signal(signal.SIGSTOP)
            to_stalled = nodes[0].links[stalled_fp][0]
            for i in range(8000):  # far more than the kernel buffers plus our queue hold
                nodes[0].send_datagram(stalled_fp, 7, b"x" * 800, hops=1)
                if i % 200 == 0:
                    await anyio.sleep(0)
            assert to_stalled.statistics().drops["queue_full"] > 0
            with anyio.fail_after(5):
                for i in range(100):
                    nodes[0].send_datagram(nodes[1].fingerprint, 7, bytes([i]), hops=1)
                got = await receive_all(nodes[1], 100)
            assert sorted(got) == [bytes([i]) for i in range(100)]
    finally:
        stalled.process.send_signal(signal.SIGCONT)
        stalled.stop(signal.SIGKILL)
