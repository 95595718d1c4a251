"""The control API's HTTP server on real loopback sockets: JSON in and out, routing, limits,
the loopback-only and JSON-only rules, and survival of bad clients and buggy handlers."""

from __future__ import annotations

import http.client
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import h11
import msgspec
import pytest
from anyio.abc import SocketStream
from structlog.testing import capture_logs

from earendil_py.core.errors import LocalProtocolError
from earendil_py.runtime.http import (
    MAX_BODY_BYTES,
    ControlApiError,
    HttpError,
    HttpServer,
    Request,
    Response,
    Router,
    call_api,
    json_response,
)

HOST = "127.0.0.1"


def make_router() -> Router:
    router = Router()

    @router.route("GET", "/api/status")
    async def status(request: Request) -> Response:
        return json_response({"ok": True, "query": request.query})

    @router.route("POST", "/api/echo")
    async def echo(request: Request) -> Response:
        return json_response({"got": request.json()})

    @router.route("POST", "/api/settlements/{id}/accept")
    async def accept(request: Request) -> Response:
        return json_response({"accepted": request.params["id"]})

    @router.route("GET", "/api/settlements/{id}")
    async def settlement(request: Request) -> Response:
        raise HttpError(409, f"settlement {request.params['id']} is already closed")

    @router.route("GET", "/api/boom")
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals")

    return router


@asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(make_router(), HOST, 0, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def api(server: HttpServer, method: str, path: str, body: object = None) -> Any:
    return await anyio.to_thread.run_sync(
        partial(call_api, HOST, server.port, method, path, body, timeout=5)
    )


def _plain_request(
    port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


async def plain_request(
    server: HttpServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A request with exactly these headers (plus http.client's Host, unless given)."""
    return await anyio.to_thread.run_sync(
        partial(_plain_request, server.port, method, path, body, headers or {})
    )


def h11_request(
    method: str, path: str, headers: list[tuple[str, str]] | None = None
) -> h11.Request:
    return h11.Request(method=method, target=path, headers=headers or [("Host", HOST)])


async def receive_response(
    stream: SocketStream, client: h11.Connection
) -> tuple[h11.Response, bytes]:
    response: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            try:
                client.receive_data(await stream.receive())
            except anyio.EndOfStream:
                client.receive_data(b"")
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body
        else:
            raise AssertionError(f"unexpected {event!r}")


async def receive_until_closed(stream: SocketStream) -> bytes:
    data = b""
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


def error_of(body: bytes) -> str:
    decoded = msgspec.json.decode(body)
    assert isinstance(decoded, dict)
    error = decoded["error"]
    assert isinstance(error, str)
    return error


# --- JSON round trips and routing ---------------------------------------------------------


@pytest.mark.anyio
async def test_get_and_post_json_round_trip() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            assert await api(server, "GET", "/api/status?peer=ab%20cd&n=") == {
                "ok": True,
                "query": {"peer": "ab cd", "n": ""},
            }
            body = {"amount_umel": 1_500_000, "memo": "für Ärger", "tags": [1, None]}
            assert await api(server, "POST", "/api/echo", body) == {"got": body}


@pytest.mark.anyio
async def test_path_parameters_are_matched_and_decoded() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            result = await api(server, "POST", "/api/settlements/ab%2Fc%20d/accept", {})
            assert result == {"accepted": "ab/c d"}
            with pytest.raises(ControlApiError) as info:
                await api(server, "GET", "/api/settlements/42")
            assert (info.value.status, info.value.message) == (
                409,
                "settlement 42 is already closed",
            )


@pytest.mark.anyio
async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            with pytest.raises(ControlApiError) as info:
                await api(server, "GET", "/api/nothing-here")
            assert (info.value.status, info.value.message) == (404, "not found")
            with pytest.raises(ControlApiError) as info:
                await api(server, "GET", "/api/settlements//accept")  # empty parameter
            assert info.value.status == 404

            status, headers, body = await plain_request(server, "DELETE", "/api/status")
            assert status == 405
            assert headers["Allow"] == "GET"
            assert "DELETE" in error_of(body)
            # A CORS preflight is never approved: no route, no Access-Control-* headers.
            status, headers, _ = await plain_request(server, "OPTIONS", "/api/echo")
            assert status == 405
            assert not [name for name in headers if name.lower().startswith("access-control")]


def test_router_refuses_clashing_and_malformed_routes() -> None:
    router = make_router()

    async def handler(request: Request) -> Response:
        return json_response(None)

    with pytest.raises(LocalProtocolError):
        router.add("post", "/api/settlements/{other}/accept", handler)
    with pytest.raises(LocalProtocolError):
        router.add("GET", "api/no-slash", handler)
    with pytest.raises(LocalProtocolError):
        router.add("GET", "/api/{a}/{a}", handler)
    router.add("GET", "/api/settlements/{id}/accept", handler)  # another method is fine


def test_response_refuses_what_could_not_be_sent() -> None:
    with pytest.raises(ValueError, match="invalid response"):
        Response(200, headers=(("X-Note", "split\r\nSet-Cookie: a=b"),))
    with pytest.raises(ValueError, match="set by the server"):
        Response(200, headers=(("Content-Length", "3"),))
    with pytest.raises(ValueError, match="200-599"):
        Response(101)


# --- bad requests -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bad_json_is_400_naming_the_problem() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            status, _, body = await plain_request(
                server,
                "POST",
                "/api/echo",
                b'{"amount_umel": 1,',
                {"Content-Type": "application/json"},
            )
            assert status == 400
            assert error_of(body).startswith("invalid JSON body: ")


@pytest.mark.anyio
async def test_body_over_the_limit_is_413() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            # Content-Length announces it: refused before the body is read, yet the client,
            # which sends the whole body before reading, still gets the answer.
            with pytest.raises(ControlApiError) as info:
                await api(server, "POST", "/api/echo", {"pad": "x" * MAX_BODY_BYTES})
            assert info.value.status == 413
            # Chunked: refused once the data passes the limit.
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                chunk = b"x" * 65536
                await stream.send(
                    b"POST /api/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + (b"10000\r\n" + chunk + b"\r\n")
                    * (MAX_BODY_BYTES // len(chunk) + 1)
                )
                assert (await receive_until_closed(stream)).startswith(b"HTTP/1.1 413 ")
            assert (await api(server, "GET", "/api/status"))["ok"] is True


@pytest.mark.anyio
async def test_garbage_gets_400_and_a_closed_connection_and_the_server_lives_on() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            for garbage in [
                b"\x00\x01\xff garbage\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
            ]:
                stream = await anyio.connect_tcp(HOST, server.port)
                async with stream:
                    await stream.send(garbage)
                    answer = await receive_until_closed(stream)
                assert answer.startswith(b"HTTP/1.1 400 ")
                assert b'{"error":"bad HTTP: ' in answer
            assert (await api(server, "GET", "/api/status"))["ok"] is True


@pytest.mark.anyio
async def test_oversized_request_head_is_431() -> None:
    with anyio.fail_after(10):
        async with serving(max_header_bytes=4096) as server:
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                await stream.send(
                    b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
                    + b"x" * 8192
                    + b"\r\n\r\n"
                )
                assert (await receive_until_closed(stream)).startswith(b"HTTP/1.1 431 ")


@pytest.mark.anyio
async def test_a_client_that_stalls_mid_request_is_disconnected() -> None:
    with anyio.fail_after(5):
        async with serving(read_timeout_secs=0.3) as server:
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                await stream.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                started = anyio.current_time()
                assert await receive_until_closed(stream) == b""
                assert anyio.current_time() - started < 2


# --- the security policy ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:8964", True),
        ("LocalHost:8964", True),
        ("[::1]:8964", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("evil.example", False),
        ("evil.example:8964", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io:8964", False),
        ("192.168.1.10:8964", False),
        ("::1", False),  # an IPv6 Host must be bracketed
        ("127.0.0.1:8964, evil.example", False),
        ("", False),
    ],
)
async def test_only_loopback_host_headers_are_served(host: str, allowed: bool) -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            status, _, body = await plain_request(
                server, "GET", "/api/status", None, {"Host": host}
            )
    if allowed:
        assert status == 200
    else:
        assert status == 403
        assert error_of(body) == "the Host header must name a loopback address"


@pytest.mark.anyio
async def test_state_changing_requests_must_be_json() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            for content_type in [
                "application/x-www-form-urlencoded",
                "text/plain",
                "multipart/form-data; boundary=x",
                None,
            ]:
                headers = {} if content_type is None else {"Content-Type": content_type}
                status, _, body = await plain_request(server, "POST", "/api/echo", b"1", headers)
                assert status == 415, content_type
                assert "application/json" in error_of(body)
            json_utf8 = {"Content-Type": "Application/JSON; charset=utf-8"}
            status, _, body = await plain_request(server, "POST", "/api/echo", b"[1]", json_utf8)
            assert (status, msgspec.json.decode(body)) == (200, {"got": [1]})


# --- robustness ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_handler_exception_is_a_bare_500_logged_and_the_server_lives_on() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            with capture_logs() as logs:
                status, _, body = await plain_request(server, "GET", "/api/boom")
            assert status == 500
            assert msgspec.json.decode(body) == {"error": "internal error"}
            assert b"secret" not in body
            assert b"Traceback" not in body
            errors = [entry for entry in logs if entry["event"] == "control_handler_error"]
            assert len(errors) == 1
            assert errors[0]["path"] == "/api/boom"
            assert (await api(server, "GET", "/api/status"))["ok"] is True


@pytest.mark.anyio
async def test_keep_alive_serves_sequential_and_pipelined_requests_on_one_connection() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                client = h11.Connection(h11.CLIENT)
                for n in range(2):
                    await stream.send(client.send(h11_request("GET", f"/api/status?n={n}")))
                    await stream.send(client.send(h11.EndOfMessage()))
                    response, body = await receive_response(stream, client)
                    assert response.status_code == 200
                    assert msgspec.json.decode(body)["query"] == {"n": str(n)}
                    client.start_next_cycle()

                # Two requests in one write; the second waits in the server's buffer.
                request = b"GET /api/status?n=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                await stream.send(request % 2 + request % 3)
                for n in (2, 3):
                    client.send(h11_request("GET", f"/api/status?n={n}"))  # already sent
                    client.send(h11.EndOfMessage())
                    response, body = await receive_response(stream, client)
                    assert msgspec.json.decode(body)["query"] == {"n": str(n)}
                    client.start_next_cycle()


@pytest.mark.anyio
async def test_head_gets_a_bodiless_405_and_the_connection_stays_usable() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                client = h11.Connection(h11.CLIENT)
                await stream.send(client.send(h11_request("HEAD", "/api/status")))
                await stream.send(client.send(h11.EndOfMessage()))
                response, body = await receive_response(stream, client)
                assert (response.status_code, body) == (405, b"")
                assert (b"allow", b"GET") in response.headers
                client.start_next_cycle()
                await stream.send(client.send(h11_request("GET", "/api/status")))
                await stream.send(client.send(h11.EndOfMessage()))
                response, _ = await receive_response(stream, client)
                assert response.status_code == 200


@pytest.mark.anyio
async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            stream = await anyio.connect_tcp(HOST, server.port)
            async with stream:
                client = h11.Connection(h11.CLIENT)
                headers = [
                    ("Host", HOST),
                    ("Content-Type", "application/json"),
                    ("Content-Length", "3"),
                    ("Expect", "100-continue"),
                ]
                await stream.send(client.send(h11_request("POST", "/api/echo", headers)))
                client.receive_data(await stream.receive())
                event = client.next_event()
                assert isinstance(event, h11.InformationalResponse)
                assert event.status_code == 100
                await stream.send(client.send(h11.Data(data=b"[7]")))
                await stream.send(client.send(h11.EndOfMessage()))
                response, body = await receive_response(stream, client)
                assert (response.status_code, msgspec.json.decode(body)) == (200, {"got": [7]})


# --- the client ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_call_api_against_a_closed_port_says_the_node_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    with anyio.fail_after(10), pytest.raises(ControlApiError) as info:
        await anyio.to_thread.run_sync(partial(call_api, HOST, port, "GET", "/api/status"))
    assert info.value.status == 0
    assert info.value.message.startswith(f"cannot reach the node's control API at {HOST}:{port}: ")
    assert "refused" in info.value.message.lower()
