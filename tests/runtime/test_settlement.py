"""Settlements between real nodes on loopback: manual and pow, refusals, crashes."""

from __future__ import annotations

import base64
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from earendil_py.cli import main
from earendil_py.core.settlement import Attestation, SettlementRecord, SettlementState, encode
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.node import Node
from earendil_py.runtime.rpc import RpcError
from earendil_py.runtime.settlement import REFUSED
from tests.helpers import (
    FAST,
    DaemonProcess,
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
"""


async def owe(payer: Node, payee: Node, packets: int) -> None:
    """`payer` sends `payee` packets (price 1 each) and both count them."""
    for i in range(packets):
        payer.send_datagram(payee.fingerprint, DOCK, b"x", hops=1)
        if i % 25 == 24:
            await anyio.sleep(0.01)
    for _ in range(packets):
        await payee.receive_datagram(DOCK)


def balances(a: Node, b: Node) -> tuple[int, int, int, int]:
    """(a owes b by a, by b; b owes a by b, by a)."""
    ab, ba = a.accounting.accounts[b.fingerprint], b.accounting.accounts[a.fingerprint]
    return ab.debt_out_umel, ba.debt_in_umel, ba.debt_out_umel, ab.debt_in_umel


async def api(node: Node, method: str, path: str, body: object | None = None) -> Any:
    return await anyio.to_thread.run_sync(call_api, node.config, method, path, body)


async def record_in(
    node: Node, other: Node, settlement_id: str, state: SettlementState
) -> SettlementRecord:
    with anyio.fail_after(10):
        while True:
            book = node.settlements.books.get(other.fingerprint)
            record = book.record(bytes.fromhex(settlement_id)) if book else None
            if record is not None and record.state is state:
                return record
            await anyio.sleep(0.05)


class Crash(Exception):
    """Raised inside a node to stop it as SIGKILL would: nothing more is written."""


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
        assert a.settlements.books[b.fingerprint].head == b.settlements.books[a.fingerprint].head
        # Accepting twice is refused; the balances moved once.
        with pytest.raises(ControlApiError) as caught:
            await api(b, "POST", f"/api/settlements/{answer['id']}/accept", {})
        assert caught.value.status == 409
        assert balances(a, b) == (50, 50, 40, 40)


@pytest.mark.anyio
async def test_manual_settlement_rejected_then_one_that_expires(tmp_path: Path) -> None:
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
        assert balances(a, b) == (100, 100, 0, 0)
        with pytest.raises(ControlApiError) as caught:  # too late to accept
            await api(b, "POST", f"/api/settlements/{second['id']}/accept", {})
        assert caught.value.status == 409


@pytest.mark.anyio
async def test_pow_settlement_end_to_end_and_its_refusals(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 900)
        await owe(b, a, 100)
        record = await a.settlements.propose(
            b.fingerprint, pay_umel=700, request_umel=0, method="pow"
        )
        assert record.state is SettlementState.COMPLETED
        assert balances(a, b) == (200, 200, 100, 100)
        proposal = record.proposal

        async def start(params: object) -> Any:
            return await a.rpc.call(b.fingerprint, "start_settlement", params)

        # A replayed proposal gets the identical answer and changes nothing.
        again = await start({"proposal": base64.b64encode(encode(proposal)).decode()})
        assert again["state"] == "completed"
        assert balances(a, b) == (200, 200, 100, 100)

        # Its pow challenge, reused for a new proposal, is refused.
        book = a.settlements.books[b.fingerprint]
        reuse = book.propose(
            settlement_id=b"\x01" * 16,
            reduce_mine_umel=700,
            reduce_theirs_umel=0,
            method="pow",
            proof=proposal.proof,
            ledger_head=bytes(32),
            now=proposal.timestamp,
            expiry_secs=60,
        )
        answer = await start({"proposal": base64.b64encode(encode(reuse)).decode()})
        assert answer["state"] == "rejected"
        await a.settlements._apply_answer(b.fingerprint, answer)
        assert book.record(reuse.settlement_id).reason == "unknown_challenge"  # type: ignore[union-attr]

        # A forged proposal and one naming a stale head are refused.
        forged = msgspec.structs.replace(reuse, settlement_id=b"\x02" * 16)
        with pytest.raises(RpcError) as caught:
            await start({"proposal": base64.b64encode(encode(forged)).decode()})
        assert (caught.value.code, caught.value.data) == (REFUSED, "bad_signature")
        head = book.state.head
        book.state.head = bytes(32)  # as if we had missed the first settlement
        stale = book.propose(
            settlement_id=b"\x03" * 16,
            reduce_mine_umel=5,
            reduce_theirs_umel=0,
            method="manual",
            ledger_head=bytes(32),
            now=proposal.timestamp,
            expiry_secs=60,
        )
        book.state.head = head
        answer = await start({"proposal": base64.b64encode(encode(stale)).decode()})
        assert answer["state"] == "rejected"
        await a.settlements._apply_answer(b.fingerprint, answer)
        assert book.record(stale.settlement_id).reason == "stale_head"  # type: ignore[union-attr]
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
        record = a.settlements.books[b.fingerprint].record(bytes.fromhex(answer["id"]))
        assert record is not None
        fake = Attestation(record.proposal, bytes(64))  # "approved" without Bob's signature
        with anyio.fail_after(5):
            await b.rpc.call(
                a.fingerprint,
                "settlement_answer",
                {"attestation": base64.b64encode(encode(fake)).decode()},
            )
        assert record.state is SettlementState.PENDING
        assert balances(a, b) == (100, 100, 0, 0)


class Crashable:
    """Nodes in their own cancel scopes: `crash` stops one as SIGKILL would (nothing more is
    written: no clean checkpoint), `restart` starts it again from its files."""

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
        ledger = node.accounting.ledger

        async def close_only() -> None:
            if ledger is not None:
                await ledger.aclose()

        node.accounting.aclose = close_only  # type: ignore[method-assign]
        self.scopes[node.fingerprint].cancel()

    async def restart(self, node: Node) -> Node:
        await anyio.sleep(0.2)  # the old sockets and ledger are closed by now
        return await self.start(node_from(node.config))


async def settled(a: Node, b: Node, settlement_id: bytes) -> None:
    with anyio.fail_after(15):
        while not all(
            (book := n.settlements.books.get(o.fingerprint)) is not None
            and (record := book.record(settlement_id)) is not None
            and record.state is SettlementState.COMPLETED
            for n, o in [(a, b), (b, a)]
        ):
            await anyio.sleep(0.05)


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

        def crash_then_hang(node: Node, original: Callable[..., Awaitable[Any]]) -> Any:
            async def hang(*args: Any, **kwargs: Any) -> Any:
                if step == "after_responder_commit":
                    await original(*args, **kwargs)  # committed, never answered
                nodes.crash(node)
                crashed.append(node)
                await anyio.sleep_forever()

            return hang

        if step == "after_pending":  # the proposal is written, never sent
            original_call = a.settlements.call

            async def call(neighbor: bytes, method: str, params: Any) -> Any:
                if method == "start_settlement":
                    return await crash_then_hang(a, original_call)()
                return await original_call(neighbor, method, params)

            a.settlements.call = call  # type: ignore[method-assign]
        elif step == "after_responder_commit":
            b.settlements.decide = crash_then_hang(b, b.settlements.decide)  # type: ignore[method-assign]
        else:
            a.settlements._apply_answer = crash_then_hang(a, a.settlements._apply_answer)  # type: ignore[method-assign]

        async def propose() -> None:
            with anyio.move_on_after(10):
                await a.settlements.propose(
                    b.fingerprint, pay_umel=300, request_umel=0, method="pow"
                )

        tg.start_soon(propose)
        with anyio.fail_after(10):
            while not crashed:
                await anyio.sleep(0.02)
        (pending,) = a.settlements.books[b.fingerprint].state.records.values()
        settlement_id = pending.proposal.settlement_id
        if crashed[0] is a:
            a = await nodes.restart(a)
        else:
            b = await nodes.restart(b)
        await settled(a, b, settlement_id)
        await anyio.sleep(0.5)  # any retransmission still in flight lands, and changes nothing
        assert balances(a, b) == (200, 200, 0, 0)
        assert a.settlements.books[b.fingerprint].head == b.settlements.books[a.fingerprint].head
        tg.cancel_scope.cancel()


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
        completed = [
            s
            for s in a.settlements.summaries()
            if s["state"] == "completed" and s["method"] == "pow"
        ]
        assert len(completed) >= 2
        paid = sum(s["paid_out_umel"] for s in completed)
        a_owes, b_says, _, _ = balances(a, b)
        assert a_owes == b_says == 50_000 - paid
        assert a_owes < 20_000
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
async def test_the_balance_audit_finds_a_ledger_that_lost_a_settlement(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 200)
        await a.settlements.propose(b.fingerprint, pay_umel=150, request_umel=0, method="pow")
        assert await a.settlements.audit(b.fingerprint) is None  # both chains agree
        assert await b.settlements.audit(a.fingerprint) is None
        # Bob's ledger loses the settlement (say, restored from an old backup).
        book = b.settlements.books[a.fingerprint]
        (key,) = book.state.completed
        del book.state.records[key]
        book.state.completed.clear()
        book.state.head = bytes(32)
        mismatch = await b.settlements.audit(a.fingerprint)
        assert mismatch is not None and mismatch.startswith("extra at 0")
        assert b.accounting.accounts[a.fingerprint].state.frozen == "audit_mismatch"
        status = await api(b, "GET", "/api/status")
        assert [acct["frozen"] for acct in status["accounts"]] == ["audit_mismatch"]


@pytest.mark.anyio
async def test_the_cli_settles_lists_and_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await anyio.to_thread.run_sync(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    async with network(tmp_path) as (a, b):
        await owe(a, b, 100)
        config_a, config_b = str(a.config.source), str(b.config.source)
        code, out, _ = await cli(
            "settle", "--config", config_a, "--neighbor", b.fingerprint.hex(),
            "--amount", "60", "--method", "manual",
        )  # fmt: skip
        (line,) = [line for line in out.splitlines() if line.startswith("settlement ")]
        assert code == 0 and line.endswith(": pending")
        settlement_id = line.split()[1].rstrip(":")
        code, out, _ = await cli("settlements", "--config", config_b)
        assert code == 0 and settlement_id in out and "they pay        60" in out
        code, out, _ = await cli("reject", "--config", config_b, settlement_id)
        assert code == 0 and f"settlement {settlement_id}: rejected\n" in out
        code, _, err = await cli("accept", "--config", config_b, settlement_id)
        assert code == 1 and "not waiting for us" in err
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            await cli(
                "settle", "--config", config_a, "--neighbor", b.fingerprint.hex(),
                "--amount", "60", "--method", "onchain",
            )  # fmt: skip
        assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err
        assert balances(a, b) == (100, 100, 0, 0)


def test_sigkilled_daemons_around_a_manual_settlement_converge(tmp_path: Path) -> None:
    """Real SIGKILLs at the step boundaries a manual settlement exposes: the proposer right
    after its proposal is pending on both sides, the responder right after it committed its
    approval (its answer to the proposer may not have left)."""
    timing = FAST + "[accounting]\npush_debt_secs = 0.5\ncheckpoint_secs = 0.1\n"
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
