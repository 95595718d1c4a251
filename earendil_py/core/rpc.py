"""JSON-RPC 2.0 between neighbours, as sans-IO state: a server that runs each request at most
once and a client that retransmits until it is answered.

The transport is the link between two neighbours, which over UDP may lose, duplicate and
reorder messages. Exactly-once *effect* is built from two halves, as in classic RPC over
datagrams (Birrell & Nelson; Sun RPC's duplicate request cache):

- the client retransmits the same request bytes, same `id`, on a bounded exponential
  schedule (`RpcTimers`), and discards responses it is not waiting for;
- the server remembers every request by (neighbour fingerprint, id): while the handler runs a
  retransmission is answered with nothing (the client will ask again), afterwards with the
  byte-identical cached response, for at least `RESPONSE_CACHE_SECS`. The method never runs
  twice for one key while the key is remembered, and the whole client schedule
  (`RpcTimers.give_up_after`, 31.5 s by default) fits inside that window.

The cache is bounded per neighbour, in entries and in bytes, and in total by those quotas
times the number of neighbours the node admits, so one neighbour (or many identities behind
one route cookie) filling its quota takes nothing from the others. A request over a bound is
refused with SERVER_BUSY (the method did not run, so the caller may retry) instead of
evicting a live entry, which would break the run-once guarantee without anyone noticing.
Answers that ran no handler (malformed requests, unknown methods) take no entry at all.

The envelope is JSON-RPC 2.0 (https://www.jsonrpc.org/specification) in msgspec JSON, not
the project's array-like msgpack: it is a public, self-describing format that any JSON-RPC
tool can speak. Our profile of it: ids are required (no notifications) and are strings or
64-bit integers (we send 32 hex digits from 16 random bytes); params, when present, are an
array or an object; batches are not supported (answered with INVALID_REQUEST). Every
message, request or response, is at most MAX_PAYLOAD_SIZE bytes. See docs/rpc.md.

This module is pure: time comes in as `now` (monotonic seconds, never decreasing) and
randomness as an `rng` callable.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import blake3
import msgspec

from earendil_py.core.errors import (
    EarendilError,
    LocalProtocolError,
    RemoteProtocolError,
    decode_remote,
)

Rng = Callable[[int], bytes]

# --- constants ----------------------------------------------------------------------------

# Standard JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (the spec reserves -32099..-32000 for these).
SERVER_BUSY = -32000  # the cache is full; the method did not run, a new call may succeed
# Codes that handlers may raise for their own, method-level errors (besides INVALID_PARAMS).
APPLICATION_ERROR_MIN = 1000
APPLICATION_ERROR_MAX = 9999

STANDARD_MESSAGES = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    SERVER_BUSY: "Server busy",
}

# RPC messages ride in CONTROL link frames, and a link message is at most 16_384 bytes
# (link.MAX_MESSAGE_SIZE) including 30 bytes of DATA header, frame kind and AEAD tag. 16_000
# leaves over 350 bytes for the control-message envelope that carries the payload.
MAX_PAYLOAD_SIZE = 16_000
# Ids are kept in the cache; a peer must not make us store long strings.
MAX_ID_LENGTH = 128
MAX_METHOD_LENGTH = 64  # our method names are short snake_case words
MAX_ERROR_MESSAGE_CHARS = 256  # JSON-RPC: "a short description"; longer ones are cut on send
ID_BYTES = 16  # random bytes in the ids we generate (sent as 32 hex digits)

RESPONSE_CACHE_SECS = 60.0
# Per neighbour, 64 entries per 60 s allow a sustained ~1 call/s from each neighbour (an honest
# one pushes its debt once a minute and chats at most 30 times).
MAX_CACHE_ENTRIES_PER_NEIGHBOR = 64
# What one entry costs besides its response: key, id (up to MAX_ID_LENGTH characters),
# digest, the entry, its dict and deque slots, the response's bytes header. tracemalloc
# measures ~550 bytes with a 128-character id; rounded up.
CACHE_ENTRY_OVERHEAD_BYTES = 640
# Responses may be up to MAX_PAYLOAD_SIZE, so entries alone do not bound memory. A running
# entry is charged as if its response were that large (so `complete` never overshoots), an
# answered one for what it holds. 256 KiB fit the 64 entries with responses up to ~3.4 KB
# (typical ones are a few dozen bytes), or 15 calls running at once.
MAX_CACHE_BYTES_PER_NEIGHBOR = 256 * 1024
# The neighbours the node admits at once (runtime/node.py passes its own cap); the global
# bounds are the quotas times this. Worst-case memory of the cache: max_neighbors x
# MAX_CACHE_BYTES_PER_NEIGHBOR = 1024 x 256 KiB = 256 MiB, reached only by 1024 authenticated
# neighbours each at its quota (typical responses are tiny: a few KiB per neighbour).
DEFAULT_MAX_NEIGHBORS = 1024
# Each request costs the event loop tens of µs to decode, look up and answer, busy refusals
# included: eight identities' bursts of 256 calls stalled every other link for ~0.1 s
# (bench/hostile.py). So a neighbour's requests are also admitted at a rate, from a bucket of
# REQUEST_BURST_PER_NEIGHBOR refilled at REQUEST_RATE_PER_NEIGHBOR a second; beyond it a
# request is dropped unread, and its client sends it again on its backoff schedule. An honest
# neighbour pushes its debt once a minute and chats at most 30 times a minute.
REQUEST_RATE_PER_NEIGHBOR = 4.0
REQUEST_BURST_PER_NEIGHBOR = 32

_DETAIL_CHARS = 200  # error details echoed to the peer are cut to this length

# --- errors -------------------------------------------------------------------------------


class RpcError(EarendilError):
    """A JSON-RPC error object: raised by a handler to answer with an error, and by
    `GlobalRpc.call` when the peer answered with one.

    Handlers should use INVALID_PARAMS or a code in APPLICATION_ERROR_MIN..MAX.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcTimeout(EarendilError):
    """No response after every retransmission. The peer may or may not have run the method.

    Deliberately not an RpcError: an error response is the peer's answer, a timeout is the
    absence of one, and callers must not mistake "unknown" for "refused".
    """

    def __init__(self, method: str, attempts: int, detail: str | None = None) -> None:
        super().__init__(detail or f"no response to {method!r} after {attempts} attempts")
        self.method = method
        self.attempts = attempts


class MalformedRequest(RemoteProtocolError):
    """A request we cannot run; `code` is PARSE_ERROR or INVALID_REQUEST and `request_id` is
    the id we could still read from it (echoed in the error response), else None."""

    def __init__(self, detail: str, *, code: int, request_id: RequestId | None) -> None:
        reason = "rpc_parse_error" if code == PARSE_ERROR else "rpc_invalid_request"
        super().__init__(detail, reason)
        self.detail = detail
        self.code = code
        self.request_id = request_id


# --- wire structs -------------------------------------------------------------------------

RequestId = str | int
# What we accept from peers is bounded (docs/rpc.md, "Decoding peer input"): the spec's string
# or number ids minus fractions, integers in int64, short strings. params, result and error
# data are any JSON, bounded by MAX_PAYLOAD_SIZE and by the nesting depth msgspec parses.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
WireId = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)] | Int64


class ErrorObject(msgspec.Struct, frozen=True, kw_only=True):
    code: Int64
    message: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_MESSAGE_CHARS)]
    data: Any = msgspec.UNSET  # omitted when unset


class Request(msgspec.Struct, frozen=True, kw_only=True):
    jsonrpc: Literal["2.0"]
    id: WireId
    method: Annotated[str, msgspec.Meta(max_length=MAX_METHOD_LENGTH)]
    # The spec allows only structured params; absent is passed to handlers as None.
    params: list[Any] | dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class Response(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of `result` (any JSON value, null included) and `error` is set."""

    jsonrpc: Literal["2.0"]
    id: WireId | None  # null only when the request's id could not be read
    result: Any = msgspec.UNSET
    error: ErrorObject | msgspec.UnsetType = msgspec.UNSET


class _IdProbe(msgspec.Struct):
    id: WireId | None = None


class _MethodProbe(msgspec.Struct):
    method: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_encoder = msgspec.json.Encoder()
# Key order and whitespace must not make two copies of one request look different.
_canonical_encoder = msgspec.json.Encoder(order="sorted")
_request_decoder = msgspec.json.Decoder(Request)
_response_decoder = msgspec.json.Decoder(Response)
_id_probe_decoder = msgspec.json.Decoder(_IdProbe)
_method_probe_decoder = msgspec.json.Decoder(_MethodProbe)

# msgspec raises these for values it cannot encode (unsupported types, huge ints, NaN keys...).
_ENCODE_ERRORS = (msgspec.EncodeError, TypeError, ValueError, OverflowError)


def _encode(message: Request | Response, what: str) -> bytes:
    try:
        payload = _encoder.encode(message)
    except _ENCODE_ERRORS as exc:
        raise LocalProtocolError(f"{what} is not JSON-encodable: {exc}") from None
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{what} of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return payload


def encode_request(request_id: RequestId, method: str, params: Any = None) -> bytes:
    """Raises LocalProtocolError if params is not None, a list, tuple or dict, is not
    JSON-encodable, or the request exceeds MAX_PAYLOAD_SIZE."""
    if params is None:
        wire_params: Any = msgspec.UNSET
    elif isinstance(params, list | tuple | dict):
        wire_params = params
    else:
        raise LocalProtocolError("JSON-RPC params must be an array or an object")
    return _encode(
        Request(jsonrpc="2.0", id=request_id, method=method, params=wire_params), "request"
    )


def encode_result(request_id: RequestId, result: Any) -> bytes:
    """Raises LocalProtocolError if result is not JSON-encodable or the response exceeds
    MAX_PAYLOAD_SIZE."""
    return _encode(Response(jsonrpc="2.0", id=request_id, result=result), "result")


def encode_error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    """`data=None` is omitted; `message` is cut to MAX_ERROR_MESSAGE_CHARS. Raises
    LocalProtocolError if data is not JSON-encodable or the response exceeds MAX_PAYLOAD_SIZE."""
    error = ErrorObject(
        code=code,
        message=message[:MAX_ERROR_MESSAGE_CHARS],
        data=msgspec.UNSET if data is None else data,
    )
    return _encode(Response(jsonrpc="2.0", id=request_id, error=error), "error response")


def _standard_error(request_id: RequestId | None, code: int, detail: str | None = None) -> bytes:
    # Cannot fail: every part is small and encodable.
    data = None if detail is None else detail[:_DETAIL_CHARS]
    return encode_error(request_id, code, STANDARD_MESSAGES[code], data)


def is_request(payload: bytes) -> bool:
    """True if the payload is for the server side (it has a "method" member), False if it is
    a response. Anything that is not a JSON object counts as a request, so that the server
    answers it with the right error; our error responses are never answered in turn."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        return True
    try:
        probe = decode_remote(_method_probe_decoder, payload, "probe", "rpc_parse_error")
    except RemoteProtocolError:
        return True
    return probe.method is not msgspec.UNSET


def decode_request(payload: bytes) -> Request:
    """Raises MalformedRequest (a RemoteProtocolError) with the JSON-RPC code to answer."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise MalformedRequest("request too large", code=INVALID_REQUEST, request_id=None)
    try:
        return decode_remote(
            _request_decoder,
            payload,
            "bad request",
            "rpc_parse_error",  # not JSON, or nested deeper than we parse
            invalid="rpc_invalid_request",  # valid JSON, not a valid request
        )
    except RemoteProtocolError as exc:
        if exc.reason == "rpc_parse_error":
            raise MalformedRequest(str(exc), code=PARSE_ERROR, request_id=None) from None
        detail = str(exc)
    try:  # answered under the request's id, if it has one we can read
        request_id = decode_remote(_id_probe_decoder, payload, "id", "rpc_invalid_request").id
    except RemoteProtocolError:
        request_id = None
    raise MalformedRequest(detail, code=INVALID_REQUEST, request_id=request_id)


def decode_response(payload: bytes) -> Response:
    """Raises RemoteProtocolError("rpc_bad_response") for anything but a valid response."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise RemoteProtocolError("response too large", "rpc_bad_response")
    response = decode_remote(_response_decoder, payload, "bad response", "rpc_bad_response")
    if (response.result is msgspec.UNSET) == (response.error is msgspec.UNSET):
        raise RemoteProtocolError("response needs exactly one of result, error", "rpc_bad_response")
    return response


# --- server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new request: run `method` once and hand the response to `RpcServer.complete`."""

    neighbor: bytes
    request_id: RequestId
    method: str
    params: list[Any] | dict[str, Any] | None


@dataclass(slots=True)
class ServerStatistics:
    requests_received: int = 0
    dispatched: int = 0  # new requests handed out to run
    cache_hits: int = 0  # retransmissions answered with the cached response
    in_progress_hits: int = 0  # retransmissions while the method ran: no answer
    parse_errors: int = 0
    invalid_requests: int = 0
    unknown_methods: int = 0  # answered METHOD_NOT_FOUND, without an entry
    rate_limited: int = 0  # dropped unread: the neighbour was over its request rate
    # SERVER_BUSY answers by the bound that was reached: "neighbor_entries",
    # "neighbor_bytes" (the caller's quota), "total_entries", "total_bytes".
    busy: Counter[str] = field(default_factory=Counter)
    id_conflicts: int = 0  # a known id with a different method or params: dropped
    expired: int = 0
    cached_entries: int = 0  # now remembered, running or answered
    cached_bytes: int = 0  # what they are charged (see CACHE_ENTRY_OVERHEAD_BYTES)
    cached_neighbors: int = 0  # neighbours holding entries


@dataclass(slots=True)
class _Usage:
    """Entries and bytes held by one neighbour, or a bound on them."""

    entries: int = 0
    size_bytes: int = 0


@dataclass(slots=True)
class _Entry:
    digest: bytes  # of (method, params), to tell a retransmission from a reused id
    response: bytes | None  # None while the method runs
    charged_bytes: int


# What a running entry is charged: its response is not known yet and may be this large.
_RUNNING_CHARGE = CACHE_ENTRY_OVERHEAD_BYTES + MAX_PAYLOAD_SIZE


def _request_digest(request: Request) -> bytes:
    params = None if request.params is msgspec.UNSET else request.params
    return blake3.blake3(_canonical_encoder.encode([request.method, params])).digest(length=16)


class RpcServer:
    """The run-at-most-once side. One per node; entries are keyed by (neighbour, id) because
    ids are only unique per client.

    Each neighbour has a quota of entries and of bytes; the total is bounded by the quotas
    times `max_neighbors`, the number of neighbours the node admits at once, so a neighbour
    under its quota is refused only if more neighbours than that hold entries (an entry
    outlives its neighbour's link by up to `response_cache_secs`).

    `receive_request` never raises for remote input. An entry is remembered from dispatch
    until `response_cache_secs` after `complete`; entries still running never expire.
    """

    def __init__(
        self,
        *,
        response_cache_secs: float = RESPONSE_CACHE_SECS,
        max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
        max_entries_per_neighbor: int = MAX_CACHE_ENTRIES_PER_NEIGHBOR,
        max_bytes_per_neighbor: int = MAX_CACHE_BYTES_PER_NEIGHBOR,
        request_rate: float | None = REQUEST_RATE_PER_NEIGHBOR,
        request_burst: int = REQUEST_BURST_PER_NEIGHBOR,
    ) -> None:
        """`request_rate=None` admits every request (the cache's bounds still hold)."""
        if response_cache_secs <= 0 or max_neighbors < 1 or max_entries_per_neighbor < 1:
            raise LocalProtocolError("cache lifetime and bounds must be positive")
        if max_bytes_per_neighbor < _RUNNING_CHARGE:
            raise LocalProtocolError(f"a neighbour's quota must hold {_RUNNING_CHARGE} bytes")
        self._ttl = response_cache_secs
        self._quota = _Usage(max_entries_per_neighbor, max_bytes_per_neighbor)
        self._bound = _Usage(
            max_entries_per_neighbor * max_neighbors, max_bytes_per_neighbor * max_neighbors
        )
        self._entries: dict[tuple[bytes, RequestId], _Entry] = {}
        self._cached_bytes = 0
        self._per_neighbor: dict[bytes, _Usage] = {}
        # Completed keys in completion order, which is expiry order since `now` never
        # decreases and the lifetime is constant.
        self._expiry: deque[tuple[float, tuple[bytes, RequestId]]] = deque()
        if request_rate is not None and (request_rate <= 0 or request_burst < 1):
            raise LocalProtocolError("request rate and burst must be positive")
        self._rate = request_rate
        self._burst = float(request_burst)
        self._max_neighbors = max_neighbors
        # neighbour -> (requests it may still send, when that was counted); a neighbour whose
        # bucket is full again has no entry.
        self._budgets: dict[bytes, tuple[float, float]] = {}
        self._stats = ServerStatistics()

    def statistics(self) -> ServerStatistics:
        """A snapshot of the counters."""
        return replace(
            self._stats,
            busy=Counter(self._stats.busy),
            cached_entries=len(self._entries),
            cached_bytes=self._cached_bytes,
            cached_neighbors=len(self._per_neighbor),
        )

    def receive_request(
        self, neighbor: bytes, payload: bytes, now: float, *, methods: Container[str]
    ) -> RequestReceived | bytes | None:
        """What to do with a request from `neighbor`, given the `methods` we serve:

        - `bytes`: send them back (an error response, or the cached response to a
          retransmission: byte-identical to the first answer);
        - `RequestReceived`: a new request, run it and call `complete`;
        - `None`: send nothing (a retransmission of a request still running, or a reused id).
        """
        self._expire(now)
        if not self._admit(neighbor, now):
            self._stats.rate_limited += 1
            return None
        self._stats.requests_received += 1
        try:
            request = decode_request(payload)
        except MalformedRequest as exc:
            if exc.code == PARSE_ERROR:
                self._stats.parse_errors += 1
            else:
                self._stats.invalid_requests += 1
            return _standard_error(exc.request_id, exc.code, exc.detail)
        key = (neighbor, request.id)
        digest = _request_digest(request)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.digest != digest:
                # A buggy or hostile client reused an id. Answering with the first response
                # would be wrong, and an error under this id would resolve the first call.
                self._stats.id_conflicts += 1
                return None
            if entry.response is None:
                self._stats.in_progress_hits += 1
                return None
            self._stats.cache_hits += 1
            return entry.response
        if request.method not in methods:
            # Nothing runs for an unknown method, so its answer depends only on the method
            # name and our handler table: every copy gets the same bytes without an entry,
            # and unknown calls, like malformed ones, hold no memory. (The table is filled
            # before requests are served; a handler registered later could run for a
            # retransmission whose first copy was told the method was missing, still once.)
            self._stats.unknown_methods += 1
            return _standard_error(request.id, METHOD_NOT_FOUND)
        refusal = self._refusal(neighbor)
        if refusal is not None:
            self._stats.busy[refusal] += 1
            return _standard_error(request.id, SERVER_BUSY, refusal)
        self._entries[key] = _Entry(digest, None, _RUNNING_CHARGE)
        self._charge(neighbor, 1, _RUNNING_CHARGE)
        self._stats.dispatched += 1
        params = None if request.params is msgspec.UNSET else request.params
        return RequestReceived(neighbor, request.id, request.method, params)

    def _admit(self, neighbor: bytes, now: float) -> bool:
        """Whether `neighbor` may send a request now (a token bucket); takes its token."""
        rate = self._rate
        if rate is None:
            return True
        budgets = self._budgets
        tokens, counted_at = budgets.get(neighbor, (self._burst, now))
        tokens = min(self._burst, tokens + (now - counted_at) * rate)
        if tokens < 1:
            budgets[neighbor] = (tokens, now)
            return False
        budgets[neighbor] = (tokens - 1, now)
        if len(budgets) > 2 * self._max_neighbors:  # forget the buckets that are full again
            burst = self._burst
            self._budgets = {
                n: (t, at) for n, (t, at) in budgets.items() if t + (now - at) * rate < burst
            }
        return True

    def complete(self, neighbor: bytes, request_id: RequestId, response: bytes, now: float) -> None:
        """Cache the response to a dispatched request; the caller sends it.

        Raises LocalProtocolError if the request was not dispatched or is already complete,
        or the response exceeds MAX_PAYLOAD_SIZE.
        """
        entry = self._entries.get((neighbor, request_id))
        if entry is None or entry.response is not None:
            raise LocalProtocolError(f"request {request_id!r} is not running")
        if len(response) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"response of {len(response)} bytes is too large")
        # msgspec's encoder returns its buffer, slack included (up to half the length
        # again): held for a minute, an exact copy is what we charge for.
        entry.response = bytes(memoryview(response))
        charge = CACHE_ENTRY_OVERHEAD_BYTES + len(response)
        self._charge(neighbor, 0, charge - entry.charged_bytes)
        entry.charged_bytes = charge
        self._expiry.append((now + self._ttl, (neighbor, request_id)))

    def get_timer(self) -> float | None:
        """When the oldest cached response expires (None if nothing is cached)."""
        return self._expiry[0][0] if self._expiry else None

    def handle_timer(self, now: float) -> None:
        self._expire(now)

    def _refusal(self, neighbor: bytes) -> str | None:
        """The bound a new entry from `neighbor` would pass, if any: its own quota first."""
        usage = self._per_neighbor.get(neighbor, _Usage())
        if usage.entries >= self._quota.entries:
            return "neighbor_entries"
        if usage.size_bytes + _RUNNING_CHARGE > self._quota.size_bytes:
            return "neighbor_bytes"
        if len(self._entries) >= self._bound.entries:
            return "total_entries"
        if self._cached_bytes + _RUNNING_CHARGE > self._bound.size_bytes:
            return "total_bytes"
        return None

    def _charge(self, neighbor: bytes, entries: int, size_bytes: int) -> None:
        usage = self._per_neighbor.setdefault(neighbor, _Usage())
        usage.entries += entries
        usage.size_bytes += size_bytes
        self._cached_bytes += size_bytes
        if not usage.entries:
            del self._per_neighbor[neighbor]

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, key = self._expiry.popleft()
            entry = self._entries.pop(key)
            self._charge(key[0], -1, -entry.charged_bytes)
            self._stats.expired += 1


# --- client -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcTimers:
    """Retransmission policy. A request is sent, then resent after `initial_rto`, doubling,
    `max_attempts` sends in all; the call fails `give_up_after` seconds after the first send
    (0.5 s and 6 sends: resends at 0.5, 1.5, 3.5, 7.5, 15.5 s, failure at 31.5 s).

    The schedule must end within RESPONSE_CACHE_SECS, so that every copy of a request
    reaches the peer while its first answer is still cached there.
    """

    initial_rto: float = 0.5
    max_attempts: int = 6

    def __post_init__(self) -> None:
        if self.initial_rto <= 0 or self.max_attempts < 1:
            raise LocalProtocolError("initial_rto and max_attempts must be positive")
        if self.give_up_after > RESPONSE_CACHE_SECS:
            raise LocalProtocolError(
                f"retransmission schedule of {self.give_up_after} s outlives the peer's "
                f"{RESPONSE_CACHE_SECS} s response cache"
            )

    @property
    def give_up_after(self) -> float:
        return self.initial_rto * ((1 << self.max_attempts) - 1)


@dataclass(frozen=True, slots=True)
class ResultReceived:
    request_id: str
    neighbor: bytes
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    request_id: str
    neighbor: bytes
    code: int
    message: str
    data: Any  # None when the peer sent none


@dataclass(frozen=True, slots=True)
class CallTimedOut:
    request_id: str
    neighbor: bytes
    method: str
    attempts: int


CallOutcome = ResultReceived | ErrorReceived | CallTimedOut


@dataclass(slots=True)
class ClientStatistics:
    sent: int = 0  # calls started (first sends)
    retransmitted: int = 0
    completed: int = 0  # answered with a result or an error
    failed: int = 0  # timed out after max_attempts sends
    cancelled: int = 0
    unmatched_responses: int = 0  # valid responses to no pending call: discarded
    malformed: int = 0  # responses we could not decode: discarded
    pending: int = 0


@dataclass(slots=True)
class _PendingCall:
    neighbor: bytes
    method: str
    payload: bytes
    attempts: int
    rto: float
    next_at: float


class RpcClient:
    """The retransmitting side. One per node; calls are addressed to a neighbour, and a
    response only completes a call if it comes from the neighbour the call went to.

    Timeouts are events (`next_event`), responses are return values of `receive_response`,
    which never raises for remote input.
    """

    def __init__(self, timers: RpcTimers | None = None) -> None:
        self._timers = timers or RpcTimers()
        self._pending: dict[str, _PendingCall] = {}
        self._events: deque[CallTimedOut] = deque()
        self._stats = ClientStatistics()

    @property
    def timers(self) -> RpcTimers:
        return self._timers

    def statistics(self) -> ClientStatistics:
        """A snapshot of the counters."""
        return replace(self._stats, pending=len(self._pending))

    def request(
        self, neighbor: bytes, method: str, params: Any, now: float, rng: Rng
    ) -> tuple[str, bytes]:
        """Start a call: returns its id and the payload to send now.

        Raises LocalProtocolError if params is not None/array/object, not JSON-encodable, or
        the request exceeds MAX_PAYLOAD_SIZE.
        """
        request_id = rng(ID_BYTES).hex()
        while request_id in self._pending:  # 2^-128; a broken rng must not merge two calls
            request_id = rng(ID_BYTES).hex()
        payload = encode_request(request_id, method, params)
        rto = self._timers.initial_rto
        self._pending[request_id] = _PendingCall(neighbor, method, payload, 1, rto, now + rto)
        self._stats.sent += 1
        return request_id, payload

    def cancel(self, request_id: str) -> bool:
        """Forget a pending call (its caller went away). False if it was not pending."""
        if self._pending.pop(request_id, None) is None:
            return False
        self._stats.cancelled += 1
        return True

    def receive_response(
        self, neighbor: bytes, payload: bytes
    ) -> ResultReceived | ErrorReceived | None:
        """The outcome of a pending call, or None if the payload was discarded (malformed,
        or not answering a call pending towards `neighbor`; both counted)."""
        try:
            response = decode_response(payload)
        except RemoteProtocolError:
            self._stats.malformed += 1
            return None
        request_id = response.id
        # We only ever send string ids, so any other id answers nothing of ours.
        call = self._pending.get(request_id) if isinstance(request_id, str) else None
        if call is None or call.neighbor != neighbor:
            self._stats.unmatched_responses += 1
            return None
        assert isinstance(request_id, str)
        del self._pending[request_id]
        self._stats.completed += 1
        if isinstance(response.error, ErrorObject):
            error = response.error
            data = None if error.data is msgspec.UNSET else error.data
            return ErrorReceived(request_id, neighbor, error.code, error.message, data)
        return ResultReceived(request_id, neighbor, response.result)

    def get_timer(self) -> float | None:
        """The next retransmission or timeout (None when no call is pending)."""
        return min((call.next_at for call in self._pending.values()), default=None)

    def handle_timer(self, now: float) -> list[tuple[bytes, bytes]]:
        """(neighbor, payload) pairs to resend now. Calls out of attempts become
        CallTimedOut events."""
        resend: list[tuple[bytes, bytes]] = []
        for request_id, call in list(self._pending.items()):
            if call.next_at > now:
                continue
            if call.attempts >= self._timers.max_attempts:
                del self._pending[request_id]
                self._stats.failed += 1
                self._events.append(
                    CallTimedOut(request_id, call.neighbor, call.method, call.attempts)
                )
                continue
            call.attempts += 1
            call.rto *= 2
            call.next_at = now + call.rto
            resend.append((call.neighbor, call.payload))
        if resend:
            self._stats.retransmitted += len(resend)
        return resend

    def next_event(self) -> CallTimedOut | None:
        return self._events.popleft() if self._events else None
