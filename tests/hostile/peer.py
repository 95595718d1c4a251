"""A hostile neighbour built from the project's own parts, and probes from strangers.

`HostilePeer` dials a daemon's in_route as any neighbour does: a real Noise handshake and
identity proof (`core.link.Link` with an `Identity` of its own) over a UDP socket or a TCP
connection (`frame_for_stream` / `StreamDecoder`). It prices the link like a node
(`core.accounting.Account`), answers the daemon's calls it has a handler for and answers
every other with "Method not found", and otherwise sends whatever it is told: raw CONTROL
payloads, crafted control messages, raw JSON-RPC payloads on GLOBAL_RPC_DOCK, gossip, onion
frames, a CLOSE with any text. Its link runs in a thread of its own, so a test can block on a
CLI command while the peer keeps answering the daemon.

The functions after it are what a stranger without the route cookie can do to a listening
port. Everything here is pointed at 127.0.0.1 only. Used by tests/hostile/ and
bench/hostile.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from earendil_py.core.accounting import Account, AccountState, Counters
from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.identity import Identity
from earendil_py.core.link import (
    HS_INIT,
    MAC_SIZE,
    U32,
    ControlReceived,
    Link,
    LinkClosed,
    LinkEstablished,
    LinkState,
    LinkTimers,
    StreamDecoder,
    _mac1,
    derive_cookie_keys,
    frame_for_stream,
    onion_frame,
)
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    ControlMessage,
    DockMessage,
    decode_control,
    encode_control,
)
from earendil_py.core.neighbor import SettlementQuery, unwire, wire
from earendil_py.core.pricing import AcceptanceRule, PriceAnswer, PriceOffer, PriceTerms
from earendil_py.core.rpc import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    STANDARD_MESSAGES,
    ErrorObject,
    Response,
    RpcError,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    is_request,
)
from earendil_py.runtime.gossip import unix_now

Address = tuple[str, int]
Handler = Callable[[Any], Any]

# Retransmission and keepalive for the peer's own link: the daemon under test sets its own.
PEER_TIMERS = LinkTimers(handshake_rto=0.2, keepalive_interval=1.0, dead_after=30.0)
RETRANSMIT_SECS = 0.5  # a call's request is sent again this often until answered
# Terms the peer offers and accepts: any price, so that the link gets priced.
PEER_TERMS = PriceTerms(1, 1_000_000, ("pow", "manual"))
ACCEPT_ANY = AcceptanceRule(2**62, 0, ("pow", "manual"))
_POLL_SECS = 0.05  # the reader thread looks at its stop flag at least this often


@dataclass(frozen=True, slots=True)
class Route:
    """What a neighbour knows of a daemon's in_route: its protocol, address and cookie."""

    protocol: str
    address: Address
    secret: str


@dataclass(slots=True)
class Calls:
    """What the peer received, for a test to look at."""

    requests: list[tuple[str, Any]] = field(default_factory=list)  # (method, params)
    responses: dict[object, Response] = field(default_factory=dict)  # by request id
    anonymous: list[Response] = field(default_factory=list)  # answers with a null id
    controls: list[ControlMessage] = field(default_factory=list)  # other than RPC
    undecodable: int = 0


class HostilePeer:
    """One link to a daemon, as a neighbour that proved its identity. See the module
    docstring. `connect()` first; `close()` (or the context manager) ends the thread."""

    def __init__(
        self,
        route: Route,
        expected: bytes,
        *,
        identity: Identity | None = None,
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        self.route = route
        self.expected = expected
        self.identity = identity or Identity.generate(os.urandom)
        self.fingerprint = self.identity.fingerprint
        self.handlers: dict[str, Handler] = {"push_price": self._answer_price, **(handlers or {})}
        self.silent: set[str] = set()  # methods whose calls get no answer at all
        self.calls = Calls()
        self.account: Account | None = None
        self.closed: LinkClosed | None = None
        self._cond = threading.Condition()  # guards the link and everything the thread writes
        self._link: Link | None = None
        self._sock: socket.socket | None = None
        self._decoder = StreamDecoder()
        self._writes: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------

    def connect(self, *, poison: str | None = None, timeout: float = 10.0) -> HostilePeer:
        """Handshake and prove our identity; AssertionError if the link is not up in time.

        `poison` first sends, on the same socket, an HS_INIT whose cookie MAC is valid but
        whose Noise body is not (`poisoned_hs_init`), as an attacker holding the cookie would;
        over TCP in the same write as the genuine HS_INIT, so both arrive together.
        """
        tcp = self.route.protocol == "tcp"
        if tcp:
            sock = socket.create_connection(self.route.address, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(self.route.address)
        sock.settimeout(None)
        self._sock = sock
        link = Link(
            initiator=True,
            identity=self.identity,
            static_private=os.urandom(32),
            secret=self.route.secret,
            local_index=int.from_bytes(os.urandom(4), "big"),
            now=time.monotonic(),
            rng=os.urandom,
            expected_fingerprint=self.expected,
            reliable=tcp,
            timers=PEER_TIMERS,
        )
        if tcp:
            self._threads.append(threading.Thread(target=self._write_loop, daemon=True))
        self._threads.append(threading.Thread(target=self._read_loop, daemon=True))
        with self._cond:
            self._link = link
            if poison is not None:
                first = [poisoned_hs_init(self.route.secret, poison), *link.datagrams_to_send()]
                if tcp:
                    self._writes.put(b"".join(map(frame_for_stream, first)))
                else:
                    for message in first:
                        self._send_now(message)
            self._flush()
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while link.state is not LinkState.ESTABLISHED and self.closed is None:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no link to {self.route} within {timeout} s"
                self._cond.wait(remaining)
            assert self.closed is None, f"link refused: {self.closed}"
        return self

    def close(self, reason: str = "bye") -> None:
        """Send CLOSE with `reason` (any text: it goes on the wire as UTF-8) and stop."""
        with self._cond:
            if self._link is not None and self._link.state is not LinkState.CLOSED:
                self._link.close(reason, time.monotonic())
                self._flush()
        self.stop()

    def stop(self) -> None:
        """Stop the threads and close the socket without telling the daemon."""
        with self._cond:
            self._stopping = True
        self._writes.put(None)
        for thread in self._threads:
            thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> HostilePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def up(self) -> bool:
        with self._cond:
            return self._link is not None and self._link.state is LinkState.ESTABLISHED

    # --- sending -------------------------------------------------------------------------

    def send_control(self, payload: bytes) -> None:
        """One CONTROL frame with any payload."""
        with self._cond:
            self._live().send_control(payload)
            self._flush()

    def send_message(self, message: ControlMessage) -> None:
        self.send_control(encode_control(message))

    def send_rpc(self, payload: bytes) -> None:
        """Any bytes as a JSON-RPC payload on the global RPC dock."""
        self.send_message(DockMessage(GLOBAL_RPC_DOCK, payload))

    def send_onions(self, frames: list[tuple[bytes, bytes]]) -> None:
        """(next_peeler, packet) onion frames, any bytes."""
        with self._cond:
            messages = self._live().encrypt_onions([onion_frame(*frame) for frame in frames])
            for message in messages:
                self._send_now(message)

    def call(self, method: str, params: Any = None, *, timeout: float = 5.0) -> Response:
        """Call `method` on the daemon and return its answer (result or error)."""
        request_id = os.urandom(16).hex()
        return self.call_raw(encode_request(request_id, method, params), request_id, timeout)

    def call_raw(self, payload: bytes, request_id: object, timeout: float = 5.0) -> Response:
        """Send a JSON-RPC payload until the answer to `request_id` comes (AssertionError
        after `timeout`); the daemon runs it once however often it arrives."""
        deadline = time.monotonic() + timeout
        while True:
            self.send_rpc(payload)
            resend = min(deadline, time.monotonic() + RETRANSMIT_SECS)
            with self._cond:
                while request_id not in self.calls.responses and time.monotonic() < resend:
                    self._cond.wait(resend - time.monotonic())
                if request_id in self.calls.responses:
                    return self.calls.responses.pop(request_id)
                assert self.closed is None, f"the link closed: {self.closed}"
            assert time.monotonic() < deadline, f"no answer to {payload[:80]!r} in {timeout} s"

    def push_price(self, terms: PriceTerms = PEER_TERMS) -> PriceAnswer:
        """Offer the daemon our price, as a node does at link-up; returns its answer."""
        with self._cond:
            account = self._account()
            offer = account.propose(terms, unix_now())
        response = self.call("push_price", wire(offer))
        assert response.error is msgspec.UNSET, response.error
        answer = unwire(response.result, PriceAnswer)
        with self._cond:
            account.on_answer(answer)
        return answer

    def wait_for(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `check()` (called with the peer's lock held) is true; AssertionError after
        `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check():
                remaining = deadline - time.monotonic()
                assert remaining > 0, "condition not met in time"
                self._cond.wait(remaining)

    # --- the link's thread ---------------------------------------------------------------

    def _live(self) -> Link:
        assert self._link is not None, "connect() first"
        return self._link

    def _account(self) -> Account:
        if self.account is None:
            link = self._live()
            assert link.peer_identity_public is not None and link.peer_fingerprint is not None
            state = AccountState(link.peer_fingerprint)
            self.account = Account(self.identity, link.peer_identity_public, state, Counters())
        return self.account

    def _send_now(self, message: bytes) -> None:
        """Called with the lock held, in the order the link produced the messages."""
        assert self._sock is not None
        if self.route.protocol == "tcp":
            self._writes.put(frame_for_stream(message))
            return
        with contextlib.suppress(OSError):  # the daemon may be gone, as on a real wire
            self._sock.send(message)

    def _flush(self) -> None:
        link = self._live()
        while link.wants_service:  # answering an event queues more to send
            for message in link.datagrams_to_send():
                self._send_now(message)
            while (event := link.next_event()) is not None:
                match event:
                    case LinkEstablished():
                        self._account()
                    case LinkClosed():
                        self.closed = event
                    case ControlReceived(payload=payload):
                        self._on_control(payload)
        self._cond.notify_all()

    def _write_loop(self) -> None:
        # TCP writes may block on a slow daemon; the reader must keep reading meanwhile.
        assert self._sock is not None
        while (data := self._writes.get()) is not None:
            try:
                self._sock.sendall(data)
            except OSError:
                return

    def _read_loop(self) -> None:
        sock, link = self._sock, self._live()
        assert sock is not None
        tcp = self.route.protocol == "tcp"
        with selectors.DefaultSelector() as selector:  # select() stops at fd 1023
            selector.register(sock, selectors.EVENT_READ)
            self._read_from(sock, link, selector, tcp)

    def _read_from(
        self, sock: socket.socket, link: Link, selector: selectors.BaseSelector, tcp: bool
    ) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                deadline = link.get_timer()
                if deadline is not None and now >= deadline:
                    link.handle_timer(now)
                    self._flush()
                    continue
            wait = _POLL_SECS if deadline is None else min(_POLL_SECS, deadline - now)
            if not selector.select(max(wait, 0.0)):
                continue
            try:
                data = sock.recv(65_536)
            except OSError:
                data = b""
            messages = [data]
            if tcp:
                if not data:  # EOF or reset: the daemon closed the connection
                    with self._cond:
                        self.closed = self.closed or LinkClosed("connection_closed", by_peer=True)
                        self._cond.notify_all()
                    return
                self._decoder.receive_bytes(data)
                messages = []
                try:
                    while (message := self._decoder.next_message()) is not None:
                        messages.append(message)
                except RemoteProtocolError:
                    return
            with self._cond:
                link.receive_datagrams(messages, time.monotonic())
                self._flush()

    def _on_control(self, payload: bytes) -> None:
        try:
            message = decode_control(payload)
        except RemoteProtocolError:
            self.calls.undecodable += 1
            return
        if not isinstance(message, DockMessage) or message.dock != GLOBAL_RPC_DOCK:
            self.calls.controls.append(message)
            return
        if is_request(message.data):
            self._answer(message.data)
            return
        try:
            response = decode_response(message.data)
        except RemoteProtocolError:
            self.calls.undecodable += 1
            return
        if response.id is None:
            self.calls.anonymous.append(response)
        else:
            self.calls.responses[response.id] = response

    def _answer(self, payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except RemoteProtocolError:
            self.calls.undecodable += 1
            return
        params = None if request.params is msgspec.UNSET else request.params
        self.calls.requests.append((request.method, params))
        if request.method in self.silent:
            return
        handler = self.handlers.get(request.method)
        if handler is None:
            answer = encode_error(request.id, METHOD_NOT_FOUND, STANDARD_MESSAGES[METHOD_NOT_FOUND])
        else:
            try:
                answer = encode_result(request.id, handler(params))
            except RpcError as exc:
                answer = encode_error(request.id, exc.code, exc.message, exc.data)
            except (msgspec.ValidationError, RemoteProtocolError) as exc:
                answer = encode_error(request.id, INVALID_PARAMS, str(exc)[:200])
        link = self._live()
        if link.state is LinkState.ESTABLISHED:  # not closed since the request came
            link.send_control(encode_control(DockMessage(GLOBAL_RPC_DOCK, answer)))

    def _answer_price(self, params: Any) -> Any:
        offer = unwire(params, PriceOffer)
        answer = self._account().on_offer(offer, ACCEPT_ANY, unix_now())
        return wire(answer)


def flood_calls(count: int) -> list[bytes]:
    """`count` JSON-RPC requests, each under a fresh id: half to a method nobody serves, half
    to one the node serves (`settlement_status` of a settlement it never heard of). Only the
    second kind runs a handler, and so takes a place in the node's run-once cache."""
    return [
        encode_request(os.urandom(16).hex(), "no_such_method")
        if i % 2
        else encode_request(
            os.urandom(16).hex(), "settlement_status", wire(SettlementQuery(os.urandom(16)))
        )
        for i in range(count)
    ]


def error_code(response: Response) -> int | None:
    """The JSON-RPC error code of an answer, None for a result."""
    return response.error.code if isinstance(response.error, ErrorObject) else None


# --- what a stranger can do ----------------------------------------------------------------

_LENGTH = struct.Struct(">H")


def poisoned_hs_init(secret: str, kind: str = "bad_tag") -> bytes:
    """An HS_INIT whose cookie MAC is valid and whose Noise message 1 fails to read:
    "bad_tag" (the right length, a wrong AEAD tag), "short" or "low_order" (an all-zero
    ephemeral key, which no DH may accept)."""
    bodies = {
        "bad_tag": os.urandom(32 + MAC_SIZE),
        "short": os.urandom(7),
        "low_order": bytes(32) + os.urandom(MAC_SIZE),
    }
    message = bytes([HS_INIT]) + U32.pack(random.getrandbits(32)) + bodies[kind]
    return message + _mac1(derive_cookie_keys(secret)[1], message)


def tcp_connect_close(address: Address) -> None:
    """Connect and close at once (an orderly FIN)."""
    socket.create_connection(address, timeout=5).close()


def tcp_reset(address: Address) -> None:
    """Connect, then reset the connection (SO_LINGER 0 sends RST on close)."""
    sock = socket.create_connection(address, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def tcp_send(address: Address, data: bytes, *, linger: float = 0.2) -> bytes:
    """Connect, send `data`, wait up to `linger` s for anything back, close; returns what
    came back (a daemon answers a stranger with nothing)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(linger)
        try:
            return sock.recv(65_536)
        except (TimeoutError, ConnectionResetError):
            return b""


def length_prefix(size: int) -> bytes:
    """A stream frame header announcing `size` bytes (0 and 0xFFFF are the nasty ones)."""
    return _LENGTH.pack(size)


def tcp_idle(address: Address, count: int, *, first_byte: bool = False) -> list[socket.socket]:
    """Open `count` connections and keep them, sending nothing (or one byte of a frame
    header: a slow peer). The caller closes them."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5)
            held.append(sock)
            sock.connect(address)
            if first_byte:
                sock.send(b"\x00")
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def garbage_datagrams(count: int, seed: int, secret: str | None = None) -> list[bytes]:
    """Datagrams a stranger might send: random bytes of random sizes, and random bytes
    behind every message type's first byte (a forged DATA, an HS_INIT with a bad MAC). With
    `secret`, also HS_INITs whose MAC is valid and whose body is not."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        size = rng.choice((0, 1, 5, 17, 48, 100, 1400, rng.randrange(1, 1500)))
        body = rng.randbytes(size)
        if i % 4 == 1 and body:
            body = bytes([rng.randrange(1, 7)]) + body[1:]
        if secret is not None and i % 64 == 3:
            body = poisoned_hs_init(secret)
        out.append(body)
    return out


def send_datagrams(address: Address, datagrams: list[bytes]) -> int:
    """Send each datagram from one UDP socket; returns how many the kernel took."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in datagrams:
            try:
                sock.sendto(data, address)
                sent += 1
            except OSError:
                time.sleep(0.001)  # the send buffer is full: let the kernel catch up
    return sent
