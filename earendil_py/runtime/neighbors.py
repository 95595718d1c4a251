"""The node's neighbours: one `core.neighbor.Neighbor` each, and the one service that drives
them all.

The service does the I/O a Neighbor asks for, in one place (`_run_effects`): it commits an
effect's ledger entries, then applies the effect, then makes its RPC calls, runs its proof of
work in a thread, logs its events and resolves the operator requests waiting on it. A failed
commit drops the effect: the Neighbor, the ledger and the neighbour are as they were, the
neighbour's call is answered with an internal error, and the neighbour's timers wait a second.

* **One RPC registration table**: every method of `core.neighbor.CALLS` is served by the same
  handler, which hands the call to the neighbour's Neighbor.
* **One timer loop** over every neighbour's `get_timer()`: a heap of deadlines, a sleep until
  the earliest, woken early only when a deadline moves earlier or the relay loop wakes a
  neighbour (its `wake_mark`, or a refusal). An idle neighbour costs a wake-up per push
  interval. Due neighbours are handled together and their entries committed in one
  transaction; so are the `counts` of every neighbour whose counts moved, every
  `checkpoint_secs`.
* **Group commit**: received claims wait up to `claim_commit_delay_secs` for others, then go
  to disk in one transaction, before any of them is acknowledged.
* **One effect at a time per neighbour**: an effect is computed, committed and applied under
  the neighbour's lock, so the next one is computed on the state the last one left.

A Neighbor is restored from its ledger entries the first time its link comes up in this
process (the ledger names neighbours by fingerprint; restoring needs their key). Ledgers
written before Neighbors existed are migrated then (`_migrate_v1`).

Needs no `Node`: the node gives it its identity, config and GlobalRpc, opens the ledger for
it, and tells it when links come and go.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup

from earendil_py.core.accounting import AccountState
from earendil_py.core.errors import EarendilError, LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Identity, short_hex
from earendil_py.core.ledger import Entry
from earendil_py.core.neighbor import (
    CALLS,
    MIGRATED,
    REFUSED,
    AccountEntry,
    Answered,
    Effect,
    Neighbor,
    NoAnswer,
    Policy,
    Refused,
    Reply,
    Solve,
)
from earendil_py.core.pricing import (
    AcceptanceRule,
    PriceAnswer,
    PriceOffer,
    PriceTerms,
    make_offer,
)
from earendil_py.core.settlement import SettlementRecord
from earendil_py.runtime.config import Config, PriceConfig
from earendil_py.runtime.rpc import GlobalRpc, RpcError, RpcTimeout
from earendil_py.runtime.store import AsyncLedger

log = structlog.get_logger("earendil_py.neighbors")

COMMIT_RETRY_SECS = 1.0  # a neighbour whose commit failed waits this long before its timers

Attach = Callable[[Neighbor], None]


@dataclass(slots=True)
class _Group:
    """Effects whose entries share one transaction, committed by the first to arrive."""

    members: list[tuple[bytes, Effect]] = field(default_factory=list)
    committed: anyio.Event = field(default_factory=anyio.Event)
    heads: dict[bytes, bytes] | None = None  # per neighbour, once committed


@dataclass(slots=True)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    value: object = None


class Neighbors:
    """The node's neighbours. `start(ledger)` before links come up, `run()` for the timers
    and tasks, `aclose()` on shutdown (a clean `counts` entry for every neighbour)."""

    def __init__(self, identity: Identity, config: Config, rpc: GlobalRpc) -> None:
        self.identity = identity
        self.config = config
        self.rpc = rpc
        self.neighbors: dict[bytes, Neighbor] = {}
        self.ledger: AsyncLedger | None = None
        # A neighbour's lock, only while one of its steps holds it or waits for it (`_release`).
        self._locks: dict[bytes, anyio.Lock] = {}
        self._links: dict[bytes, int] = {}  # links up per neighbour
        self._restoring: dict[bytes, anyio.Event] = {}  # set, and dropped, once restored
        self._policies: dict[PriceConfig, Policy] = {}  # one per price table (`policy_for`)
        self._timers: list[tuple[float, bytes]] = []  # a heap; stale entries are skipped
        self._scheduled: dict[bytes, float] = {}  # the deadline last pushed, per neighbour
        self._sleep_until = math.inf
        self._woken: set[bytes] = set()
        self._wakeup = anyio.Event()
        self._hold: dict[bytes, float] = {}  # no timers before then (a failed commit)
        self._waiters: dict[tuple[bytes, tuple[str, bytes]], _Waiter] = {}
        self._group: _Group | None = None
        self._changed: anyio.Event | None = None  # made by the first to wait for a change
        self._task_group: TaskGroup | None = None
        # Called with the neighbour's fingerprint after each of its steps is applied.
        self.on_applied: Callable[[bytes], None] | None = None
        for method in CALLS:
            rpc.register(method, self._handler(method))

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, ledger: AsyncLedger) -> None:
        self.ledger = ledger

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The timer loop, and the tasks for calls and proof of work, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            task_status.started()
            await self._timer_loop()

    async def aclose(self) -> None:
        """Write a clean `counts` entry for every neighbour (nothing counted is lost)."""
        if self.ledger is None:
            return
        with anyio.CancelScope(shield=True):
            now = time.time()
            batch = [
                (fp, effect)
                for fp, neighbor in self.neighbors.items()
                if (effect := neighbor.checkpoint(now, clean=True)) is not None
            ]
            if batch:
                heads = await self._commit(batch)
                for fp, effect in batch:
                    self.neighbors[fp].apply(effect, ledger_head=heads.get(fp))

    def _ledger(self) -> AsyncLedger:
        assert self.ledger is not None, "Neighbors.start() gives it the ledger"
        return self.ledger

    def _spawn(self, function: Callable[..., Any], *args: object) -> None:
        assert self._task_group is not None, "Neighbors.run() is running"
        self._task_group.start_soon(function, *args)

    # --- links --------------------------------------------------------------------------

    def on_link_up(
        self, neighbor: bytes, neighbor_public: bytes, price: PriceConfig, attach: Attach
    ) -> None:
        """A link to `neighbor` is up: `attach(neighbor)` gets its Neighbor (the relay loop's
        reference) once it is restored; the first link starts it (offers, status, audit)."""
        self._links[neighbor] = self._links.get(neighbor, 0) + 1
        first = self._links[neighbor] == 1
        if (known := self.neighbors.get(neighbor)) is not None:
            attach(known)  # at once: its traffic flows as soon as the link does
        elif neighbor not in self._restoring:
            self._restoring[neighbor] = anyio.Event()
        self._spawn(self._link_up, neighbor, neighbor_public, self.policy_for(price), attach, first)

    def on_link_down(self, neighbor: bytes) -> None:
        """A link to `neighbor` is down; the last one stops it."""
        self._links[neighbor] -= 1
        if not self._links[neighbor]:
            del self._links[neighbor]
            self._spawn(self._link_down, neighbor)

    async def _link_up(
        self, fp: bytes, neighbor_public: bytes, policy: Policy, attach: Attach, first: bool
    ) -> None:
        async with self._locked(fp):
            neighbor = self.neighbors.get(fp)
            if neighbor is None:
                neighbor = await self._restore(fp, neighbor_public, policy)
                self.neighbors[fp] = neighbor
                self._restoring.pop(fp).set()
            attach(neighbor)
            if not first or await self._linked(fp, neighbor, policy):
                return
        # Until its link-up is written the neighbour is not linked in its own eyes (no offer,
        # claim or status question would go out): a failed commit is tried again.
        while True:
            await anyio.sleep(COMMIT_RETRY_SECS)
            async with self._locked(fp):
                if await self._linked(fp, neighbor, policy):
                    return

    async def _linked(self, fp: bytes, neighbor: Neighbor, policy: Policy) -> bool:
        """Run the neighbour's link-up, unless its link is gone or it is linked already;
        False if that commit failed."""
        if fp not in self._links or self.neighbors.get(fp) is not neighbor or neighbor.linked:
            return True
        return await self._run_effects(fp, [neighbor.on_link_up(time.time(), policy)])

    def set_price(self, neighbor: bytes, price: PriceConfig) -> None:
        """The price table of the neighbour's route changed (a config reload): its terms are
        offered to it now (see `Neighbor.set_policy`)."""
        self._spawn(self._set_policy, neighbor, self.policy_for(price))

    async def _set_policy(self, fp: bytes, policy: Policy) -> None:
        async with self._locked(fp):
            neighbor = self.neighbors.get(fp)
            if neighbor is not None:
                await self._run_effects(fp, [neighbor.set_policy(policy, time.time())])

    async def _link_down(self, fp: bytes) -> None:
        async with self._locked(fp):
            neighbor = self.neighbors.get(fp)
            if neighbor is not None and fp not in self._links:
                await self._run_effects(fp, [neighbor.on_link_down(time.time())])

    async def _restore(self, fp: bytes, neighbor_public: bytes, policy: Policy) -> Neighbor:
        entries = await self._ledger().entries(fp)
        migrated = _migrate_v1(self.identity, fp, entries, policy)
        if migrated is not None:
            items = [(fp, kind, body) for kind, body in migrated.entries]
            entries += await self._ledger().append_many(items, migrated.recorded_at)
            log.warning("ledger_migrated", neighbor=short_hex(fp), detail=migrated.detail)
        return Neighbor.restore(self.identity, neighbor_public, policy, os.urandom, entries)

    def policy_for(self, price: PriceConfig) -> Policy:
        """A route's price table, with the node's settlement and accounting config: one
        (immutable) Policy per price table, shared by every neighbour it applies to."""
        if (policy := self._policies.get(price)) is not None:
            return policy
        settlement, accounting = self.config.settlement, self.config.accounting
        methods = tuple(settlement.methods)
        policy = self._policies[price] = Policy(
            terms=PriceTerms(price.inbound_price_umel, price.inbound_debt_limit_umel, methods),
            rule=AcceptanceRule(
                price.outbound_max_price_umel, price.outbound_min_debt_limit_umel, methods
            ),
            methods=methods,
            push_debt_secs=accounting.push_debt_secs,
            claim_tolerance_packets=accounting.claim_tolerance_packets,
            keep_claims=accounting.keep_claims,
            auto_settle_percent=settlement.auto_settle_percent,
            min_settlement_umel=settlement.min_settlement_umel,
            expiry_secs=settlement.manual_expiry_secs,
        )
        return policy

    # --- the relay loop's wake-up -------------------------------------------------------

    def wake(self, neighbor: bytes) -> None:
        """The relay loop saw `neighbor`'s wake mark reached, or refused its packets: its
        `handle_timer` runs soon. Cheap; never blocks."""
        self._woken.add(neighbor)
        self._wakeup.set()

    # --- RPC from neighbours ------------------------------------------------------------

    def _handler(self, method: str) -> Callable[[bytes, Any], Any]:
        async def handle(fp: bytes, params: Any) -> Any:
            return await self._on_call(fp, method, params)

        return handle

    async def _on_call(self, fp: bytes, method: str, params: Any) -> Any:
        restoring = self._restoring.get(fp)
        if restoring is not None:
            await restoring.wait()  # a call right after the link-up waits for the restore
        async with self._locked(fp):
            neighbor = self.neighbors.get(fp)
            if neighbor is None:
                raise RpcError(REFUSED, "no link to this neighbour", "not_linked")
            effect = neighbor.receive_call(method, params, time.time())
            if not await self._run_effects(fp, [effect]):
                raise EarendilError("the ledger commit failed")  # answered INTERNAL_ERROR
        reply = effect.reply
        if isinstance(reply, Refused):
            raise RpcError(reply.code, reply.message, reply.data)
        return reply

    # --- the one place effects run ------------------------------------------------------

    async def _run_effects(self, fp: bytes, effects: Sequence[Effect]) -> bool:
        """Commit, apply, send, log — for effects of `fp`, computed under its lock. False if
        the commit failed: then nothing of them happened."""
        batch = [(fp, effect) for effect in effects]
        try:
            if any(effect.batch for effect in effects):
                heads = await self._group_commit(batch)
            else:
                heads = await self._commit(batch)
        except (sqlite3.Error, OSError, EarendilError, anyio.ClosedResourceError) as exc:
            self._commit_failed([fp], exc)
            return False
        for effect in effects:
            self._finish(fp, effect, heads.get(fp))
        return True

    async def _commit(self, batch: Sequence[tuple[bytes, Effect]]) -> dict[bytes, bytes]:
        """Every entry and prune of `batch` in one transaction; the neighbours' new heads."""
        items = [(fp, kind, body) for fp, effect in batch for kind, body in effect.entries]
        prunes = [(fp, kind, keep) for fp, effect in batch for kind, keep in effect.prunes]
        if not items and not prunes:
            return {}
        recorded_at = max(effect.recorded_at for _, effect in batch)
        entries = await self._ledger().append_many(items, recorded_at, prune=prunes)
        return {entry.neighbor: entry.hash for entry in entries}

    async def _group_commit(self, batch: list[tuple[bytes, Effect]]) -> dict[bytes, bytes]:
        """`_commit`, shared with the other batchable effects (received claims) that arrive
        within `claim_commit_delay_secs` of the first: one transaction and one fsync for all,
        where claims from many neighbours would each cost one. The first waits out the delay
        and commits the group. Raises what the commit raised, in every member."""
        group = self._group
        if group is not None:
            group.members += batch
            await group.committed.wait()
            if group.heads is None:
                raise EarendilError("the group's ledger commit failed")
            return group.heads
        group = self._group = _Group(list(batch))
        try:
            await anyio.sleep(self.config.accounting.claim_commit_delay_secs)
        finally:
            self._group = None
            try:
                with anyio.CancelScope(shield=True):
                    heads = group.heads = await self._commit(group.members)
            finally:
                group.committed.set()
        return heads

    def _commit_failed(self, fps: Iterable[bytes], exc: BaseException) -> None:
        retry = time.time() + COMMIT_RETRY_SECS
        for fp in fps:
            self._hold[fp] = retry
            self._schedule(fp, retry)
            log.error("ledger_commit_failed", neighbor=short_hex(fp), error=str(exc))

    def _finish(self, fp: bytes, effect: Effect, head: bytes | None) -> None:
        """After the commit: apply, then send, work, log, resolve, reschedule."""
        neighbor = self.neighbors[fp]
        neighbor.apply(effect, ledger_head=head)
        for call in effect.calls:
            self._spawn(self._call, fp, neighbor, call.token, call.method, call.params)
        for work in effect.work:
            self._spawn(self._solve, fp, neighbor, work)
        for event in effect.events:
            getattr(log, event.level)(event.name, neighbor=short_hex(fp), **event.fields)
        for key, value in effect.done:
            waiter = self._waiters.get((fp, key))
            if waiter is not None:
                waiter.value = value
                waiter.event.set()
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if self.on_applied is not None:
            self.on_applied(fp)
        deadline = neighbor.get_timer()
        if deadline is not None:
            self._schedule(fp, deadline)

    async def _call(
        self, fp: bytes, neighbor: Neighbor, token: int, method: str, params: Any
    ) -> None:
        reply: Reply
        try:
            reply = Answered(await self.rpc.call(fp, method, params))
        except RpcError as exc:
            reply = Refused(exc.code, exc.message, exc.data)
        except RpcTimeout:
            reply = NoAnswer()
        await self._outcome(
            fp, neighbor, token, lambda now: neighbor.receive_reply(token, reply, now)
        )

    async def _solve(self, fp: bytes, neighbor: Neighbor, work: Solve) -> None:
        try:
            # Seconds of hashing for large amounts: off the event loop.
            proof = await anyio.to_thread.run_sync(work.solve)
        except LocalProtocolError:
            proof = None
        await self._outcome(
            fp,
            neighbor,
            work.token,
            lambda now: (
                neighbor.receive_reply(work.token, NoAnswer(), now)
                if proof is None
                else neighbor.proof_ready(work.token, proof, now)
            ),
        )

    async def _outcome(
        self, fp: bytes, neighbor: Neighbor, token: int, make: Callable[[float], Effect]
    ) -> None:
        """Hand the Neighbor what came of its call or work `token`. If that cannot be
        written, it is as if nothing came: the Neighbor retries or gives up as it would."""
        async with self._locked(fp):
            if self.neighbors.get(fp) is not neighbor:
                return
            if not await self._run_effects(fp, [make(time.time())]):
                lost = neighbor.receive_reply(token, NoAnswer(), time.time())
                await self._run_effects(fp, [lost])

    @contextlib.asynccontextmanager
    async def _locked(self, fp: bytes) -> AsyncIterator[None]:
        """Hold `fp`'s lock: at once if it is free (anyio's `acquire` would yield twice
        even then, which the calls of a thousand neighbours feel), else in turn."""
        lock = self._lock(fp)
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            yield
        finally:
            self._release(fp, lock)

    def _busy(self, fp: bytes) -> bool:
        """Whether `fp`'s lock is held (without making one)."""
        lock = self._locks.get(fp)
        return lock is not None and lock.locked()

    def _lock(self, fp: bytes) -> anyio.Lock:
        lock = self._locks.get(fp)
        if lock is None:
            lock = self._locks[fp] = anyio.Lock()
        return lock

    def _release(self, fp: bytes, lock: anyio.Lock) -> None:
        """Release `fp`'s lock, and forget it unless a waiter took it over: an idle neighbour
        keeps none (anyio's costs ~0.8 KB), its next step makes one. anyio hands a released
        lock straight to its first waiter, so one still free after `release` has none."""
        lock.release()
        if not lock.locked() and self._locks.get(fp) is lock:
            del self._locks[fp]

    # --- timers -------------------------------------------------------------------------

    def _schedule(self, fp: bytes, deadline: float) -> None:
        if self._scheduled.get(fp) == deadline:
            return  # already in the heap
        self._scheduled[fp] = deadline
        heapq.heappush(self._timers, (deadline, fp))
        if deadline < self._sleep_until:
            self._wakeup.set()

    async def _timer_loop(self) -> None:
        next_checkpoint = time.time() + self.config.accounting.checkpoint_secs
        while True:
            self._wakeup = anyio.Event()
            now = time.time()
            due = self._woken
            self._woken = set()
            while self._timers and self._timers[0][0] <= now:
                deadline, fp = heapq.heappop(self._timers)
                if self._scheduled.get(fp) == deadline:
                    del self._scheduled[fp]
                due.add(fp)
            await self._handle_due(due, now)
            if now >= next_checkpoint:
                next_checkpoint = now + self.config.accounting.checkpoint_secs
                await self._checkpoint(now)
            self._sleep_until = min(
                next_checkpoint, self._timers[0][0] if self._timers else math.inf
            )
            with anyio.move_on_after(max(0.0, self._sleep_until - time.time())):
                await self._wakeup.wait()
            self._sleep_until = -math.inf

    async def _handle_due(self, due: set[bytes], now: float) -> None:
        """Every due neighbour whose lock is free (a busy one reschedules itself when done)
        handles its timer; their entries go to disk together."""
        taken: list[tuple[bytes, anyio.Lock]] = []
        batch: list[tuple[bytes, Effect]] = []
        try:
            for fp in due:
                neighbor = self.neighbors.get(fp)
                if neighbor is None or self._busy(fp) or now < self._hold.get(fp, 0.0):
                    continue
                lock = self._lock(fp)
                lock.acquire_nowait()
                taken.append((fp, lock))
                effect = neighbor.handle_timer(now)
                if effect is not None:
                    batch.append((fp, effect))
                elif (deadline := neighbor.get_timer()) is not None:
                    self._schedule(fp, deadline)
            await self._commit_and_finish(batch)
        finally:
            for fp, lock in taken:
                self._release(fp, lock)

    async def _checkpoint(self, now: float) -> None:
        """A `counts` entry for every neighbour whose counts moved, in one transaction."""
        taken: list[tuple[bytes, anyio.Lock]] = []
        batch: list[tuple[bytes, Effect]] = []
        try:
            for fp, neighbor in self.neighbors.items():
                if self._busy(fp):
                    continue  # its counts go in the next tick
                effect = neighbor.checkpoint(now)
                if effect is not None:
                    lock = self._lock(fp)
                    lock.acquire_nowait()
                    taken.append((fp, lock))
                    batch.append((fp, effect))
            await self._commit_and_finish(batch)
        finally:
            for fp, lock in taken:
                self._release(fp, lock)

    async def _commit_and_finish(self, batch: list[tuple[bytes, Effect]]) -> None:
        if not batch:
            return
        try:
            heads = await self._commit(batch)
        except (sqlite3.Error, OSError, EarendilError, anyio.ClosedResourceError) as exc:
            self._commit_failed([fp for fp, _ in batch], exc)
            return
        for fp, effect in batch:
            self._finish(fp, effect, heads.get(fp))

    # --- the operator -------------------------------------------------------------------

    def get(self, fingerprint: bytes) -> Neighbor | None:
        return self.neighbors.get(fingerprint)

    async def wait_priced(self, fingerprints: set[bytes]) -> None:
        """Return once these neighbours are linked with both prices accepted."""
        while not all(
            (n := self.neighbors.get(fp)) is not None and n.linked and n.priced
            for fp in fingerprints
        ):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def summaries(self) -> list[dict[str, Any]]:
        return [neighbor.summary() for neighbor in self.neighbors.values()]

    def debts(self) -> list[tuple[bytes, int, int]]:
        """Per neighbour, what it owes us and what we owe it (µMEL)."""
        accounts = ((fp, neighbor.account) for fp, neighbor in self.neighbors.items())
        return [(fp, a.debt_in_umel, a.debt_out_umel) for fp, a in accounts]

    def settlements(self) -> list[dict[str, Any]]:
        return [s for neighbor in self.neighbors.values() for s in neighbor.settlements()]

    async def reprice(self, fingerprint: bytes, terms: PriceTerms) -> str:
        """Offer new terms to a linked neighbour now (and at every later link-up); returns
        why they are not in force ('' if it accepted them). Raises LocalProtocolError (no
        such neighbour, or no link to it)."""
        if not self._known(fingerprint).linked:
            raise LocalProtocolError("no link to this neighbour")
        outcome = await self._request(fingerprint, lambda n, now: n.reprice(terms, now), "price")
        return str(outcome)

    async def unfreeze(self, fingerprint: bytes) -> None:
        """Lift a freeze. Raises LocalProtocolError (no such neighbour), EarendilError (the
        ledger commit failed)."""
        neighbor = self._known(fingerprint)
        async with self._locked(fingerprint):
            if not await self._run_effects(fingerprint, [neighbor.unfreeze(time.time())]):
                raise EarendilError("the ledger commit failed")

    async def propose(
        self,
        fingerprint: bytes,
        *,
        pay_umel: int,
        request_umel: int,
        method: str,
        prepay: bool = False,
    ) -> SettlementRecord:
        """Propose a settlement; the record as it stands after the first answer. Raises
        LocalProtocolError for what we will not propose (see `Neighbor.propose`),
        RemoteProtocolError if the payment failed."""

        def make(neighbor: Neighbor, now: float) -> Effect:
            return neighbor.propose(
                pay_umel=pay_umel,
                request_umel=request_umel,
                method=method,
                now=now,
                prepay=prepay,
            )

        return await self._settle_request(fingerprint, make)

    async def cancel(self, settlement_id: bytes) -> SettlementRecord:
        """Ask the neighbour to cancel our open proposal; the record after its answer. Raises
        LocalProtocolError unless it is our proposal and pending."""
        fingerprint = self._holder(settlement_id)
        return await self._settle_request(fingerprint, lambda n, now: n.cancel(settlement_id, now))

    async def decide(
        self, settlement_id: bytes, *, approve: bool, reason: str = "rejected_by_operator"
    ) -> SettlementRecord:
        """The operator accepts or rejects a proposal waiting for it. Raises
        LocalProtocolError unless it is an incoming proposal still pending."""
        fingerprint = self._holder(settlement_id)
        neighbor = self._known(fingerprint)
        async with self._locked(fingerprint):
            now = time.time()
            effect = neighbor.decide(settlement_id, approve=approve, now=now, reason=reason)
            if not await self._run_effects(fingerprint, [effect]):
                raise LocalProtocolError("the ledger commit failed: try again")
        record: SettlementRecord = effect.reply
        return record

    async def _settle_request(
        self, fingerprint: bytes, make: Callable[[Neighbor, float], Effect]
    ) -> SettlementRecord:
        outcome = await self._request(fingerprint, make, "settle")
        if isinstance(outcome, RemoteProtocolError):
            raise outcome
        if not isinstance(outcome, SettlementRecord):
            raise LocalProtocolError("the settlement is no longer kept in memory")
        return outcome

    async def _request(
        self, fingerprint: bytes, make: Callable[[Neighbor, float], Effect], kind: str
    ) -> object:
        """An operator request: run its effect, then wait for the outcome it announces."""
        neighbor = self._known(fingerprint)
        async with self._locked(fingerprint):
            effect = make(neighbor, time.time())
            key = (kind, effect.reply)  # what the outcome will be announced under
            waiter = self._waiters[(fingerprint, key)] = _Waiter()
            try:
                if not await self._run_effects(fingerprint, [effect]):
                    raise LocalProtocolError("the ledger commit failed: try again")
            except BaseException:
                del self._waiters[(fingerprint, key)]
                raise
        try:
            await waiter.event.wait()
        finally:
            del self._waiters[(fingerprint, key)]
        return waiter.value

    def _known(self, fingerprint: bytes) -> Neighbor:
        neighbor = self.neighbors.get(fingerprint)
        if neighbor is None:
            raise LocalProtocolError("no account with this neighbour")
        return neighbor

    def _holder(self, settlement_id: bytes) -> bytes:
        for fingerprint, neighbor in self.neighbors.items():
            if neighbor.book.record(settlement_id) is not None:
                return fingerprint
        raise LocalProtocolError(f"no settlement {settlement_id.hex()}")

    def find(self, settlement_id: bytes) -> SettlementRecord:
        """Raises LocalProtocolError if no neighbour's book keeps this settlement."""
        record = self.neighbors[self._holder(settlement_id)].book.record(settlement_id)
        assert record is not None
        return record


# --- ledgers from before Neighbors ----------------------------------------------------------
#
# The version before wrote a whole account checkpoint (`checkpoint`, a map-encoded account
# state) with every change and kept settlements in `settlements` books; its claims, offers
# and settlements were signed under the v1 rules, which neighbours no longer check. What
# carries over is what the two sides agreed: each direction's debt (as a fixed amount), the
# claim seqs (so neither side's next claim is taken for a replay), the freeze, and the offer
# seqs (our next offer continues after the last one the neighbour answered). Prices are
# agreed again at the link-up that follows, and the settlement chain starts again from
# GENESIS on both sides (the old attestations stay in the ledger, as history).


class _V1Epoch(msgspec.Struct, array_like=True):
    epoch: int
    price_umel: int
    packets: int = 0
    claimed: int = -1
    counted_at_claim: int = 0

    def charged(self) -> int:
        return (
            self.packets
            if self.claimed < 0
            else self.claimed + self.packets - self.counted_at_claim
        )


class _V1Account(msgspec.Struct):
    proposed: PriceOffer | None = None
    their_answer: PriceAnswer | None = None
    inbound: list[_V1Epoch] = msgspec.field(default_factory=list)
    outbound: list[_V1Epoch] = msgspec.field(default_factory=list)
    folded_in_umel: int = 0
    folded_out_umel: int = 0
    settled_in_umel: int = 0
    settled_out_umel: int = 0
    claim_seq_sent: int = 0
    claim_seq_received: int = 0
    frozen: str = ""


class _V1Record(msgspec.Struct):
    role: str = ""
    state: str = ""


class _V1Book(msgspec.Struct):
    records: dict[str, _V1Record] = msgspec.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Migrated:
    entries: list[tuple[str, bytes]]
    recorded_at: int
    detail: str


def _migrate_v1(
    identity: Identity, fp: bytes, entries: Sequence[Entry], policy: Policy
) -> _Migrated | None:
    """The `migrated` entry that carries a neighbour's old ledger over, or None if there is
    nothing to carry (no old checkpoint, or it was carried over already)."""
    if any(e.kind in (MIGRATED, "counts") for e in entries):
        return None
    checkpoint = next((e for e in reversed(entries) if e.kind == "checkpoint" and e.body), None)
    if checkpoint is None or checkpoint.body is None:
        return None
    old = msgspec.msgpack.decode(checkpoint.body, type=_V1Account)
    debt_in = old.folded_in_umel - old.settled_in_umel
    debt_in += sum(e.packets * e.price_umel for e in old.inbound)
    debt_out = old.folded_out_umel - old.settled_out_umel
    debt_out += sum(e.charged() * e.price_umel for e in old.outbound)
    book = next((e for e in reversed(entries) if e.kind == "settlements" and e.body), None)
    pending = 0
    if book is not None and book.body is not None:
        records = msgspec.msgpack.decode(book.body, type=_V1Book).records.values()
        pending = sum(r.state in ("pending", "canceled") for r in records)
    now = int(time.time())
    seq = (old.proposed.seq if old.proposed is not None else 0) + 1
    state = AccountState(
        fp,
        proposed=make_offer(identity, fp, seq, policy.terms, now),
        their_answer=old.their_answer,
        folded_in_umel=debt_in,
        folded_out_umel=debt_out,
        claim_seq_sent=old.claim_seq_sent,
        claim_seq_received=old.claim_seq_received,
        frozen=old.frozen,
    )
    body = msgspec.msgpack.encode(AccountEntry(state, 0, 0, b"v1"))
    detail = (
        f"debts carried over: they owe {debt_in}, we owe {debt_out} uMEL; prices are agreed "
        f"again; {pending} open settlement(s) dropped; the settlement chain starts anew"
    )
    return _Migrated([(MIGRATED, body)], now, detail)
