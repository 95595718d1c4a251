"""Debt accounting between real nodes on loopback: prices, claims, limits, the ledger."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from earendil_py.core.accounting import EpochCount
from earendil_py.core.rpc import INVALID_PARAMS
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.accounting import KEEP_CHECKPOINTS, PRUNE_EVERY, REFUSED, prune_turn
from earendil_py.runtime.config import load_config
from earendil_py.runtime.http import call_api
from earendil_py.runtime.node import Node
from earendil_py.runtime.rpc import RpcError
from earendil_py.runtime.store import LedgerStore
from tests.helpers import (
    FAST,
    DaemonProcess,
    UdpProxy,
    converged,
    daemon_api,
    daemon_priced,
    make_nodes,
    node_from,
    running,
    summary_of,
    wait_until,
)

ACCOUNTING = """
[accounting]
push_debt_secs = 0.5
checkpoint_secs = 0.1
"""
PAIR = [Edge(0, 1, "udp")]
DOCK = 7


def price_toml(route: str, price: int, limit: int = 1_000_000) -> str:
    return (
        f"[{route}.price]\ninbound_price_umel = {price}\ninbound_debt_limit_umel = {limit}\n"
        "outbound_max_price_umel = 100\n"
    )


# Node 0 dials node 1: node 1 prices its in_route, node 0 its out_route.
def priced_pair(tmp_path: Path, price_0: int, price_1: int, limit_1: int = 1_000_000) -> list[Node]:
    return make_nodes(
        tmp_path,
        2,
        PAIR,
        extra_toml=ACCOUNTING,
        node_toml={
            0: price_toml("out_routes.node1_udp", price_0),
            1: price_toml("in_routes.from_node0_udp", price_1, limit_1),
        },
    )


def account(node: Node, other: Node):  # type: ignore[no-untyped-def]
    return node.accounting.accounts[other.fingerprint]


async def send_and_wait(sender: Node, receiver: Node, count: int) -> None:
    for i in range(count):
        sender.send_datagram(receiver.fingerprint, DOCK, i.to_bytes(4, "big"), hops=1)
        if i % 25 == 24:
            await anyio.sleep(0.01)
    for _ in range(count):
        await receiver.receive_datagram(DOCK)


@pytest.mark.anyio
async def test_a_rejected_price_means_no_traffic_either_way(tmp_path: Path) -> None:
    # Node 1 asks 101 uMEL a packet; node 0 pays at most 100.
    nodes = priced_pair(tmp_path, price_0=1, price_1=101)
    async with running(nodes):
        with anyio.fail_after(5):
            await nodes[0].wait_neighbors({nodes[1].fingerprint})
            while (
                account(nodes[1], nodes[0]).state.proposed is None
                or not account(nodes[0], nodes[1]).state.their_answer
            ):
                await anyio.sleep(0.02)
            await anyio.sleep(0.2)
        answer = account(nodes[0], nodes[1]).state.their_answer
        assert answer is not None and answer.reason == "price_too_high"
        assert not account(nodes[0], nodes[1]).priced and not account(nodes[1], nodes[0]).priced
        for _ in range(10):
            nodes[0].send_datagram(nodes[1].fingerprint, DOCK, b"x", hops=1)
            nodes[1].send_datagram(nodes[0].fingerprint, DOCK, b"y", hops=1)
        await anyio.sleep(0.2)
        for sender, receiver in [(nodes[0], nodes[1]), (nodes[1], nodes[0])]:
            link = sender.links[receiver.fingerprint][0]
            assert link.statistics().drops["not_priced_out"] == 10
            assert link.packets_sent == 0
            assert receiver.receive_datagrams_nowait(DOCK) == []
        status = await anyio.to_thread.run_sync(call_api, nodes[0].config, "GET", "/api/status")
        (summary,) = status["accounts"]
        assert summary["priced"] is False and summary["their_price_umel"] is None


@pytest.mark.anyio
async def test_a_reprice_charges_old_packets_at_the_old_price(tmp_path: Path) -> None:
    nodes = priced_pair(tmp_path, price_0=2, price_1=3)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        with anyio.fail_after(10):
            await send_and_wait(a, b, 100)
            await send_and_wait(b, a, 40)
        answer = await anyio.to_thread.run_sync(
            call_api,
            b.config,
            "POST",
            f"/api/neighbors/{a.fingerprint.hex()}/price",
            {"price_umel": 7, "debt_limit_umel": 1_000_000},
        )
        assert answer == {"accepted": True, "reason": ""}
        with anyio.fail_after(10):
            await send_and_wait(a, b, 50)
            await send_and_wait(b, a, 10)
        expected_a_owes = 100 * 3 + 50 * 7
        expected_b_owes = (40 + 10) * 2
        assert account(a, b).debt_out_umel == account(b, a).debt_in_umel == expected_a_owes
        assert account(b, a).debt_out_umel == account(a, b).debt_in_umel == expected_b_owes
        # A round of push_debt claims confirms it; nothing is disputed.
        seq = account(a, b).state.claim_seq_received
        with anyio.fail_after(3):
            while account(a, b).state.claim_seq_received == seq:
                await anyio.sleep(0.05)
        assert account(a, b).debt_out_umel == expected_a_owes
        assert not account(a, b).state.frozen and not account(b, a).state.frozen


@pytest.mark.anyio
async def test_a_lossy_link_converges_within_one_push_interval(tmp_path: Path) -> None:
    generated = generate_network(tmp_path, 2, PAIR, extra_toml=FAST + ACCOUNTING)
    listener = node_from(generated[1].config)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        proxy = UdpProxy(listener.listening["from_node0_udp"], loss=0.1, seed=7)
        tg.start_soon(proxy.serve)
        path = generated[0].config_path
        connect = generated[0].config.out_routes["node1_udp"].connect
        path.write_text(path.read_text().replace(connect, f"127.0.0.1:{proxy.address[1]}"))
        dialer = node_from(load_config(path))
        await tg.start(dialer.run)
        with anyio.fail_after(10):
            await dialer.wait_priced({listener.fingerprint})
            await listener.wait_priced({dialer.fingerprint})
            while (
                dialer.graph.statistics().adjacencies + listener.graph.statistics().adjacencies < 2
            ):
                await anyio.sleep(0.02)
        for i in range(600):
            dialer.send_datagram(listener.fingerprint, DOCK, b"a", hops=1)
            listener.send_datagram(dialer.fingerprint, DOCK, b"b", hops=1)
            if i % 20 == 19:
                await anyio.sleep(0.01)
        a, b = account(dialer, listener), account(listener, dialer)
        assert a.sent == b.sent == 600
        assert 400 < b.received < 600 and 400 < a.received < 600  # about 10 % lost
        # One push interval later (0.5 s; allow for claims lost and retransmitted) both
        # sides agree to the last uMEL.
        with anyio.move_on_after(5):
            while not (a.debt_out_umel == b.debt_in_umel and b.debt_out_umel == a.debt_in_umel):
                await anyio.sleep(0.05)
        views = (a.debt_out_umel, b.debt_in_umel, b.debt_out_umel, a.debt_in_umel)
        assert views[0] == views[1] and views[2] == views[3], (views, a.state, b.state)
        assert a.debt_out_umel == b.received and b.debt_out_umel == a.received  # price 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_neighbour_over_its_limit_is_cut_off(tmp_path: Path) -> None:
    # Node 1 charges 100 uMEL a packet with a 10,000 uMEL limit: 100 packets of credit.
    nodes = priced_pair(tmp_path, price_0=1, price_1=100, limit_1=10_000)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        # An honest sender stops itself at the limit.
        for _ in range(120):
            a.send_datagram(b.fingerprint, DOCK, b"x", hops=1)
        link = a.links[b.fingerprint][0]
        assert link.statistics().drops["debt_limit_out"] == 20
        assert account(a, b).debt_out_umel == 10_000
        await anyio.sleep(0.2)
        assert account(b, a).debt_in_umel == 10_000
        # A sender that ignores our limit is cut off by us, and told so.
        offer = account(a, b).state.their_offer
        account(a, b).state.their_offer = msgspec.structs.replace(offer, debt_limit_umel=10**9)
        for _ in range(30):
            a.send_datagram(b.fingerprint, DOCK, b"x", hops=1)
        await anyio.sleep(0.3)
        assert b.links[a.fingerprint][0].statistics().drops["debt_limit"] == 30
        assert account(b, a).debt_in_umel == 10_000
        assert len(b.receive_datagrams_nowait(DOCK, 1000)) == 100


def test_each_account_prunes_its_checkpoints_once_every_prune_every_ticks() -> None:
    for first in range(256):
        turns = [t for t in range(1, 3 * PRUNE_EVERY + 1) if prune_turn(bytes([first]), t)]
        assert len(turns) == 3 and turns[1] - turns[0] == turns[2] - turns[1] == PRUNE_EVERY


@pytest.mark.anyio
async def test_prunes_ride_in_the_claim_and_checkpoint_transactions(tmp_path: Path) -> None:
    # No periodic work of its own: the test makes every claim and checkpoint.
    toml = "[accounting]\npush_debt_secs = 1000\ncheckpoint_secs = 1000\nkeep_claims = 3\n"
    nodes = make_nodes(
        tmp_path,
        2,
        PAIR,
        extra_toml=toml,
        node_toml={
            0: price_toml("out_routes.node1_udp", 1),
            1: price_toml("in_routes.from_node0_udp", 1),
        },
    )
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        ledgers = [a.accounting._ledger(), b.accounting._ledger()]

        async def no_prune_calls(*args: object) -> int:
            raise AssertionError("prunes ride in other transactions")

        for ledger in ledgers:
            ledger.prune = no_prune_calls  # type: ignore[method-assign]
        with anyio.fail_after(10):
            for i in range(2 * PRUNE_EVERY):
                if i < PRUNE_EVERY:  # then idle: a's counts stop moving
                    await send_and_wait(a, b, 3)
                await a.accounting.push_debts([b.fingerprint])
                while b.fingerprint in a.accounting._pushing:  # until b acknowledged it
                    await anyio.sleep(0.01)
                await a.accounting.checkpoint()

    def bodies(node: Node, other: Node, kind: str) -> list[bool]:
        store = LedgerStore.open(node.config.db_path)
        with store:
            return [e.body is not None for e in store.entries(other.fingerprint, kinds=[kind])]

    for node, other, kind in [(a, b, "claim_sent"), (b, a, "claim_received")]:
        kept = bodies(node, other, kind)
        assert len(kept) == 2 * PRUNE_EVERY and kept == [False] * (len(kept) - 3) + [True] * 3
    # a pruned its checkpoints at its turns, idle or not (after its turn in the idle half
    # came at most one checkpoint per idle tick, then the clean one at shutdown); b's claims
    # pruned none of its checkpoints.
    kept = bodies(a, b, "checkpoint")
    assert KEEP_CHECKPOINTS < sum(kept) <= KEEP_CHECKPOINTS + PRUNE_EVERY < len(kept)
    assert kept == sorted(kept)  # the newest are the ones kept
    assert all(bodies(b, a, "checkpoint"))


STAR = [Edge(1, 0, "udp"), Edge(2, 0, "udp"), Edge(3, 0, "tcp")]


@pytest.mark.anyio
@pytest.mark.parametrize("fail", [False, True])
async def test_claims_received_together_are_committed_together(tmp_path: Path, fail: bool) -> None:
    # Node 0 hears from three neighbours at once: one transaction, before any acknowledgement;
    # if that transaction fails, none of them is acknowledged.
    nodes = make_nodes(tmp_path, 4, STAR, extra_toml="[accounting]\npush_debt_secs = 1000\n")
    hub, *leaves = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, STAR)
        ledger = hub.accounting._ledger()
        commits: list[list[str]] = []
        append_many = ledger.append_many

        async def spy(items: list[tuple[bytes, str, bytes]], *args: object, **kw: object) -> object:
            commits.append([kind for _, kind, _ in items])
            if fail:
                raise sqlite3.OperationalError("disk I/O error")
            return await append_many(items, *args, **kw)  # type: ignore[arg-type]

        ledger.append_many = spy  # type: ignore[method-assign]
        answers: dict[int, object] = {}

        async def push(index: int, leaf: Node) -> None:
            claim = msgspec.to_builtins(account(leaf, hub).make_claim(int(time.time())))
            try:
                answers[index] = await leaf.rpc.call(hub.fingerprint, "push_debt", claim)
            except RpcError as exc:
                answers[index] = exc.code

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for index, leaf in enumerate(leaves):
                    tg.start_soon(push, index, leaf)
        ledger.append_many = append_many  # type: ignore[method-assign]
    assert commits == [["claim_received", "checkpoint"] * 3]
    if fail:
        assert answers == {0: -32603, 1: -32603, 2: -32603}
    else:
        assert answers == {i: {"debt_umel": 0} for i in range(3)}
        with LedgerStore.open(hub.config.db_path) as store:
            for leaf in leaves:
                assert store.latest(leaf.fingerprint, "claim_received") is not None


@pytest.mark.anyio
async def test_forged_replayed_and_overclaiming_push_debt(tmp_path: Path) -> None:
    nodes = priced_pair(tmp_path, price_0=1, price_1=1)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
            await send_and_wait(a, b, 20)
        claim = account(b, a).make_claim(int(time.time()))

        async def push(params: object) -> RpcError:
            with pytest.raises(RpcError) as caught:
                await b.rpc.call(a.fingerprint, "push_debt", params)
            return caught.value

        forged = msgspec.structs.replace(claim, received=[EpochCount(1, 0)])
        error = await push(msgspec.to_builtins(forged))
        assert (error.code, error.data) == (REFUSED, "bad_signature")
        await b.rpc.call(a.fingerprint, "push_debt", msgspec.to_builtins(claim))
        error = await push(msgspec.to_builtins(claim))  # the same claim, a new request
        assert (error.code, error.data) == (REFUSED, "replayed_claim")
        error = await push({"not": "a claim"})
        assert error.code == -32602
        assert account(a, b).debt_out_umel == 20

        account(b, a).received += 1_000  # node 1 claims packets node 0 never sent
        error = await push(msgspec.to_builtins(account(b, a).make_claim(int(time.time()))))
        assert (error.code, error.data) == (REFUSED, "dispute")
        assert account(a, b).state.frozen == "dispute"
        assert account(a, b).debt_out_umel == 20
        a.send_datagram(b.fingerprint, DOCK, b"x", hops=1)
        assert a.links[b.fingerprint][0].statistics().drops["frozen_out"] == 1
        await anyio.to_thread.run_sync(
            call_api, a.config, "POST", f"/api/neighbors/{b.fingerprint.hex()}/unfreeze", {}
        )
        assert account(a, b).state.frozen == ""


def test_sigkill_then_restart_resumes_balances_and_a_tampered_ledger_is_refused(
    tmp_path: Path,
) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "tcp")], extra_toml=FAST + ACCOUNTING)
    sender, receiver = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        wait_until(lambda: daemon_priced(a.config_path, b.fingerprint), 10)
        body = {"destination": b.fingerprint, "dock": DOCK, "data_b64": "eA==", "hops": 1}
        for i in range(300):
            daemon_api(a.config_path, "POST", "/api/send", body)
            if i == 200:
                receiver.stop(signal.SIGKILL)  # mid-traffic, between checkpoints
        # Counted when handed to the link; the link notices the death soon after.
        assert 201 <= summary_of(a.config_path, b.fingerprint)["packets_out"] <= 300
        receiver = DaemonProcess(b.config_path)  # the ledger verifies, or it would exit
        receiver.wait_for("link_up", 10)
        # Within a push interval or two both sides agree again on what arrived.
        wait_until(
            lambda: (
                summary_of(b.config_path, a.fingerprint)["debt_in_umel"]
                == summary_of(a.config_path, b.fingerprint)["debt_out_umel"]
                >= 200
            ),
            10,
        )
        assert receiver.stop(signal.SIGTERM) == 0
    finally:
        sender.stop()
        receiver.stop()

    # Someone edits a row of the receiver's ledger: the daemon refuses to start.
    db = b.config.db_path
    with sqlite3.connect(db) as conn:
        (seq,) = conn.execute(
            "SELECT seq FROM entries WHERE kind = 'checkpoint' LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE entries SET body = X'00' WHERE kind = 'checkpoint' AND seq = ?", (seq,)
        )
    conn.close()
    result = subprocess.run(
        [sys.executable, "-m", "earendil_py", "daemon", "--config", str(b.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"earendil-py: error: {db}: ")
    assert f"seq {seq}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.anyio
async def test_a_debt_limit_notice_out_of_range_is_refused_as_invalid_params(
    tmp_path: Path,
) -> None:
    """A debt of 2**64 in a notice used to pass the params check, then raise OverflowError
    when the notice was encoded to check its signature: -32603 and a logged traceback."""
    nodes = priced_pair(tmp_path, price_0=1, price_1=1)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
            notice = msgspec.to_builtins(account(b, a).make_limit_notice(int(time.time())))
            for debt in (2**64, -(2**63) - 1):
                notice[2] = debt
                with pytest.raises(RpcError) as caught:
                    await b.rpc.call(a.fingerprint, "debt_limit", notice)
                assert caught.value.code == INVALID_PARAMS
