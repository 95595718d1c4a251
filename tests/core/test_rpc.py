"""JSON-RPC envelopes, the run-once server cache and the retransmitting client, in memory."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core import link
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.rpc import (
    CACHE_ENTRY_OVERHEAD_BYTES,
    INVALID_REQUEST,
    MAX_CACHE_ENTRIES_PER_NEIGHBOR,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_METHOD_LENGTH,
    MAX_PAYLOAD_SIZE,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_BURST_PER_NEIGHBOR,
    REQUEST_RATE_PER_NEIGHBOR,
    RESPONSE_CACHE_SECS,
    SERVER_BUSY,
    CallTimedOut,
    ErrorObject,
    ErrorReceived,
    RequestReceived,
    ResultReceived,
    RpcClient,
    RpcServer,
    RpcTimers,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    is_request,
)
from tests.helpers import seeded_rng

TICK = 0.01
ALICE = b"A" * 32
BOB = b"B" * 32
CAROL = b"C" * 32


def as_json(payload: bytes) -> Any:
    return msgspec.json.decode(payload)


def request_bytes(request_id: Any, method: str = "echo", params: Any = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return msgspec.json.encode(message)


# What the servers below serve; any other method is unknown.
METHODS = frozenset({"echo", "add", "other"})


def receive(
    server: RpcServer, neighbor: bytes, payload: bytes, now: float
) -> RequestReceived | bytes | None:
    return server.receive_request(neighbor, payload, now, methods=METHODS)


def dispatch(server: RpcServer, neighbor: bytes, payload: bytes, now: float) -> RequestReceived:
    action = receive(server, neighbor, payload, now)
    assert isinstance(action, RequestReceived), action
    return action


# --- envelopes ----------------------------------------------------------------------------


def test_request_envelope_is_json_rpc_2() -> None:
    client = RpcClient()
    request_id, payload = client.request(BOB, "ping", {"n": 1}, 0.0, seeded_rng(1))
    assert len(request_id) == 32 and int(request_id, 16) >= 0  # 16 random bytes in hex
    assert payload == (
        b'{"jsonrpc":"2.0","id":"' + request_id.encode() + b'","method":"ping","params":{"n":1}}'
    )
    no_params = encode_request("x", "ping")
    assert as_json(no_params) == {"jsonrpc": "2.0", "id": "x", "method": "ping"}


def test_ids_come_from_the_rng() -> None:
    first = RpcClient().request(BOB, "m", None, 0.0, seeded_rng(5))[0]
    again = RpcClient().request(BOB, "m", None, 0.0, seeded_rng(5))[0]
    other = RpcClient().request(BOB, "m", None, 0.0, seeded_rng(6))[0]
    assert first == again != other


def test_response_envelopes() -> None:
    assert as_json(encode_result(7, None)) == {"jsonrpc": "2.0", "id": 7, "result": None}
    assert as_json(encode_error("a", 1001, "no")) == {
        "jsonrpc": "2.0",
        "id": "a",
        "error": {"code": 1001, "message": "no"},
    }
    assert as_json(encode_error(None, 1001, "no", {"k": [1]}))["error"]["data"] == {"k": [1]}


def test_local_misuse_raises_local_protocol_error() -> None:
    client = RpcClient()
    rng = seeded_rng(1)
    with pytest.raises(LocalProtocolError, match="array or an object"):
        client.request(BOB, "m", 5, 0.0, rng)
    with pytest.raises(LocalProtocolError, match="not JSON-encodable"):
        client.request(BOB, "m", [object()], 0.0, rng)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        client.request(BOB, "m", ["x" * MAX_PAYLOAD_SIZE], 0.0, rng)
    assert client.statistics().pending == 0
    with pytest.raises(LocalProtocolError):
        encode_result("a", {1, 2, 3} | {object()})
    with pytest.raises(LocalProtocolError):
        encode_error("a", 1000, "m", data=object())
    with pytest.raises(LocalProtocolError):
        RpcTimers(initial_rto=1.0, max_attempts=7)  # 127 s outlives the 60 s cache


def test_payload_limit_fits_a_link_control_frame() -> None:
    envelope_allowance = 64  # the control message that carries an RPC payload
    assert MAX_PAYLOAD_SIZE + link.DATA_OVERHEAD + envelope_allowance <= link.MAX_MESSAGE_SIZE


def test_requests_and_responses_are_told_apart() -> None:
    assert is_request(request_bytes("a"))
    assert not is_request(encode_result("a", 1))
    assert not is_request(encode_error(None, PARSE_ERROR, "Parse error"))
    # Garbage goes to the server, which answers it with an error.
    assert is_request(b"\xff")
    assert is_request(b"[1]")
    assert is_request(b"x" * (MAX_PAYLOAD_SIZE + 1))


# --- server: malformed input ----------------------------------------------------------------


# Nested deeper than msgspec parses (~1,000 levels): these used to raise RecursionError out
# of the server and stop the node; the first is a 1 KB request.
TOO_DEEP = [
    b'{"":' + b"[" * 1000,
    b'{"jsonrpc":"2.0","id":5,"method":"m","params":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"a":' * 2000 + b"1" + b"}" * 2000,
]


@pytest.mark.parametrize(
    "payload", [b"", b"{", b'{"jsonrpc": "2.0",', b"\xff\xfe", b"nul", *TOO_DEEP]
)
def test_malformed_json_is_a_parse_error(payload: bytes) -> None:
    server = RpcServer()
    response = receive(server, ALICE, payload, 0.0)
    assert isinstance(response, bytes)
    body = as_json(response)
    assert body["id"] is None
    assert body["error"]["code"] == PARSE_ERROR
    assert server.statistics().parse_errors == 1


@pytest.mark.parametrize(
    ("payload", "echoed_id"),
    [
        (b"[]", None),  # batches are not supported
        (b'[{"jsonrpc":"2.0","id":1,"method":"m"}]', None),
        (b"42", None),
        (b'{"jsonrpc":"2.0","method":"m"}', None),  # a notification: we require ids
        (b'{"jsonrpc":"1.0","id":3,"method":"m"}', 3),
        (b'{"id":"x","method":"m"}', "x"),
        (b'{"jsonrpc":"2.0","id":3,"method":7}', 3),
        (b'{"jsonrpc":"2.0","id":3,"method":"m","params":5}', 3),
        (b'{"jsonrpc":"2.0","id":3,"method":"m","params":null}', 3),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"m"}', None),
        (b'{"jsonrpc":"2.0","id":true,"method":"m"}', None),
        (b'{"jsonrpc":"2.0","id":null,"method":"m"}', None),
        (b'{"jsonrpc":"2.0","id":99999999999999999999,"method":"m"}', None),
        (b'{"jsonrpc":"2.0","id":"' + b"i" * 129 + b'","method":"m"}', None),
        (b'{"jsonrpc":"2.0","id":4,"method":"' + b"m" * (MAX_METHOD_LENGTH + 1) + b'"}', 4),
    ],
)
def test_valid_json_but_not_a_request_is_invalid_request(
    payload: bytes, echoed_id: str | int | None
) -> None:
    server = RpcServer()
    response = receive(server, ALICE, payload, 0.0)
    assert isinstance(response, bytes)
    body = as_json(response)
    assert body["error"]["code"] == INVALID_REQUEST
    assert body["id"] == echoed_id
    assert server.statistics().invalid_requests == 1
    assert server.statistics().cached_entries == 0  # nothing ran, nothing remembered


@pytest.mark.parametrize(
    "payload",
    [
        *TOO_DEEP,
        b'{"jsonrpc":"2.0","id":"x","result":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"jsonrpc":"2.0","id":"x","error":{"code":18446744073709551616,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":"x","error":{"code":1,"message":"' + b"m" * 257 + b'"}}',
    ],
)
def test_responses_too_deep_or_out_of_bounds_are_malformed(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_response(payload)
    assert caught.value.reason == "rpc_bad_response"
    client = RpcClient()
    client.request(BOB, "m", None, 0.0, seeded_rng(1))
    assert client.receive_response(BOB, payload) is None
    assert client.statistics().malformed == 1


def test_error_messages_are_cut_to_what_a_peer_accepts() -> None:
    error = decode_response(encode_error("x", 1000, "m" * 1000)).error
    assert isinstance(error, ErrorObject) and len(error.message) == MAX_ERROR_MESSAGE_CHARS


def test_oversized_request_is_refused_unread() -> None:
    server = RpcServer()
    payload = request_bytes("a", params=["x" * MAX_PAYLOAD_SIZE])
    response = receive(server, ALICE, payload, 0.0)
    assert isinstance(response, bytes)
    assert as_json(response)["error"]["code"] == INVALID_REQUEST


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
MESSAGE_KEYS = st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "x"])
JSON_OBJECTS = st.dictionaries(
    MESSAGE_KEYS, JSON_VALUES | st.just("2.0") | st.just("echo"), max_size=5
)
# The id the client below gets from seeded_rng(1), so that some responses match its call.
PENDING_ID = RpcClient().request(BOB, "m", None, 0.0, seeded_rng(1))[0]
IDS = st.just(PENDING_ID) | st.integers() | st.text(max_size=8) | JSON_VALUES
ERRORS = st.fixed_dictionaries(
    {"code": st.integers(), "message": st.text(max_size=8)}, optional={"data": JSON_VALUES}
)
NEARLY_VALID = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "id": IDS, "method": st.text(max_size=8)},
    optional={"params": st.lists(JSON_VALUES, max_size=3) | JSON_VALUES},
) | st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "id": IDS},
    optional={"result": JSON_VALUES, "error": ERRORS | JSON_VALUES},
)
PAYLOADS = (
    st.binary(max_size=300)
    | JSON_VALUES.map(msgspec.json.encode)
    | JSON_OBJECTS.map(msgspec.json.encode)
    | NEARLY_VALID.map(msgspec.json.encode)
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(PAYLOADS)
def test_any_bytes_into_the_decoders_raise_only_remote_protocol_error(payload: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(RemoteProtocolError):
            decode(payload)
    is_request(payload)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(PAYLOADS)
def test_any_bytes_into_the_server_get_a_well_formed_answer(payload: bytes) -> None:
    server = RpcServer()
    action = receive(server, ALICE, payload, 0.0)
    if isinstance(action, bytes):
        response = decode_response(action)  # our answers are always valid responses
        assert response.error is not msgspec.UNSET
        assert not is_request(action)  # so the peer never answers them in turn
    else:
        assert isinstance(action, RequestReceived)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(PAYLOADS)
def test_any_bytes_into_the_client_complete_the_call_or_are_counted(payload: bytes) -> None:
    client = RpcClient()
    client.request(BOB, "m", None, 0.0, seeded_rng(1))
    outcome = client.receive_response(BOB, payload)
    stats = client.statistics()
    if outcome is None:
        assert stats.malformed + stats.unmatched_responses == 1
        assert stats.pending == 1
    else:
        assert outcome.request_id == PENDING_ID
        assert (stats.completed, stats.pending) == (1, 0)


# --- server: the run-once cache ---------------------------------------------------------------


def test_retransmission_gets_identical_cached_bytes_and_does_not_rerun() -> None:
    server = RpcServer()
    now = 0.0
    payload = request_bytes("r1", params=[1, 2])
    request = dispatch(server, ALICE, payload, now)
    assert (request.neighbor, request.request_id, request.method, request.params) == (
        ALICE,
        "r1",
        "echo",
        [1, 2],
    )
    now += TICK
    assert receive(server, ALICE, payload, now) is None  # still running: no answer
    response = encode_result("r1", {"sum": 3})
    server.complete(ALICE, "r1", response, now)
    for _ in range(3):
        now += TICK
        assert receive(server, ALICE, payload, now) == response
    # Key order and whitespace do not make a retransmission a new request.
    respelled = b'{"params": [1, 2], "method": "echo", "id": "r1", "jsonrpc": "2.0"}'
    assert receive(server, ALICE, respelled, now) == response
    stats = server.statistics()
    assert stats.dispatched == 1
    assert stats.in_progress_hits == 1
    assert stats.cache_hits == 4


def test_key_is_neighbor_and_id() -> None:
    server = RpcServer()
    dispatch(server, ALICE, request_bytes(1), 0.0)
    dispatch(server, BOB, request_bytes(1), 0.0)  # same id, another client
    dispatch(server, ALICE, request_bytes("1"), 0.0)  # a string is not the integer
    assert server.statistics().dispatched == 3


def test_reused_id_with_other_content_is_dropped() -> None:
    server = RpcServer()
    dispatch(server, ALICE, request_bytes("r", "echo", [1]), 0.0)
    assert receive(server, ALICE, request_bytes("r", "echo", [2]), 0.0) is None
    server.complete(ALICE, "r", encode_result("r", 1), 0.0)
    assert receive(server, ALICE, request_bytes("r", "other", [1]), 0.0) is None
    assert server.statistics().id_conflicts == 2


def test_entries_live_60_seconds_and_not_longer() -> None:
    assert RESPONSE_CACHE_SECS == 60.0
    server = RpcServer()
    payload = request_bytes("r")
    dispatch(server, ALICE, payload, 0.0)
    response = encode_result("r", "done")
    server.complete(ALICE, "r", response, 10.0)
    assert server.get_timer() == 70.0
    for second in range(11, 70):
        server.handle_timer(float(second))
    assert receive(server, ALICE, payload, 70.0 - TICK) == response
    server.handle_timer(70.0)
    assert server.statistics().expired == 1
    assert server.get_timer() is None
    dispatch(server, ALICE, payload, 70.0)  # forgotten: it would run again


def test_running_entries_never_expire() -> None:
    server = RpcServer()
    payload = request_bytes("slow")
    dispatch(server, ALICE, payload, 0.0)
    assert server.get_timer() is None
    server.handle_timer(1000.0)
    assert receive(server, ALICE, payload, 1000.0) is None


def test_complete_misuse() -> None:
    server = RpcServer()
    with pytest.raises(LocalProtocolError):
        server.complete(ALICE, "never", b"x", 0.0)
    dispatch(server, ALICE, request_bytes("r"), 0.0)
    with pytest.raises(LocalProtocolError, match="too large"):
        server.complete(ALICE, "r", b"x" * (MAX_PAYLOAD_SIZE + 1), 0.0)
    server.complete(ALICE, "r", encode_result("r", 1), 0.0)
    with pytest.raises(LocalProtocolError):
        server.complete(ALICE, "r", encode_result("r", 2), 0.0)


def test_unknown_methods_are_answered_without_an_entry() -> None:
    server = RpcServer(max_neighbors=1, max_entries_per_neighbor=1)
    payload = request_bytes(7, "no_such_method", [1])
    answer = receive(server, ALICE, payload, 0.0)
    assert isinstance(answer, bytes)
    assert as_json(answer) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": METHOD_NOT_FOUND, "message": "Method not found"},
    }
    assert receive(server, ALICE, payload, 1.0) == answer  # a retransmission: same bytes
    stats = server.statistics()
    assert (stats.unknown_methods, stats.dispatched, stats.cached_entries) == (2, 0, 0)
    dispatch(server, ALICE, request_bytes(8), 1.0)  # the one slot is still free


def busy(action: RequestReceived | bytes | None) -> str | None:
    """The bound a SERVER_BUSY answer names, or None for any other action."""
    if not isinstance(action, bytes):
        return None
    error = as_json(action).get("error")
    return error["data"] if error and error["code"] == SERVER_BUSY else None


def test_full_cache_refuses_new_requests_and_keeps_its_entries() -> None:
    server = RpcServer(max_neighbors=1, max_entries_per_neighbor=3, response_cache_secs=60.0)
    responses = {}
    for i in range(3):
        dispatch(server, ALICE, request_bytes(i), 0.0)
        responses[i] = encode_result(i, i)
        server.complete(ALICE, i, responses[i], 0.0)
    assert busy(receive(server, ALICE, request_bytes(3), 0.5)) == "neighbor_entries"
    # More neighbours than the node admits hold entries: the total bound is reached.
    refused = receive(server, BOB, request_bytes(99), 1.0)
    assert busy(refused) == "total_entries"
    assert isinstance(refused, bytes) and as_json(refused)["id"] == 99
    # The refusal is not remembered, and every live entry still answers from the cache.
    assert busy(receive(server, BOB, request_bytes(99), 2.0)) == "total_entries"
    for i in range(3):
        assert receive(server, ALICE, request_bytes(i), 59.0) == responses[i]
    stats = server.statistics()
    assert stats.busy == {"neighbor_entries": 1, "total_entries": 2}
    assert (stats.dispatched, stats.cached_entries, stats.cached_neighbors) == (3, 3, 1)
    # Space comes back only as entries reach 60 s.
    dispatch(server, BOB, request_bytes(99), 60.0)


def test_running_entries_count_against_the_bound() -> None:
    server = RpcServer(max_neighbors=2, max_entries_per_neighbor=1)
    dispatch(server, ALICE, request_bytes(1), 0.0)
    dispatch(server, BOB, request_bytes(1), 0.0)
    assert busy(receive(server, CAROL, request_bytes(1), 1000.0)) == "total_entries"


def test_eight_identities_filling_their_quotas_leave_room_for_an_honest_neighbor() -> None:
    """The attack: eight neighbours (one route cookie, eight identities) call as fast as
    they can, with unknown methods and with real ones. The ninth, honest, still gets in."""
    server = RpcServer(max_neighbors=9, request_rate=None)  # quotas alone; rates below
    flooders = [bytes([i]) * 32 for i in range(8)]
    for flooder in flooders:
        for i in range(MAX_CACHE_ENTRIES_PER_NEIGHBOR):
            receive(server, flooder, request_bytes(f"u{i}", "no_such_method"), 0.0)
    assert server.statistics().cached_entries == 0
    for flooder in flooders:
        for i in range(MAX_CACHE_ENTRIES_PER_NEIGHBOR + 10):
            action = receive(server, flooder, request_bytes(f"e{i}"), 1.0)
            if isinstance(action, RequestReceived):
                server.complete(
                    flooder, action.request_id, encode_result(action.request_id, i), 1.0
                )
            else:
                assert busy(action) == "neighbor_entries"
    stats = server.statistics()
    assert stats.busy == {"neighbor_entries": 8 * 10}
    assert stats.cached_entries == 8 * MAX_CACHE_ENTRIES_PER_NEIGHBOR
    for i in range(MAX_CACHE_ENTRIES_PER_NEIGHBOR):
        dispatch(server, ALICE, request_bytes(i, "add", [i, 1]), 2.0)
        server.complete(ALICE, i, encode_result(i, i + 1), 2.0)


def test_a_neighbors_requests_beyond_its_rate_are_dropped_unread() -> None:
    """A burst beyond REQUEST_BURST_PER_NEIGHBOR is dropped (the client resends); tokens come
    back at REQUEST_RATE_PER_NEIGHBOR a second; other neighbours are not affected."""
    server = RpcServer()
    for i in range(REQUEST_BURST_PER_NEIGHBOR):
        dispatch(server, ALICE, request_bytes(i), 0.0)
        server.complete(ALICE, i, encode_result(i, None), 0.0)
    assert receive(server, ALICE, request_bytes("over"), 0.0) is None
    assert receive(server, ALICE, b"{garbage", 0.0) is None  # dropped before it is read
    dispatch(server, BOB, request_bytes(1), 0.0)
    stats = server.statistics()
    assert (stats.rate_limited, stats.parse_errors, stats.dispatched) == (2, 0, 33)
    # One token back after 1 / rate seconds, not before.
    almost = 0.99 / REQUEST_RATE_PER_NEIGHBOR
    assert receive(server, ALICE, request_bytes("over"), almost) is None
    dispatch(server, ALICE, request_bytes("over"), 1.0 / REQUEST_RATE_PER_NEIGHBOR)
    assert receive(server, ALICE, request_bytes("later"), 1.0 / REQUEST_RATE_PER_NEIGHBOR) is None


# What a running entry is charged: its response may be as large as a payload can be.
RUNNING_BYTES = CACHE_ENTRY_OVERHEAD_BYTES + MAX_PAYLOAD_SIZE


def test_bytes_are_bounded_per_neighbor_and_answered_entries_cost_what_they_hold() -> None:
    server = RpcServer(max_neighbors=2, max_bytes_per_neighbor=3 * RUNNING_BYTES)
    for i in range(3):
        dispatch(server, ALICE, request_bytes(i), 0.0)
    assert server.statistics().cached_bytes == 3 * RUNNING_BYTES
    assert busy(receive(server, ALICE, request_bytes(3), 0.0)) == "neighbor_bytes"
    dispatch(server, BOB, request_bytes(3), 0.0)  # Alice's quota is hers alone
    large = encode_result(0, "x" * (MAX_PAYLOAD_SIZE // 2))
    server.complete(ALICE, 0, large, 0.0)
    assert busy(receive(server, ALICE, request_bytes(3), 0.0)) == "neighbor_bytes"
    small = encode_result(1, 1)
    server.complete(ALICE, 1, small, 0.0)  # frees almost a whole running charge
    dispatch(server, ALICE, request_bytes(3), 0.0)
    expected = (
        3 * RUNNING_BYTES  # Alice's 2 and 3, Bob's 3
        + 2 * CACHE_ENTRY_OVERHEAD_BYTES
        + len(large)
        + len(small)
    )
    assert server.statistics().cached_bytes == expected
    server.complete(ALICE, 2, small, 0.0)
    server.complete(ALICE, 3, small, 0.0)
    server.complete(BOB, 3, small, 0.0)
    server.handle_timer(RESPONSE_CACHE_SECS)
    stats = server.statistics()
    assert (stats.cached_bytes, stats.cached_entries, stats.cached_neighbors) == (0, 0, 0)


def test_more_neighbors_than_admitted_reach_the_total_byte_bound() -> None:
    server = RpcServer(max_neighbors=2, max_bytes_per_neighbor=2 * RUNNING_BYTES)
    for neighbor in (ALICE, BOB):
        for i in range(2):
            dispatch(server, neighbor, request_bytes(i), 0.0)
    assert busy(receive(server, CAROL, request_bytes(0), 0.0)) == "total_bytes"


def test_unusable_bounds_are_refused() -> None:
    for bad in (
        {"max_neighbors": 0},
        {"max_entries_per_neighbor": 0},
        {"response_cache_secs": 0.0},
        {"max_bytes_per_neighbor": RUNNING_BYTES - 1},  # not even one call could run
    ):
        with pytest.raises(LocalProtocolError):
            RpcServer(**bad)  # type: ignore[arg-type]


QUOTA_ENTRIES = 4
QUOTA_BYTES = 3 * RUNNING_BYTES + 2 * (CACHE_ENTRY_OVERHEAD_BYTES + 2000)
# Calls outnumber answers and time moves seldom, so that quotas fill up often.
ACTIONS = st.sampled_from(["call"] * 3 + ["answer small", "answer large", "wait"])
STEPS = st.lists(st.tuples(st.integers(0, 3), ACTIONS), min_size=10, max_size=150)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(STEPS)
def test_a_neighbor_under_its_quota_is_never_refused(steps: list[tuple[int, str]]) -> None:
    """However four neighbours interleave calls, answers and time, a call is refused exactly
    when its own neighbour's entries or bytes are used up, never for the others' sake."""
    ttl = 10.0
    server = RpcServer(
        response_cache_secs=ttl,
        max_neighbors=4,
        max_entries_per_neighbor=QUOTA_ENTRIES,
        max_bytes_per_neighbor=QUOTA_BYTES,
    )
    neighbors = [bytes([i + 1]) * 32 for i in range(4)]
    # The charges the documentation promises: (bytes, expiry or None while running).
    held: list[dict[int, tuple[int, float | None]]] = [{} for _ in neighbors]
    now = 0.0
    next_id = 0
    for who, what in steps:
        neighbor, mine = neighbors[who], held[who]
        if what == "wait":
            now += 3.0
        elif what == "call":
            next_id += 1
            action = receive(server, neighbor, request_bytes(next_id), now)
            used = sum(size for size, _ in mine.values())
            full = len(mine) >= QUOTA_ENTRIES or used + RUNNING_BYTES > QUOTA_BYTES
            if full:
                assert busy(action) in ("neighbor_entries", "neighbor_bytes")
            else:
                assert isinstance(action, RequestReceived)
                mine[next_id] = (RUNNING_BYTES, None)
        else:
            running = [request_id for request_id, (_, expiry) in mine.items() if expiry is None]
            if running:
                result = "x" * (2000 if what == "answer large" else 1)
                response = encode_result(running[0], result)
                server.complete(neighbor, running[0], response, now)
                mine[running[0]] = (CACHE_ENTRY_OVERHEAD_BYTES + len(response), now + ttl)
        server.handle_timer(now)
        for entries in held:
            for request_id, (_, expiry) in list(entries.items()):
                if expiry is not None and expiry <= now:
                    del entries[request_id]
        stats = server.statistics()
        assert stats.cached_bytes == sum(size for e in held for size, _ in e.values())
        assert stats.cached_bytes <= 4 * QUOTA_BYTES
        assert not {"total_entries", "total_bytes"} & set(stats.busy)


# --- client ---------------------------------------------------------------------------------


def run_until(client: RpcClient, now: float, until: float) -> tuple[float, list[tuple[float, Any]]]:
    """Step the clock by TICK, collecting (time, resend or event)."""
    happened: list[tuple[float, Any]] = []
    while now < until:
        now = round(now + TICK, 6)
        timer = client.get_timer()
        if timer is not None and now >= timer:
            happened += [(now, resend) for resend in client.handle_timer(now)]
            while (event := client.next_event()) is not None:
                happened.append((now, event))
    return now, happened


def test_client_retransmits_same_bytes_with_backoff_then_gives_up() -> None:
    timers = RpcTimers(initial_rto=0.5, max_attempts=6)
    assert timers.give_up_after == 31.5
    client = RpcClient(timers)
    request_id, payload = client.request(BOB, "m", [1], 0.0, seeded_rng(3))
    assert client.get_timer() == 0.5
    _, happened = run_until(client, 0.0, 40.0)
    resends = [(t, what) for t, what in happened if isinstance(what, tuple)]
    assert [t for t, _ in resends] == [0.5, 1.5, 3.5, 7.5, 15.5]
    assert all(what == (BOB, payload) for _, what in resends)
    assert happened[-1] == (31.5, CallTimedOut(request_id, BOB, "m", 6))
    assert client.get_timer() is None
    stats = client.statistics()
    assert (stats.sent, stats.retransmitted, stats.failed, stats.pending) == (1, 5, 1, 0)


def test_response_completes_the_call_and_stops_retransmission() -> None:
    client = RpcClient(RpcTimers(initial_rto=0.1, max_attempts=4))
    request_id, _ = client.request(BOB, "m", None, 0.0, seeded_rng(1))
    now, _ = run_until(client, 0.0, 0.15)
    outcome = client.receive_response(BOB, encode_result(request_id, None))
    assert outcome == ResultReceived(request_id, BOB, None)
    _, happened = run_until(client, now, 5.0)
    assert happened == []
    stats = client.statistics()
    assert (stats.sent, stats.retransmitted, stats.completed, stats.failed) == (1, 1, 1, 0)


def test_error_response_is_an_outcome() -> None:
    client = RpcClient()
    request_id, _ = client.request(BOB, "m", None, 0.0, seeded_rng(1))
    response = encode_error(request_id, 1234, "refused", {"why": "because"})
    outcome = client.receive_response(BOB, response)
    assert outcome == ErrorReceived(request_id, BOB, 1234, "refused", {"why": "because"})


def test_unmatched_responses_are_discarded_and_counted() -> None:
    client = RpcClient()
    request_id, _ = client.request(BOB, "m", None, 0.0, seeded_rng(1))
    assert client.receive_response(BOB, encode_result("someone-else", 1)) is None
    assert client.receive_response(BOB, encode_result(None, 1)) is None
    assert client.receive_response(BOB, encode_result(7, 1)) is None
    assert client.receive_response(CAROL, encode_result(request_id, 1)) is None  # wrong peer
    assert client.receive_response(BOB, encode_result(request_id, 1)) is not None
    assert client.receive_response(BOB, encode_result(request_id, 1)) is None  # duplicate
    assert client.receive_response(BOB, b'{"jsonrpc":"2.0","id":"x"}') is None  # no result
    stats = client.statistics()
    assert (stats.unmatched_responses, stats.malformed, stats.completed) == (5, 1, 1)


def test_cancelled_call_is_forgotten() -> None:
    client = RpcClient()
    request_id, _ = client.request(BOB, "m", None, 0.0, seeded_rng(1))
    assert client.cancel(request_id)
    assert not client.cancel(request_id)
    assert client.get_timer() is None
    assert client.receive_response(BOB, encode_result(request_id, 1)) is None


def test_client_and_server_over_a_wire_that_loses_the_first_copies() -> None:
    """The request's first copy and the response's first copy are lost: the method still
    runs once and the caller gets its result from the cache."""
    client = RpcClient(RpcTimers(initial_rto=0.1, max_attempts=6))
    server = RpcServer()
    now = 0.0
    request_id, _ = client.request(BOB, "add", [2, 3], now, seeded_rng(9))  # lost
    runs = 0
    outcome = None
    lost_first_response = False
    while outcome is None:
        now = round(now + TICK, 6)
        for _, payload in client.handle_timer(now):
            action = receive(server, ALICE, payload, now)
            if isinstance(action, RequestReceived):
                runs += 1
                assert isinstance(action.params, list)
                response = encode_result(action.request_id, sum(action.params))
                server.complete(ALICE, action.request_id, response, now)
                lost_first_response = True  # dropped on the way back
            elif isinstance(action, bytes):
                outcome = client.receive_response(BOB, action)
        assert now < 5.0
    assert lost_first_response
    assert runs == 1
    assert outcome == ResultReceived(request_id, BOB, 5)
    assert server.statistics().cache_hits == 1
