"""GlobalRpc between in-memory neighbours over wires that lose and duplicate messages."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from structlog.testing import capture_logs

from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MAX_CACHE_ENTRIES_PER_NEIGHBOR,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_BURST_PER_NEIGHBOR,
    REQUEST_RATE_PER_NEIGHBOR,
)
from earendil_py.runtime.rpc import GlobalRpc, RpcError, RpcTimeout, RpcTimers
from tests.helpers import seeded_rng

ALICE = b"A" * 32
BOB = b"B" * 32
NOBODY = b"N" * 32  # no link: every send to it fails
TIMERS = RpcTimers(initial_rto=0.02, max_attempts=6)  # gives up after 1.26 s
HANDLER_SECS = 0.1  # longer than the first retransmissions, so some arrive while it runs


class Net:
    """Neighbours joined by an in-memory datagram wire. Delivery is deferred to a task, as
    a real link would, so a send never re-enters the receiver."""

    def __init__(self, tg: anyio.abc.TaskGroup, *, lossy: bool, duplicating: bool) -> None:
        self.tg = tg
        self.lossy = lossy
        self.duplicating = duplicating
        self.nodes: dict[bytes, GlobalRpc] = {}
        self.copies: Counter[tuple[bytes, bytes, bytes]] = Counter()
        self.sent_to: Counter[bytes] = Counter()
        self.dropped = 0
        self.delivered: list[tuple[bytes, bytes, bytes]] = []

    def add(
        self, fingerprint: bytes, timers: RpcTimers, seed: int, request_rate: float | None
    ) -> GlobalRpc:
        def send(neighbor: bytes, payload: bytes) -> bool:
            return self._send(fingerprint, neighbor, payload)

        rpc = GlobalRpc(send, rng=seeded_rng(seed), timers=timers, request_rate=request_rate)
        self.nodes[fingerprint] = rpc
        return rpc

    def _send(self, source: bytes, destination: bytes, payload: bytes) -> bool:
        self.sent_to[destination] += 1
        if destination not in self.nodes:
            return False
        key = (source, destination, payload)
        self.copies[key] += 1
        # Lossy: the 1st, 3rd, 5th... copy of every distinct message is lost. Deterministic,
        # and every message gets through on its second try.
        if self.lossy and self.copies[key] % 2 == 1:
            self.dropped += 1
            return True
        for _ in range(2 if self.duplicating else 1):
            self.tg.start_soon(self._deliver, source, destination, payload)
        return True

    async def _deliver(self, source: bytes, destination: bytes, payload: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.delivered.append((source, destination, payload))
        self.nodes[destination].receive(source, payload)


@asynccontextmanager
async def network(
    *,
    lossy: bool = False,
    duplicating: bool = False,
    timers: RpcTimers = TIMERS,
    request_rate: float | None = REQUEST_RATE_PER_NEIGHBOR,
) -> AsyncIterator[tuple[Net, GlobalRpc, GlobalRpc]]:
    async with anyio.create_task_group() as tg:
        net = Net(tg, lossy=lossy, duplicating=duplicating)
        alice = net.add(ALICE, timers, seed=1, request_rate=request_rate)
        bob = net.add(BOB, timers, seed=2, request_rate=request_rate)
        await tg.start(alice.run)
        await tg.start(bob.run)
        yield net, alice, bob
        tg.cancel_scope.cancel()


class Adder:
    """A handler with a side effect: it counts how often each request really ran."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    async def __call__(self, neighbor: bytes, params: Any) -> Any:
        assert neighbor == ALICE
        match params:
            case {"tag": str(tag), "terms": [int(a), int(b)]}:
                pass
            case _:
                raise RpcError(INVALID_PARAMS, "Invalid params", "expected tag and two terms")
        self.runs[tag] += 1
        await anyio.sleep(HANDLER_SECS)
        return {"sum": a + b, "tag": tag}


@pytest.mark.anyio
async def test_call_returns_the_result() -> None:
    with anyio.fail_after(5):
        async with network() as (_, alice, bob):
            adder = Adder()
            bob.register("add", adder)
            result = await alice.call(BOB, "add", {"tag": "t", "terms": [2, 3]})
    assert result == {"sum": 5, "tag": "t"}
    assert adder.runs == {"t": 1}
    client = alice.statistics().client
    assert (client.sent, client.completed, client.pending) == (1, 1, 0)
    # The handler outlasts the first retransmissions; they found it running.
    assert bob.statistics().server.in_progress_hits == client.retransmitted > 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("lossy", "duplicating"),
    [(True, False), (False, True), (True, True)],
    ids=["lossy", "duplicating", "lossy+duplicating"],
)
async def test_handler_runs_exactly_once_under_loss_duplication_and_retransmission(
    lossy: bool, duplicating: bool
) -> None:
    tags = [f"call-{i}" for i in range(6)]
    results: dict[str, Any] = {}
    with anyio.fail_after(5):
        # Every copy is replayed at the end, faster than a neighbour's request rate admits.
        async with network(lossy=lossy, duplicating=duplicating, request_rate=None) as (
            net,
            alice,
            bob,
        ):
            adder = Adder()
            bob.register("add", adder)

            async def one(i: int, tag: str) -> None:
                results[tag] = await alice.call(BOB, "add", {"tag": tag, "terms": [i, 10]})

            async with anyio.create_task_group() as callers:
                for i, tag in enumerate(tags):
                    callers.start_soon(one, i, tag)
            # Retransmissions after the fact are answered from the cache, never re-run.
            for source, destination, payload in list(net.delivered):
                if destination == BOB:
                    bob.receive(source, payload)
            await anyio.sleep(0.05)
    assert results == {tag: {"sum": i + 10, "tag": tag} for i, tag in enumerate(tags)}
    assert adder.runs == dict.fromkeys(tags, 1)
    server = bob.statistics().server
    assert server.dispatched == len(tags)
    assert server.cache_hits >= len(tags)  # copies after it finished (at least our replays)
    client = alice.statistics().client
    assert client.completed == len(tags)
    if lossy:
        assert net.dropped > 0
        assert client.retransmitted > 0
    if duplicating:
        assert server.in_progress_hits > 0  # copies arrived while the handler ran
        assert client.unmatched_responses > 0  # second copies of answers are discarded


@pytest.mark.anyio
async def test_method_not_found() -> None:
    with anyio.fail_after(5):
        async with network(duplicating=True) as (_, alice, bob):
            with pytest.raises(RpcError) as caught:
                await alice.call(BOB, "no_such_method", [1])
    assert caught.value.code == METHOD_NOT_FOUND
    server = bob.statistics().server
    assert server.unknown_methods >= 1
    assert (server.dispatched, server.cached_entries) == (0, 0)  # nothing ran, nothing kept


@pytest.mark.anyio
async def test_eight_flooding_identities_leave_room_for_an_honest_neighbor() -> None:
    """Eight neighbours (one route cookie, eight identities) flood Bob with unknown methods,
    then with a real one beyond their quotas: Alice's call still runs. Each flooder's burst
    beyond its request rate is dropped unread; with the rate lifted, each is refused for its
    own cache quota, never for the cache as a whole."""
    flooders = [bytes([i]) * 32 for i in range(8)]
    quota = MAX_CACHE_ENTRIES_PER_NEIGHBOR

    async def note(neighbor: bytes, params: Any) -> Any:
        return None

    for request_rate in (REQUEST_RATE_PER_NEIGHBOR, None):
        with anyio.fail_after(10):
            async with network(request_rate=request_rate) as (_, alice, bob):
                bob.register("note", note)
                bob.register("add", Adder())
                for flooder in flooders:
                    for i in range(quota):
                        bob.receive(flooder, msgspec.json.encode(request(f"u{i}", "nothing")))
                    for i in range(quota + 10):
                        bob.receive(flooder, msgspec.json.encode(request(f"n{i}", "note")))
                result = await alice.call(BOB, "add", {"tag": "t", "terms": [2, 3]})
        assert result == {"sum": 5, "tag": "t"}
        server = bob.statistics().server
        if request_rate is not None:
            assert server.unknown_methods == 8 * REQUEST_BURST_PER_NEIGHBOR
            assert server.rate_limited == 8 * (2 * quota + 10 - REQUEST_BURST_PER_NEIGHBOR)
            assert not server.busy
            continue
        assert server.unknown_methods == 8 * quota
        # Calls arrived faster than they ran, so running calls used up a flooder's bytes first.
        assert set(server.busy) == {"neighbor_bytes"}
        assert server.busy.total() + server.dispatched - 1 == 8 * (quota + 10)


def request(request_id: str, method: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method}


@pytest.mark.anyio
async def test_handler_error_reaches_the_caller() -> None:
    runs = 0

    async def refuse(neighbor: bytes, params: Any) -> Any:
        nonlocal runs
        runs += 1
        await anyio.sleep(HANDLER_SECS)
        raise RpcError(1001, "price too high", {"max_umel": 5})

    with anyio.fail_after(5):
        async with network(lossy=True, duplicating=True) as (_, alice, bob):
            bob.register("buy", refuse)
            with pytest.raises(RpcError) as caught:
                await alice.call(BOB, "buy", {"umel": 7})
    assert (caught.value.code, caught.value.message, caught.value.data) == (
        1001,
        "price too high",
        {"max_umel": 5},
    )
    assert runs == 1


@pytest.mark.anyio
async def test_invalid_params_from_a_handler() -> None:
    with anyio.fail_after(5):
        async with network() as (_, alice, bob):
            bob.register("add", Adder())
            with pytest.raises(RpcError) as caught:
                await alice.call(BOB, "add", ["not", "an", "object"])
    assert caught.value.code == INVALID_PARAMS


@pytest.mark.anyio
async def test_handler_crash_is_an_internal_error_and_the_server_lives_on() -> None:
    runs = 0

    async def crash(neighbor: bytes, params: Any) -> Any:
        nonlocal runs
        runs += 1
        raise ValueError("secret local state")

    async def unencodable(neighbor: bytes, params: Any) -> Any:
        return object()

    async def reserved_code(neighbor: bytes, params: Any) -> Any:
        raise RpcError(METHOD_NOT_FOUND, "pretending")

    with anyio.fail_after(5), capture_logs() as logs:
        async with network(duplicating=True) as (_, alice, bob):
            bob.register("crash", crash)
            bob.register("unencodable", unencodable)
            bob.register("reserved_code", reserved_code)
            bob.register("add", Adder())
            for method in ("crash", "unencodable", "reserved_code"):
                with pytest.raises(RpcError) as caught:
                    await alice.call(BOB, method, None)
                assert caught.value.code == INTERNAL_ERROR
                assert "secret" not in repr(caught.value.data)
            assert await alice.call(BOB, "add", {"tag": "x", "terms": [1, 1]}) == {
                "sum": 2,
                "tag": "x",
            }
    assert runs == 1
    errors = [entry for entry in logs if entry["event"] == "rpc_handler_error"]
    assert [entry["method"] for entry in errors] == ["crash", "unencodable", "reserved_code"]
    assert errors[0]["neighbor"] == ALICE.hex()[:8]


@pytest.mark.anyio
async def test_call_to_a_neighbor_that_never_answers_times_out() -> None:
    timers = RpcTimers(initial_rto=0.02, max_attempts=4)  # resends at .02 .06 .14, gives up .30
    with anyio.fail_after(5):
        async with network(timers=timers) as (net, alice, _):
            started = anyio.current_time()
            with pytest.raises(RpcTimeout) as caught:
                await alice.call(NOBODY, "add", [1, 2])
            elapsed = anyio.current_time() - started
    assert caught.value.attempts == 4
    assert timers.give_up_after <= elapsed < timers.give_up_after + 1.0
    assert net.sent_to[NOBODY] == 4
    stats = alice.statistics().client
    assert (stats.sent, stats.retransmitted, stats.failed, stats.pending) == (1, 3, 1, 0)


@pytest.mark.anyio
async def test_cancelled_call_stops_retransmitting() -> None:
    with anyio.fail_after(5):
        async with network() as (net, alice, _):
            with anyio.move_on_after(0.05):
                await alice.call(NOBODY, "add", [1, 2])
            sent = net.sent_to[NOBODY]
            await anyio.sleep(0.3)
            assert net.sent_to[NOBODY] == sent
    stats = alice.statistics().client
    assert (stats.cancelled, stats.pending) == (1, 0)


@pytest.mark.anyio
async def test_garbage_is_answered_and_never_raises() -> None:
    with anyio.fail_after(5):
        async with network() as (net, alice, bob):
            alice.receive(BOB, b"\x00not json")
            alice.receive(BOB, b'{"jsonrpc":"2.0","id":"nobody-asked","result":1}')
            await anyio.sleep(0.05)
    answer = msgspec.json.decode(net.delivered[0][2])
    assert net.delivered[0][:2] == (ALICE, BOB)
    assert answer["error"]["code"] == PARSE_ERROR
    assert alice.statistics().server.parse_errors == 1
    assert alice.statistics().client.unmatched_responses == 1
    assert bob.statistics().client.unmatched_responses == 1  # the error answer, discarded
    assert len(net.delivered) == 1  # and not answered in turn


@pytest.mark.anyio
async def test_misuse_raises_local_protocol_error() -> None:
    rpc = GlobalRpc(lambda neighbor, payload: True)
    with pytest.raises(LocalProtocolError, match="not running"):
        await rpc.call(BOB, "add", [1, 2])
    rpc.register("add", Adder())
    with pytest.raises(LocalProtocolError, match="already registered"):
        rpc.register("add", Adder())
    with pytest.raises(LocalProtocolError, match="reserved"):
        rpc.register("rpc.discover", Adder())
    rpc.receive(ALICE, b'{"jsonrpc":"2.0","id":1,"method":"add"}')  # not running: dropped
    assert rpc.statistics().dropped_not_running == 1


@pytest.mark.anyio
async def test_pending_calls_end_when_run_stops() -> None:
    outcome: list[BaseException] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            rpc = GlobalRpc(lambda neighbor, payload: True, timers=TIMERS)
            async with anyio.create_task_group() as inner:
                await inner.start(rpc.run)

                async def caller() -> None:
                    try:
                        await rpc.call(BOB, "add", [1, 2])
                    except RpcTimeout as exc:
                        outcome.append(exc)

                tg.start_soon(caller)
                await anyio.sleep(0.01)
                inner.cancel_scope.cancel()
    assert len(outcome) == 1
    assert rpc.statistics().client.pending == 0
