"""GlobalRpc: JSON-RPC 2.0 calls between neighbours, over whatever carries bytes between them.

One per node. The node hands every RPC payload from a neighbour to `receive` and gives us a
`send` callback; `run` owns the retransmission timer and the task group in which handlers
run. The protocol state (run-once cache, retransmission schedule) is `core/rpc.py`; this
module adds tasks, the clock and logging. See docs/rpc.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import structlog

from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.rpc import (
    APPLICATION_ERROR_MAX,
    APPLICATION_ERROR_MIN,
    DEFAULT_MAX_NEIGHBORS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MAX_CACHE_BYTES_PER_NEIGHBOR,
    MAX_CACHE_ENTRIES_PER_NEIGHBOR,
    REQUEST_RATE_PER_NEIGHBOR,
    RESPONSE_CACHE_SECS,
    STANDARD_MESSAGES,
    CallOutcome,
    CallTimedOut,
    ClientStatistics,
    ErrorReceived,
    RequestReceived,
    ResultReceived,
    Rng,
    RpcClient,
    RpcError,
    RpcServer,
    RpcTimeout,
    RpcTimers,
    ServerStatistics,
    encode_error,
    encode_result,
    is_request,
)
from earendil_py.runtime.faults import Faults

__all__ = ["GlobalRpc", "GlobalRpcStatistics", "Handler", "RpcError", "RpcTimeout", "RpcTimers"]

log = structlog.get_logger("earendil_py.rpc")

Handler = Callable[[bytes, Any], Awaitable[Any]]
Send = Callable[[bytes, bytes], bool]


@dataclass(frozen=True, slots=True)
class GlobalRpcStatistics:
    client: ClientStatistics
    server: ServerStatistics
    handlers_running: int
    dropped_not_running: int  # requests that arrived while run() was not running


@dataclass(slots=True)
class _Waiter:
    method: str
    event: anyio.Event
    outcome: CallOutcome | None = None
    stopped: bool = False  # run() ended before an outcome


class GlobalRpc:
    """JSON-RPC between this node and its neighbours.

    `send(neighbor_fp, payload)` hands a payload to the link towards a neighbour. It must
    not block or raise; it may lose the payload (UDP) and returns False when there is no
    link to send on, which we treat as a loss: the call keeps retransmitting in case the
    link comes up, and ends with RpcTimeout otherwise.

    `max_neighbors` is how many neighbours the node admits at once: the response cache gives
    each neighbour its own quota and is bounded in total by the quotas times this number.
    """

    def __init__(
        self,
        send: Send,
        *,
        rng: Rng = os.urandom,
        timers: RpcTimers | None = None,
        response_cache_secs: float = RESPONSE_CACHE_SECS,
        max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
        max_cache_entries_per_neighbor: int = MAX_CACHE_ENTRIES_PER_NEIGHBOR,
        max_cache_bytes_per_neighbor: int = MAX_CACHE_BYTES_PER_NEIGHBOR,
        request_rate: float | None = REQUEST_RATE_PER_NEIGHBOR,
    ) -> None:
        self._send = send
        self._rng = rng
        self._client = RpcClient(timers)
        self._server = RpcServer(
            response_cache_secs=response_cache_secs,
            max_neighbors=max_neighbors,
            max_entries_per_neighbor=max_cache_entries_per_neighbor,
            max_bytes_per_neighbor=max_cache_bytes_per_neighbor,
            request_rate=request_rate,
        )
        self._handlers: dict[str, Handler] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._wakeup = anyio.Event()
        self._handlers_running = 0
        self._dropped_not_running = 0
        self._faults = Faults(log)

    @property
    def timers(self) -> RpcTimers:
        return self._client.timers

    def statistics(self) -> GlobalRpcStatistics:
        return GlobalRpcStatistics(
            client=self._client.statistics(),
            server=self._server.statistics(),
            handlers_running=self._handlers_running,
            dropped_not_running=self._dropped_not_running,
        )

    def register(self, method: str, handler: Handler) -> None:
        """Serve `method` with `handler(neighbor_fp, params)`.

        `params` is the request's array (list) or object (dict), or None when absent. The
        handler returns a JSON-encodable result, or raises RpcError with INVALID_PARAMS or a
        code in APPLICATION_ERROR_MIN..MAX to answer with that error. Anything else it raises
        is logged (`rpc_handler_error`) and answered with INTERNAL_ERROR. It runs at most
        once per request, however often the request is retransmitted. Register every method
        before the node serves requests: a call to an unknown method is answered
        METHOD_NOT_FOUND without being remembered.

        Raises LocalProtocolError if the method is already registered or its name is
        reserved by JSON-RPC ("rpc." prefix).
        """
        if method.startswith("rpc."):
            raise LocalProtocolError(f"method names starting with 'rpc.' are reserved: {method}")
        if method in self._handlers:
            raise LocalProtocolError(f"method {method!r} is already registered")
        self._handlers[method] = handler

    async def call(self, neighbor: bytes, method: str, params: Any = None) -> Any:
        """Call `method` on `neighbor` and return its result.

        Retransmits on the `timers` schedule, so it ends by itself after at most
        `timers.give_up_after` seconds (31.5 s by default); wrap it in `anyio.fail_after`
        for a shorter bound. `params` is None, a list/tuple or a dict.

        Raises RpcError if the neighbour answered with an error, RpcTimeout if it never
        answered (or `run` stopped first): then the method may or may not have run there.
        Raises LocalProtocolError if `run` is not running or params are not encodable or too
        large.
        """
        # A caller cancelled (shutdown) stops here, before finding `run` already stopped.
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._task_group is None:
            raise LocalProtocolError("GlobalRpc.run() is not running")
        request_id, payload = self._client.request(
            neighbor, method, params, anyio.current_time(), self._rng
        )
        waiter = _Waiter(method, anyio.Event())
        self._waiters[request_id] = waiter
        fields = {"method": method, "neighbor": short_hex(neighbor)}
        log.debug("rpc_call_sent", **fields)
        try:
            self._wakeup.set()  # the timer loop must learn about the new retransmission
            self._send(neighbor, payload)
            await waiter.event.wait()
        finally:
            del self._waiters[request_id]
            if waiter.outcome is None:  # cancelled: stop retransmitting
                self._client.cancel(request_id)
        log.debug("rpc_call_answered", outcome=type(waiter.outcome).__name__, **fields)
        if waiter.stopped:
            raise RpcTimeout(method, 0, "GlobalRpc stopped before an answer")
        match waiter.outcome:
            case ResultReceived(result=result):
                return result
            case ErrorReceived(code=code, message=message, data=data):
                raise RpcError(code, message, data)
            case CallTimedOut(attempts=attempts):
                raise RpcTimeout(method, attempts)
        raise AssertionError("unreachable")

    def receive(self, neighbor: bytes, payload: bytes) -> None:
        """Handle one RPC payload from `neighbor`. Never blocks and never raises for remote
        input: requests are answered or dispatched to a handler task, responses complete
        pending calls, and anything else is answered with an error or dropped and counted
        (see `statistics`)."""
        if is_request(payload):
            self._receive_request(neighbor, payload)
            return
        outcome = self._client.receive_response(neighbor, payload)
        if outcome is not None:
            self._resolve(outcome)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the retransmission timer and host the handler tasks, until cancelled.

        Once per GlobalRpc. Calls still waiting when it stops raise RpcTimeout.
        """
        if self._task_group is not None:
            raise LocalProtocolError("GlobalRpc.run() is already running")
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                task_status.started()
                await self._timer_loop()
        finally:
            self._task_group = None
            for request_id, waiter in self._waiters.items():
                if waiter.outcome is None:
                    self._client.cancel(request_id)
                    waiter.stopped = True
                    waiter.event.set()

    async def _timer_loop(self) -> None:
        while True:
            # A fresh event before reading the timers: whatever is scheduled after this
            # point sets it and cuts the sleep short.
            self._wakeup = anyio.Event()
            now = anyio.current_time()
            for neighbor, payload in self._client.handle_timer(now):
                self._send(neighbor, payload)
            while (timed_out := self._client.next_event()) is not None:
                log.info(
                    "rpc_call_timed_out",
                    method=timed_out.method,
                    neighbor=short_hex(timed_out.neighbor),
                    attempts=timed_out.attempts,
                )
                self._resolve(timed_out)
            self._server.handle_timer(now)
            timers = [
                t for t in (self._client.get_timer(), self._server.get_timer()) if t is not None
            ]
            delay = min(timers) - now if timers else math.inf
            with anyio.move_on_after(delay):
                await self._wakeup.wait()

    def _resolve(self, outcome: CallOutcome) -> None:
        waiter = self._waiters.get(outcome.request_id)
        if waiter is not None:
            waiter.outcome = outcome
            waiter.event.set()

    def _receive_request(self, neighbor: bytes, payload: bytes) -> None:
        tg = self._task_group
        if tg is None:
            # Without the task group nothing could run it; not registering it keeps the id
            # free, and the client retransmits.
            self._dropped_not_running += 1
            return
        now = anyio.current_time()
        match self._server.receive_request(neighbor, payload, now, methods=self._handlers):
            case bytes() as response:
                self._send(neighbor, response)
            case RequestReceived() as request:
                log.debug(
                    "rpc_request_received", method=request.method, neighbor=short_hex(neighbor)
                )
                self._handlers_running += 1
                tg.start_soon(self._run_handler, request, self._handlers[request.method])
            case None:
                pass

    async def _run_handler(self, request: RequestReceived, handler: Handler) -> None:
        try:
            response = await self._respond(request, handler)
        finally:
            self._handlers_running -= 1
        self._finish(request, response)

    async def _respond(self, request: RequestReceived, handler: Handler) -> bytes:
        fields = {"method": request.method, "neighbor": short_hex(request.neighbor)}
        try:
            result = await handler(request.neighbor, request.params)
        except RpcError as exc:
            if exc.code != INVALID_PARAMS and not (
                APPLICATION_ERROR_MIN <= exc.code <= APPLICATION_ERROR_MAX
            ):
                log.error(
                    "rpc_handler_error", reason="reserved_error_code", code=exc.code, **fields
                )
                return _internal_error(request)
            try:
                return encode_error(request.request_id, exc.code, exc.message, exc.data)
            except LocalProtocolError as encode_exc:
                log.error("rpc_handler_error", reason=str(encode_exc), **fields)
                return _internal_error(request)
        except Exception as exc:  # a handler bug: answer -32603, not leave the caller waiting
            self._faults.log_bug(exc, "rpc_handler", "rpc_handler_error", **fields)
            return _internal_error(request)
        try:
            return encode_result(request.request_id, result)
        except LocalProtocolError as exc:
            log.error("rpc_handler_error", reason=str(exc), **fields)
            return _internal_error(request)

    def _finish(self, request: RequestReceived, response: bytes) -> None:
        self._server.complete(request.neighbor, request.request_id, response, anyio.current_time())
        self._wakeup.set()  # the server timer may now be due earlier
        self._send(request.neighbor, response)
        log.debug(
            "rpc_request_answered", method=request.method, neighbor=short_hex(request.neighbor)
        )


def _internal_error(request: RequestReceived) -> bytes:
    # Deliberately no detail: exception text may carry local state the peer must not see.
    return encode_error(request.request_id, INTERNAL_ERROR, STANDARD_MESSAGES[INTERNAL_ERROR])
