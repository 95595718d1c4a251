"""Debt accounting in the node: prices at link-up, push_debt claims, checkpoints, the ledger.

Each neighbour has one `core.accounting.Account`, restored from the ledger at start-up. At
every link-up we push our price offer (`push_price` over GlobalRPC) and the neighbour pushes
theirs; until both are accepted the relay loop neither takes nor sends the link's packets.
Every `push_debt_secs` we send each neighbour a signed claim of our counts; every
`checkpoint_secs` we persist the counts. Every state change that matters (an agreement, a
claim, a dispute) is committed to the ledger together with a checkpoint of the account
*before* it is acknowledged to the neighbour.

The relay loop never waits on any of this: it reads allowances and bumps counters only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from earendil_py.core.accounting import (
    Account,
    AccountState,
    DebtClaim,
    DebtLimitNotice,
    Dispute,
)
from earendil_py.core.errors import RemoteProtocolError, convert_remote
from earendil_py.core.identity import short_hex
from earendil_py.core.pricing import (
    AcceptanceRule,
    PriceAccepted,
    PriceAnswer,
    PriceOffer,
    PriceTerms,
)
from earendil_py.core.rpc import APPLICATION_ERROR_MIN, INVALID_PARAMS
from earendil_py.runtime.config import PriceConfig
from earendil_py.runtime.rpc import RpcError, RpcTimeout
from earendil_py.runtime.store import AsyncLedger

if TYPE_CHECKING:
    from earendil_py.runtime.node import LinkRunner, Node

log = structlog.get_logger("earendil_py.accounting")

# JSON-RPC application error: the peer's message was refused; `data` is the reason label.
REFUSED = APPLICATION_ERROR_MIN
# Checkpoints kept in full per neighbour (older ones keep only their hash in the chain).
KEEP_CHECKPOINTS = 10
# Old claim bodies are pruned every this many claims, in the claim's own transaction; old
# checkpoint bodies every this many periodic checkpoints, in the checkpoint's transaction
# (each account at its own turn, so every periodic checkpoint prunes ~1/PRUNE_EVERY of them).
PRUNE_EVERY = 10
# A debt-limit notice is sent at most this often per neighbour.
NOTICE_INTERVAL_SECS = 10.0

_record_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(AccountState)


def unix_now() -> int:
    return int(time.time())


def prune_turn(neighbor: bytes, tick: int) -> bool:
    """Whether `neighbor`'s old checkpoints are pruned at the `tick`-th periodic checkpoint:
    one tick in PRUNE_EVERY, offset by its fingerprint, so the prunes spread over the ticks."""
    return (tick + neighbor[0]) % PRUNE_EVERY == 0


def _record(*items: object) -> bytes:
    return _record_encoder.encode(items)


def _with_checkpoint(
    account: Account, events: Sequence[tuple[str, bytes]]
) -> list[tuple[bytes, str, bytes]]:
    """Ledger items for `events` (kind, body) of `account`, then a checkpoint of it as it is
    now: what every commit writes, so that a restart resumes from the state after them."""
    neighbor = account.neighbor
    items = [(neighbor, kind, body) for kind, body in events]
    items.append((neighbor, "checkpoint", account.checkpoint()))
    return items


class Accounting:
    """The node's accounts and their persistence. `start()` before links come up; `run()`
    for the periodic work; `aclose()` on shutdown (a clean checkpoint)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.accounting
        self.methods = tuple(node.config.settlement.methods)
        self.accounts: dict[bytes, Account] = {}
        self.overrides: dict[bytes, PriceTerms] = {}
        self.ledger: AsyncLedger | None = None
        self._saved: dict[bytes, AccountState] = {}
        self._last_notice: dict[bytes, float] = {}
        self._checkpointed: dict[bytes, tuple[int, int]] = {}
        self._checkpoint_ticks = 0  # calls of checkpoint(): when each account prunes
        self._unpruned: set[bytes] = set()  # checkpoint bodies written since their last prune
        self._pushing: set[bytes] = set()
        self._claims: _ClaimGroup | None = None  # received claims waiting for their commit
        rpc = node.rpc
        rpc.register("push_price", self._on_push_price)
        rpc.register("push_debt", self._on_push_debt)
        rpc.register("debt_limit", self._on_debt_limit)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the ledger (verifying every chain) and load each neighbour's last checkpoint.
        Raises LedgerCorrupt naming the file if the ledger was tampered with."""
        self.ledger = await AsyncLedger.open(self.node.config.db_path)
        for neighbor in await self.ledger.neighbors():
            entry = await self.ledger.latest(neighbor, "checkpoint")
            if entry is not None and entry.body is not None:
                self._saved[neighbor] = _state_decoder.decode(entry.body)

    async def run(self) -> None:
        """Checkpoint and push claims on their intervals, until cancelled."""
        next_claims = anyio.current_time() + self.config.push_debt_secs
        while True:
            await anyio.sleep(self.config.checkpoint_secs)
            await self.checkpoint()
            if anyio.current_time() >= next_claims:
                next_claims = anyio.current_time() + self.config.push_debt_secs
                await self.push_debts([n for n in self.accounts if n in self.node.links])

    async def aclose(self) -> None:
        """Write a clean checkpoint of every account and close the ledger."""
        if self.ledger is None:
            return
        with anyio.CancelScope(shield=True):
            items = [(n, "checkpoint", a.checkpoint(clean=True)) for n, a in self.accounts.items()]
            if items:
                await self.ledger.append_many(items, unix_now())
            await self.ledger.aclose()
        self.ledger = None

    async def checkpoint(self) -> None:
        """Persist the counts of every account whose counts moved since the last time, and
        in the same transaction prune the old checkpoint bodies of the accounts whose turn it
        is: each account's turn comes every PRUNE_EVERY calls, at an offset of its own."""
        items = []
        for neighbor, account in self.accounts.items():
            counts = (account.sent, account.received)
            if self._checkpointed.get(neighbor) != counts:
                self._checkpointed[neighbor] = counts
                items.append((neighbor, "checkpoint", account.checkpoint()))
                self._unpruned.add(neighbor)
        self._checkpoint_ticks += 1
        due = [n for n in self._unpruned if prune_turn(n, self._checkpoint_ticks)]
        prunes = [(n, "checkpoint", KEEP_CHECKPOINTS) for n in due]
        if items or prunes:
            await self._ledger().append_many(items, unix_now(), prune=prunes)
            self._unpruned.difference_update(due)

    async def commit(
        self,
        account: Account,
        kind: str,
        body: bytes,
        prune: Sequence[tuple[bytes, str, int]] = (),
        *,
        also: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Append an event, the entries in `also`, and a checkpoint of `account` in one
        transaction, with `prune`."""
        items = _with_checkpoint(account, [(kind, body), *also])
        await self._ledger().append_many(items, unix_now(), prune=prune)
        self._unpruned.add(account.neighbor)

    def _ledger(self) -> AsyncLedger:
        assert self.ledger is not None, "Accounting.start() opens the ledger"
        return self.ledger

    # --- accounts -----------------------------------------------------------------------

    def account_for(self, runner: LinkRunner) -> Account:
        """The neighbour's account (restored, or new), bound to its proven identity key."""
        neighbor = runner.peer_fingerprint
        assert neighbor is not None and runner.link.peer_identity_public is not None
        account = self.accounts.get(neighbor)
        if account is None:
            saved = self._saved.pop(neighbor, None)
            account = Account(
                self.node.identity,
                runner.link.peer_identity_public,
                saved or AccountState(neighbor),
                recovering=saved is not None,
            )
            self.accounts[neighbor] = account
        return account

    def on_link_up(self, runner: LinkRunner) -> None:
        runner.account = self.account_for(runner)
        self.node.spawn(self.push_price, runner)

    def terms_for(self, runner: LinkRunner) -> tuple[PriceTerms, AcceptanceRule]:
        price = self._route_price(runner)
        terms = PriceTerms(price.inbound_price_umel, price.inbound_debt_limit_umel, self.methods)
        assert runner.peer_fingerprint is not None
        terms = self.overrides.get(runner.peer_fingerprint, terms)
        rule = AcceptanceRule(
            price.outbound_max_price_umel, price.outbound_min_debt_limit_umel, self.methods
        )
        return terms, rule

    def _route_price(self, runner: LinkRunner) -> PriceConfig:
        config = self.node.config
        routes: dict[str, Any] = (
            config.in_routes if runner.route.direction == "in" else config.out_routes
        )
        price: PriceConfig = routes[runner.route.name].price
        return price

    # --- push_price ---------------------------------------------------------------------

    async def push_price(self, runner: LinkRunner, terms: PriceTerms | None = None) -> str:
        """Offer our price to the runner's neighbour and apply its answer; returns why the
        offer is not in force ('' if it was accepted). An offer is persisted before it is
        sent (its seq must never be reused)."""
        account = runner.account
        assert account is not None
        offer = account.propose(terms or self.terms_for(runner)[0], unix_now())
        await self.commit(account, "price_offer_sent", _record(offer))
        try:
            raw = await self.node.rpc.call(
                account.neighbor, "push_price", msgspec.to_builtins(offer)
            )
            answer = msgspec.convert(raw, PriceAnswer)
            outcome = account.on_answer(answer)
        except (RpcError, RpcTimeout) as exc:
            log.warning("price_push_failed", neighbor=short_hex(account.neighbor), error=str(exc))
            return str(exc)
        except (msgspec.ValidationError, RemoteProtocolError) as exc:
            runner.statistics().drops["bad_price_answer"] += 1
            log.warning(
                "price_answer_refused", neighbor=short_hex(account.neighbor), error=str(exc)
            )
            return f"invalid answer: {exc}"
        await self.commit(account, "price_answer_received", _record(offer, answer))
        if isinstance(outcome, PriceAccepted):
            log.info(
                "price_accepted",
                neighbor=short_hex(account.neighbor),
                seq=offer.seq,
                price_umel=offer.price_umel,
                debt_limit_umel=offer.debt_limit_umel,
            )
        else:
            log.warning(
                "price_rejected",
                neighbor=short_hex(account.neighbor),
                seq=offer.seq,
                reason=outcome.reason,
            )
        self.node.accounts_changed()
        return "" if isinstance(outcome, PriceAccepted) else outcome.reason

    async def _on_push_price(self, neighbor: bytes, params: Any) -> Any:
        runner, account = self._linked(neighbor)
        offer = _convert(params, PriceOffer)
        _, rule = self.terms_for(runner)
        try:
            answer = account.on_offer(offer, rule, unix_now())
        except RemoteProtocolError as exc:
            raise _refused(exc) from None
        await self.commit(account, "price_answered", _record(offer, answer))
        log.info(
            "price_offer_received",
            neighbor=short_hex(neighbor),
            seq=offer.seq,
            price_umel=offer.price_umel,
            debt_limit_umel=offer.debt_limit_umel,
            accepted=answer.accepted,
            reason=answer.reason,
        )
        self.node.accounts_changed()
        return msgspec.to_builtins(answer)

    # --- push_debt ----------------------------------------------------------------------

    async def push_debts(self, neighbors: list[bytes]) -> None:
        """Sign a claim for each neighbour, commit them all in one transaction, then send
        them. One claim in flight per neighbour: a newer claim overtaking an older one would
        only get the older one refused."""
        now = unix_now()
        claims: list[DebtClaim] = []
        items: list[tuple[bytes, str, bytes]] = []
        prunes: list[tuple[bytes, str, int]] = []
        for neighbor in neighbors:
            if neighbor in self._pushing:
                continue
            account = self.accounts[neighbor]
            claim = account.make_claim(now)
            items += _with_checkpoint(account, [("claim_sent", _record(claim))])
            if claim.seq % PRUNE_EVERY == 0:
                prunes.append((neighbor, "claim_sent", self.config.keep_claims))
            claims.append(claim)
            self._pushing.add(neighbor)
        if items:
            await self._ledger().append_many(items, now, prune=prunes)
            self._unpruned.update(claim.counterparty for claim in claims)
        for claim in claims:
            self.node.spawn(self._send_claim, claim)

    async def _send_claim(self, claim: DebtClaim) -> None:
        neighbor = claim.counterparty
        try:
            # Claims are cumulative: one unanswered for a push interval is superseded by the
            # next, rather than retransmitted for longer.
            with anyio.move_on_after(self.config.push_debt_secs) as scope:
                try:
                    await self.node.rpc.call(neighbor, "push_debt", msgspec.to_builtins(claim))
                except (RpcError, RpcTimeout) as exc:
                    log.warning("debt_push_failed", neighbor=short_hex(neighbor), error=str(exc))
            if scope.cancelled_caught:
                log.info("debt_push_unanswered", neighbor=short_hex(neighbor), seq=claim.seq)
        finally:
            self._pushing.discard(neighbor)

    async def _on_push_debt(self, neighbor: bytes, params: Any) -> Any:
        _, account = self._linked(neighbor)
        claim = _convert(params, DebtClaim)
        try:
            outcome = account.on_claim(claim, unix_now(), self.config.claim_tolerance_packets)
        except RemoteProtocolError as exc:
            raise _refused(exc) from None
        if isinstance(outcome, Dispute):
            await self.commit(account, "dispute", _record(claim, msgspec.to_builtins(outcome)))
            log.warning(
                "debt_dispute",
                neighbor=short_hex(neighbor),
                epoch=outcome.epoch,
                their_packets=outcome.their_packets,
                our_packets=outcome.our_packets,
            )
            self.node.accounts_changed()
            raise RpcError(REFUSED, "claim disputed: account frozen", "dispute")
        await self._commit_claim(account, _record(claim), claim.seq % PRUNE_EVERY == 0)
        return {"debt_umel": outcome.debt_out_after_umel}

    async def _commit_claim(self, account: Account, body: bytes, prune: bool) -> None:
        """Commit a received claim, with a checkpoint of its account, before it is
        acknowledged: together with the other claims received within claim_commit_delay_secs
        of the first (a group commit: one transaction and one fsync for all of them, where
        claims from many neighbours would each cost one). The first claim of a group waits out
        the delay and commits the group; the checkpoints are taken then, so on disk they
        follow any commit made meanwhile. Raises what the commit raised, in every member."""
        group = self._claims
        if group is not None:
            group.members.append((account, body, prune))
            await group.committed.wait()
            if group.error is not None:
                raise group.error
            return
        group = self._claims = _ClaimGroup([(account, body, prune)])
        try:
            await anyio.sleep(self.config.claim_commit_delay_secs)
        finally:
            self._claims = None
            items: list[tuple[bytes, str, bytes]] = []
            prunes = []
            for member, member_body, member_prune in group.members:
                items += _with_checkpoint(member, [("claim_received", member_body)])
                if member_prune:
                    prunes.append((member.neighbor, "claim_received", self.config.keep_claims))
            try:
                with anyio.CancelScope(shield=True):
                    await self._ledger().append_many(items, unix_now(), prune=prunes)
            except Exception as exc:
                group.error = exc
                raise
            finally:
                group.committed.set()
            self._unpruned.update(member.neighbor for member, _, _ in group.members)

    # --- debt limits --------------------------------------------------------------------

    def on_refused(self, runner: LinkRunner) -> None:
        """The relay loop refused the neighbour's packets: tell it, at most every so often,
        when the reason is its debt."""
        account = runner.account
        if account is None or not account.priced or account.state.frozen:
            return
        now = anyio.current_time()
        if (
            now - self._last_notice.get(account.neighbor, -NOTICE_INTERVAL_SECS)
            < NOTICE_INTERVAL_SECS
        ):
            return
        self._last_notice[account.neighbor] = now
        notice = account.make_limit_notice(unix_now())
        log.info(
            "debt_limit_reached",
            neighbor=short_hex(account.neighbor),
            debt_umel=notice.debt_umel,
            limit_umel=notice.limit_umel,
        )
        self.node.spawn(self._send_notice, account.neighbor, notice)

    async def _send_notice(self, neighbor: bytes, notice: DebtLimitNotice) -> None:
        try:
            await self.node.rpc.call(neighbor, "debt_limit", msgspec.to_builtins(notice))
        except (RpcError, RpcTimeout) as exc:
            log.info("debt_limit_notice_failed", neighbor=short_hex(neighbor), error=str(exc))

    async def _on_debt_limit(self, neighbor: bytes, params: Any) -> Any:
        _, account = self._linked(neighbor)
        notice = _convert(params, DebtLimitNotice)
        try:
            account.verify_limit_notice(notice)
        except RemoteProtocolError as exc:
            raise _refused(exc) from None
        log.warning(
            "debt_limit_notice",
            neighbor=short_hex(neighbor),
            their_view_umel=notice.debt_umel,
            our_view_umel=account.debt_out_umel,
            limit_umel=notice.limit_umel,
        )
        return {}

    # --- operator actions ---------------------------------------------------------------

    async def reprice(self, neighbor: bytes, terms: PriceTerms) -> str:
        """Offer new terms to a linked neighbour now (and at every later link-up); returns
        why they are not in force ('' if accepted)."""
        runner, _ = self._linked(neighbor)
        self.overrides[neighbor] = terms
        return await self.push_price(runner, terms)

    async def unfreeze(self, neighbor: bytes) -> None:
        account = self.accounts[neighbor]
        account.unfreeze()
        await self.commit(account, "unfreeze", _record(unix_now()))
        self.node.accounts_changed()

    def _linked(self, neighbor: bytes) -> tuple[LinkRunner, Account]:
        runners = self.node.links.get(neighbor)
        if not runners or runners[0].account is None:
            raise RpcError(REFUSED, "no link to this neighbour", "not_linked")
        return runners[0], runners[0].account

    def summaries(self) -> Iterable[dict[str, Any]]:
        for neighbor, account in self.accounts.items():
            s = account.state
            yield {
                "neighbor": neighbor.hex(),
                "priced": account.priced,
                "our_price_umel": s.our_offer.price_umel if s.our_offer else None,
                "our_debt_limit_umel": s.our_offer.debt_limit_umel if s.our_offer else None,
                "their_price_umel": s.their_offer.price_umel if s.their_offer else None,
                "their_debt_limit_umel": s.their_offer.debt_limit_umel if s.their_offer else None,
                "debt_in_umel": account.debt_in_umel,
                "debt_out_umel": account.debt_out_umel,
                "packets_in": account.received,
                "packets_out": account.sent,
                "frozen": s.frozen,
            }


@dataclass(slots=True)
class _ClaimGroup:
    """Received claims that will be committed in one transaction."""

    members: list[tuple[Account, bytes, bool]]  # (account, claim record, prune its claims)
    committed: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


def _convert(params: Any, kind: type[Any]) -> Any:
    try:
        return convert_remote(params, kind, "invalid params", "invalid_params")
    except RemoteProtocolError as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None


def _refused(exc: RemoteProtocolError) -> RpcError:
    return RpcError(REFUSED, str(exc), exc.reason)
