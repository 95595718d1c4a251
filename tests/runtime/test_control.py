"""The control API and the CLI commands built on it, against running nodes on loopback:
authentication by the token the node writes, the dashboard link, the loopback-only rule, no
state changed by a GET, and the reference page in step with the routes."""

from __future__ import annotations

import http.client
import socket
import stat
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.core.errors import ConfigError
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.config import load_config
from earendil_py.runtime.control import build_router
from earendil_py.runtime.http import (
    ControlApiError,
    ControlAuth,
    call_api,
    read_token_file,
    request_api,
    token_path,
)
from earendil_py.runtime.node import Node
from tests.helpers import (
    cli_beside_nodes,
    converged,
    make_nodes,
    node_from,
    run_cli,
    running,
)

LINE3 = [Edge(0, 1, "udp"), Edge(1, 2, "tcp")]
DOCS = Path(__file__).parents[2] / "docs" / "control-api.md"


def config_path(node: Node) -> str:
    return str(node.config.source)


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
            code, _, err = await cli_beside_nodes(
                capsys, "send", "--config", config_path(nodes[0]), "--to", destination,
                "--dock", "9", "--hops", "2", text,
            )  # fmt: skip
            assert (code, err) == (0, "")
        received: list[str] = []
        with anyio.fail_after(5):
            while len(received) < 2:
                code, out, _ = await cli_beside_nodes(
                    capsys, "receive", "--config", config_path(nodes[2]), "--dock", "9"
                )
                assert code == 0
                received += out.splitlines()
                await anyio.sleep(0.05)
        assert sorted(received) == ["hello", "world"]

        code, out, _ = await cli_beside_nodes(capsys, "status", "--config", config_path(nodes[1]))
        assert code == 0
        assert nodes[1].fingerprint.hex() in out
        assert "peeled 2" in out  # the middle node was the first of the two peelers
        assert nodes[0].fingerprint.hex()[:8] in out and nodes[2].fingerprint.hex()[:8] in out

        status = await anyio.to_thread.run_sync(call_api, nodes[0].config, "GET", "/api/status")
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
        code, _, err = await cli_beside_nodes(
            capsys, "send", "--config", config_path(nodes[0]), "--to", "abc", "--dock", "1", "x"
        )
        assert code == 2
        assert err.startswith("earendil-py: error: ") and "fingerprint" in err

        unknown = "ab" * 32
        code, _, err = await cli_beside_nodes(
            capsys, "send", "--config", config_path(nodes[0]), "--to", unknown, "--dock", "1", "x"
        )
        assert code == 1
        assert "no route" in err

        cases: list[tuple[str, str, object, int]] = [
            ("POST", "/api/send", {"destination": unknown}, 400),  # fields missing
            ("POST", "/api/send", {"destination": unknown, "dock": -1, "data_b64": ""}, 400),
            ("POST", "/api/send", {"destination": unknown, "dock": 1, "data_b64": "%%"}, 400),
            ("POST", "/api/receive", {}, 400),
            ("POST", "/api/receive", {"dock": "x"}, 400),
            ("POST", "/api/receive", {"dock": 1, "limit": 0}, 400),
            ("GET", "/api/receive?dock=1", None, 405),  # a GET never takes datagrams away
            ("GET", "/api/nothing", None, 404),
            ("DELETE", "/api/status", None, 405),
        ]
        for method, path, body, status in cases:
            with pytest.raises(ControlApiError) as caught:
                await anyio.to_thread.run_sync(call_api, nodes[0].config, method, path, body)
            assert caught.value.status == status, (method, path, caught.value.message)
        # The node is still serving after all that.
        status_now = await anyio.to_thread.run_sync(call_api, nodes[0].config, "GET", "/api/status")
        assert status_now["fingerprint"] == nodes[0].fingerprint.hex()

    # Once the node is gone the CLI says so in one line.
    code, _, err = await cli_beside_nodes(capsys, "status", "--config", config_path(nodes[0]))
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


def raw_request(
    address: tuple[str, int], method: str, path: str, headers: dict[str, str]
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=5)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


@pytest.mark.anyio
async def test_the_api_needs_the_token_the_node_wrote_at_start(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    path = token_path(node.config)
    assert path == node.config.db_path.parent / "control.token"
    host, port = node.config.control_listen
    async with running([node]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = read_token_file(path)
        bearer = {"Authorization": f"Bearer {token}"}
        for headers, expected in [
            ({}, 401),
            ({"Authorization": "Bearer " + "0" * 64}, 401),
            ({"Authorization": f"Bearer {token}x"}, 401),
            ({**bearer, "Host": "evil.example"}, 403),  # a rebound name, even with the token
            (bearer, 200),
        ]:
            for target in ["/api/status", "/metrics", "/", "/api/settlements"]:
                status, answer, _ = await anyio.to_thread.run_sync(
                    raw_request, (host, port), "GET", target, headers
                )
                assert status == expected, (target, headers)
                if status == 401:
                    assert answer["WWW-Authenticate"].startswith("Bearer")
    # A new start writes a new token; the old one is refused.
    restarted = node_from(node.config)
    async with running([restarted]):
        assert read_token_file(path) != token
        with pytest.raises(ControlApiError) as caught:
            await anyio.to_thread.run_sync(
                partial(request_api, host, port, "GET", "/api/status", token=token)
            )
        assert caught.value.status == 401
        status_now = await anyio.to_thread.run_sync(call_api, node.config, "GET", "/api/status")
        assert status_now["fingerprint"] == node.fingerprint.hex()


@pytest.mark.anyio
async def test_the_cli_says_in_one_line_when_it_cannot_read_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    code, _, err = await cli_beside_nodes(capsys, "status", "--config", config_path(node))
    assert code == 1
    assert err.count("\n") == 1
    assert f"{token_path(node.config)}: cannot read control token" in err
    assert "is the daemon running?" in err and "node's user" in err


@pytest.mark.anyio
async def test_the_dashboard_command_prints_a_link_that_works_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    host, port = node.config.control_listen
    async with running([node]):
        code, out, err = await cli_beside_nodes(capsys, "dashboard", "--config", config_path(node))
        assert code == 0
        link = out.splitlines()[-1]  # the lines before are the node's own log
        assert link.startswith(f"http://{host}:{port}/login?code=")
        assert "works once" in err
        target = link.removeprefix(f"http://{host}:{port}")
        status, headers, _ = await anyio.to_thread.run_sync(
            raw_request, (host, port), "GET", target, {}
        )
        assert (status, headers["Location"]) == (303, "/")
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        status, _, body = await anyio.to_thread.run_sync(
            raw_request, (host, port), "GET", target, {}
        )
        assert status == 403 and b"used or has expired" in body
        for path, expected in [("/", 200), ("/api/status", 200), ("/metrics", 200)]:
            status, _, _ = await anyio.to_thread.run_sync(
                raw_request, (host, port), "GET", path, {"Cookie": cookie}
            )
            assert status == expected, path


@pytest.mark.parametrize(
    ("listen", "allow_remote", "accepted"),
    [
        ("0.0.0.0", False, False),
        ("[::]", False, False),
        ("192.0.2.1", False, False),
        ("127.0.0.2", False, True),
        ("[::1]", False, True),
        ("0.0.0.0", True, True),
    ],
)
def test_a_control_listen_off_loopback_needs_the_explicit_opt_in(
    tmp_path: Path, listen: str, allow_remote: bool, accepted: bool
) -> None:
    (generated,) = generate_network(tmp_path, 1, [])
    text = generated.config_path.read_text()
    host, port = generated.config.control_listen
    text = text.replace(f'control_listen = "{host}:{port}"', f'control_listen = "{listen}:{port}"')
    if allow_remote:
        text = "control_allow_remote = true\n" + text
    generated.config_path.write_text(text)
    if accepted:
        assert load_config(generated.config_path).control_allow_remote is allow_remote
        return
    for command in ["check-config", "daemon"]:
        result = run_cli(command, "--config", str(generated.config_path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("earendil-py: error: ")
        assert "control_listen" in result.stderr and "control_allow_remote = true" in result.stderr
    assert not token_path(generated.config).exists()  # the daemon stopped before anything


@pytest.mark.anyio
async def test_no_get_changes_what_the_node_shows(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    a, b = nodes
    neighbor = b.fingerprint.hex()
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, [Edge(0, 1, "udp")])
        b.send_datagram(a.fingerprint, 9, b"waiting", hops=1)
        with anyio.fail_after(5):
            while a.relay.delivered < 1:
                await anyio.sleep(0.02)
        await anyio.to_thread.run_sync(
            call_api, a.config, "POST", f"/api/chat/{neighbor}", {"text": "hi"}
        )

        async def seen() -> list[Any]:
            shown = []
            for path in ["/api/status", "/api/settlements", f"/api/chat/{neighbor}"]:
                answer = await anyio.to_thread.run_sync(call_api, a.config, "GET", path)
                answer.pop("uptime_secs", None)
                for link in answer.get("links", []):
                    link.pop("rtt_ms")  # keepalives go on
                    for key in ["frames_in", "frames_out", "bytes_in", "bytes_out"]:
                        link.pop(key)
                shown.append(answer)
            return shown

        before = await seen()
        assert a.control_auth is not None
        gets = [p for m, p in build_router(a, a.control_auth).routes() if m == "GET"]
        assert "/login" in gets and "/api/status" in gets
        for pattern in gets:
            path = pattern.replace("{fingerprint}", neighbor)
            for _ in range(2):
                await anyio.to_thread.run_sync(
                    raw_request,
                    a.config.control_listen,
                    "GET",
                    path + "?dock=9&code=x",
                    {"Authorization": f"Bearer {a.control_auth.token}"},
                )
        assert await seen() == before
        assert [d.data for d in a.receive_datagrams_nowait(9)] == [b"waiting"]


def test_every_route_is_documented(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    doc = DOCS.read_text(encoding="utf-8")
    routes = build_router(node, ControlAuth.generate()).routes()
    assert len(routes) > 10
    missing = [f"{m} {p}" for m, p in routes if f"`{m} {p}`" not in doc]
    assert missing == []


@pytest.mark.anyio
async def test_the_node_logs_its_control_address_and_a_dashboard_link_at_start(
    tmp_path: Path,
) -> None:
    (node,) = make_nodes(tmp_path, 1, [])
    host, port = node.config.control_listen
    with capture_logs() as logs:
        async with running([node]):
            (logged,) = [entry for entry in logs if entry["event"] == "control_api"]
            assert logged["url"] == f"http://{host}:{port}/"
            link = logged["dashboard"]
            assert link.startswith(f"http://{host}:{port}/login?code=")
            target = link.removeprefix(f"http://{host}:{port}")
            statuses = [
                (await anyio.to_thread.run_sync(raw_request, (host, port), "GET", target, {}))[0]
                for _ in range(2)
            ]
    assert statuses == [303, 403]
