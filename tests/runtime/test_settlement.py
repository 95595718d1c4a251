"""Settlements between real nodes on loopback: manual and pow, refusals, crashes, failed
commits, audits, the CLI."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from earendil_py.core.errors import EarendilError
from earendil_py.core.ledger import GENESIS
from earendil_py.core.neighbor import (
    REFUSED,
    Neighbor,
    SettlementAnswer,
    SettlementQuery,
    unwire,
    wire,
)
from earendil_py.core.settlement import (
    MAX_PROOF_SIZE,
    RECENT,
    Attestation,
    BookState,
    SettlementBook,
    SettlementRecord,
    SettlementState,
    make_proposal,
)
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.node import Node
from earendil_py.runtime.rpc import RpcError
from tests.helpers import (
    FAST,
    DaemonProcess,
    cli_beside_nodes,
    converged,
    daemon_api,
    daemon_priced,
    make_nodes,
    node_from,
    summary_of,
    wait_until,
)

PAIR = [Edge(0, 1, "udp")]
DOCK = 7
SETTLEMENT = """
[settlement]
manual_expiry_secs = 2
min_settlement_umel = 10

[accounting]
push_debt_secs = 0.5
checkpoint_secs = 0.5
"""
LONGER = SETTLEMENT.replace("manual_expiry_secs = 2", "manual_expiry_secs = 60")


def neighbor(node: Node, other: Node) -> Neighbor:
    found = node.accounts.get(other.fingerprint)
    assert found is not None
    return found


async def owe(payer: Node, payee: Node, packets: int) -> None:
    """`payer` sends `payee` packets (price 1 each), and both agree on what arrived: the
    claims made while some were in flight have been corrected by the next ones."""
    for i in range(packets):
        payer.send_datagram(payee.fingerprint, DOCK, b"x", hops=1)
        if i % 25 == 24:
            await anyio.sleep(0.01)
    for _ in range(packets):
        await payee.receive_datagram(DOCK)
    with anyio.fail_after(10):
        for settle_down in (True, False):  # a claim still in flight may land: wait it out
            while neighbor(payer, payee).account.debt_out_umel != (
                neighbor(payee, payer).account.debt_in_umel
            ):
                await anyio.sleep(0.05)
            if settle_down:
                await anyio.sleep(1.2)  # over two push intervals


def balances(a: Node, b: Node) -> tuple[int, int, int, int]:
    """(a owes b by a, by b; b owes a by b, by a)."""
    ab, ba = neighbor(a, b).account, neighbor(b, a).account
    return ab.debt_out_umel, ba.debt_in_umel, ba.debt_out_umel, ab.debt_in_umel


async def api(node: Node, method: str, path: str, body: object | None = None) -> Any:
    return await anyio.to_thread.run_sync(call_api, node.config, method, path, body)


async def record_in(
    node: Node, other: Node, settlement_id: str, state: SettlementState
) -> SettlementRecord:
    with anyio.fail_after(10):
        while True:
            found = node.accounts.get(other.fingerprint)
            record = found.book.record(bytes.fromhex(settlement_id)) if found else None
            if record is not None and record.state is state:
                return record
            await anyio.sleep(0.05)


@asynccontextmanager
async def network(tmp_path: Path, extra: str = SETTLEMENT) -> AsyncIterator[list[Node]]:
    nodes = make_nodes(tmp_path, 2, PAIR, extra_toml=extra)
    async with anyio.create_task_group() as tg:
        for node in nodes:
            await tg.start(node.run)
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        yield nodes
        tg.cancel_scope.cancel()


def attacker_book(attacker: Node, victim: Node) -> SettlementBook:
    """The attacker's own book, kept apart from its node's, to sign what it likes."""
    return SettlementBook(
        attacker.identity, victim.identity.identity_public, BookState(victim.fingerprint)
    )


@pytest.mark.anyio
async def test_manual_settlement_accepted_by_the_other_operator(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 300)
        await owe(b, a, 40)
        assert balances(a, b) == (300, 300, 40, 40)
        answer = await api(
            a,
            "POST",
            "/api/settlements",
            {"neighbor": b.fingerprint.hex(), "method": "manual", "pay_umel": 250},
        )
        assert answer["state"] == "pending"
        listed = (await api(b, "GET", "/api/settlements"))["settlements"]
        assert [(s["id"], s["role"], s["state"], s["paid_in_umel"]) for s in listed] == [
            (answer["id"], "responder", "pending", 250)
        ]
        assert balances(a, b) == (300, 300, 40, 40)  # nothing moves before acceptance
        accepted = await api(b, "POST", f"/api/settlements/{answer['id']}/accept", {})
        assert accepted["state"] == "completed"
        await record_in(a, b, answer["id"], SettlementState.COMPLETED)
        assert balances(a, b) == (50, 50, 40, 40)
        assert neighbor(a, b).book.head == neighbor(b, a).book.head
        # Accepting twice is refused; the balances moved once.
        with pytest.raises(ControlApiError) as caught:
            await api(b, "POST", f"/api/settlements/{answer['id']}/accept", {})
        assert caught.value.status == 409
        assert balances(a, b) == (50, 50, 40, 40)


@pytest.mark.anyio
async def test_manual_settlements_obey_the_minimum_and_pay_no_more_than_owed(
    tmp_path: Path,
) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 100)
        settle = {"neighbor": b.fingerprint.hex(), "method": "manual"}
        for pay, reason in [(5, "below the minimum"), (150, "needs prepay")]:
            with pytest.raises(ControlApiError) as caught:
                await api(a, "POST", "/api/settlements", {**settle, "pay_umel": pay})
            assert caught.value.status == 409 and reason in str(caught.value)
        prepaid = await api(
            a, "POST", "/api/settlements", {**settle, "pay_umel": 150, "prepay": True}
        )
        await api(b, "POST", f"/api/settlements/{prepaid['id']}/accept", {})
        await record_in(a, b, prepaid["id"], SettlementState.COMPLETED)
        assert balances(a, b) == (-50, -50, 0, 0)
        # b does not pay a's request for more than b owes: refused, and not even recorded.
        request = await api(a, "POST", "/api/settlements", {**settle, "request_umel": 20})
        assert (request["state"], request["reason"]) == ("rejected", "more_than_we_owe")
        assert neighbor(b, a).book.record(bytes.fromhex(request["id"])) is None


@pytest.mark.anyio
async def test_manual_settlement_rejected_then_one_that_expires_then_one_canceled(
    tmp_path: Path,
) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 100)
        settle = {"neighbor": b.fingerprint.hex(), "method": "manual", "pay_umel": 100}
        first = await api(a, "POST", "/api/settlements", settle)
        await api(b, "POST", f"/api/settlements/{first['id']}/reject", {})
        record = await record_in(a, b, first["id"], SettlementState.REJECTED)
        assert record.reason == "rejected_by_operator"
        second = await api(a, "POST", "/api/settlements", settle)  # the link is free again
        await record_in(b, a, second["id"], SettlementState.EXPIRED)  # 2 s, nobody decides
        await record_in(a, b, second["id"], SettlementState.EXPIRED)
        with pytest.raises(ControlApiError) as caught:  # too late to accept
            await api(b, "POST", f"/api/settlements/{second['id']}/accept", {})
        assert caught.value.status == 409
        third = await api(a, "POST", "/api/settlements", settle)
        canceled = await api(a, "POST", f"/api/settlements/{third['id']}/cancel", {})
        assert canceled["state"] == "canceled"
        await record_in(b, a, third["id"], SettlementState.CANCELED)
        assert balances(a, b) == (100, 100, 0, 0)


@pytest.mark.anyio
async def test_pow_settlement_end_to_end_and_its_refusals(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 900)
        await owe(b, a, 100)
        record = await a.accounts.propose(b.fingerprint, pay_umel=700, request_umel=0, method="pow")
        assert record.state is SettlementState.COMPLETED
        assert balances(a, b) == (200, 200, 100, 100)
        proposal = record.proposal

        async def start(params: object) -> SettlementAnswer:
            from earendil_py.core.neighbor import unwire

            return unwire(
                await a.rpc.call(b.fingerprint, "start_settlement", params), SettlementAnswer
            )

        # A replayed proposal gets the identical answer and changes nothing.
        again = await start(wire(proposal))
        assert again.state is SettlementState.COMPLETED and again.attestation == record.attestation
        assert balances(a, b) == (200, 200, 100, 100)

        # Its pow challenge, reused for a new proposal, is refused.
        book = attacker_book(a, b)
        book.state.head = neighbor(a, b).book.head
        reuse = book.propose(
            settlement_id=b"\x01" * 16,
            reduce_mine_umel=700,
            reduce_theirs_umel=0,
            method="pow",
            proof=proposal.proof,
            ledger_head=bytes(32),
            now=proposal.timestamp,
            expiry_secs=60,
        ).proposal
        answer = await start(wire(reuse))
        assert answer.rejection is not None and answer.rejection.reason == "unknown_challenge"

        # A forged proposal and one naming a stale head are refused.
        forged = msgspec.structs.replace(reuse, settlement_id=b"\x02" * 16)
        with pytest.raises(RpcError) as caught:
            await start(wire(forged))
        assert (caught.value.code, caught.value.data) == (REFUSED, "bad_signature")
        stale = (
            attacker_book(a, b)
            .propose(  # at GENESIS, as if it had missed the first one
                settlement_id=b"\x03" * 16,
                reduce_mine_umel=50,
                reduce_theirs_umel=0,
                method="manual",
                ledger_head=bytes(32),
                now=proposal.timestamp,
                expiry_secs=60,
            )
            .proposal
        )
        answer = await start(wire(stale))
        assert answer.rejection is not None and answer.rejection.reason == "stale_head"
        assert balances(a, b) == (200, 200, 100, 100)


@pytest.mark.anyio
async def test_an_attestation_signed_by_one_side_only_changes_nothing(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 100)
        answer = await api(
            a,
            "POST",
            "/api/settlements",
            {"neighbor": b.fingerprint.hex(), "method": "manual", "pay_umel": 100},
        )
        record = neighbor(a, b).book.record(bytes.fromhex(answer["id"]))
        assert record is not None
        fake = Attestation(record.proposal, bytes(64))  # "approved" without b's signature
        with anyio.fail_after(5), pytest.raises(RpcError) as caught:
            await b.rpc.call(
                a.fingerprint,
                "settlement_answer",
                wire(SettlementAnswer(SettlementState.COMPLETED, attestation=fake)),
            )
        assert caught.value.data == "bad_signature"
        assert neighbor(a, b).book.record(record.settlement_id).state is SettlementState.PENDING  # type: ignore[union-attr]
        assert balances(a, b) == (100, 100, 0, 0)


class Crashable:
    """Nodes in their own cancel scopes: `crash` stops one as SIGKILL would (nothing more is
    written: no clean stop), `restart` starts it again from its files."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        self.scopes: dict[bytes, anyio.CancelScope] = {}

    async def start(self, node: Node) -> Node:
        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.CancelScope() as scope:
                self.scopes[node.fingerprint] = scope
                await node.run(task_status=task_status)

        await self.tg.start(run)
        return node

    def crash(self, node: Node) -> None:
        async def nothing() -> None:
            """No clean counts: a crash writes nothing more."""

        node.accounts.aclose = nothing  # type: ignore[method-assign]
        self.scopes[node.fingerprint].cancel()

    async def restart(self, node: Node) -> Node:
        await anyio.sleep(0.2)  # the old sockets and ledger are closed by now
        return await self.start(node_from(node.config))


async def settled(a: Node, b: Node, settlement_id: bytes) -> None:
    with anyio.fail_after(20):
        while not all(
            (n := node.accounts.get(other.fingerprint)) is not None
            and (record := n.book.record(settlement_id)) is not None
            and record.state is SettlementState.COMPLETED
            for node, other in [(a, b), (b, a)]
        ):
            await anyio.sleep(0.05)


def hook_ledger(node: Node, hook: Callable[[list[str]], Awaitable[None]]) -> None:
    """Run `hook(kinds)` before each of the node's ledger commits."""
    ledger = node.ledger
    assert ledger is not None
    original = ledger.append_many

    async def append_many(items: Any, *args: Any, **kw: Any) -> Any:
        await hook([kind for _, kind, _ in items])
        return await original(items, *args, **kw)

    ledger.append_many = append_many  # type: ignore[method-assign]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "step", ["after_pending", "after_responder_commit", "before_proposer_commit"]
)
async def test_a_crash_at_each_step_converges_without_double_application(
    tmp_path: Path, step: str
) -> None:
    a, b = make_nodes(tmp_path, 2, PAIR, extra_toml=SETTLEMENT)
    async with anyio.create_task_group() as tg:
        nodes = Crashable(tg)
        for node in (a, b):
            await nodes.start(node)
        with anyio.fail_after(5):
            await converged([a, b], PAIR)
        await owe(a, b, 500)
        crashed: list[Node] = []

        def crash_at(node: Node, kind: str, *, after: bool) -> None:
            """`node` dies at its commit of `kind`: before it, or just after it (before
            anything else happens)."""
            ledger = node.ledger
            assert ledger is not None
            original = ledger.append_many

            async def append_many(items: Any, *args: Any, **kw: Any) -> Any:
                if crashed or kind not in [k for _, k, _ in items]:
                    return await original(items, *args, **kw)
                if after:
                    with anyio.CancelScope(shield=True):
                        await original(items, *args, **kw)
                crashed.append(node)
                nodes.crash(node)
                await anyio.sleep_forever()

            ledger.append_many = append_many  # type: ignore[method-assign]

        if step == "after_pending":  # the proposal is written, never sent
            original = a.rpc.call

            async def call(neighbor_fp: bytes, method: str, params: Any = None) -> Any:
                if method == "start_settlement" and not crashed:
                    crashed.append(a)
                    nodes.crash(a)
                    await anyio.sleep_forever()
                return await original(neighbor_fp, method, params)

            a.rpc.call = call  # type: ignore[method-assign]
        elif step == "after_responder_commit":
            crash_at(b, "settlement_completed", after=True)
        else:
            crash_at(a, "settlement_completed", after=False)

        async def propose() -> None:
            with anyio.move_on_after(10):
                await a.accounts.propose(b.fingerprint, pay_umel=300, request_umel=0, method="pow")

        tg.start_soon(propose)
        with anyio.fail_after(10):
            while not crashed:
                await anyio.sleep(0.02)
        (pending,) = neighbor(a, b).book.state.open.values()
        settlement_id = pending.settlement_id
        await anyio.sleep(0.1)
        if crashed[0] is a:
            a = await nodes.restart(a)
        else:
            b = await nodes.restart(b)
        await settled(a, b, settlement_id)
        await anyio.sleep(0.5)  # any retransmission still in flight lands, and changes nothing
        assert balances(a, b) == (200, 200, 0, 0)
        assert neighbor(a, b).book.head == neighbor(b, a).book.head
        tg.cancel_scope.cancel()


async def state_of(node: Node, other: Node) -> tuple[tuple[int, int], bytes, int]:
    """What a failed settlement step must leave as it was: the amounts settled, the book, and
    the settlement entries on disk."""
    found = neighbor(node, other)
    ledger = node.ledger
    assert ledger is not None
    entries = await ledger.entries(other.fingerprint)
    written = sum(e.kind.startswith("settlement_") for e in entries)
    account = found.account.state
    settled = (account.settled_in_umel, account.settled_out_umel)
    return settled, msgspec.msgpack.encode(found.book.state), written


def fail_settlement_commit(side: Node, other: Node, step: int) -> list[bool]:
    """Make `side`'s `step`-th settlement commit fail; the list returned gets True once
    both sides were found, after it, as they were before it."""
    seen: list[str] = []
    unchanged: list[bool] = []

    async def hook(kinds: list[str]) -> None:
        if not any(kind.startswith("settlement_") for kind in kinds):
            return
        seen.append(kinds[0])
        if len(seen) != step:
            return
        before = await state_of(side, other), await state_of(other, side)

        async def compare() -> None:
            await anyio.sleep(0.3)  # the failed step's answer has reached the neighbour
            unchanged.append((await state_of(side, other), await state_of(other, side)) == before)

        side.accounts._spawn(compare)
        raise sqlite3.OperationalError("disk I/O error")

    hook_ledger(side, hook)
    return unchanged


async def retried(attempt: Callable[[], Awaitable[Any]]) -> Any:
    """What an operator does when the ledger failed (here, or the payment with it): try
    again, a second later."""
    while True:
        try:
            return await attempt()
        except EarendilError:
            await anyio.sleep(1)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["pow", "manual"])
@pytest.mark.parametrize("failing", [0, 1])
async def test_a_failed_commit_at_each_step_of_a_settlement_changes_nothing(
    tmp_path: Path, method: str, failing: int
) -> None:
    """The ledger commit of each settlement step, on either side, fails in turn: memory,
    disk and the neighbour are as they were before the step; the settlement then completes
    on both sides, once."""

    async def settle(a: Node, b: Node) -> None:
        record = await retried(
            lambda: a.accounts.propose(b.fingerprint, pay_umel=250, request_umel=0, method=method)
        )
        if method == "manual":
            incoming = await record_in(b, a, record.proposal.id_hex, SettlementState.PENDING)
            await retried(lambda: b.accounts.decide(incoming.settlement_id, approve=True))
        await settled(a, b, record.settlement_id)

    steps = 0
    for step in (1, 2):
        # Proposals wait a minute: long enough for the proposer's status question (every
        # 5 s) to find a responder that failed to write one.
        async with network(tmp_path / f"step{step}", LONGER) as nodes:
            a, b = nodes
            await owe(a, b, 300)
            unchanged = fail_settlement_commit(nodes[failing], nodes[1 - failing], step)
            with anyio.fail_after(60):
                await settle(a, b)
                await anyio.sleep(0.4)  # the check after a failure has run
            assert all(unchanged)
            steps += len(unchanged)
            assert balances(a, b) == (50, 50, 0, 0)
            assert neighbor(a, b).book.head == neighbor(b, a).book.head
    # Each side writes two settlement steps, but a pow responder one: each failed once.
    assert steps == (1 if (method, failing) == ("pow", 1) else 2)


@pytest.mark.anyio
async def test_auto_settlement_keeps_traffic_flowing_under_a_small_limit(tmp_path: Path) -> None:
    # Node 1 charges 10 uMEL a packet and lets node 0 owe at most 20,000: 2,000 packets.
    price = (
        "[in_routes.from_node0_udp.price]\n"
        "inbound_price_umel = 10\ninbound_debt_limit_umel = 20000\n"
    )
    a, b = make_nodes(tmp_path, 2, PAIR, extra_toml=SETTLEMENT, node_toml={1: price})
    async with anyio.create_task_group() as tg:
        for node in (a, b):
            await tg.start(node.run)
        with anyio.fail_after(5):
            await converged([a, b], PAIR)
        with anyio.fail_after(30):
            await owe_paced(a, b, 5_000, per_second=800)  # 50,000 uMEL: 2.5 limits' worth
        link = a.links[b.fingerprint][0]
        assert link.statistics().drops["debt_limit_out"] == 0
        assert b.links[a.fingerprint][0].statistics().drops["debt_limit"] == 0

        def settled() -> tuple[int, int]:
            completed = [
                s
                for s in a.accounts.settlements()
                if s["state"] == "completed" and s["method"] == "pow"
            ]
            return len(completed), sum(s["paid_out_umel"] for s in completed)

        # Node 0 adopts node 1's claims: packets in flight when node 1 made one are charged
        # again by its next, a push interval later. Both books agree once one has arrived.
        with anyio.fail_after(10):
            while balances(a, b)[:2] != (50_000 - settled()[1],) * 2:
                await anyio.sleep(0.05)
        assert settled()[0] >= 2
        assert balances(a, b)[0] < 20_000
        tg.cancel_scope.cancel()


async def owe_paced(payer: Node, payee: Node, packets: int, per_second: int) -> None:
    delivered = payee.relay.delivered
    for i in range(packets):
        payer.send_datagram(payee.fingerprint, DOCK, b"x", hops=1)
        if i % 20 == 19:
            await anyio.sleep(20 / per_second)
            payee.receive_datagrams_nowait(DOCK, 10_000)  # keep the dock's queue short
    while payee.relay.delivered < delivered + packets:
        await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_the_audit_after_a_reconnect_finds_a_ledger_that_lost_a_settlement(
    tmp_path: Path,
) -> None:
    a, b = make_nodes(tmp_path, 2, PAIR, extra_toml=SETTLEMENT)
    async with anyio.create_task_group() as tg:
        nodes = Crashable(tg)
        for node in (a, b):
            await nodes.start(node)
        with anyio.fail_after(5):
            await converged([a, b], PAIR)
        await owe(a, b, 200)
        backup = tmp_path / "backup.db"
        with sqlite3.connect(b.config.db_path) as live, sqlite3.connect(backup) as copy:
            live.backup(copy)  # b's ledger before the settlement
        live.close()
        copy.close()
        await a.accounts.propose(b.fingerprint, pay_umel=150, request_umel=0, method="pow")
        nodes.crash(b)
        await anyio.sleep(0.2)
        # b's ledger comes back from the old backup: the settlement is gone from it.
        for suffix in ("-wal", "-shm"):
            Path(str(b.config.db_path) + suffix).unlink(missing_ok=True)
        backup.replace(b.config.db_path)
        b = await nodes.restart(b)
        with anyio.fail_after(10):
            while neighbor_or_none(b, a) is None or not neighbor(b, a).frozen:
                await anyio.sleep(0.05)
        assert neighbor(b, a).frozen == "audit_mismatch"
        assert neighbor(b, a).book.head == GENESIS != neighbor(a, b).book.head
        assert not neighbor(a, b).frozen  # a sees b lag behind: b's to find
        status = await api(b, "GET", "/api/status")
        assert [acct["frozen"] for acct in status["accounts"]] == ["audit_mismatch"]
        tg.cancel_scope.cancel()


def neighbor_or_none(node: Node, other: Node) -> Neighbor | None:
    return node.accounts.get(other.fingerprint)


@pytest.mark.anyio
async def test_the_cli_settles_lists_rejects_and_cancels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cli(*argv: str) -> tuple[int, str, str]:
        return await cli_beside_nodes(capsys, *argv)

    def settlement_of(out: str) -> str:
        (line,) = [line for line in out.splitlines() if line.startswith("settlement ")]
        return line.split()[1].rstrip(":")

    async with network(tmp_path) as (a, b):
        await owe(a, b, 100)
        config_a, config_b = str(a.config.source), str(b.config.source)
        settle = ("settle", "--config", config_a, "--neighbor", b.fingerprint.hex())
        code, out, _ = await cli(*settle, "--amount", "60", "--method", "manual")
        assert code == 0 and out.rstrip().endswith(": pending")
        settlement_id = settlement_of(out)
        code, out, _ = await cli("settlements", "--config", config_b)
        assert code == 0 and settlement_id in out and "they pay        60" in out
        code, out, _ = await cli("reject", "--config", config_b, settlement_id)
        assert code == 0 and f"settlement {settlement_id}: rejected" in out
        code, _, err = await cli("accept", "--config", config_b, settlement_id)
        assert code == 1 and "no open incoming proposal" in err
        code, _, err = await cli(*settle, "--amount", "160", "--method", "manual")
        assert code == 1 and "needs prepay" in err
        code, out, _ = await cli(*settle, "--amount", "160", "--method", "manual", "--prepay")
        assert code == 0
        code, out, _ = await cli("cancel", "--config", config_a, settlement_of(out))
        assert code == 0 and out.rstrip().endswith(": canceled (canceled)")
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            await cli(*settle, "--amount", "60", "--method", "onchain")
        assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err
        assert balances(a, b) == (100, 100, 0, 0)


def test_sigkilled_daemons_around_a_manual_settlement_converge(tmp_path: Path) -> None:
    """Real SIGKILLs at the step boundaries a manual settlement exposes: the proposer right
    after its proposal is pending on both sides, the responder right after it committed its
    approval (its answer to the proposer may not have left)."""
    timing = FAST + LONGER
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "tcp")], extra_toml=timing)
    proposer, responder = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        wait_until(lambda: daemon_priced(a.config_path, b.fingerprint), 10)
        send = {"destination": b.fingerprint, "dock": DOCK, "data_b64": "eA==", "hops": 1}
        for _ in range(300):
            daemon_api(a.config_path, "POST", "/api/send", send)
        wait_until(lambda: summary_of(b.config_path, a.fingerprint)["debt_in_umel"] == 300, 10)
        settle = {"neighbor": b.fingerprint, "method": "manual", "pay_umel": 200}
        answer = daemon_api(a.config_path, "POST", "/api/settlements", settle)
        assert answer["state"] == "pending"
        proposer.stop(signal.SIGKILL)
        proposer = DaemonProcess(a.config_path)
        wait_until(lambda: daemon_priced(a.config_path, b.fingerprint), 10)
        # Restarted, the proposer counts its whole outbound lease as sent until the
        # responder's next claim corrects it; the responder may be killed before or after
        # that claim lands, and must not re-learn the lease as packets it lost either way.
        decided = daemon_api(b.config_path, "POST", f"/api/settlements/{answer['id']}/accept", {})
        assert decided["state"] == "completed"
        responder.stop(signal.SIGKILL)
        responder = DaemonProcess(b.config_path)

        def states(config_path: Path) -> list[str]:
            listed = daemon_api(config_path, "GET", "/api/settlements")["settlements"]
            return [s["state"] for s in listed if s["id"] == answer["id"]]

        wait_until(lambda: states(a.config_path) == states(b.config_path) == ["completed"], 20)
        wait_until(
            lambda: (
                summary_of(a.config_path, b.fingerprint)["debt_out_umel"]
                == summary_of(b.config_path, a.fingerprint)["debt_in_umel"]
                == 100
            ),
            10,
        )
    finally:
        proposer.stop()
        responder.stop()


def ledger_bytes(node: Node) -> int:
    """The size of the node's ledger as SQLite sees it (the WAL's pages included)."""
    conn = sqlite3.connect(node.config.db_path)
    try:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
        return int(pages * size)
    finally:
        conn.close()


@pytest.mark.anyio
async def test_ten_thousand_proposals_grow_the_ledger_linearly_and_memory_not_at_all(
    tmp_path: Path,
) -> None:
    """One neighbour proposes 10,000 manual settlements, each with a proof of the largest
    size and a fresh id, and cancels each (one pending at a time: the cap). The victim's
    ledger grows by the same small amount each time (under 2 KB: one entry for the open
    proposal, one for its end), and its memory does not grow at all: finished records leave
    it. The calls go straight to the victim's service, as its RPC server would hand them
    over (the RPC cache's own quota would slow the neighbour down, not change the bound)."""
    async with network(tmp_path, LONGER) as (a, b):
        book = attacker_book(b, a)
        service, fp = a.accounts, b.fingerprint

        async def propose_and_cancel(count: int) -> None:
            for _ in range(count):
                now = int(time.time())
                proposal = make_proposal(
                    b.identity,
                    a.fingerprint,
                    settlement_id=os.urandom(16),
                    reduce_mine_umel=1_000,
                    reduce_theirs_umel=0,
                    method="manual",
                    proof=os.urandom(MAX_PROOF_SIZE),
                    previous=book.head,
                    ledger_head=GENESIS,
                    now=now,
                    expiry_secs=60,
                )
                opened = await service._on_call(fp, "start_settlement", wire(proposal))
                assert unwire(opened, SettlementAnswer).state is SettlementState.PENDING
                query = wire(SettlementQuery(proposal.settlement_id))
                canceled = await service._on_call(fp, "cancel_settlement", query)
                assert unwire(canceled, SettlementAnswer).state is SettlementState.CANCELED

        await propose_and_cancel(1_000)  # warm: the book's recent records are full
        tracemalloc.start()
        try:
            sizes, memory = [ledger_bytes(a)], [tracemalloc.get_traced_memory()[0]]
            for _ in range(3):
                await propose_and_cancel(3_000)
                sizes.append(ledger_bytes(a))
                memory.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        growth = [after - before for before, after in itertools.pairwise(sizes)]
        assert all(g / 3_000 < 2_048 for g in growth), growth
        assert max(growth) < 1.2 * min(growth), growth  # linear: the same per proposal
        # Flat: what the first window allocated (caches warming up) stays; the later ones add
        # bytes, not bytes per proposal.
        assert memory[-1] - memory[1] < 32 * 1024, memory
        kept = neighbor(a, b).book.state
        assert not kept.open and len(kept.finished) <= RECENT
        assert neighbor(a, b).settlement_counts() == {("manual", "responder", "canceled"): 10_000}
