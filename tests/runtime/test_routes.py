"""Every configured route's status tells the operator whether it is up, since when, and why not."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.netgen import Edge, GeneratedNode, generate_network
from earendil_py.runtime.config import load_config
from earendil_py.runtime.node import Node
from tests.helpers import cli_beside_nodes, node_from

# Handshakes are retried fast, but a link is only declared dead after the default 20 s: a
# failure must be named long before that.
TIMING = """
[links]
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.5

[logging]
format = "json"
"""
DIALER_ROUTE = {"udp": "node1_udp", "tcp": "node1_tcp"}


def nodes_with(
    tmp_path: Path, protocol: str, spoil: Callable[[list[GeneratedNode], str], str] | None = None
) -> list[Node]:
    """node0 dials node1 over `protocol`; `spoil(generated, text)` rewrites node0's config."""
    generated = generate_network(tmp_path, 3, [Edge(0, 1, protocol)], extra_toml=TIMING)
    if spoil is not None:
        path = generated[0].config_path
        path.write_text(spoil(generated, path.read_text()))
    return [node_from(load_config(g.config_path)) for g in generated]


def route(node: Node, name: str) -> dict[str, Any]:
    (found,) = [r for r in node.routes.summaries() if r["name"] == name]
    return found


async def wait_route(node: Node, name: str, **expected: object) -> dict[str, Any]:
    while True:
        status = route(node, name)
        if all(status[key] == value for key, value in expected.items()):
            return status
        await anyio.sleep(0.02)


def wrong_secret(generated: list[GeneratedNode], text: str) -> str:
    return re.sub(r'secret = "([0-9a-f]+)"', r'secret = "not-\1"', text)


def wrong_fingerprint(generated: list[GeneratedNode], text: str) -> str:
    return text.replace(generated[1].fingerprint, generated[2].fingerprint)


@pytest.mark.anyio
async def test_a_wrong_udp_secret_is_named_at_the_first_unanswered_handshake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with capture_logs():  # the nodes' log lines are not printed among the CLI's
        dialer, listener, _ = nodes_with(tmp_path, "udp", wrong_secret)
        async with anyio.create_task_group() as tg:
            await tg.start(dialer.run)
            await tg.start(listener.run)
            with anyio.fail_after(5):  # the handshake itself gives up only after 20 s
                status = await wait_route(dialer, "node1_udp", failure="no_reply")
            assert status["state"] == "never_up"
            assert status["failure_reason"] == "no reply: check the route secret and fingerprint"
            assert listener.drop_counts()["bad_mac1"] >= 2  # the secret: dropped unanswered
            code, out, _ = await cli_beside_nodes(
                capsys, "status", "--config", str(dialer.config.source)
            )
            tg.cancel_scope.cancel()
    assert code == 0
    lines = out.splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.startswith("  out node1_udp ")]
    assert " never up since " in lines[index]
    assert lines[index + 1].startswith("      last failure ")
    assert lines[index + 1].endswith(": no reply: check the route secret and fingerprint")


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_nothing_listening_is_a_refused_connection(tmp_path: Path, protocol: str) -> None:
    dialer, listener, _ = nodes_with(tmp_path, protocol)
    address = listener.config.in_routes[f"from_node0_{protocol}"].listen
    async with anyio.create_task_group() as tg:
        await tg.start(dialer.run)  # the listener does not run
        with anyio.fail_after(5):
            status = await wait_route(dialer, DIALER_ROUTE[protocol], failure="connection_refused")
        assert status["state"] == "never_up"
        assert status["failure_reason"] == (
            f"connection refused by {address}: is the neighbour's node running?"
        )
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_wrong_tcp_secret_is_named_when_the_listener_hangs_up(tmp_path: Path) -> None:
    dialer, listener, _ = nodes_with(tmp_path, "tcp", wrong_secret)
    address = listener.config.in_routes["from_node0_tcp"].listen
    async with anyio.create_task_group() as tg:
        await tg.start(dialer.run)
        await tg.start(listener.run)
        with anyio.fail_after(5):
            status = await wait_route(dialer, "node1_tcp", failure="handshake_closed")
        assert status["failure_reason"] == (
            f"closed by {address} during the handshake: check the route secret and fingerprint"
        )
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_a_wrong_fingerprint_names_the_identity_proven(tmp_path: Path, protocol: str) -> None:
    dialer, listener, _ = nodes_with(tmp_path, protocol, wrong_fingerprint)
    address = listener.config.in_routes[f"from_node0_{protocol}"].listen
    async with anyio.create_task_group() as tg:
        await tg.start(dialer.run)
        await tg.start(listener.run)
        with anyio.fail_after(5):
            status = await wait_route(dialer, DIALER_ROUTE[protocol], failure="wrong_fingerprint")
        assert status["state"] == "never_up"
        assert status["failure_reason"] == (
            f"wrong fingerprint: {address} proved to be {listener.fingerprint.hex()}, "
            "not the configured one"
        )
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_route_is_up_since_its_handshake_then_down_with_the_reason(
    tmp_path: Path,
) -> None:
    dialer, listener, _ = nodes_with(tmp_path, "udp")
    async with anyio.create_task_group() as tg:
        await tg.start(dialer.run)
        async with anyio.create_task_group() as listening:
            assert route(listener, "from_node0_udp")["state"] == "listening"
            await listening.start(listener.run)
            with anyio.fail_after(5):
                await dialer.wait_neighbors({listener.fingerprint})
                up = await wait_route(dialer, "node1_udp", state="up")
                inbound = await wait_route(listener, "from_node0_udp", state="up", links=1)
            assert up["since"] == up["last_handshake"]
            assert up["neighbor"] == listener.fingerprint.hex()
            assert inbound["neighbor"] is None and inbound["failure"] is None
            listening.cancel_scope.cancel()  # a clean stop: it tells the dialer why
        with anyio.fail_after(5):
            down = await wait_route(dialer, "node1_udp", state="down")
        assert down["since"] >= up["since"] and down["last_handshake"] == up["last_handshake"]
        assert (down["failure"], down["failure_reason"]) == (
            "closed_by_peer",
            "closed by the neighbour: shutdown",
        )
        assert route(listener, "from_node0_udp")["state"] == "listening"
        tg.cancel_scope.cancel()
