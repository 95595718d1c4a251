"""Settlements in the node: start_settlement over GlobalRPC, payment methods, auto-settling.

One `core.settlement.SettlementBook` per neighbour, restored from the ledger. Every change
to a book is committed together with a checkpoint of the account (whose balances a completed
settlement changes) and of the book, in one ledger transaction, before anything is sent:

* proposer: the proposal is written (pending) before `start_settlement` is sent; an
  approval is verified, applied to the account and written before anything else happens;
* responder: an approval (attestation) or rejection is written before it is answered; a
  retransmitted proposal (same id, even after a restart) gets the stored answer again.

Payment methods are small classes behind one interface (`PaymentMethod`): `manual` waits for
the responder's operator (`earendil-py accept` / `reject`); `pow` is automatic: the payer
solves a BLAKE3 proof of work on a one-time challenge from the payee (docs/settlement.md).

Every link-up: outgoing proposals still pending are asked about (`settlement_status`), then
both settlement chains are compared (`settlement_audit`); a mismatch is a dispute that
freezes the account until the operator looks.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
import structlog

from earendil_py.core import pow as pow_method
from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.ledger import GENESIS
from earendil_py.core.rpc import APPLICATION_ERROR_MIN, INVALID_PARAMS
from earendil_py.core.settlement import (
    HASH_SIZE,
    METHOD_MANUAL,
    METHOD_POW,
    SETTLEMENT_ID_SIZE,
    Attestation,
    Rejection,
    SettlementBook,
    SettlementBookState,
    SettlementRecord,
    SettlementState,
    attestation_hash,
    decode_attestation,
    decode_audit,
    decode_proposal,
    decode_rejection,
    encode,
)
from earendil_py.runtime.rpc import RpcError, RpcTimeout

if TYPE_CHECKING:
    from earendil_py.runtime.node import LinkRunner, Node

log = structlog.get_logger("earendil_py.settlement")

REFUSED = APPLICATION_ERROR_MIN + 1  # JSON-RPC error: `data` is the reason label
UNKNOWN_SINCE = APPLICATION_ERROR_MIN + 2  # audit: we do not know the head asked from
TICK_SECS = 0.5  # expiry, polling and auto-settle checks
POLL_SECS = 5.0  # ask about an outgoing pending proposal this often
RETRY_MIN_SECS = 2.0  # auto-settle backoff after a failure (doubles)
RETRY_MAX_SECS = 120.0

_book_decoder = msgspec.msgpack.Decoder(SettlementBookState)


def unix_now() -> int:
    return int(time.time())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _param(params: Any, name: str) -> bytes:
    try:
        return base64.b64decode(params[name], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise RpcError(INVALID_PARAMS, f"params need {name!r} (base64)") from None


def _hex_param(params: Any, name: str, size: int) -> bytes:
    try:
        value = bytes.fromhex(params[name])
    except (KeyError, TypeError, ValueError):
        value = None
    if value is None or len(value) != size:
        raise RpcError(INVALID_PARAMS, f"params need {name!r} ({size} bytes in hex)")
    return value


def _refused(exc: RemoteProtocolError) -> RpcError:
    return RpcError(REFUSED, str(exc), exc.reason)


class PaymentMethod(Protocol):
    """One way of paying. `automatic` methods are approved without the operator."""

    name: str
    automatic: bool

    async def prove(self, neighbor: bytes, settlement_id: bytes, amount_umel: int) -> bytes:
        """The payer's proof of payment for the proposal (may be empty)."""
        ...

    def redeem(self, neighbor: bytes, record: SettlementRecord, now: int) -> None:
        """The payee's check of the proof; raises RemoteProtocolError to reject."""
        ...


class ManualPayment:
    """Paid out of band; the responder's operator accepts or rejects."""

    name = METHOD_MANUAL
    automatic = False

    async def prove(self, neighbor: bytes, settlement_id: bytes, amount_umel: int) -> bytes:
        return b""

    def redeem(self, neighbor: bytes, record: SettlementRecord, now: int) -> None:
        """Nothing to check: the operator decides."""


class PowPayment:
    """Proof of work on a one-time challenge from the payee (core/pow.py)."""

    name = METHOD_POW
    automatic = True

    def __init__(self, settlements: Settlements) -> None:
        self.settlements = settlements
        self.challenges = pow_method.ChallengeBook(settlements.node.fingerprint)

    async def prove(self, neighbor: bytes, settlement_id: bytes, amount_umel: int) -> bytes:
        raw = await self.settlements.call(neighbor, "pow_challenge", {})
        try:
            challenge = pow_method.decode_challenge(_param(raw, "challenge"))
        except RpcError as exc:
            raise RemoteProtocolError(exc.message, "bad_pow") from None
        if challenge.payer != self.settlements.node.fingerprint or challenge.payee != neighbor:
            raise RemoteProtocolError("challenge for other parties", "foreign_challenge")
        # Seconds of hashing for large amounts: off the event loop.
        return await anyio.to_thread.run_sync(
            pow_method.make_proof, challenge, settlement_id, amount_umel
        )

    def redeem(self, neighbor: bytes, record: SettlementRecord, now: int) -> None:
        proposal = record.proposal
        if proposal.payer != neighbor:
            raise RemoteProtocolError("a pow settlement is paid by its proposer", "bad_pow")
        pow_method.redeem_proof(
            self.challenges,
            proposal.proof,
            payer=neighbor,
            settlement_id=proposal.settlement_id,
            amount_umel=proposal.net_umel,
            now=now,
        )

    async def issue(self, neighbor: bytes, params: Any) -> Any:
        challenge = self.challenges.issue(neighbor, unix_now(), os.urandom)
        return {"challenge": _b64(pow_method.encode_challenge(challenge))}


class Settlements:
    """The node's settlement books, payment methods and RPC handlers."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.settlement
        self.books: dict[bytes, SettlementBook] = {}
        self._saved: dict[bytes, SettlementBookState] = {}
        self._busy: set[bytes] = set()  # neighbours with an auto-settlement task running
        self._retry_at: dict[bytes, tuple[float, float]] = {}  # neighbour -> (when, backoff)
        self._polled: dict[bytes, float] = {}
        pow_payment = PowPayment(self)
        self.methods: dict[str, PaymentMethod] = {
            METHOD_MANUAL: ManualPayment(),
            METHOD_POW: pow_payment,
        }
        rpc = node.rpc
        rpc.register("pow_challenge", pow_payment.issue)
        rpc.register("start_settlement", self._on_start)
        rpc.register("settlement_status", self._on_status)
        rpc.register("settlement_answer", self._on_answer)
        rpc.register("settlement_audit", self._on_audit)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load each neighbour's last book checkpoint (the ledger is already open)."""
        ledger = self.node.accounting.ledger
        assert ledger is not None
        for neighbor in await ledger.neighbors():
            entry = await ledger.latest(neighbor, "settlements")
            if entry is not None and entry.body is not None:
                self._saved[neighbor] = _book_decoder.decode(entry.body)

    async def run(self) -> None:
        """Expire, poll and auto-settle every TICK_SECS, until cancelled."""
        while True:
            await anyio.sleep(TICK_SECS)
            now = unix_now()
            for neighbor, book in list(self.books.items()):
                for record in book.expire(now):
                    await self._commit(neighbor, "settlement_expired", encode(record.proposal))
                    log.info(
                        "settlement_expired",
                        neighbor=short_hex(neighbor),
                        id=record.proposal.id_hex,
                    )
                    if record.role == "responder" and neighbor in self.node.links:
                        self.node.spawn(self._tell, neighbor, _answer(record))
                if neighbor not in self.node.links:
                    continue
                pending = book.outgoing_pending()
                if pending is not None and self._due(self._polled, neighbor, POLL_SECS):
                    self.node.spawn(self._ask_status, neighbor, pending.proposal.settlement_id)
                self._maybe_auto_settle(neighbor, book, now)

    @staticmethod
    def _due(last: dict[bytes, float], neighbor: bytes, interval: float) -> bool:
        """True at most once per `interval` per neighbour."""
        now = anyio.current_time()
        if now - last.get(neighbor, -interval) < interval:
            return False
        last[neighbor] = now
        return True

    def on_link_up(self, runner: LinkRunner) -> None:
        self.book_for(runner)
        assert runner.peer_fingerprint is not None
        self.node.spawn(self._reconcile, runner.peer_fingerprint)

    def book_for(self, runner: LinkRunner) -> SettlementBook:
        neighbor = runner.peer_fingerprint
        assert neighbor is not None and runner.link.peer_identity_public is not None
        book = self.books.get(neighbor)
        if book is None:
            state = self._saved.pop(neighbor, None) or SettlementBookState(neighbor)
            book = SettlementBook(self.node.identity, runner.link.peer_identity_public, state)
            self.books[neighbor] = book
        return book

    # --- persistence --------------------------------------------------------------------

    async def _commit(self, neighbor: bytes, kind: str, body: bytes) -> None:
        """Append an event, the account's checkpoint and the book's, in one transaction."""
        accounting = self.node.accounting
        book_state = msgspec.msgpack.encode(self.books[neighbor].state)
        await accounting.commit(
            accounting.accounts[neighbor], kind, body, also=[("settlements", book_state)]
        )
        self.node.accounts_changed()

    async def call(self, neighbor: bytes, method: str, params: Any) -> Any:
        return await self.node.rpc.call(neighbor, method, params)

    # --- proposing ----------------------------------------------------------------------

    async def propose(
        self, neighbor: bytes, *, pay_umel: int, request_umel: int, method: str
    ) -> SettlementRecord:
        """Propose to `neighbor`: we pay `pay_umel` of our debt, they `request_umel` of
        theirs, by `method`. Returns the record as it stands after the first answer (or
        still PENDING if none came). Raises LocalProtocolError for what we cannot propose
        (no link, a settlement in flight, an unknown method or one they do not accept) and
        RemoteProtocolError if the payment could not be made."""
        book = self.books.get(neighbor)
        account = self.node.accounting.accounts.get(neighbor)
        if book is None or account is None or neighbor not in self.node.links:
            raise LocalProtocolError("no link to this neighbour")
        if method not in self.config.methods or method not in self.methods:
            raise LocalProtocolError(f"payment method {method!r} is not enabled here")
        offer = account.state.their_offer
        if offer is None or method not in offer.methods:
            raise LocalProtocolError(f"the neighbour does not accept {method!r}")
        if book.in_flight(unix_now()) is not None:
            raise LocalProtocolError("a settlement with this neighbour is already in flight")
        settlement_id = os.urandom(16)
        net = abs(pay_umel - request_umel)
        proof = await self.methods[method].prove(neighbor, settlement_id, net) if net else b""
        ledger = self.node.accounting.ledger
        assert ledger is not None
        _, ledger_head = await ledger.head(neighbor)
        proposal = book.propose(
            settlement_id=settlement_id,
            reduce_mine_umel=pay_umel,
            reduce_theirs_umel=request_umel,
            method=method,
            proof=proof,
            ledger_head=ledger_head,
            now=unix_now(),
            expiry_secs=self.config.manual_expiry_secs,
        )
        await self._commit(neighbor, "settlement_proposed", encode(proposal))
        log.info(
            "settlement_proposed",
            neighbor=short_hex(neighbor),
            id=proposal.id_hex,
            method=method,
            pay_umel=pay_umel,
            request_umel=request_umel,
        )
        try:
            answer = await self.call(
                neighbor, "start_settlement", {"proposal": _b64(encode(proposal))}
            )
            await self._apply_answer(neighbor, answer)
        except (RpcError, RpcTimeout) as exc:
            log.warning("settlement_not_answered", neighbor=short_hex(neighbor), error=str(exc))
        record = book.record(settlement_id)
        assert record is not None
        return record

    async def _apply_answer(self, neighbor: bytes, answer: Any) -> None:
        """Apply the responder's answer about one of our proposals (pending: nothing)."""
        book = self.books[neighbor]
        try:
            if isinstance(answer, dict) and "attestation" in answer:
                attestation = decode_attestation(_param(answer, "attestation"))
                completed = book.on_approved(attestation)
                if completed is None:
                    return
                self.node.accounting.accounts[neighbor].settle(*completed.reduction)
                await self._commit(neighbor, "attestation", encode(attestation))
                log.info(
                    "settlement_completed",
                    neighbor=short_hex(neighbor),
                    id=attestation.proposal.id_hex,
                    paid_in_umel=completed.reduction[0],
                    paid_out_umel=completed.reduction[1],
                )
            elif isinstance(answer, dict) and "rejection" in answer:
                rejection = decode_rejection(_param(answer, "rejection"))
                if book.on_rejected(rejection) is not None:
                    await self._commit(neighbor, "settlement_rejected", encode(rejection))
                    log.info(
                        "settlement_rejected",
                        neighbor=short_hex(neighbor),
                        id=rejection.settlement_id.hex(),
                        reason=rejection.reason,
                    )
        except (RpcError, RemoteProtocolError) as exc:
            log.warning("settlement_answer_refused", neighbor=short_hex(neighbor), error=str(exc))

    async def _ask_status(self, neighbor: bytes, settlement_id: bytes) -> None:
        """Ask about our pending proposal; one the responder never received (we stopped
        before sending it, or it was lost) is sent again, identical."""
        try:
            answer = await self.call(neighbor, "settlement_status", {"id": settlement_id.hex()})
        except RpcError as exc:
            record = self.books[neighbor].record(settlement_id)
            if exc.data != "unknown_settlement" or record is None:
                return
            params = {"proposal": _b64(encode(record.proposal))}
            try:
                answer = await self.call(neighbor, "start_settlement", params)
            except (RpcError, RpcTimeout):
                return
        except RpcTimeout:
            return
        await self._apply_answer(neighbor, answer)

    # --- responding ---------------------------------------------------------------------

    def _book(self, neighbor: bytes) -> SettlementBook:
        book = self.books.get(neighbor)
        if book is None or neighbor not in self.node.accounting.accounts:
            raise RpcError(REFUSED, "no link to this neighbour", "not_linked")
        return book

    async def _on_start(self, neighbor: bytes, params: Any) -> Any:
        book = self._book(neighbor)
        now = unix_now()
        try:
            proposal = decode_proposal(_param(params, "proposal"))
            known = book.record(proposal.settlement_id) is not None
            record = book.receive(proposal, now, expiry_secs=self.config.manual_expiry_secs)
        except RemoteProtocolError as exc:
            raise _refused(exc) from None
        if known:  # a retransmission, perhaps from before our restart: the same answer
            return _answer(record)
        await self._commit(neighbor, "settlement_received", encode(proposal))
        if record.state is not SettlementState.PENDING:  # refused on receipt (stale head...)
            return _answer(record)
        problem = self._check(neighbor, record)
        method = self.methods.get(proposal.method)
        if problem is None and method is not None:
            try:
                method.redeem(neighbor, record, now)
            except RemoteProtocolError as exc:
                problem = exc.reason
        if problem is not None:
            await self.decide(neighbor, record, approve=False, reason=problem)
        elif method is not None and method.automatic:
            await self.decide(neighbor, record, approve=True)
        else:
            log.info(
                "settlement_awaiting_operator",
                neighbor=short_hex(neighbor),
                id=proposal.id_hex,
                net_umel=proposal.net_umel,
                direction=proposal.direction,
            )
        return _answer(record)

    def _check(self, neighbor: bytes, record: SettlementRecord) -> str | None:
        """Why we refuse this proposal outright, or None."""
        proposal = record.proposal
        if proposal.method not in self.config.methods or proposal.method not in self.methods:
            return "method_not_accepted"
        _, waived = proposal.reduction_for(self.node.fingerprint)
        account = self.node.accounting.accounts[neighbor]
        if waived > max(0, account.debt_out_umel):
            return "more_than_we_owe"  # it would cut our debt below what we owe
        return None

    async def decide(
        self, neighbor: bytes, record: SettlementRecord, *, approve: bool, reason: str = ""
    ) -> None:
        """Approve (apply and sign) or reject an incoming PENDING proposal, commit, and tell
        the proposer (best effort: it also asks)."""
        book = self.books[neighbor]
        now = unix_now()
        settlement_id = record.proposal.settlement_id
        answer = (
            book.approve(settlement_id, now) if approve else book.reject(settlement_id, reason, now)
        )
        if isinstance(answer, Attestation):
            paid_in, paid_out = book.reduction(record)
            self.node.accounting.accounts[neighbor].settle(paid_in, paid_out)
            await self._commit(neighbor, "attestation", encode(answer))
            log.info(
                "settlement_completed",
                neighbor=short_hex(neighbor),
                id=record.proposal.id_hex,
                paid_in_umel=paid_in,
                paid_out_umel=paid_out,
            )
        else:
            await self._commit(neighbor, "settlement_rejected", encode(answer))
            log.info(
                "settlement_rejected",
                neighbor=short_hex(neighbor),
                id=record.proposal.id_hex,
                reason=answer.reason,
            )

    async def _tell(self, neighbor: bytes, answer: dict[str, Any]) -> None:
        try:
            await self.call(neighbor, "settlement_answer", answer)
        except (RpcError, RpcTimeout):
            return  # the proposer asks with settlement_status

    async def _on_status(self, neighbor: bytes, params: Any) -> Any:
        book = self._book(neighbor)
        record = book.record(_hex_param(params, "id", SETTLEMENT_ID_SIZE))
        if record is None or record.role != "responder":
            raise RpcError(REFUSED, "unknown settlement", "unknown_settlement")
        return _answer(record)

    async def _on_answer(self, neighbor: bytes, params: Any) -> Any:
        self._book(neighbor)
        await self._apply_answer(neighbor, params)
        return {}

    # --- operator decisions -------------------------------------------------------------

    def find(self, settlement_id: bytes) -> tuple[bytes, SettlementRecord]:
        """Raises LocalProtocolError if no book holds this settlement."""
        for neighbor, book in self.books.items():
            record = book.record(settlement_id)
            if record is not None:
                return neighbor, record
        raise LocalProtocolError(f"no settlement {settlement_id.hex()}")

    async def operator_decides(self, settlement_id: bytes, *, approve: bool) -> SettlementRecord:
        """`earendil-py accept|reject ID`. Raises LocalProtocolError unless it is an incoming
        proposal waiting for a decision."""
        neighbor, record = self.find(settlement_id)
        if record.role != "responder" or record.state is not SettlementState.PENDING:
            raise LocalProtocolError(
                f"settlement {settlement_id.hex()} is not waiting for us ({record.state})"
            )
        await self.decide(neighbor, record, approve=approve, reason="rejected_by_operator")
        self.node.spawn(self._tell, neighbor, _answer(record))
        return record

    # --- automatic settlement -----------------------------------------------------------

    def auto_settlement(self, neighbor: bytes) -> tuple[int, str] | None:
        """Our debt to `neighbor` at which we settle by ourselves (a share of its limit, never
        dust) and the method, or None if no automatic method is agreed with it."""
        account = self.node.accounting.accounts.get(neighbor)
        if account is None or not account.priced:
            return None
        offer = account.state.their_offer
        assert offer is not None
        method = next(
            (
                m
                for m in self.config.methods
                if m in offer.methods and m in self.methods and self.methods[m].automatic
            ),
            None,
        )
        if method is None:
            return None
        threshold = offer.debt_limit_umel * self.config.auto_settle_percent // 100
        return max(threshold, self.config.min_settlement_umel, 1), method

    def _maybe_auto_settle(self, neighbor: bytes, book: SettlementBook, now: int) -> None:
        auto = self.auto_settlement(neighbor)
        if auto is None or neighbor in self._busy:
            return
        threshold, method = auto
        debt = self.node.accounting.accounts[neighbor].debt_out_umel
        if debt < threshold or book.in_flight(now) is not None:
            return
        when, _ = self._retry_at.get(neighbor, (0.0, 0.0))
        if anyio.current_time() < when:
            return
        self._busy.add(neighbor)
        self.node.spawn(self._auto_settle, neighbor, debt, method)

    async def _auto_settle(self, neighbor: bytes, amount: int, method: str) -> None:
        try:
            record = await self.propose(neighbor, pay_umel=amount, request_umel=0, method=method)
            failed = record.state is not SettlementState.COMPLETED
        except (LocalProtocolError, RemoteProtocolError, RpcError, RpcTimeout) as exc:
            log.warning("auto_settlement_failed", neighbor=short_hex(neighbor), error=str(exc))
            failed = True
        finally:
            self._busy.discard(neighbor)
        if failed:
            _, backoff = self._retry_at.get(neighbor, (0.0, RETRY_MIN_SECS / 2))
            backoff = min(backoff * 2, RETRY_MAX_SECS)
            self._retry_at[neighbor] = (anyio.current_time() + backoff, backoff)
        else:
            self._retry_at.pop(neighbor, None)

    # --- reconnect: pending answers, then the audit -------------------------------------

    async def _reconcile(self, neighbor: bytes) -> None:
        book = self.books[neighbor]
        pending = book.outgoing_pending()
        if pending is not None:
            await self._ask_status(neighbor, pending.proposal.settlement_id)
        await self.audit(neighbor)

    async def audit(self, neighbor: bytes) -> str | None:
        """Compare the neighbour's settlement chain with ours (the balance audit). Returns
        None if they agree, else the mismatch, which is recorded as a dispute and freezes
        the account."""
        book = self.books[neighbor]
        since = GENESIS
        while True:
            try:
                raw = await self.call(neighbor, "settlement_audit", {"since": since.hex()})
                page = decode_audit(_param(raw, "page"))
            except (RpcError, RpcTimeout, RemoteProtocolError) as exc:
                log.info("settlement_audit_failed", neighbor=short_hex(neighbor), error=str(exc))
                return None
            mismatch = book.verify_audit(page.head, page.attestations, since=since)
            if mismatch is not None and mismatch.reason == "missing":
                return None  # they lack our newest; they will fetch it as its proposer
            if mismatch is not None and mismatch.reason == "extra":
                # The answer to our own pending proposal, which we had not heard yet?
                extra = page.attestations[mismatch.index]
                record = book.record(extra.proposal.settlement_id)
                if record is not None and record.role == "proposer" and record.answer is None:
                    await self._apply_answer(neighbor, {"attestation": _b64(encode(extra))})
                    since = GENESIS
                    continue
            if mismatch is not None:
                account = self.node.accounting.accounts[neighbor]
                account.state.frozen = "audit_mismatch"
                detail = f"{mismatch.reason} at {mismatch.index}: {mismatch.detail}"
                await self._commit(neighbor, "dispute", detail.encode())
                log.warning(
                    "settlement_audit_mismatch", neighbor=short_hex(neighbor), detail=detail
                )
                return detail
            if not page.attestations or attestation_hash(page.attestations[-1]) == page.head:
                return None
            since = attestation_hash(page.attestations[-1])

    async def _on_audit(self, neighbor: bytes, params: Any) -> Any:
        book = self._book(neighbor)
        page = book.audit_page(_hex_param(params, "since", HASH_SIZE))
        if page is None:
            raise RpcError(UNKNOWN_SINCE, "unknown head", "unknown_since")
        return {"page": _b64(encode(page))}

    # --- the operator's view ------------------------------------------------------------

    def summaries(self) -> Iterable[dict[str, Any]]:
        for neighbor, book in self.books.items():
            for record in book.state.records.values():
                proposal = record.proposal
                paid_in, paid_out = proposal.reduction_for(self.node.fingerprint)
                yield {
                    "id": proposal.id_hex,
                    "neighbor": neighbor.hex(),
                    "role": record.role,
                    "state": str(record.state),
                    "reason": record.reason,
                    "method": proposal.method,
                    "paid_in_umel": paid_in,
                    "paid_out_umel": paid_out,
                    "created_at": record.created_at,
                    "expires_at": record.expires_at,
                }


def _answer(record: SettlementRecord) -> dict[str, Any]:
    if isinstance(record.answer, Attestation):
        return {"state": str(record.state), "attestation": _b64(encode(record.answer))}
    if isinstance(record.answer, Rejection):
        return {"state": str(record.state), "rejection": _b64(encode(record.answer))}
    return {"state": str(record.state)}
