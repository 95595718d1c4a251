"""Debt accounting between real nodes on loopback: prices, claims, limits, the ledger, and a
neighbour that re-prices to claim packets it never carried."""

from __future__ import annotations

import base64
import itertools
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from earendil_py.core.accounting import CLAIM_DOMAIN, Account, DebtClaim, EpochCount
from earendil_py.core.link import onion_frame
from earendil_py.core.neighbor import REFUSED, Neighbor, wire
from earendil_py.core.pricing import PriceTerms
from earendil_py.core.rpc import INTERNAL_ERROR, INVALID_PARAMS, RpcServer
from earendil_py.core.signed import sign
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.config import load_config
from earendil_py.runtime.http import call_api
from earendil_py.runtime.node import HELD_PER_LINK, Node
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
def priced_pair(
    tmp_path: Path, price_0: int, price_1: int, limit_1: int = 1_000_000, extra: str = ""
) -> list[Node]:
    return make_nodes(
        tmp_path,
        2,
        PAIR,
        extra_toml=ACCOUNTING + extra,
        node_toml={
            0: price_toml("out_routes.node1_udp", price_0),
            1: price_toml("in_routes.from_node0_udp", price_1, limit_1),
        },
    )


def account(node: Node, other: Node) -> Account:
    return neighbor(node, other).account


def neighbor(node: Node, other: Node) -> Neighbor:
    found = node.accounts.get(other.fingerprint)
    assert found is not None
    return found


def claim_of(node: Node, other: Node, **changes: object) -> DebtClaim:
    """`node`'s claim to `other` now, on a copy of its account (its own claims go on), with
    `changes` and signed again: what a neighbour can send whenever it likes."""
    real = neighbor(node, other)
    state = real.account.state.copy()
    copy = Account(node.identity, other.identity.identity_public, state, real.counters)
    copy.state.claim_seq_sent = next(_claim_seqs)
    claim = msgspec.structs.replace(copy.make_claim(int(time.time())), **changes)
    return sign(node.identity, CLAIM_DOMAIN, claim)


_claim_seqs = itertools.count(10_000)  # above any seq the node's own claims reach in a test


async def send_and_wait(sender: Node, receiver: Node, count: int) -> None:
    for i in range(count):
        sender.send_datagram(receiver.fingerprint, DOCK, i.to_bytes(4, "big"), hops=1)
        if i % 25 == 24:
            await anyio.sleep(0.01)
    for _ in range(count):
        await receiver.receive_datagram(DOCK)


@pytest.mark.anyio
async def test_packets_that_overtake_our_acceptance_on_disk_are_held_not_dropped(
    tmp_path: Path,
) -> None:
    """Node 0 is priced as soon as node 1's answer arrives, and sends; node 1 is priced only
    once node 0's answer is on its disk (here slowed to 2 s: a margin for a busy machine).
    What comes meanwhile waits, up to HELD_PER_LINK frames; the rest is dropped and counted."""
    nodes = priced_pair(tmp_path, price_0=1, price_1=2)
    sender, receiver = nodes
    commit = receiver.accounts._commit

    async def slow_acceptance(batch: Any) -> Any:
        if any(kind == "price_answer_received" for _, e in batch for kind, _ in e.entries):
            await anyio.sleep(2)
        return await commit(batch)

    receiver.accounts._commit = slow_acceptance  # type: ignore[method-assign]
    async with running(nodes):
        with anyio.fail_after(10):
            while not (
                sender.accounts.get(receiver.fingerprint) is not None
                and account(sender, receiver).priced
            ):
                await anyio.sleep(0.01)
            assert neighbor(receiver, sender).pricing  # its acceptance is being written
            for i in range(HELD_PER_LINK + 10):
                sender.send_datagram(receiver.fingerprint, DOCK, bytes([i]), hops=1)
            got = [(await receiver.receive_datagram(DOCK)).data for _ in range(HELD_PER_LINK)]
        assert got == [bytes([i]) for i in range(HELD_PER_LINK)]
        drops = receiver.links[sender.fingerprint][0].statistics().drops
        assert drops["not_priced"] == 10
        assert account(receiver, sender).debt_in_umel == HELD_PER_LINK * 2
        assert receiver._held == {} and receiver._held_count == 0


@pytest.mark.anyio
async def test_a_link_up_whose_commit_failed_is_written_again(tmp_path: Path) -> None:
    """Node 1's first link-up step (its offer, written before it is pushed) fails to commit:
    tried again a second later, so the link is priced both ways without a reconnect."""
    nodes = priced_pair(tmp_path, price_0=1, price_1=2)
    commit = nodes[1].accounts._commit
    failed: list[bool] = []

    async def fail_the_first_offer(batch: Any) -> Any:
        if not failed and any(
            kind == "price_offer_sent" for _, e in batch for kind, _ in e.entries
        ):
            failed.append(True)
            raise sqlite3.OperationalError("disk I/O error")
        return await commit(batch)

    nodes[1].accounts._commit = fail_the_first_offer  # type: ignore[method-assign]
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, PAIR)
        assert failed == [True]
        assert neighbor(nodes[1], nodes[0]).linked


@pytest.mark.anyio
async def test_a_rejected_price_means_no_traffic_either_way(tmp_path: Path) -> None:
    # Node 1 asks 101 uMEL a packet; node 0 pays at most 100.
    nodes = priced_pair(tmp_path, price_0=1, price_1=101)
    async with running(nodes):
        with anyio.fail_after(5):
            await nodes[0].wait_neighbors({nodes[1].fingerprint})
            while (
                nodes[1].accounts.get(nodes[0].fingerprint) is None
                or nodes[0].accounts.get(nodes[1].fingerprint) is None
                or account(nodes[1], nodes[0]).state.proposed is None
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
async def test_idle_neighbours_hold_no_lock_and_share_their_policy(tmp_path: Path) -> None:
    # Nodes 0 and 2 dial node 1 on two routes with the same price table.
    edges = [Edge(0, 1, "udp"), Edge(2, 1, "udp")]
    nodes = make_nodes(tmp_path, 3, edges)
    hub = nodes[1].accounts
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, edges)
            while hub._locks:  # until the link-up's calls are answered
                await anyio.sleep(0.02)
        assert not hub._restoring
        first, second = (hub.get(node.fingerprint) for node in (nodes[0], nodes[2]))
        assert first is not None and second is not None
        assert first.policy is second.policy
        # A step still takes the lock and lets it go.
        await hub.unfreeze(nodes[0].fingerprint)
        assert not hub._locks


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
        assert not neighbor(a, b).frozen and not neighbor(b, a).frozen


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
        a, b = neighbor(dialer, listener), neighbor(listener, dialer)
        assert a.counters.packets_out == b.counters.packets_out == 600
        assert 400 < b.counters.packets_in < 600 and 400 < a.counters.packets_in < 600

        # One push interval later (0.5 s; allow for claims lost and retransmitted) both
        # sides agree to the last uMEL.
        def views() -> tuple[int, int, int, int]:
            da, db = a.account, b.account
            return da.debt_out_umel, db.debt_in_umel, db.debt_out_umel, da.debt_in_umel

        with anyio.move_on_after(5):
            while not (views()[0] == views()[1] and views()[2] == views()[3]):
                await anyio.sleep(0.05)
        seen = views()
        assert seen[0] == seen[1] and seen[2] == seen[3], (seen, a.account.state, b.account.state)
        assert seen[0] == b.counters.packets_in and seen[2] == a.counters.packets_in  # price 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_neighbour_over_its_limit_is_cut_off_and_told(tmp_path: Path) -> None:
    # Node 1 charges 100 uMEL a packet with a 10,000 uMEL limit: 100 packets of credit.
    nodes = priced_pair(tmp_path, price_0=1, price_1=100, limit_1=10_000, extra=MANUAL_ONLY)
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
        # A sender that ignores our limit (it puts frames on the link itself) is cut off by
        # us, and told so.
        runner = a.links[b.fingerprint][0]
        frames = [onion_frame(b.fingerprint, bytes(1281)) for _ in range(30)]
        for frame in runner.link.encrypt_onions(frames):
            runner.transport.send(frame)
        with anyio.fail_after(5):
            while b.links[a.fingerprint][0].statistics().drops["debt_limit"] < 30:
                await anyio.sleep(0.02)
            while not neighbor(a, b).statistics().events["debt_limit_notice"]:
                await anyio.sleep(0.02)
        assert account(b, a).debt_in_umel == 10_000
        assert len(b.receive_datagrams_nowait(DOCK, 1000)) == 100
        assert neighbor(b, a).statistics().events["debt_limit_reached"] == 1


MANUAL_ONLY = '\n[settlement]\nmethods = ["manual"]\n'


@pytest.mark.anyio
async def test_claims_and_counts_prune_inside_their_own_transactions(tmp_path: Path) -> None:
    toml = "[accounting]\npush_debt_secs = 0.5\ncheckpoint_secs = 0.1\nkeep_claims = 3\n"
    nodes = make_nodes(tmp_path, 2, PAIR, extra_toml=toml)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        for ledger in (a.ledger, b.ledger):

            async def no_prune_calls(*args: object) -> int:
                raise AssertionError("prunes ride in other transactions")

            ledger.prune = no_prune_calls  # type: ignore[method-assign,union-attr]
        with anyio.fail_after(20):
            while neighbor(b, a).account.state.claim_seq_received < 12:  # taken, not sent
                await send_and_wait(a, b, 3)
                await anyio.sleep(0.05)

    def bodies(node: Node, other: Node, kind: str) -> list[bool]:
        with LedgerStore.open(node.config.db_path) as store:
            return [e.body is not None for e in store.entries(other.fingerprint, kinds=[kind])]

    for node, other, kind in [(a, b, "claim_sent"), (b, a, "claim_received")]:
        kept = bodies(node, other, kind)
        assert len(kept) >= 12 and kept == sorted(kept)  # the newest are the ones kept
        # Pruned at every tenth claim, keeping 3: at most 9 more since.
        assert 3 <= sum(kept) <= 3 + 9 and sum(kept) < len(kept)
    kept = bodies(a, b, "counts")
    assert kept == sorted(kept) and sum(kept) < len(kept)


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
            # The claims every link-up sends have been taken.
            while any(account(hub, leaf).state.claim_seq_received < 1 for leaf in leaves):
                await anyio.sleep(0.02)
            await anyio.sleep(0.5)  # and their group written
        ledger = hub.ledger
        assert ledger is not None
        commits: list[list[str]] = []
        append_many = ledger.append_many

        async def spy(items: list[tuple[bytes, str, bytes]], *args: object, **kw: object) -> object:
            kinds = [kind for _, kind, _ in items]
            if "claim_received" in kinds:
                commits.append(kinds)
                if fail:
                    raise sqlite3.OperationalError("disk I/O error")
            return await append_many(items, *args, **kw)  # type: ignore[arg-type]

        ledger.append_many = spy  # type: ignore[method-assign]
        answers: dict[int, object] = {}

        async def push(index: int, leaf: Node) -> None:
            try:
                answers[index] = await leaf.rpc.call(
                    hub.fingerprint, "push_debt", wire(claim_of(leaf, hub))
                )
            except RpcError as exc:
                answers[index] = exc.code

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for index, leaf in enumerate(leaves):
                    tg.start_soon(push, index, leaf)
        ledger.append_many = append_many  # type: ignore[method-assign]
    assert commits == [["claim_received"] * 3]
    if fail:
        assert answers == dict.fromkeys(range(3), INTERNAL_ERROR)
    else:
        assert sorted(answers) == [0, 1, 2] and all(isinstance(v, dict) for v in answers.values())
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
        claim = claim_of(b, a)

        async def push(params: object) -> RpcError:
            with pytest.raises(RpcError) as caught:
                await b.rpc.call(a.fingerprint, "push_debt", params)
            return caught.value

        forged = msgspec.structs.replace(claim, received=[EpochCount(1, 0)])
        error = await push(wire(forged))
        assert (error.code, error.data) == (REFUSED, "bad_signature")
        await b.rpc.call(a.fingerprint, "push_debt", wire(claim))
        error = await push(wire(claim))  # the same claim, a new request
        assert (error.code, error.data) == (REFUSED, "replayed_claim")
        error = await push({"not": "a claim"})
        assert error.code == INVALID_PARAMS
        assert account(a, b).debt_out_umel == 20

        received = [EpochCount(c.epoch, c.packets + 1_000) for c in claim.received]
        error = await push(wire(claim_of(b, a, received=received)))  # packets never sent
        assert (error.code, error.data) == (REFUSED, "dispute")
        assert neighbor(a, b).frozen == "dispute"
        assert account(a, b).debt_out_umel == 20
        a.send_datagram(b.fingerprint, DOCK, b"x", hops=1)
        assert a.links[b.fingerprint][0].statistics().drops["frozen_out"] == 1
        await anyio.to_thread.run_sync(
            call_api, a.config, "POST", f"/api/neighbors/{b.fingerprint.hex()}/unfreeze", {}
        )
        assert neighbor(a, b).frozen == ""


@pytest.mark.anyio
async def test_a_debt_limit_notice_out_of_range_is_refused_as_invalid_params(
    tmp_path: Path,
) -> None:
    """A debt beyond the signed 64-bit range in a notice is refused as invalid params, before
    anything encodes it again to check its signature."""
    nodes = priced_pair(tmp_path, price_0=1, price_1=1)
    a, b = nodes
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
            notice = account(b, a).make_limit_notice(int(time.time()))
            fields = msgspec.to_builtins(notice, builtin_types=(bytes,))
            fields[2] = 2**63  # msgpack carries it; no signed 64-bit integer does
            params = {"msg": base64.b64encode(msgspec.msgpack.encode(fields)).decode()}
            with pytest.raises(RpcError) as caught:
                await b.rpc.call(a.fingerprint, "debt_limit", params)
            assert caught.value.code == INVALID_PARAMS


@pytest.mark.anyio
async def test_a_reprice_storm_with_phantom_claims_gets_no_excess(tmp_path: Path) -> None:
    """Node 1 re-prices (the limit + 1, a new epoch) then claims 256 packets in the new, empty
    epoch, 40 times over. Node 0 accepts no excess: the first such claim is a dispute."""
    nodes = priced_pair(tmp_path, price_0=1, price_1=5, limit_1=10_000_000)
    a, b = nodes
    # The RPC cache's quota (64 calls a minute from one neighbour) would turn the storm away
    # after 32 cycles; raised, every cycle reaches the accounting.
    a.rpc._server = RpcServer(max_entries_per_neighbor=1024)
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        with anyio.fail_after(10):
            await send_and_wait(a, b, 100)
            # Both books at the 100 packets first: a claim of node 1's taken while some were
            # in flight leaves node 0 lower until the next, which the storm's dispute stops.
            while account(a, b).debt_out_umel != 500:
                await anyio.sleep(0.05)
        tolerance = a.config.accounting.claim_tolerance_packets
        methods = tuple(b.config.settlement.methods)
        with anyio.fail_after(60):
            for cycle in range(40):
                terms = PriceTerms(5, 10_000_001 + cycle, methods)
                await b.accounts.reprice(a.fingerprint, terms)
                received = [EpochCount(c.epoch, c.packets) for c in claim_of(b, a).received]
                received[-1] = EpochCount(received[-1].epoch, received[-1].packets + 256)
                try:
                    await b.rpc.call(
                        a.fingerprint, "push_debt", wire(claim_of(b, a, received=received))
                    )
                except RpcError as exc:
                    assert exc.data in ("dispute", "replayed_claim")
        excess = account(a, b).charged_out_packets() - neighbor(a, b).counters.packets_out
        assert excess <= tolerance
        assert neighbor(a, b).frozen == "dispute"
        assert account(a, b).debt_out_umel == 500  # the 100 packets carried, at 5


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
        # Within a few push intervals (0.5 s) both sides agree again: two, or four when the
        # sender adopts the receiver's link-up claim, made before it re-learned, and is
        # corrected by the next. 20 s: a margin for a loaded machine. The receiver re-learns
        # what the sender counted as sent: at least the 201 before the kill.
        seen: list[tuple[int, int]] = []

        def agree() -> bool:
            seen.append(
                (
                    summary_of(b.config_path, a.fingerprint)["debt_in_umel"],
                    summary_of(a.config_path, b.fingerprint)["debt_out_umel"],
                )
            )
            return seen[-1][0] == seen[-1][1] >= 201

        try:
            wait_until(agree, 20)
        except AssertionError:
            raise AssertionError(f"the books never agreed: {seen[-3:]}") from None
        assert receiver.stop(signal.SIGTERM) == 0
    finally:
        sender.stop()
        receiver.stop()

    # Someone edits a row of the receiver's ledger: the daemon refuses to start.
    db = b.config.db_path
    with sqlite3.connect(db) as conn:
        (seq,) = conn.execute("SELECT seq FROM entries WHERE kind = 'counts' LIMIT 1").fetchone()
        conn.execute("UPDATE entries SET body = X'00' WHERE kind = 'counts' AND seq = ?", (seq,))
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


def test_both_sides_sigkilled_within_one_claim_interval_are_never_charged_the_lease(
    tmp_path: Path,
) -> None:
    """The sender dies mid-traffic (its unused outbound lease, 4,096 packets, now counts as
    sent), then the receiver, before a claim of its own corrected that; both restart. The
    receiver may re-learn counts it lost from what the sender counted, never from the lease:
    the books agree on what was sent."""
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "tcp")], extra_toml=FAST + ACCOUNTING)
    sender, receiver = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        wait_until(lambda: daemon_priced(a.config_path, b.fingerprint), 10)
        price = summary_of(b.config_path, a.fingerprint)["our_price_umel"]
        body = {"destination": b.fingerprint, "dock": DOCK, "data_b64": "eA==", "hops": 1}
        for _ in range(150):
            daemon_api(a.config_path, "POST", "/api/send", body)
        wait_until(lambda: summary_of(b.config_path, a.fingerprint)["packets_in"] == 150, 10)
        time.sleep(0.5)  # both sides' counts written (every 0.1 s)
        sender.stop(signal.SIGKILL)
        receiver.stop(signal.SIGKILL)
        sender, receiver = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
        # It counts its whole lease as sent, until the receiver's claims correct it.
        wait_until(lambda: summary_of(a.config_path, b.fingerprint)["packets_out"] >= 4_096, 10)
        seen: list[tuple[int, int]] = []

        def agree() -> bool:
            seen.append(
                (
                    summary_of(b.config_path, a.fingerprint)["debt_in_umel"],
                    summary_of(a.config_path, b.fingerprint)["debt_out_umel"],
                )
            )
            return seen[-1][0] == seen[-1][1]

        try:
            wait_until(agree, 20)
        except AssertionError:
            raise AssertionError(f"the books never agreed: {seen[-3:]}") from None
        assert seen[-1][0] == 150 * price  # the receiver may re-learn up to 256: none of it
        assert not summary_of(a.config_path, b.fingerprint)["frozen"]
    finally:
        sender.stop()
        receiver.stop()


# --- ledgers written before Neighbors ------------------------------------------------------


class V1Epoch(msgspec.Struct, array_like=True):
    """An epoch as the version before wrote it in its checkpoints."""

    epoch: int
    price_umel: int
    packets: int = 0
    claimed: int = -1
    counted_at_claim: int = 0


class V1Account(msgspec.Struct):
    """A checkpoint of the version before (map-encoded: every field by name)."""

    neighbor: bytes
    inbound: list[V1Epoch] = msgspec.field(default_factory=list)
    outbound: list[V1Epoch] = msgspec.field(default_factory=list)
    folded_in_umel: int = 0
    folded_out_umel: int = 0
    settled_in_umel: int = 0
    settled_out_umel: int = 0
    claim_seq_sent: int = 0
    claim_seq_received: int = 0
    frozen: str = ""
    peak_packets: int = 0
    checkpoint_packets: int = 0
    clean: bool = True


@pytest.mark.anyio
async def test_a_ledger_from_before_neighbors_is_carried_over_once(tmp_path: Path) -> None:
    """Both nodes' ledgers hold what the version before wrote: checkpoints (and a book with
    an open proposal). At the first link-up each side writes one `migrated` entry: the debts
    carry over exactly (both sides agree), the claim seqs go on, prices are agreed again and
    traffic is charged from there. A restart does not migrate again."""
    nodes = make_nodes(tmp_path, 2, PAIR, extra_toml=ACCOUNTING)
    a, b = nodes
    # a: b owes 2 x 300 + 50 folded - 20 settled = 630; a owes 3 x (90 claimed + 100 - 95
    # counted at that claim) - 10 settled = 275. b's checkpoint says the same from its side.
    old_a = V1Account(
        b.fingerprint,
        inbound=[V1Epoch(1, 2, 300)],
        outbound=[V1Epoch(1, 3, 100, claimed=90, counted_at_claim=95)],
        folded_in_umel=50,
        settled_in_umel=20,
        settled_out_umel=10,
        claim_seq_sent=7,
        claim_seq_received=9,
    )
    old_b = V1Account(
        a.fingerprint,
        inbound=[V1Epoch(1, 3, 95)],
        outbound=[V1Epoch(1, 2, 300)],
        folded_out_umel=50,
        settled_in_umel=10,
        settled_out_umel=20,
        claim_seq_sent=9,
        claim_seq_received=7,
    )
    book = {"records": {"00" * 16: {"role": "proposer", "state": "pending", "reason": ""}}}
    for node, other, old in ((a, b, old_a), (b, a, old_b)):
        with LedgerStore.open(node.config.db_path) as store:
            items = [
                (other.fingerprint, "checkpoint", msgspec.msgpack.encode(old)),
                (other.fingerprint, "settlements", msgspec.msgpack.encode(book)),
            ]
            store.append_many(items, int(time.time()) - 60)
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        assert (account(a, b).debt_in_umel, account(a, b).debt_out_umel) == (630, 275)
        assert (account(b, a).debt_in_umel, account(b, a).debt_out_umel) == (275, 630)
        with anyio.fail_after(10):
            await send_and_wait(a, b, 10)  # charged at the new price, 1
            while account(b, a).debt_in_umel != 285 or account(a, b).debt_out_umel != 285:
                await anyio.sleep(0.05)
        with anyio.fail_after(5):  # its claims go on from the old seq, and are taken
            while account(b, a).state.claim_seq_received <= 7:
                await anyio.sleep(0.05)
            while account(a, b).state.claim_seq_received <= 9:
                await anyio.sleep(0.05)
    for node, other in ((a, b), (b, a)):
        with LedgerStore.open(node.config.db_path) as store:
            kinds = [e.kind for e in store.entries(other.fingerprint)]
        assert kinds.count("migrated") == 1
    nodes = [node_from(a.config), node_from(b.config)]  # restarted: nothing more to migrate
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, PAIR)
        assert account(nodes[0], nodes[1]).debt_out_umel == 285
        assert account(nodes[1], nodes[0]).debt_in_umel == 285
    with LedgerStore.open(a.config.db_path) as store:
        assert [e.kind for e in store.entries(b.fingerprint)].count("migrated") == 1
