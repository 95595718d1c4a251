"""The control API's HTTP server on real loopback sockets: JSON in and out, routing, limits,
authentication (token, one-time login codes, sessions), the loopback-only and JSON-only
rules, and survival of bad clients and buggy handlers."""

from __future__ import annotations

import http.client
import socket
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import msgspec
import pytest
from anyio.abc import SocketAttribute, SocketStream
from structlog.testing import capture_logs

from earendil_py.core.errors import ConfigError, LocalProtocolError
from earendil_py.runtime.http import (
    LOGIN_CODE_SECS,
    MAX_BODY_BYTES,
    MAX_LOGIN_CODES,
    MAX_SESSIONS,
    ControlApiError,
    ControlAuth,
    HttpError,
    HttpServer,
    Request,
    Response,
    Router,
    json_response,
    read_token_file,
    request_api,
    write_token_file,
)

HOST = "127.0.0.1"
TOKEN = "5e" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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

    @router.route("GET", "/login", public=True)
    async def login(request: Request) -> Response:
        return json_response({"public": True})

    @router.route("GET", "/api/boom")
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals")

    return router


@asynccontextmanager
async def serving(auth: ControlAuth | None = None, **kwargs: Any) -> AsyncIterator[HttpServer]:
    server = HttpServer(make_router(), auth or ControlAuth(TOKEN), HOST, 0, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def api(
    server: HttpServer, method: str, path: str, body: object = None, token: str = TOKEN
) -> Any:
    return await anyio.to_thread.run_sync(
        partial(request_api, HOST, server.port, method, path, body, token=token, timeout=5)
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
    """A request with exactly these headers (plus http.client's Host, unless given): give
    AUTH among them to authenticate."""
    return await anyio.to_thread.run_sync(
        partial(_plain_request, server.port, method, path, body, headers or {})
    )


def h11_request(
    method: str, path: str, headers: list[tuple[str, str]] | None = None
) -> h11.Request:
    default = [("Host", HOST), *AUTH.items()]
    return h11.Request(method=method, target=path, headers=headers or default)


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

            status, headers, body = await plain_request(server, "DELETE", "/api/status", None, AUTH)
            assert status == 405
            assert headers["Allow"] == "GET"
            assert "DELETE" in error_of(body)
            # A CORS preflight is never approved: no route, no Access-Control-* headers.
            status, headers, _ = await plain_request(server, "OPTIONS", "/api/echo", None, AUTH)
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
                {"Content-Type": "application/json", **AUTH},
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
                server, "GET", "/api/status", None, {"Host": host, **AUTH}
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
                headers = (
                    dict(AUTH) if content_type is None else {"Content-Type": content_type, **AUTH}
                )
                status, _, body = await plain_request(server, "POST", "/api/echo", b"1", headers)
                assert status == 415, content_type
                assert "application/json" in error_of(body)
            json_utf8 = {"Content-Type": "Application/JSON; charset=utf-8", **AUTH}
            status, _, body = await plain_request(server, "POST", "/api/echo", b"[1]", json_utf8)
            assert (status, msgspec.json.decode(body)) == (200, {"got": [1]})


# --- robustness ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_handler_exception_is_a_bare_500_logged_and_the_server_lives_on() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            with capture_logs() as logs:
                status, _, body = await plain_request(server, "GET", "/api/boom", None, AUTH)
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
                request = (
                    b"GET /api/status?n=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
                )
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
                    *AUTH.items(),
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
        await anyio.to_thread.run_sync(
            partial(request_api, HOST, port, "GET", "/api/status", token=TOKEN)
        )
    assert info.value.status == 0
    assert info.value.message.startswith(f"cannot reach the node's control API at {HOST}:{port}: ")
    assert "refused" in info.value.message.lower()


# --- authentication -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_without_the_right_token_get_401_whatever_the_path() -> None:
    with anyio.fail_after(10):
        async with serving() as server:
            for method, path in [
                ("GET", "/api/status"),
                ("POST", "/api/echo"),
                ("GET", "/api/nothing-here"),  # no hint of which paths exist
                ("DELETE", "/api/status"),
                ("GET", "/api/boom"),  # the handler never runs
            ]:
                for headers in [
                    {},
                    {"Authorization": "Bearer " + "00" * 32},
                    {"Authorization": "Bearer " + TOKEN[:-1]},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer \u00ff"},
                    {"Cookie": f"earendil_session={TOKEN}"},
                ]:
                    headers["Content-Type"] = "application/json"
                    status, answer, body = await plain_request(server, method, path, b"{}", headers)
                    assert status == 401, (method, path, headers)
                    assert answer["WWW-Authenticate"].startswith('Bearer realm="earendil"')
                    assert "token" in error_of(body) or "dashboard" in error_of(body)
            with pytest.raises(ControlApiError) as info:
                await api(server, "GET", "/api/status", token="ab" * 32)
            assert info.value.status == 401
            assert info.value.message.startswith("wrong control token")
            assert (await api(server, "GET", "/api/status"))["ok"] is True
            # A public route needs nothing.
            status, _, body = await plain_request(server, "GET", "/login")
            assert (status, msgspec.json.decode(body)) == (200, {"public": True})


class SeenFrom(anyio.abc.ByteStream):
    """A loopback connection that claims to come from `address`, as one from another host
    would: the server must decide by the peer address, whatever the Host header says."""

    def __init__(self, stream: SocketStream, address: str) -> None:
        self.stream = stream
        self.address = address

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.stream.send(item)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {SocketAttribute.remote_address: lambda: (self.address, 40_000)}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("peer", "allow_remote", "host", "status"),
    [
        ("203.0.113.9", False, "127.0.0.1", 403),  # a remote client claiming to be local
        ("203.0.113.9", False, "localhost", 403),
        ("2001:db8::9", False, "[::1]", 403),
        ("::ffff:127.0.0.1", False, "127.0.0.1", 200),  # a dual-stack socket's 127.0.0.1
        ("::1", False, "[::1]:8964", 200),
        ("127.0.0.9", False, "127.0.0.1", 200),
        ("203.0.113.9", True, "198.51.100.7:8964", 200),  # opted in: any IP literal
        ("203.0.113.9", True, "evil.example", 403),  # but still no rebindable name
    ],
)
async def test_only_loopback_peers_are_served_unless_remote_clients_are_allowed(
    peer: str, allow_remote: bool, host: str, status: int
) -> None:
    server = HttpServer(make_router(), ControlAuth(TOKEN), allow_remote=allow_remote)
    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host=HOST)
        port = listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(
                listener.serve, lambda stream: server.serve_connection(SeenFrom(stream, peer))
            )
            got, _, body = await anyio.to_thread.run_sync(
                partial(_plain_request, port, "GET", "/api/status", None, {"Host": host, **AUTH})
            )
            tg.cancel_scope.cancel()
    assert got == status, error_of(body)


@pytest.mark.anyio
async def test_a_login_code_opens_one_session_once() -> None:
    now = [1000.0]
    auth = ControlAuth(TOKEN, clock=lambda: now[0])
    assert auth.redeem_login_code("") is None
    assert auth.redeem_login_code("made-up") is None
    code = auth.mint_login_code()
    session = auth.redeem_login_code(code)
    assert session is not None
    assert auth.redeem_login_code(code) is None  # spent
    cookie = auth.session_cookie(session)
    assert cookie.startswith(f"{auth.cookie_name}={session};")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert TOKEN not in cookie and TOKEN not in auth.cookie_name

    late = auth.mint_login_code()
    now[0] += LOGIN_CODE_SECS
    assert auth.redeem_login_code(late) is None  # expired
    codes = [auth.mint_login_code() for _ in range(MAX_LOGIN_CODES + 1)]
    assert auth.redeem_login_code(codes[0]) is None  # the oldest made way
    assert auth.redeem_login_code(codes[-1]) is not None

    sessions = [auth.redeem_login_code(auth.mint_login_code()) for _ in range(MAX_SESSIONS)]
    assert not auth.session_ok(f"{auth.cookie_name}={session}")  # the least recent went
    assert auth.session_ok(f"other=1; {auth.cookie_name}={sessions[-1]}")
    assert not auth.session_ok(f"earendil_session_other={sessions[-1]}")  # another node's


@pytest.mark.anyio
async def test_a_session_cookie_reads_but_changes_state_only_from_the_dashboard() -> None:
    auth = ControlAuth(TOKEN)
    session = auth.redeem_login_code(auth.mint_login_code())
    with anyio.fail_after(10):
        async with serving(auth) as server:
            origin = f"http://{HOST}:{server.port}"
            cookie = {"Host": f"{HOST}:{server.port}", "Cookie": f"{auth.cookie_name}={session}"}
            status, _, _ = await plain_request(server, "GET", "/api/status", None, cookie)
            assert status == 200
            json = {**cookie, "Content-Type": "application/json"}
            dashboard = {**json, "X-Earendil-Dashboard": "1"}
            for headers, expected in [
                (json, 403),  # a form or fetch from another origin cannot add the header
                ({**dashboard, "Origin": "http://127.0.0.1:1"}, 403),
                ({**dashboard, "Origin": "null"}, 403),
                ({**dashboard, "Sec-Fetch-Site": "same-site"}, 403),  # another port
                ({**dashboard, "Sec-Fetch-Site": "cross-site"}, 403),
                (dashboard, 200),
                ({**dashboard, "Origin": origin, "Sec-Fetch-Site": "same-origin"}, 200),
                ({**json, **AUTH}, 200),  # the token needs neither
            ]:
                status, _, body = await plain_request(server, "POST", "/api/echo", b"[]", headers)
                assert status == expected, (headers, body)
            for extra, expected in [
                ({"Origin": "http://127.0.0.1:1"}, 403),
                ({"Sec-Fetch-Site": "cross-site", "X-Path": "/login"}, 200),
                ({"Sec-Fetch-Site": "same-site"}, 403),  # an <img> on another port's page
                ({"Sec-Fetch-Site": "none"}, 200),  # the operator opening the URL
            ]:
                path = extra.pop("X-Path", "/api/status")
                status, _, _ = await plain_request(server, "GET", path, None, {**cookie, **extra})
                assert status == expected, extra


def test_the_token_file_is_private_replaced_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    first, second = ControlAuth.generate().token, ControlAuth.generate().token
    assert first != second and len(first) == 64
    write_token_file(path, first)
    inode = path.stat().st_ino
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == first
    path.chmod(0o644)
    write_token_file(path, second)
    assert path.stat().st_ino != inode  # a new file renamed into place, never half written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.token"]


def test_a_missing_or_damaged_token_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    with pytest.raises(ControlApiError) as info:
        read_token_file(path)
    assert info.value.status == 0
    assert str(path) in info.value.message
    assert "is the daemon running?" in info.value.message
    assert "node's user" in info.value.message
    assert "\n" not in info.value.message
    path.write_text("not a token\r\nX-Injected: 1\n")
    with pytest.raises(ControlApiError, match="not a control token"):
        read_token_file(path)
    with pytest.raises(ConfigError, match="cannot write the control token"):
        write_token_file(tmp_path / "missing-directory" / "control.token", "ab" * 32)
