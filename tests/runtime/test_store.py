"""The SQLite ledger: durable appends, tampering caught at open, atomic batches, async ordering."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.core.errors import ConfigError, LocalProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.ledger import GENESIS, LedgerCorrupt, verify_chain
from earendil_py.runtime.store import (
    PAGE_SIZE,
    AsyncLedger,
    LedgerStore,
    _indexed,
    claim_ledger,
    ledger_id_file,
)

ALICE = bytes([0xA1]) * 32
BOB = bytes([0xB2]) * 32
CAROL = bytes([0xC3]) * 32
T0 = 1_700_000_000


def populate(path: Path) -> None:
    """ALICE: 5 entries (seq 1..5), BOB: 3 entries."""
    with LedgerStore.open(path) as store:
        for i in range(5):
            kind = "debt_checkpoint" if i % 2 == 0 else "price"
            store.append(ALICE, kind, b"alice %d" % i, T0 + i)
        for i in range(3):
            store.append(BOB, "debt_checkpoint", b"bob %d" % i, T0 + i)


def raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run SQL on the file behind the store's back, as an attacker or a bad tool would."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(sql, params).fetchall()


def flip(value: object) -> bytes:
    assert isinstance(value, bytes)
    return bytes([value[0] ^ 0x01]) + value[1:]


def edit(column: str, seq: int, neighbor: bytes = ALICE) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        [(old,)] = raw(
            path, f"SELECT {column} FROM entries WHERE neighbor=? AND seq=?", (neighbor, seq)
        )
        new = old[:-1] + ("x" if old[-1] != "x" else "y") if isinstance(old, str) else flip(old)
        raw(path, f"UPDATE entries SET {column}=? WHERE neighbor=? AND seq=?", (new, neighbor, seq))

    return apply


def delete(seq: int, neighbor: bytes = ALICE) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        raw(path, "DELETE FROM entries WHERE neighbor=? AND seq=?", (neighbor, seq))

    return apply


def swap(path: Path) -> None:
    # Rows 2 and 3 trade places; each keeps its own content.
    raw(path, "UPDATE entries SET seq=100 WHERE neighbor=? AND seq=2", (ALICE,))
    raw(path, "UPDATE entries SET seq=2 WHERE neighbor=? AND seq=3", (ALICE,))
    raw(path, "UPDATE entries SET seq=3 WHERE neighbor=? AND seq=100", (ALICE,))


def edit_recorded_at(path: Path) -> None:
    raw(path, "UPDATE entries SET recorded_at=recorded_at+1 WHERE neighbor=? AND seq=3", (ALICE,))


def edit_head(path: Path) -> None:
    [(old,)] = raw(path, "SELECT hash FROM heads WHERE neighbor=?", (ALICE,))
    raw(path, "UPDATE heads SET hash=? WHERE neighbor=?", (flip(old), ALICE))


def delete_head(path: Path) -> None:
    raw(path, "DELETE FROM heads WHERE neighbor=?", (ALICE,))


def delete_all_of_bob(path: Path) -> None:
    raw(path, "DELETE FROM entries WHERE neighbor=?", (BOB,))


@pytest.mark.parametrize(
    ("tamper", "neighbor", "seq", "reason"),
    [
        pytest.param(edit("body", 3), ALICE, 3, "body_mismatch", id="edited-body"),
        pytest.param(edit("kind", 3), ALICE, 3, "hash_mismatch", id="edited-kind"),
        pytest.param(edit("hash", 3), ALICE, 3, "hash_mismatch", id="edited-hash"),
        pytest.param(edit("hash", 5), ALICE, 5, "hash_mismatch", id="edited-last-hash"),
        pytest.param(edit("prev_hash", 3), ALICE, 3, "prev_hash_mismatch", id="edited-prev"),
        pytest.param(edit("body_hash", 2, BOB), BOB, 2, "body_mismatch", id="edited-body-hash"),
        pytest.param(edit_recorded_at, ALICE, 3, "hash_mismatch", id="edited-time"),
        pytest.param(delete(3), ALICE, 3, "seq_gap", id="deleted-middle-row"),
        pytest.param(delete(5), ALICE, 5, "truncated", id="deleted-last-row"),
        pytest.param(delete_all_of_bob, BOB, 1, "truncated", id="deleted-whole-chain"),
        pytest.param(swap, ALICE, 2, "prev_hash_mismatch", id="swapped-rows"),
        pytest.param(edit_head, ALICE, 5, "head_mismatch", id="edited-head"),
        pytest.param(delete_head, ALICE, 5, "head_missing", id="deleted-head"),
    ],
)
def test_tampering_is_caught_at_open(
    tmp_path: Path,
    tamper: Callable[[Path], None],
    neighbor: bytes,
    seq: int,
    reason: str,
) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    tamper(path)
    with pytest.raises(LedgerCorrupt) as caught:
        LedgerStore.open(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: neighbour {short_hex(neighbor)} seq {seq}: "), message
    assert (caught.value.neighbor, caught.value.seq, caught.value.reason) == (neighbor, seq, reason)


def test_untampered_file_opens_and_resumes_every_head(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    with LedgerStore.open(path) as store:
        alice = store.entries(ALICE)
        assert store.neighbors() == [ALICE, BOB]
        assert store.head(ALICE) == (5, alice[-1].hash)
        assert store.head(CAROL) == (0, GENESIS)
        assert verify_chain(alice) == alice[-1].hash
        assert [e.body for e in alice] == [b"alice %d" % i for i in range(5)]
        following = store.append(ALICE, "price", b"after restart", T0 + 9)
    assert (following.seq, following.prev_hash) == (6, alice[-1].hash)
    with LedgerStore.open(path) as store:
        assert store.entries(ALICE, after_seq=5) == [following]
        assert store.head(ALICE) == (6, following.hash)
        assert store.head(BOB)[0] == 3


def test_entries_filters_by_kind_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    with LedgerStore.open(path) as store:
        assert [e.seq for e in store.entries(ALICE, kinds={"price"})] == [2, 4]
        assert [e.seq for e in store.entries(ALICE, kinds=["price"], after_seq=2)] == [4]
        kinds = ("price", "debt_checkpoint")
        assert [e.seq for e in store.entries(ALICE, kinds=kinds)] == [1, 2, 3, 4, 5]
        assert store.entries(ALICE, kinds=[]) == []
        assert store.entries(CAROL) == []


def test_wal_mode_is_persistent_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    LedgerStore.open(path).close()
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    raw(path, "PRAGMA user_version=5")
    with pytest.raises(ConfigError, match=r"schema version 5 is newer .*\(4\); upgrade"):
        LedgerStore.open(path)


def test_a_version_1_ledger_is_migrated_and_keeps_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    # Version 1 had one more index and no meta table; otherwise the same tables.
    raw(path, "CREATE INDEX entries_by_kind ON entries (neighbor, kind, seq)")
    raw(path, "DROP TABLE meta")
    raw(path, "PRAGMA user_version=1")
    before = raw(path, "SELECT * FROM entries ORDER BY neighbor, seq")
    with LedgerStore.open(path) as store:
        assert store.head(ALICE)[0] == 5
        assert store.append(ALICE, "price", b"after", T0).seq == 6
        ledger_id = store.ledger_id
    assert raw(path, "PRAGMA user_version") == [(4,)]
    assert raw(path, "SELECT name FROM sqlite_schema WHERE name = 'entries_by_kind'") == []
    (index,) = raw(path, "SELECT sql FROM sqlite_schema WHERE name = 'entries_with_body'")
    assert "kind IN ('claim_sent', 'claim_received', 'counts')" in index[0]
    assert len(ledger_id) == 16 and raw(path, "SELECT value FROM meta") == [(ledger_id,)]
    after = "SELECT * FROM entries WHERE NOT (neighbor = ? AND seq = 6) ORDER BY neighbor, seq"
    assert raw(path, after, (ALICE,)) == before


def test_new_ledgers_have_large_pages_and_index_only_the_pruned_kinds(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        store.append(ALICE, "claim_sent", b"claim", T0)
        store.append(ALICE, "settlement_opened", b"proposal", T0)
    assert raw(path, "PRAGMA page_size") == [(PAGE_SIZE,)]
    # Only the pruned kinds have rows in the partial index, and their queries use it.
    indexed = "SELECT count(*) FROM entries INDEXED BY entries_with_body WHERE body IS NOT NULL"
    assert raw(path, indexed + _indexed("claim_sent")) == [(1,)]
    prune = "SELECT seq FROM entries WHERE neighbor = ? AND kind = ? AND body IS NOT NULL"
    plan = raw(path, "EXPLAIN QUERY PLAN " + prune + _indexed("counts"), (ALICE, "counts"))
    assert "entries_with_body" in str(plan)
    with LedgerStore.open(path) as store:  # the others are found all the same
        latest = store.latest(ALICE, "settlement_opened")
        assert latest is not None and latest.body == b"proposal"


@pytest.mark.parametrize("kind", ["garbage", "other-sqlite"])
def test_files_that_are_not_ledgers_are_refused_untouched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ledger.db"
    if kind == "garbage":
        path.write_bytes(b"this is not a database at all" * 100)
    else:
        raw(path, "CREATE TABLE notes (text TEXT)")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not a.* ledger file"):
        LedgerStore.open(path)
    assert path.read_bytes() == before


def test_prune_drops_old_bodies_and_the_chain_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        for i in range(6):
            store.append(ALICE, "debt_checkpoint", b"total %d" % i, T0 + i)
            store.append(ALICE, "price", b"price %d" % i, T0 + i)
        store.append(BOB, "debt_checkpoint", b"bob", T0)
        head = store.head(ALICE)

        assert store.prune(ALICE, "debt_checkpoint", keep_last=2) == 4
        assert store.prune(ALICE, "debt_checkpoint", keep_last=2) == 0
        checkpoints = store.entries(ALICE, kinds=["debt_checkpoint"])
        assert [e.body for e in checkpoints] == [None] * 4 + [b"total 4", b"total 5"]
        assert all(e.body is not None for e in store.entries(ALICE, kinds=["price"]))
        latest = store.latest(ALICE, "debt_checkpoint")
        assert latest is not None
        assert (latest.seq, latest.body) == (11, b"total 5")
        assert store.head(ALICE) == head
        with pytest.raises(LocalProtocolError):
            store.prune(ALICE, "price", keep_last=-1)
    with LedgerStore.open(path) as store:  # verifies the pruned chain
        assert store.prune(ALICE, "debt_checkpoint", keep_last=0) == 2
        assert store.latest(ALICE, "debt_checkpoint") is None
        assert store.latest(BOB, "debt_checkpoint") is not None
        assert store.prune(CAROL, "price", keep_last=1) == 0
        # After everything was pruned, a prune keeps the newest keep_last entries, bodies
        # or not: the two new ones are among them.
        store.append(ALICE, "debt_checkpoint", b"new 1", T0)
        store.append(ALICE, "debt_checkpoint", b"new 2", T0)
        assert store.prune(ALICE, "debt_checkpoint", keep_last=3) == 0
        assert store.prune(ALICE, "debt_checkpoint", keep_last=1) == 1
        bodies = [e.body for e in store.entries(ALICE, kinds=["debt_checkpoint"])]
        assert bodies == [None] * 7 + [b"new 2"]
    LedgerStore.open(path).close()


def test_append_many_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        store.append(ALICE, "price", b"p", T0)
        batch = store.append_many(
            [(ALICE, "debt_checkpoint", b"a"), (BOB, "debt_checkpoint", b"b"), (ALICE, "x", b"c")],
            T0 + 60,
        )
        assert [(e.neighbor, e.seq) for e in batch] == [(ALICE, 2), (BOB, 1), (ALICE, 3)]
        assert batch[2].prev_hash == batch[0].hash
        assert store.head(ALICE) == (3, batch[2].hash)
        assert store.append_many([], T0) == []
    with LedgerStore.open(path) as store:
        assert store.entries(ALICE)[1:] == [batch[0], batch[2]]


def test_append_many_writes_nothing_when_an_item_fails(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        first = store.append(ALICE, "price", b"p", T0)
        # A row behind the store's back, past BOB's (empty) head: inserting BOB's seq 1 will hit
        # a duplicate key after ALICE's and CAROL's entries were already inserted.
        raw(
            path,
            "INSERT INTO entries VALUES (?, 1, 'price', x'00', ?, ?, ?, 0)",
            (BOB, bytes(32), bytes(32), bytes(32)),
        )
        items = [(ALICE, "price", b"1"), (CAROL, "price", b"2"), (BOB, "price", b"3")]
        where = f"^{re.escape(str(path))}: neighbour {short_hex(BOB)} seq 1: "
        with pytest.raises(LedgerCorrupt, match=where):
            store.append_many(items, T0)
        # An invalid item late in the batch is also all-or-nothing.
        with pytest.raises(LocalProtocolError, match="snake_case"):
            store.append_many([*items[:2], (ALICE, "Not A Kind", b"")], T0)
        assert store.head(ALICE) == (1, first.hash)
        assert store.head(CAROL) == (0, GENESIS)
        assert store.entries(ALICE) == [first]
        assert store.entries(CAROL) == []
        assert store.neighbors() == [ALICE]
        assert store.append(CAROL, "price", b"ok", T0).seq == 1  # still usable


def test_append_many_prunes_in_the_same_transaction(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        for i in range(4):
            store.append(ALICE, "debt_checkpoint", b"total %d" % i, T0 + i)
        store.append(BOB, "price", b"bob", T0)
        batch = store.append_many(
            [(ALICE, "debt_checkpoint", b"total 4"), (CAROL, "price", b"carol")],
            T0 + 10,
            prune=[(ALICE, "debt_checkpoint", 2), (BOB, "price", 0), (CAROL, "price", 1)],
        )
        assert [(e.neighbor, e.seq) for e in batch] == [(ALICE, 5), (CAROL, 1)]
        # The prunes ran after the appends: the new checkpoint is one of the two kept.
        bodies = [e.body for e in store.entries(ALICE)]
        assert bodies == [None, None, None, b"total 3", b"total 4"]
        assert [e.body for e in store.entries(BOB)] == [None]
        assert [e.body for e in store.entries(CAROL)] == [b"carol"]
        # Prunes alone still run, in a transaction of their own.
        assert store.append_many([], T0, prune=[(ALICE, "debt_checkpoint", 1)]) == []
        assert [e.body for e in store.entries(ALICE)][-2:] == [None, b"total 4"]
        with pytest.raises(LocalProtocolError, match="keep_last"):
            store.append_many([(CAROL, "price", b"x")], T0, prune=[(CAROL, "price", -1)])
        assert store.head(CAROL) == (1, batch[1].hash)
    LedgerStore.open(path).close()  # verifies the pruned chains


def test_append_many_prunes_nothing_when_an_item_fails(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        entries = [store.append(ALICE, "price", b"p %d" % i, T0) for i in range(3)]
        raw(
            path,
            "INSERT INTO entries VALUES (?, 1, 'price', x'00', ?, ?, ?, 0)",
            (BOB, bytes(32), bytes(32), bytes(32)),
        )
        with pytest.raises(LedgerCorrupt):
            store.append_many(
                [(ALICE, "price", b"new"), (BOB, "price", b"b")],
                T0,
                prune=[(ALICE, "price", 1)],
            )
        assert store.entries(ALICE) == entries  # not appended, not pruned
        raw(path, "DELETE FROM entries WHERE neighbor = ?", (BOB,))
    with LedgerStore.open(path) as store:
        assert store.entries(ALICE) == entries


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "ledger.db")
    store.close()
    store.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        store.append(ALICE, "price", b"", T0)


_KILL_AFTER_APPEND = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from earendil_py.runtime.store import LedgerStore

    store = LedgerStore.open(Path(sys.argv[1]))
    entry = store.append(bytes.fromhex(sys.argv[2]), "debt_checkpoint", b"acknowledged", 1)
    print(entry.seq, entry.hash.hex(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_an_append_that_returned_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_APPEND, str(path), ALICE.hex()],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    seq, digest = done.stdout.split()
    assert path.with_name("ledger.db-wal").exists()  # the entry lives only in the WAL so far
    with LedgerStore.open(path) as store:
        assert int(seq) == 6
        assert store.head(ALICE) == (6, bytes.fromhex(digest))
        latest = store.latest(ALICE, "debt_checkpoint")
        assert latest is not None
        assert latest.body == b"acknowledged"


@pytest.mark.anyio
async def test_async_ledger_serializes_concurrent_appends_in_call_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    per_neighbor = 15
    returned: dict[bytes, list[int]] = {ALICE: [], BOB: []}
    with anyio.fail_after(20):
        async with await AsyncLedger.open(path) as ledger:

            async def one(neighbor: bytes, i: int) -> None:
                entry = await ledger.append(neighbor, "debt_checkpoint", b"%d" % i, T0 + i)
                returned[neighbor].append(entry.seq)

            async with anyio.create_task_group() as tg:
                for i in range(per_neighbor):
                    for neighbor in (ALICE, BOB):
                        tg.start_soon(one, neighbor, i)
            for neighbor in (ALICE, BOB):
                entries = await ledger.entries(neighbor)
                assert sorted(returned[neighbor]) == list(range(1, per_neighbor + 1))
                # FIFO: the calls ran in the order the tasks made them.
                assert [e.body for e in entries] == [b"%d" % i for i in range(per_neighbor)]
                assert await ledger.head(neighbor) == (per_neighbor, entries[-1].hash)
    with LedgerStore.open(path) as store:  # verifies both chains from disk
        assert store.head(ALICE)[0] == per_neighbor


BIG = [(ALICE, "debt_checkpoint", b"x" * 100)] * 10_000  # a transaction of ~0.3 s


async def wait_until_writing(path: Path) -> None:
    """Until the ledger's thread is inside a write transaction."""
    while not _write_locked(path):
        await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_callers_cancelled_in_the_queue_never_run(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with anyio.fail_after(20):
        async with await AsyncLedger.open(path) as ledger:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ledger.append_many, BIG, T0)
                await wait_until_writing(path)
                with anyio.CancelScope() as queued:
                    async with anyio.create_task_group() as waiting:
                        for i in range(40):
                            waiting.start_soon(ledger.append, BOB, "price", b"%d" % i, T0)
                        await anyio.sleep(0)  # all 40 are queued behind the big one
                        queued.cancel()
            assert await ledger.head(BOB) == (0, GENESIS)  # none of the 40 ran
            assert (await ledger.append(BOB, "price", b"after", T0)).seq == 1
            await ledger.verify()


@pytest.mark.anyio
async def test_appends_queued_together_commit_together_in_call_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with anyio.fail_after(20):
        async with await AsyncLedger.open(path) as ledger:
            seqs: dict[int, int] = {}

            async def one(i: int) -> None:
                seqs[i] = (await ledger.append(BOB, "price", b"%d" % i, T0 + i)).seq

            async with anyio.create_task_group() as tg:
                tg.start_soon(ledger.append_many, BIG, T0)
                await wait_until_writing(path)
                for i in range(20):
                    tg.start_soon(one, i)
            assert seqs == {i: i + 1 for i in range(20)}
            stats = ledger.statistics()
            assert (stats.group_commits, stats.grouped_appends) == (1, 20)
            entries = await ledger.entries(BOB)
            assert [e.body for e in entries] == [b"%d" % i for i in range(20)]
            assert [e.recorded_at for e in entries] == [T0 + i for i in range(20)]
        with LedgerStore.open(path) as store:
            assert store.head(BOB)[0] == 20


@pytest.mark.anyio
async def test_a_bad_append_in_a_group_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    outcomes: dict[str, object] = {}

    async def one(name: str, kind: str) -> None:
        try:
            outcomes[name] = (await ledger.append(CAROL, kind, name.encode(), T0)).seq
        except LocalProtocolError as exc:
            outcomes[name] = exc

    with anyio.fail_after(20):
        async with await AsyncLedger.open(path) as ledger:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ledger.append_many, BIG, T0)
                await wait_until_writing(path)
                tg.start_soon(one, "first", "price")
                tg.start_soon(one, "bad", "Not A Kind")
                tg.start_soon(one, "last", "price")
            assert outcomes["first"] == 1 and outcomes["last"] == 2
            assert isinstance(outcomes["bad"], LocalProtocolError)
            assert [e.body for e in await ledger.entries(CAROL)] == [b"first", b"last"]


@pytest.mark.anyio
async def test_async_ledger_methods_and_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with anyio.fail_after(10):
        ledger = await AsyncLedger.open(path)
        batch = await ledger.append_many(
            [(ALICE, "debt_checkpoint", b"1"), (ALICE, "debt_checkpoint", b"2")], T0
        )
        assert [e.seq for e in batch] == [1, 2]
        assert await ledger.neighbors() == [ALICE]
        pruned = await ledger.append_many([(BOB, "price", b"b")], T0, prune=[(BOB, "price", 0)])
        assert [e.body for e in await ledger.entries(BOB)] == [None] and pruned[0].seq == 1
        assert await ledger.neighbors() == [ALICE, BOB]
        assert await ledger.prune(ALICE, "debt_checkpoint", keep_last=1) == 1
        latest = await ledger.latest(ALICE, "debt_checkpoint")
        assert latest == batch[1]
        assert [e.body for e in await ledger.entries(ALICE, kinds={"debt_checkpoint"})] == [
            None,
            b"2",
        ]
        await ledger.aclose()
        await ledger.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await ledger.head(ALICE)


@pytest.mark.anyio
async def test_async_open_reports_corruption(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    delete(5)(path)
    where = f"^{re.escape(str(path))}: neighbour {short_hex(ALICE)} seq 5: missing"
    with anyio.fail_after(10), pytest.raises(LedgerCorrupt, match=where):
        await AsyncLedger.open(path)


def _write_locked(path: Path) -> bool:
    with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False


@pytest.mark.anyio
async def test_a_cancelled_caller_waits_until_its_started_transaction_is_done(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    with anyio.fail_after(20):
        async with await AsyncLedger.open(path) as ledger:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ledger.append_many, BIG, T0)
                    await wait_until_writing(path)
                    scope.cancel()
            # The cancelled caller only got here once the transaction was committed, so another
            # connection sees all of it, and the next append follows it.
            assert raw(path, "SELECT count(*) FROM entries") == [(len(BIG),)]
            assert (await ledger.append(ALICE, "price", b"", T0)).seq == len(BIG) + 1


def test_a_missing_directory_or_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open ledger: No such file or directory"):
        LedgerStore.open(tmp_path / "missing-directory" / "ledger.db")
    with pytest.raises(ConfigError, match="cannot open ledger: Is a directory"):
        LedgerStore.open(tmp_path)


# --- files: mode, damage ------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_ledger_and_its_wal_and_shm_are_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with umask(0o022), LedgerStore.open(path) as store:
        store.append(ALICE, "price", b"p", T0)
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert files == {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600}


def test_an_older_more_open_ledger_is_tightened_with_a_log_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"")  # left by a crash; SQLite ignores an empty WAL
    path.chmod(0o644)
    wal.chmod(0o664)
    with capture_logs() as logs, LedgerStore.open(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert [(e["event"], e["files"]) for e in logs] == [
        ("ledger_mode_tightened", {str(path): "0644", str(wal): "0664"})
    ]
    with capture_logs() as logs:
        LedgerStore.open(path).close()
    assert logs == []


def test_each_ledger_has_its_own_id_which_stays(tmp_path: Path) -> None:
    with LedgerStore.open(tmp_path / "a.db") as a, LedgerStore.open(tmp_path / "b.db") as b:
        first = a.ledger_id
        assert len(first) == 16 and first != b.ledger_id
    with LedgerStore.open(tmp_path / "a.db") as a:
        assert a.ledger_id == first


def test_bytes_that_are_not_utf_8_in_a_text_column_are_one_unreadable_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    populate(path)
    raw(path, "UPDATE entries SET kind = CAST(X'ff70726963' AS TEXT) WHERE seq = 2")
    with pytest.raises(LedgerCorrupt, match=f"^{re.escape(str(path))}: unreadable ledger: ") as e:
        LedgerStore.open(path)
    assert e.value.reason == "unreadable" and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "bit-flips"])
def test_a_damaged_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path) as store:
        for i in range(300):
            store.append(bytes([i % 7]) * 32, "price", bytes(range(200)), T0)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        rng = random.Random(1)
        for _ in range(200):
            data[rng.randrange(4096, len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(data)
    with pytest.raises(LedgerCorrupt) as caught:
        LedgerStore.open(path)
    assert str(caught.value).startswith(f"{path}: unreadable ledger: ")
    assert caught.value.reason == "unreadable"


# --- claim_ledger: is this the identity's ledger? -------------------------------------------


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    (tmp_path / "node.key").write_bytes(b"")  # claim_ledger only needs the path beside it
    return tmp_path


def record_of(node_dir: Path) -> dict[str, object]:
    record = ledger_id_file(node_dir / "node.key")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    loaded: dict[str, object] = json.loads(record.read_text())
    return loaded


def test_the_first_start_creates_the_ledger_and_records_its_id(node_dir: Path) -> None:
    db, key = node_dir / "node.db", node_dir / "node.key"
    assert claim_ledger(db, key, dry_run=True) == "will be created on first start"
    assert sorted(p.name for p in node_dir.iterdir()) == ["node.key"]  # the dry run made none
    with capture_logs() as logs:
        described = claim_ledger(db, key)
    assert logs == []  # nothing to tell on a first start
    with LedgerStore.open(db) as store:
        ledger_id = store.ledger_id.hex()
    assert described == f"ledger {ledger_id[:8]}"
    record = record_of(node_dir)
    assert (record["ledger_id"], record["ledger"]) == (ledger_id, str(db))
    before = ledger_id_file(key).read_bytes()
    files = sorted(p.name for p in node_dir.iterdir())
    assert claim_ledger(db, key, dry_run=True) == described
    assert sorted(p.name for p in node_dir.iterdir()) == files
    assert claim_ledger(db, key) == described
    assert ledger_id_file(key).read_bytes() == before


def deleted(db: Path) -> None:
    db.unlink()
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)


def truncated(db: Path) -> None:
    db.write_bytes(b"")


def replaced(db: Path) -> None:
    deleted(db)
    LedgerStore.open(db).close()  # a fresh ledger: verifies, no balances


def other_nodes(db: Path) -> None:
    other = db.with_name("other.db")
    populate(other)
    deleted(db)
    other.rename(db)


@pytest.mark.parametrize(
    ("lose", "what"),
    [
        (deleted, "ledger is missing"),
        (truncated, "ledger is empty"),
        (replaced, "not the ledger this identity used"),
        (other_nodes, "not the ledger this identity used"),
    ],
)
def test_a_lost_ledger_is_refused_until_the_operator_asks_for_a_new_one(
    node_dir: Path, lose: Callable[[Path], None], what: str
) -> None:
    db, key = node_dir / "node.db", node_dir / "node.key"
    claim_ledger(db, key)
    populate(db)  # the balances that must not be forgotten silently
    recorded = record_of(node_dir)["ledger_id"]
    assert isinstance(recorded, str)
    lose(db)
    files = sorted(p.name for p in node_dir.iterdir())
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as caught:
            claim_ledger(db, key, dry_run=dry_run)
        assert str(caught.value).startswith(f"{db}: {what}: its balances are in ledger ")
        assert recorded[:8] in str(caught.value) and "--new-ledger" in str(caught.value)
        assert sorted(p.name for p in node_dir.iterdir()) == files  # nothing created
    with capture_logs() as logs:
        described = claim_ledger(db, key, new=True)
    with LedgerStore.open(db) as store:
        assert record_of(node_dir)["ledger_id"] == store.ledger_id.hex() != recorded
    assert [(e["event"], e["replaces"]) for e in logs] == [("ledger_recorded", recorded[:8])]
    assert claim_ledger(db, key) == described
    with pytest.raises(ConfigError, match="--new-ledger: this already is this identity's"):
        claim_ledger(db, key, new=True)


def test_a_ledger_from_before_ids_is_upgraded_and_recorded(node_dir: Path) -> None:
    db, key = node_dir / "node.db", node_dir / "node.key"
    populate(db)
    raw(db, "DROP TABLE meta")
    raw(db, "PRAGMA user_version=2")
    assert claim_ledger(db, key, dry_run=True) == "will be upgraded at start"
    assert not ledger_id_file(key).exists()
    claim_ledger(db, key)
    with LedgerStore.open(db) as store:
        assert record_of(node_dir)["ledger_id"] == store.ledger_id.hex()
        assert store.head(ALICE)[0] == 5


def test_a_ledger_of_the_schema_before_keeps_its_recorded_id(node_dir: Path) -> None:
    """Version 3 had ids already (only its partial index differs): the identity's record of
    it still holds after the upgrade."""
    db, key = node_dir / "node.db", node_dir / "node.key"
    populate(db)
    claim_ledger(db, key)
    recorded = record_of(node_dir)["ledger_id"]
    raw(db, "DROP INDEX entries_with_body")
    raw(
        db, "CREATE INDEX entries_with_body ON entries (neighbor, kind, seq) WHERE body IS NOT NULL"
    )
    raw(db, "PRAGMA user_version=3")
    assert claim_ledger(db, key, dry_run=True) == f"ledger {recorded[:8]}"
    assert claim_ledger(db, key) == f"ledger {recorded[:8]}"
    assert raw(db, "PRAGMA user_version") == [(4,)]
    assert record_of(node_dir)["ledger_id"] == recorded


def test_an_unreadable_record_is_refused_unless_a_new_ledger_is_asked_for(node_dir: Path) -> None:
    db, key = node_dir / "node.db", node_dir / "node.key"
    claim_ledger(db, key)
    ledger_id_file(key).write_text('{"ledger_id": "xyz"')
    with pytest.raises(ConfigError, match=r"node.key.ledger-id: not a valid ledger id file"):
        claim_ledger(db, key)
    claim_ledger(db, key, new=True)
    claim_ledger(db, key)


def test_unusable_ledger_paths_are_one_line_each(node_dir: Path) -> None:
    key = node_dir / "node.key"
    missing = node_dir / "nope" / "node.db"
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=f"directory {node_dir / 'nope'} does not exist"):
            claim_ledger(missing, key, dry_run=dry_run)
        with pytest.raises(ConfigError, match="cannot use as ledger: not a regular file"):
            claim_ledger(node_dir, key, dry_run=dry_run)
        with pytest.raises(ConfigError, match="is not a directory"):
            claim_ledger(key / "node.db", key, dry_run=dry_run)
