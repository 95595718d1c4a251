"""A small HTTP/1.1 JSON server for the control API and dashboard, and the CLI's client.

The server is h11 (sans-IO HTTP) driven by anyio: no web framework. Handlers are
``async def handler(request: Request) -> Response`` registered on a `Router`; they raise
`HttpError` for answers like 404 or 409, which are rendered as ``{"error": message}``.

Limits, so that no input can take the server down or pin it: request bodies are capped
(413), request heads are capped through h11's ``max_incomplete_event_size`` (431), each
request must arrive within a read timeout and each response must be taken within the same
time (else the connection is closed), malformed HTTP gets a 400 and the connection is closed,
and a handler that raises anything but `HttpError` is logged as ``control_handler_error`` and
answered with a bare 500, never with a traceback.

Security. This API moves money, so every request but the dashboard's login link must be
authenticated (`ControlAuth`), in the style of Tor's cookie authentication:

* The token: at each start the node writes a fresh random token to ``control.token`` beside
  its ledger, mode 0600, so only the node's own user (and root) can read it. A client sends it
  as ``Authorization: Bearer <token>`` (compared in constant time). `call_api` reads the file
  itself, so the CLI needs nothing but the config.
* The dashboard: a browser cannot read that file, so `ControlAuth.mint_login_code` (behind
  the authenticated ``POST /api/dashboard-link``) makes a one-time code that expires after
  LOGIN_CODE_SECS. ``GET /login?code=...`` spends it and sets a session cookie (HttpOnly, so
  no script can read it; SameSite=Strict; its name is unique per node run, so the dashboards
  of several nodes on one host do not log each other out).

Anything else gets 401 with ``WWW-Authenticate: Bearer``, whatever the path, so an unknown
client does not even learn which paths exist. The browser attacks that reach loopback anyway
are closed as well:

* A remote client: unless the operator opted in (``control_allow_remote``), a connection
  from a non-loopback address is refused with 403 whatever its Host header says.
* DNS rebinding: a page on ``evil.example`` re-points its own name at 127.0.0.1, and the
  browser then lets it read our responses, since to the browser they are same-origin. The
  browser still sends ``Host: evil.example``, so any request whose Host is not a loopback name
  (``localhost``, or a loopback IP literal such as 127.0.0.1 or [::1], with any port) is
  refused with 403. An IP literal cannot be rebound, so it is always safe to accept (with
  ``control_allow_remote``, any IP literal is).
* Cross-site request forgery: another origin on this host (another loopback port is
  same-site, so SameSite=Strict does not stop it) may make the browser send a "simple" POST
  (form or ``text/plain`` body) with our cookie. A cross-origin request with
  ``Content-Type: application/json`` or a custom header instead needs a CORS preflight, which
  this server never approves (it sends no CORS headers, and OPTIONS is not routed). So POST,
  PUT, PATCH and DELETE must carry ``Content-Type: application/json`` or get 415; when a
  session cookie authenticates them they must also carry ``X-Earendil-Dashboard: 1``, and a
  cookie-authenticated request that the browser says comes from another page
  (``Sec-Fetch-Site`` other than same-origin or none, or an ``Origin`` not this server's)
  gets 403. GET handlers never change state either.

Every response also carries ``X-Frame-Options: DENY`` (no clickjacking of the dashboard),
``X-Content-Type-Options: nosniff`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import h11
import msgspec
import structlog
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from earendil_py.core.errors import ConfigError, EarendilError, LocalProtocolError
from earendil_py.runtime.keyfile import PRIVATE_MODE, read_file

if TYPE_CHECKING:
    from earendil_py.runtime.config import Config

log = structlog.get_logger("earendil_py.http")

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT_SECS = 10.0
# After answering a request we will not read (413, malformed), keep reading and discarding
# for a moment before closing: closing a socket with unread input makes the kernel send RST,
# and the client may then lose our response before it reads it.
LINGER_SECS = 1.0
RECEIVE_SIZE = 65536
# The control token: 32 random bytes as hex, in this file beside the ledger.
TOKEN_FILE = "control.token"  # noqa: S105 (a file name, not a secret)
TOKEN_BYTES = 32
# A dashboard login code is good for one use within this time; a few may be outstanding.
LOGIN_CODE_SECS = 300.0
MAX_LOGIN_CODES = 16
# Browser sessions live as long as the node runs; beyond this many the oldest unused goes.
MAX_SESSIONS = 32
DASHBOARD_HEADER = "x-earendil-dashboard"

T = TypeVar("T")

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Headers the server derives from the Response fields; a handler may not set them directly.
_RESERVED_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding"})
_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
)
# RFC 9110 Host = uri-host [ ":" port ]; an IPv6 literal is bracketed.
_HOST_RE = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]*)?")


class HttpError(EarendilError):
    """Raise from a handler to answer ``{"error": message}`` with `status` (4xx or 5xx)."""

    def __init__(
        self, status: int, message: str, *, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)

    def to_response(self) -> Response:
        return json_response({"error": self.message}, status=self.status, headers=self.headers)


class ControlApiError(EarendilError):
    """`call_api` failed: `status` is the HTTP status, or 0 if the node could not be reached.

    `message` is the server's own error text when it sent one, ready to show to the operator.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ControlAuth:
    """Who may use the control API: holders of the token, and browsers holding a session
    that a one-time login code opened (see the module docstring).

    Codes and sessions are kept as SHA-256 digests: a lookup then leaks by its timing at most
    something about a digest, never about a secret. Both are bounded in number. `clock` is
    monotonic seconds (a parameter so that expiry can be tested without waiting).
    """

    def __init__(self, token: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token
        self._clock = clock
        self.cookie_name = "earendil_session_" + _digest(token).hex()[:12]
        self._codes: OrderedDict[bytes, float] = OrderedDict()  # digest -> deadline
        self._sessions: OrderedDict[bytes, None] = OrderedDict()  # digest, least recent first

    @classmethod
    def generate(cls) -> ControlAuth:
        return cls(secrets.token_hex(TOKEN_BYTES))

    def bearer_ok(self, authorization: str) -> bool:
        """Whether an Authorization header value carries our token."""
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = credentials.strip().encode("latin-1")
        return hmac.compare_digest(given, self.token.encode("ascii"))

    def session_ok(self, cookie: str) -> bool:
        """Whether a Cookie header value holds one of our sessions (and mark it used)."""
        for pair in re.split(r"[;,]", cookie):
            name, _, value = pair.strip().partition("=")
            key = _digest(value)
            if name == self.cookie_name and key in self._sessions:
                self._sessions.move_to_end(key)
                return True
        return False

    def mint_login_code(self) -> str:
        """A new one-time login code, good for LOGIN_CODE_SECS (the oldest outstanding code
        is dropped beyond MAX_LOGIN_CODES)."""
        now = self._clock()
        for key, deadline in list(self._codes.items()):
            if deadline <= now:
                del self._codes[key]
        while len(self._codes) >= MAX_LOGIN_CODES:
            self._codes.popitem(last=False)
        code = secrets.token_urlsafe(TOKEN_BYTES)
        self._codes[_digest(code)] = now + LOGIN_CODE_SECS
        return code

    def redeem_login_code(self, code: str) -> str | None:
        """Spend `code`: a new session id, or None if the code is unknown, spent or expired."""
        deadline = self._codes.pop(_digest(code), None)
        if deadline is None or deadline <= self._clock():
            return None
        session = secrets.token_urlsafe(TOKEN_BYTES)
        self._sessions[_digest(session)] = None
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def session_cookie(self, session: str) -> str:
        """The Set-Cookie value for `session`: a browser-session cookie that no script can
        read and that no other site's request carries."""
        return f"{self.cookie_name}={session}; HttpOnly; SameSite=Strict; Path=/"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def token_path(config: Config) -> Path:
    """Where the node writes its control token: beside its ledger."""
    return config.db_path.parent / TOKEN_FILE


def write_token_file(path: Path, token: str) -> None:
    """Replace `path` with a 0600 file holding `token`. Written under a temporary name and
    renamed into place, so a client never reads half a token. Raises ConfigError naming
    `path` if it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):  # a crashed process with our pid left it
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        with open(fd, "w", encoding="ascii") as file:  # closes fd, whatever happens
            file.write(token + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot write the control token: {exc.strerror}") from None


def read_token_file(path: Path) -> str:
    """The token in `path`. Raises ControlApiError (status 0) with one line for the operator
    if it cannot be read."""
    try:
        data = read_file(path, "control token", max_bytes=4 * TOKEN_BYTES, private=False)
    except ConfigError as exc:
        raise ControlApiError(
            0,
            f"{exc}: is the daemon running? It writes this file at each start; "
            "run this command as the node's user",
        ) from None
    token = data.decode("ascii", "replace").strip()
    if not re.fullmatch(f"[0-9a-f]{{{2 * TOKEN_BYTES}}}", token):
        raise ControlApiError(0, f"{path}: not a control token (the node rewrites it at start)")
    return token


@dataclass(frozen=True, slots=True)
class Request:
    """One request, read in full. `path` is still percent-encoded; `params` (the values of
    ``{name}`` segments of the matched route) and `query` are decoded. Header names are
    lower-case; a repeated header's values are joined with ", "."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    @overload
    def json(self) -> Any: ...

    @overload
    def json(self, type: type[T]) -> T: ...

    def json(self, type: Any = None) -> Any:
        """Decode the body as JSON, into `type` if given (e.g. a msgspec Struct, whose
        constraints are then checked). Raises HttpError(400) naming what is wrong."""
        try:
            if type is None:
                return _DECODER.decode(self.body)
            return msgspec.json.decode(self.body, type=type)
        except msgspec.DecodeError as exc:  # ValidationError is a subclass
            raise HttpError(400, f"invalid JSON body: {exc}") from None


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response. Raises ValueError at construction if it could not be sent: a
    status outside 200-599, a body on 204/304, a malformed header, or a header in `headers`
    that the server sets itself (Content-Type, Content-Length, Transfer-Encoding)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"response status must be 200-599, not {self.status}")
        if self.status in (204, 304) and self.body:
            raise ValueError(f"a {self.status} response cannot have a body")
        for name, _ in self.headers:
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"the {name} header is set by the server")
        try:  # h11 checks header syntax when the event is built; fail here, not mid-send
            self.to_h11()
        except h11.LocalProtocolError as exc:
            raise ValueError(f"invalid response: {exc}") from None

    def to_h11(self, *, close: bool = False) -> h11.Response:
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            *_SECURITY_HEADERS,
            *self.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = ""
        return h11.Response(status_code=self.status, headers=headers, reason=reason)


def json_response(
    obj: object, status: int = 200, *, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """Encode `obj` with msgspec. Raises TypeError if it is not JSON-encodable."""
    return Response(status, _ENCODER.encode(obj), "application/json", tuple(headers))


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def html_response(
    html: str, status: int = 200, *, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    return Response(status, html.encode(), "text/html; charset=utf-8", tuple(headers))


_INTERNAL_ERROR = HttpError(500, "internal error").to_response()

Handler = Callable[[Request], Awaitable[Response]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: str
    # Each segment is (is_param, text): a literal to compare, or a parameter name.
    segments: tuple[tuple[bool, str], ...]
    handler: Handler
    public: bool  # served without authentication

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for (is_param, text), part in zip(self.segments, parts, strict=True):
            if is_param:
                if not part:
                    return None
                params[text] = part
            elif part != text:
                return None
        return params


class Router:
    """Maps (method, path pattern) to handlers. A pattern is a path whose segments may be
    ``{name}`` parameters, each matching one non-empty segment. The first registered route
    that matches wins, so register literal paths before parameterised ones that overlap.
    Every route needs authentication unless registered `public`."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def routes(self) -> list[tuple[str, str]]:
        """Every registered (method, pattern), in registration order."""
        return [(route.method, route.pattern) for route in self._routes]

    def add(self, method: str, path: str, handler: Handler, *, public: bool = False) -> None:
        """Raises LocalProtocolError if `path` is not a valid pattern or the same method and
        pattern are already registered."""
        method = method.upper()
        if not path.startswith("/"):
            raise LocalProtocolError(f"route pattern must start with '/': {path!r}")
        segments: list[tuple[bool, str]] = []
        for text in path.split("/")[1:]:
            if text.startswith("{") and text.endswith("}"):
                name = text[1:-1]
                if not name.isidentifier():
                    raise LocalProtocolError(f"bad parameter {text!r} in route {path!r}")
                if (True, name) in segments:
                    raise LocalProtocolError(f"parameter {text!r} repeated in route {path!r}")
                segments.append((True, name))
            elif "{" in text or "}" in text:
                raise LocalProtocolError(f"bad segment {text!r} in route {path!r}")
            else:
                segments.append((False, text))
        shape = [None if is_param else text for is_param, text in segments]
        for route in self._routes:
            if (
                route.method == method
                and [None if is_param else text for is_param, text in route.segments] == shape
            ):
                raise LocalProtocolError(f"{method} {path} clashes with {route.pattern}")
        self._routes.append(_Route(method, path, tuple(segments), handler, public))

    def route(self, method: str, path: str, *, public: bool = False) -> Callable[[H], H]:
        """Decorator form of `add`."""

        def register(handler: H) -> H:
            self.add(method, path, handler, public=public)
            return handler

        return register

    def match(self, method: str, path: str) -> tuple[_Route, dict[str, str]]:
        """Find the route for a percent-encoded `path`; parameters come back decoded.

        Raises HttpError: 400 if a segment is not valid UTF-8 once decoded, 404 if no route
        has this path, 405 (with an Allow header) if routes have it but not for `method`.
        """
        try:
            parts = [unquote(part, errors="strict") for part in path.split("/")[1:]]
        except UnicodeDecodeError:
            raise HttpError(400, "request path is not valid UTF-8") from None
        allowed: set[str] = set()
        for route in self._routes:
            params = route.match(parts)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.add(route.method)
        if not allowed:
            raise HttpError(404, "not found")
        raise HttpError(
            405,
            f"method {method} not allowed here",
            headers=[("Allow", ", ".join(sorted(allowed)))],
        )


class HttpServer:
    """Serves a `Router` over HTTP/1.1 with keep-alive on ``host:port`` (port 0: any free
    port; read `port` once `serve` has started), to the clients `auth` admits. Clients that
    are not on loopback are refused unless `allow_remote`."""

    def __init__(
        self,
        router: Router,
        auth: ControlAuth,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        read_timeout_secs: float = READ_TIMEOUT_SECS,
    ) -> None:
        self.router = router
        self.auth = auth
        self.allow_remote = allow_remote
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.read_timeout_secs = read_timeout_secs
        self._requested_port = port
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port. Raises LocalProtocolError before `serve` has bound."""
        if self._port is None:
            raise LocalProtocolError("HttpServer.port read before serve() bound a socket")
        return self._port

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, signal `task_status`, and serve until cancelled.

        Raises OSError (before signalling) if the address cannot be bound. Nothing a client
        sends makes it raise.
        """
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self._requested_port
        )
        async with listener:
            self._port = listener.listeners[0].extra(SocketAttribute.local_port)
            log.info("control_api_listening", host=self.host, port=self._port)
            task_status.started()
            await listener.serve(self.serve_connection)

    async def serve_connection(self, stream: ByteStream) -> None:
        """Serve requests on one connection until either side closes it, then close it.

        Never raises for anything the peer does (bad HTTP, timeouts, disconnects)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        # A stream without a peer address (not a socket) counts as remote: refused by default.
        peer = stream.extra(SocketAttribute.remote_address, None)
        local = isinstance(peer, tuple) and _is_loopback_ip(str(peer[0]))
        async with stream:
            # The peer went away mid-exchange: there is no one left to answer. OSError
            # includes the TimeoutError of a response the peer would not take.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._serve_requests(conn, stream, local)

    async def _serve_requests(self, conn: h11.Connection, stream: ByteStream, local: bool) -> None:
        while True:
            try:
                with anyio.fail_after(self.read_timeout_secs):
                    received = await self._receive_request(conn, stream)
            except TimeoutError:
                return  # idle keep-alive or a slow (perhaps slowloris) client
            except h11.RemoteProtocolError as exc:
                await self._reject(
                    conn, stream, HttpError(exc.error_status_hint, f"bad HTTP: {exc}")
                )
                return
            except HttpError as exc:  # the head or body is too large: we stop reading
                await self._reject(conn, stream, exc)
                return
            if received is None:
                return
            event, body = received
            response = await self._respond(event, body, local)
            await self._send(conn, stream, response, head=event.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                # HTTP/1.0 or "Connection: close": the peer has what it asked for.
                await _linger(stream)
                return
            conn.start_next_cycle()

    async def _receive_request(
        self, conn: h11.Connection, stream: ByteStream
    ) -> tuple[h11.Request, bytes] | None:
        """Read one request; None if the peer closed cleanly between requests.

        Raises h11.RemoteProtocolError on malformed HTTP, HttpError(431) on a head over the
        limit and HttpError(413) on a body over the limit (as soon as Content-Length says
        so, else once the data passes it)."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                    )
                try:
                    data = await stream.receive(RECEIVE_SIZE)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                # h11 caps only a head that arrives in pieces; one that came whole is
                # measured here.
                head_size = len(event.target) + sum(len(n) + len(v) for n, v in event.headers)
                if head_size > self.max_header_bytes:
                    raise HttpError(
                        431, f"request head is larger than {self.max_header_bytes} bytes"
                    )
                for name, value in event.headers:  # h11 has checked these are digits
                    if name == b"content-length" and int(value) > self.max_body_bytes:
                        raise _too_large(self.max_body_bytes)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # PAUSED only follows a complete request, and we return at EndOfMessage
                raise LocalProtocolError(f"unexpected h11 event while reading: {event!r}")

    async def _respond(self, event: h11.Request, body: bytes, local: bool) -> Response:
        try:
            request, handler = self._admit(event, body, local)
        except HttpError as exc:
            return exc.to_response()
        try:
            response = await handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
        except HttpError as exc:
            return exc.to_response()
        except Exception:  # a handler bug must cost one request, not the server
            log.exception("control_handler_error", method=request.method, path=request.path)
            return _INTERNAL_ERROR
        return response

    def _admit(self, event: h11.Request, body: bytes, local: bool) -> tuple[Request, Handler]:
        """Apply the security policy, parse the target and route. Raises HttpError."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        # Checked first: a remote or rebound client learns nothing, not even which paths exist.
        if not (local or self.allow_remote):
            raise HttpError(403, "the control API serves loopback clients only")
        host = headers.get("host", "")
        if not _is_trusted_host(host, any_ip=self.allow_remote):
            raise HttpError(403, "the Host header must name a loopback address")
        method = event.method.decode("ascii")
        try:
            target = urlsplit(event.target.decode("ascii"))
            query_pairs = parse_qsl(target.query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "malformed request target") from None
        query = dict(query_pairs)
        if len(query) != len(query_pairs):
            raise HttpError(400, "a query parameter is repeated")  # ambiguous: refuse
        by_token = self.auth.bearer_ok(headers.get("authorization", ""))
        by_session = not by_token and self.auth.session_ok(headers.get("cookie", ""))
        try:
            route, params = self.router.match(method, target.path)
        except HttpError:
            if by_token or by_session:
                raise
            route = None
        if route is None or not (route.public or by_token or by_session):
            raise _unauthenticated(headers)
        if method in _STATE_CHANGING:
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                raise HttpError(415, f"{method} requests need Content-Type: application/json")
        if by_session and not route.public:
            # Where the browser says the request comes from (Fetch Metadata, then Origin):
            # only the dashboard page itself, or the operator opening a URL.
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site", "same-origin")
            if site not in ("same-origin", "none") or origin not in (None, f"http://{host}"):
                raise HttpError(403, "the dashboard's session serves the dashboard's own page only")
            if method in _STATE_CHANGING and headers.get(DASHBOARD_HEADER) != "1":
                raise HttpError(403, "a dashboard request must carry X-Earendil-Dashboard: 1")
        request = Request(method, target.path, query, headers, body, params)
        return request, route.handler

    async def _send(
        self,
        conn: h11.Connection,
        stream: ByteStream,
        response: Response,
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        data = conn.send(response.to_h11(close=close))
        if response.body and not head:  # h11 frames a HEAD response as empty
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        with anyio.fail_after(self.read_timeout_secs):  # a peer that never reads: TimeoutError
            await stream.send(data)

    async def _reject(self, conn: h11.Connection, stream: ByteStream, error: HttpError) -> None:
        """Answer an error we cannot read past, then close."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(conn, stream, error.to_response(), close=True)
            await _linger(stream)


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"request body is larger than {limit} bytes")


def _unauthenticated(headers: dict[str, str]) -> HttpError:
    challenge = [("WWW-Authenticate", 'Bearer realm="earendil"')]
    if headers.get("authorization"):
        message = "wrong control token (the node writes a new one at each start)"
        challenge = [("WWW-Authenticate", 'Bearer realm="earendil", error="invalid_token"')]
    elif headers.get("cookie"):
        message = "dashboard session expired: open a new link from `earendil-py dashboard`"
    else:
        message = (
            "authentication required: send the node's control token as Authorization: "
            "Bearer, or open the dashboard through the link `earendil-py dashboard` prints"
        )
    return HttpError(401, message, headers=challenge)


def _is_trusted_host(host: str, *, any_ip: bool) -> bool:
    """Whether a Host header is one a DNS rebinding cannot forge: ``localhost`` or a loopback
    IP literal (with `any_ip`, any IP literal), with any port."""
    match = _HOST_RE.fullmatch(host)
    if match is None:
        return False
    name = match["ipv6"] or match["name"]
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return any_ip or _is_loopback_ip(name)


def _is_loopback_ip(text: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (a dual-stack socket's view
    of 127.0.0.1)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


async def _linger(stream: ByteStream) -> None:
    with anyio.move_on_after(LINGER_SECS):
        try:
            await stream.send_eof()
            while True:
                await stream.receive(RECEIVE_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


def call_api(
    config: Config,
    method: str,
    path: str,
    body: object | None = None,
    *,
    timeout: float = 10.0,
) -> Any:
    """Call the control API of the node that `config` describes, with the token it wrote
    beside its ledger; as `request_api` otherwise. Raises ControlApiError (status 0) if the
    token file cannot be read."""
    host, port = config.control_listen
    token = read_token_file(token_path(config))
    return request_api(host, port, method, path, body, token=token, timeout=timeout)


def request_api(
    host: str,
    port: int,
    method: str,
    path: str,
    body: object | None = None,
    *,
    token: str,
    timeout: float = 10.0,
) -> Any:
    """Call the control API (blocking) with `token` and return the decoded JSON answer (None
    if empty).

    `body`, if given, is sent as JSON; the Content-Type is always JSON, as the server demands
    for state-changing methods. Raises ControlApiError: status 0 if the node cannot be
    reached (or does not answer within `timeout` seconds), else the HTTP status with the
    server's error message. Raises TypeError if `body` is not JSON-encodable.
    """
    payload = None if body is None else _ENCODER.encode(body)
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {token}",
    }
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or repr(exc)
        raise ControlApiError(
            0, f"cannot reach the node's control API at {host}:{port}: {reason}"
        ) from None
    finally:
        connection.close()
    try:
        decoded = _DECODER.decode(data) if data else None
    except msgspec.DecodeError:
        decoded = None
        if 200 <= response.status < 300:
            raise ControlApiError(response.status, "the control API sent malformed JSON") from None
    if 200 <= response.status < 300:
        return decoded
    message = f"HTTP {response.status} {response.reason}"
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        message = decoded["error"]
    raise ControlApiError(response.status, message)
