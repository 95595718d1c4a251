"""The control API and the CLI commands built on it, against running nodes on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from earendil_py.cli import main
from earendil_py.core.errors import ConfigError
from earendil_py.netgen import Edge
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.node import Node
from tests.helpers import converged, make_nodes, running

LINE3 = [Edge(0, 1, "udp"), Edge(1, 2, "tcp")]


def config_path(node: Node) -> str:
    return str(node.config.source)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await anyio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.anyio
async def test_send_status_and_receive_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = make_nodes(tmp_path, 3, LINE3)
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, LINE3)
        destination = nodes[2].fingerprint.hex()
        for text in ["hello", "world"]:
            code, _, err = await cli(
                capsys, "send", "--config", config_path(nodes[0]), "--to", destination,
                "--dock", "9", "--hops", "2", text,
            )  # fmt: skip
            assert (code, err) == (0, "")
        received: list[str] = []
        with anyio.fail_after(5):
            while len(received) < 2:
                code, out, _ = await cli(
                    capsys, "receive", "--config", config_path(nodes[2]), "--dock", "9"
                )
                assert code == 0
                received += out.splitlines()
                await anyio.sleep(0.05)
        assert sorted(received) == ["hello", "world"]

        code, out, _ = await cli(capsys, "status", "--config", config_path(nodes[1]))
        assert code == 0
        assert nodes[1].fingerprint.hex() in out
        assert "peeled 2" in out  # the middle node was the first of the two peelers
        assert nodes[0].fingerprint.hex()[:8] in out and nodes[2].fingerprint.hex()[:8] in out

        host, port = nodes[0].config.control_listen
        status = await anyio.to_thread.run_sync(call_api, host, port, "GET", "/api/status")
        assert status["relay"]["originated"] == 2
        (link,) = status["links"]
        assert link["packets_sent"] == 2 and link["neighbor"] == nodes[1].fingerprint.hex()


@pytest.mark.anyio
async def test_bad_requests_get_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    host, port = nodes[0].config.control_listen
    async with running(nodes):
        code, _, err = await cli(
            capsys, "send", "--config", config_path(nodes[0]), "--to", "abc", "--dock", "1", "x"
        )
        assert code == 2
        assert err.startswith("earendil-py: error: ") and "fingerprint" in err

        unknown = "ab" * 32
        code, _, err = await cli(
            capsys, "send", "--config", config_path(nodes[0]), "--to", unknown, "--dock", "1", "x"
        )
        assert code == 1
        assert "no route" in err

        cases: list[tuple[str, str, object, int]] = [
            ("POST", "/api/send", {"destination": unknown}, 400),  # fields missing
            ("POST", "/api/send", {"destination": unknown, "dock": -1, "data_b64": ""}, 400),
            ("POST", "/api/send", {"destination": unknown, "dock": 1, "data_b64": "%%"}, 400),
            ("GET", "/api/receive", None, 400),
            ("GET", "/api/receive?dock=x", None, 400),
            ("GET", "/api/nothing", None, 404),
            ("DELETE", "/api/status", None, 405),
        ]
        for method, path, body, status in cases:
            with pytest.raises(ControlApiError) as caught:
                await anyio.to_thread.run_sync(call_api, host, port, method, path, body)
            assert caught.value.status == status, (method, path, caught.value.message)
        # The node is still serving after all that.
        status_now = await anyio.to_thread.run_sync(call_api, host, port, "GET", "/api/status")
        assert status_now["fingerprint"] == nodes[0].fingerprint.hex()

    # Once the node is gone the CLI says so in one line.
    code, _, err = await cli(capsys, "status", "--config", config_path(nodes[0]))
    assert code == 1
    assert f"cannot reach the node's control API at {host}:{port}" in err


@pytest.mark.anyio
async def test_a_taken_control_port_is_a_config_error(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    host, port = node.config.control_listen
    with socket.socket() as squatter:
        squatter.bind((host, port))
        squatter.listen()
        with pytest.raises(ConfigError, match=f"control_listen: cannot listen on {host}:{port}"):
            await node.bind()
