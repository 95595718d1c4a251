"""The ledger on disk: every neighbour's hash chain (core/ledger.py) in one SQLite file.

`LedgerStore` is the synchronous store; `AsyncLedger` runs it off the event loop. The file is
verified entry by entry when it is opened, so a node never resumes balances from a ledger that
was edited behind its back (within the limits described in docs/ledger.md).

Durability: WAL journal with `synchronous=FULL`, so every commit fsyncs the WAL before `append`
returns. The cheaper `synchronous=NORMAL` keeps the database consistent but can lose the last
commits on power loss, and these commits are money that has already been acknowledged to a
neighbour. The price is one fsync per transaction (around a millisecond on an SSD, more on
spinning disks or SD cards), which is why periodic checkpoints of many links go through
`append_many`, one transaction and one fsync for all of them. Nothing here writes per packet.

Privacy: the file holds chat, debts and settlements, so it is created 0600 (SQLite gives its
`-wal` and `-shm` files the database's mode), and an older, more open one is tightened.

A ledger that is deleted, truncated to nothing or swapped for another verifies as well as the
real one: every chain in it is intact. `claim_ledger` catches that before the daemon opens it,
by the random id each ledger carries and the identity's record of it (docs/ledger.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby
from operator import attrgetter, getitem
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Generic, NamedTuple, Self, TypeVar

import anyio
import msgspec
import structlog

from earendil_py.core.errors import ConfigError, LocalProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.ledger import GENESIS, Entry, LedgerCorrupt, build_entry, verify_chain
from earendil_py.runtime.keyfile import PRIVATE_MODE, check_writable_directory, read_file

T = TypeVar("T")

log = structlog.get_logger("earendil_py.store")

SCHEMA_VERSION = 4  # PRAGMA user_version; bump with a migration, never reinterpret old files
ID_SINCE_VERSION = 3  # the schema version that gave each ledger its id (the meta table)
APPLICATION_ID = int.from_bytes(b"EPLg", "big")  # PRAGMA application_id: "this is our ledger"
MIN_SQLITE = (3, 37, 0)  # STRICT tables

# New files get 16 KiB pages: a settlement proposal's entry (up to ~1.4 KB) packs with the
# small ones around it with little left over, where a 4 KiB page holds two and wastes a
# quarter. Files created before keep their page size (changing it rewrites the file).
PAGE_SIZE = 16384
# The kinds whose bodies are pruned (core/neighbor.py: claims and counts) are the only rows
# in the partial index that pruning and `latest` use: the large entries that are never
# pruned (settlements, chat) cost it nothing. Pruning or `latest` of another kind works too,
# by a scan of the neighbour's rows. Keep in step with the index in _SCHEMA.
INDEXED_KINDS = ("claim_sent", "claim_received", "counts")
_INDEXED = " AND kind IN (" + ", ".join(f"'{kind}'" for kind in INDEXED_KINDS) + ")"

_SCHEMA = """
CREATE TABLE entries (
    neighbor BLOB NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body BLOB,
    body_hash BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (neighbor, seq)
) STRICT;
-- Only the rows that still have a body: pruning and `latest` stay fast however long the
-- chain of pruned checkpoints grows. The only secondary index: each one costs every append
-- a page write in a random place (entries of many neighbours interleave).
CREATE INDEX entries_with_body ON entries (neighbor, kind, seq) WHERE body IS NOT NULL
    AND kind IN ('claim_sent', 'claim_received', 'counts');
CREATE TABLE heads (
    neighbor BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    FOREIGN KEY (neighbor, seq) REFERENCES entries (neighbor, seq)
) STRICT;
"""
# A random id per ledger file, which the identity's ledger id file records (`claim_ledger`).
_META = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
INSERT INTO meta (key, value) VALUES ('ledger_id', randomblob(16));
"""
# From the schema version of the key to the next one; entries are never rewritten.
_MIGRATIONS = {
    # The (neighbor, kind, seq) index over every row: entries_with_body serves every query.
    1: "DROP INDEX entries_by_kind",
    2: _META,
    # The partial index holds only the rows of the kinds that are pruned.
    3: "DROP INDEX entries_with_body;"
    + _SCHEMA[
        _SCHEMA.index("CREATE INDEX entries_with_body") : _SCHEMA.index("CREATE TABLE heads")
    ],
}
_Row = tuple[bytes, int, str, bytes | None, bytes, bytes, bytes, int]
Item = tuple[bytes, str, bytes]  # (neighbor, kind, body) to append
Prune = tuple[bytes, str, int]  # (neighbor, kind, keep_last)


class Batch(NamedTuple):
    """One `append_many` call's arguments."""

    items: Sequence[Item]
    recorded_at: int
    prune: Sequence[Prune] = ()


class LedgerStore:
    """One SQLite ledger file. Synchronous; use an instance from one thread at a time.

    Create it with `LedgerStore.open`. Every method raises LocalProtocolError once the store is
    closed, and lets `sqlite3.Error` through on I/O failures (disk full, file removed); a
    failed write is rolled back entirely.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._ledger_id = b""

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> LedgerStore:
        """Open the ledger at `path`, creating it (mode 0600) if missing, and verify every
        chain in it unless `verify` is false.

        Raises ConfigError (message starts with the path) if the file cannot be opened, is not
        a ledger, or has a newer schema than this version understands; raises LedgerCorrupt
        (message starts with the path) if any chain or head does not verify, or the file
        cannot be read.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ConfigError(
                f"{path}: the ledger needs SQLite >= {'.'.join(map(str, MIN_SQLITE))}, "
                f"this Python has {sqlite3.sqlite_version}"
            )
        created = _open_private(path)
        try:
            # isolation_level=None: the sqlite3 module opens no implicit transactions; every
            # transaction below is an explicit BEGIN ... COMMIT.
            connection = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"{path}: cannot open ledger: {exc}") from None
        store = cls(path, connection)
        try:
            try:
                store._prepare()
            except sqlite3.Error as exc:  # read-only file or directory, locked, disk full...
                raise ConfigError(f"{path}: cannot open ledger: {exc}") from None
            if created:
                _fsync_dir(path.parent)  # the new file's directory entry must survive too
            if verify:
                store.verify()
        except BaseException:
            connection.close()
            raise
        return store

    @property
    def path(self) -> Path:
        return self._path

    @property
    def ledger_id(self) -> bytes:
        """The random id this ledger file was given when it was created (or upgraded)."""
        return self._ledger_id

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def verify(self) -> None:
        """Check every neighbour's chain and that the heads table agrees with it.

        `open` already does this. Raises LedgerCorrupt, with the file path first in its message.
        """
        try:
            self._verify()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # A damaged page, or bytes flipped in a TEXT column: nothing to locate in a chain.
            raise _unreadable(self._path, exc) from None

    def append(self, neighbor: bytes, kind: str, body: bytes, recorded_at: int) -> Entry:
        """Append one entry to `neighbor`'s chain; it is committed and fsynced on return.

        Raises LocalProtocolError for an invalid neighbour, kind or timestamp (nothing is
        written), LedgerCorrupt if the file holds an entry past the recorded head.
        """
        return self.append_many([(neighbor, kind, body)], recorded_at)[0]

    def append_many(
        self,
        items: Sequence[Item],
        recorded_at: int,
        *,
        prune: Sequence[Prune] = (),
    ) -> list[Entry]:
        """Append `(neighbor, kind, body)` items, in order, in ONE transaction: all or none.

        Items may name different neighbours and the same one several times. `prune` holds
        `(neighbor, kind, keep_last)` prunes (as `prune`) run in the same transaction after the
        appends, so they commit with them or not at all; with no items they still run. Raises
        as `append`, and LocalProtocolError (nothing written) if a `keep_last` is negative.
        """
        return self.append_batches([Batch(items, recorded_at, prune)])[0]

    def append_batches(self, batches: Sequence[Batch]) -> list[list[Entry]]:
        """Several `append_many` calls, in order, in ONE transaction and one fsync (a group
        commit): all or none. Returns each batch's entries. Raises as `append_many`."""
        for batch in batches:
            _check_keep(batch.prune)
        if not any(batch.items or batch.prune for batch in batches):
            return [[] for _ in batches]
        conn = self._connection()
        appended: list[list[Entry]] = []
        with self._transaction(conn, write=True):
            heads: dict[bytes, tuple[int, bytes]] = {}
            for items, recorded_at, prune in batches:
                appended.append([])
                for neighbor, kind, body in items:
                    seq, prev = heads.get(neighbor) or self._read_head(conn, neighbor)
                    entry = build_entry(
                        neighbor=neighbor,
                        seq=seq + 1,
                        kind=kind,
                        body=body,
                        prev_hash=prev,
                        recorded_at=recorded_at,
                    )
                    try:
                        conn.execute(
                            "INSERT INTO entries (neighbor, seq, kind, body, body_hash, "
                            "prev_hash, hash, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            _row_from_entry(entry),
                        )
                    except sqlite3.IntegrityError:
                        raise self._corrupt(
                            f"neighbour {short_hex(neighbor)} seq {entry.seq}: an entry already "
                            f"exists past the recorded head (seq {seq})",
                            neighbor,
                            entry.seq,
                            "head_behind",
                        ) from None
                    heads[neighbor] = (entry.seq, entry.hash)
                    appended[-1].append(entry)
                # A batch's prunes follow its own appends, as in append_many.
                for neighbor, kind, keep_last in prune:
                    _prune(conn, neighbor, kind, keep_last)
            conn.executemany(
                "INSERT INTO heads (neighbor, seq, hash) VALUES (?, ?, ?) "
                "ON CONFLICT (neighbor) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                [(neighbor, seq, digest) for neighbor, (seq, digest) in heads.items()],
            )
        return appended

    def head(self, neighbor: bytes) -> tuple[int, bytes]:
        """`(seq, hash)` of the newest entry for `neighbor`, or `(0, GENESIS)` if none."""
        return self._read_head(self._connection(), neighbor)

    def neighbors(self) -> list[bytes]:
        """Every neighbour that has at least one entry, in byte order."""
        rows = self._connection().execute("SELECT neighbor FROM heads ORDER BY neighbor")
        return [neighbor for (neighbor,) in rows]

    def entries(
        self, neighbor: bytes, *, kinds: Collection[str] | None = None, after_seq: int = 0
    ) -> list[Entry]:
        """`neighbor`'s entries with seq > `after_seq`, oldest first, optionally of `kinds` only.

        Pruned entries are included with `body=None`.
        """
        query = (
            "SELECT neighbor, seq, kind, body, body_hash, prev_hash, hash, recorded_at "
            "FROM entries WHERE neighbor = ? AND seq > ?"
        )
        params: list[object] = [neighbor, after_seq]
        if kinds is not None:
            if not kinds:
                return []
            # Only "?" placeholders are formatted in; the kinds themselves are bound.
            query += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        rows = self._connection().execute(query + " ORDER BY seq", params)
        return [_entry_from_row(row) for row in rows]

    def latest(self, neighbor: bytes, kind: str) -> Entry | None:
        """The newest entry of `kind` for `neighbor` whose body is still present, if any."""
        row = (
            self._connection()
            .execute(
                "SELECT neighbor, seq, kind, body, body_hash, prev_hash, hash, recorded_at "
                "FROM entries WHERE neighbor = ? AND kind = ? AND body IS NOT NULL"
                + _indexed(kind)
                + " ORDER BY seq DESC LIMIT 1",
                (neighbor, kind),
            )
            .fetchone()
        )
        return None if row is None else _entry_from_row(row)

    def prune(self, neighbor: bytes, kind: str, keep_last: int) -> int:
        """Drop the bodies of all but the newest `keep_last` entries of `kind`; return how many.

        Rows, body hashes and entry hashes stay, so the chain still verifies. This frees space
        for reuse inside the file; it is not a secure erase (old pages keep the bytes until
        SQLite reuses them). Raises LocalProtocolError if `keep_last` is negative.
        """
        _check_keep([(neighbor, kind, keep_last)])
        conn = self._connection()
        with self._transaction(conn, write=True):
            return _prune(conn, neighbor, kind, keep_last)

    # -- internals ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LocalProtocolError(f"{self._path}: ledger store is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so reading the head and inserting after it
        # cannot interleave with another writer. Any exception (including KeyboardInterrupt)
        # rolls the whole transaction back before it propagates.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the original error is the one to see
                    conn.execute("ROLLBACK")
            raise

    def _prepare(self) -> None:
        conn = self._connection()
        version = _schema_version(conn, self._path)
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect on a new file only
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ConfigError(f"{self._path}: cannot use WAL journal mode here (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")  # see the module docstring for the trade-off
        # macOS fsync() does not flush the drive's cache; F_FULLFSYNC does. No-op elsewhere.
        conn.execute("PRAGMA fullfsync=ON")
        conn.execute("PRAGMA checkpoint_fullfsync=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        if version != SCHEMA_VERSION:
            with self._transaction(conn, write=True):
                self._create_or_migrate(conn)
        self._ledger_id = _read_ledger_id(conn, self._path)

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        # Re-read under the write lock: another process may have created it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise ConfigError(f"{self._path}: not an earendil_py ledger file")
            statements = _SCHEMA + _META
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        else:
            statements = ";".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        for statement in statements.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _verify(self) -> None:
        conn = self._connection()
        with self._transaction(conn, write=False):  # one snapshot of both tables
            heads: dict[bytes, tuple[int, bytes]] = {
                neighbor: (seq, digest)
                for neighbor, seq, digest in conn.execute("SELECT neighbor, seq, hash FROM heads")
            }
            rows = conn.execute(
                "SELECT neighbor, seq, kind, body, body_hash, prev_hash, hash, recorded_at "
                "FROM entries ORDER BY neighbor, seq"
            )
            entries = (_entry_from_row(row) for row in rows)
            for neighbor, group in groupby(entries, key=attrgetter("neighbor")):
                last = [0]
                try:
                    head = verify_chain(_tap_seq(group, last))
                except LedgerCorrupt as exc:
                    raise self._corrupt(str(exc), neighbor, exc.seq, exc.reason) from None
                self._check_head(neighbor, heads.pop(neighbor, None), last[0], head)
            for neighbor, (seq, _) in sorted(heads.items()):
                self._check_head(neighbor, (seq, b""), 0, GENESIS)

    @staticmethod
    def _read_head(conn: sqlite3.Connection, neighbor: bytes) -> tuple[int, bytes]:
        row = conn.execute("SELECT seq, hash FROM heads WHERE neighbor = ?", (neighbor,)).fetchone()
        return (0, GENESIS) if row is None else (row[0], row[1])

    def _check_head(
        self,
        neighbor: bytes,
        recorded: tuple[int, bytes] | None,
        chain_seq: int,
        chain_head: bytes,
    ) -> None:
        where = f"neighbour {short_hex(neighbor)}"
        if recorded is None:
            raise self._corrupt(
                f"{where} seq {chain_seq}: the heads table has no head for this neighbour",
                neighbor,
                chain_seq,
                "head_missing",
            )
        seq, digest = recorded
        if seq > chain_seq:
            # Deleting the newest entries leaves a chain that verifies on its own; only the
            # head recorded alongside it shows the truncation.
            raise self._corrupt(
                f"{where} seq {chain_seq + 1}: missing: the heads table records seq {seq} "
                f"but the chain ends at seq {chain_seq} (entries were deleted)",
                neighbor,
                chain_seq + 1,
                "truncated",
            )
        if seq < chain_seq:
            raise self._corrupt(
                f"{where} seq {seq + 1}: the chain continues past the recorded head (seq {seq})",
                neighbor,
                seq + 1,
                "head_behind",
            )
        if digest != chain_head:
            raise self._corrupt(
                f"{where} seq {seq}: head hash mismatch: the heads table disagrees with the chain",
                neighbor,
                seq,
                "head_mismatch",
            )

    def _corrupt(self, what: str, neighbor: bytes, seq: int | None, reason: str) -> LedgerCorrupt:
        return LedgerCorrupt(f"{self._path}: {what}", neighbor=neighbor, seq=seq, reason=reason)


class AsyncLedger:
    """A LedgerStore that lives in a thread of its own. Its calls run there one at a time, in
    call order, so the event loop never waits on SQLite or fsync, and appends to one
    neighbour form a gap-free chain.

    Group commit: `append_many` calls queued while the thread was busy run together in ONE
    transaction (one fsync), and each caller still gets its own entries back only once they
    are on disk. If that shared transaction fails, each of its calls runs again alone, so an
    error reaches only the call that caused it.

    Cancellation: a call cancelled while it waits its turn never runs. Once it has started it
    runs to completion (its transaction commits or rolls back as a whole; a transaction is
    never left half done) and the caller waits for it, shielded; the cancellation takes effect
    at the caller's next checkpoint. So a caller whose append raised a cancellation cannot
    assume either way whether it was committed: compare `head()` if it matters. A call made
    after `aclose` raises anyio.ClosedResourceError; everything else raises as the LedgerStore
    method of the same name.

    Needs anyio's asyncio backend (the daemon's): the thread hands results back with the
    loop's `call_soon_threadsafe`, a third of the CPU of an `anyio.to_thread` call (measured
    by bench/accounting.py), and the node makes one call per received push_debt claim.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[_Call[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards every _Call.state between the two threads
        self._store: LedgerStore | None = None
        self._path: Path | None = None
        self._closing: _Call[None] | None = None
        self._stopped = False  # only the thread reads and writes it
        self._stats = LedgerStatistics()  # only the thread writes it
        threading.Thread(target=self._serve, name="ledger", daemon=True).start()

    @classmethod
    async def open(cls, path: Path) -> AsyncLedger:
        """Open (creating if missing) and verify the ledger at `path`.

        Raises as LedgerStore.open.
        """
        ledger = cls(asyncio.get_running_loop())

        def open_store() -> None:
            ledger._store = LedgerStore.open(path)  # made in, and only used from, its thread
            ledger._path = path

        try:
            await ledger._run(open_store)
        except BaseException:
            await ledger.aclose()
            raise
        return ledger

    @property
    def path(self) -> Path:
        assert self._path is not None, "AsyncLedger.open sets the path"
        return self._path

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the file after the calls already queued have run, and end the thread.
        Idempotent."""
        if self._closing is None:
            self._closing = self._submit(self._close)
        if not self._closing.finished:
            with anyio.CancelScope(shield=True):
                await asyncio.shield(self._closing.waiter)  # several may wait for it

    async def append(self, neighbor: bytes, kind: str, body: bytes, recorded_at: int) -> Entry:
        return (await self.append_many([(neighbor, kind, body)], recorded_at))[0]

    async def append_many(
        self, items: Sequence[Item], recorded_at: int, *, prune: Sequence[Prune] = ()
    ) -> list[Entry]:
        # Copies: the caller may change its lists while we wait our turn.
        entries: list[Entry] = await self._run(Batch(list(items), recorded_at, list(prune)))
        return entries

    async def head(self, neighbor: bytes) -> tuple[int, bytes]:
        return await self._run(lambda: self._live().head(neighbor))

    async def neighbors(self) -> list[bytes]:
        return await self._run(lambda: self._live().neighbors())

    async def entries(
        self, neighbor: bytes, *, kinds: Collection[str] | None = None, after_seq: int = 0
    ) -> list[Entry]:
        kinds = None if kinds is None else tuple(kinds)
        return await self._run(
            lambda: self._live().entries(neighbor, kinds=kinds, after_seq=after_seq)
        )

    async def latest(self, neighbor: bytes, kind: str) -> Entry | None:
        return await self._run(lambda: self._live().latest(neighbor, kind))

    async def prune(self, neighbor: bytes, kind: str, keep_last: int) -> int:
        return await self._run(lambda: self._live().prune(neighbor, kind, keep_last))

    async def verify(self) -> None:
        await self._run(lambda: self._live().verify())

    def statistics(self) -> LedgerStatistics:
        """A copy of the counters so far."""
        return replace(self._stats)

    # -- the event loop's side ---------------------------------------------------------------

    def _submit(self, work: Callable[[], T] | Batch) -> _Call[T]:
        call: _Call[T] = _Call(work, self._loop.create_future())
        self._queue.put(call)
        return call

    async def _run(self, work: Callable[[], T] | Batch) -> T:
        if self._closing is not None:
            raise anyio.ClosedResourceError
        call: _Call[T] = self._submit(work)
        await self._wait(call)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]  # set whenever error is not

    async def _wait(self, call: _Call[Any]) -> None:
        try:
            await call.waiter
        except anyio.get_cancelled_exc_class():
            with self._lock:
                started = call.state != _QUEUED
                if not started:
                    call.state = _SKIPPED  # the thread will pass it by
            if started and not call.finished:
                # The cancellation also cancelled the waiter: wait on a new one. _wake runs
                # on this loop too, so it cannot slip in between the check and the wait.
                call.waiter = self._loop.create_future()
                with anyio.CancelScope(shield=True):
                    await call.waiter
            raise

    # -- the thread's side -------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopped:
            calls = [self._queue.get()]
            while not self._queue.empty():  # only this thread takes from the queue
                calls.append(self._queue.get_nowait())
            with self._lock:
                calls = [call for call in calls if call.state == _QUEUED]
                for call in calls:
                    call.state = _STARTED
            # Consecutive appends share one transaction; anything else runs alone.
            for appends, group in groupby(calls, key=lambda call: isinstance(call.work, Batch)):
                if appends:
                    self._append(list(group))
                else:
                    for call in group:
                        assert not isinstance(call.work, Batch)
                        self._finish(call, call.work)

    def _append(self, calls: list[_Call[Any]]) -> None:
        batches = [call.work for call in calls if isinstance(call.work, Batch)]
        results: list[list[Entry]] | None = None
        if len(calls) > 1:
            with contextlib.suppress(Exception):  # rolled back: each call runs alone below
                results = self._live().append_batches(batches)
                self._stats.group_commits += 1
                self._stats.grouped_appends += len(calls)
        for index, (call, batch) in enumerate(zip(calls, batches, strict=True)):
            if results is not None:
                self._finish(call, partial(getitem, results, index))
            else:
                self._finish(call, partial(self._append_alone, batch))

    def _append_alone(self, batch: Batch) -> list[Entry]:
        return self._live().append_batches([batch])[0]

    def _finish(self, call: _Call[T], work: Callable[[], T]) -> None:
        try:
            call.result = work()
        except BaseException as exc:  # delivered to the caller, who raises it
            call.error = exc
        try:
            self._loop.call_soon_threadsafe(_wake, call)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            self._stopped = True

    def _live(self) -> LedgerStore:
        # aclose may have been queued ahead of a call that passed _run's check.
        if self._store is None or self._store.closed:
            raise anyio.ClosedResourceError
        return self._store

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._stopped = True


_QUEUED, _STARTED, _SKIPPED = "queued", "started", "skipped"


@dataclass(slots=True)
class LedgerStatistics:
    group_commits: int = 0  # transactions that held more than one append_many call
    grouped_appends: int = 0  # append_many calls committed in those


@dataclass(slots=True)
class _Call(Generic[T]):
    """One AsyncLedger call on its way to the thread and back."""

    work: Callable[[], T] | Batch
    waiter: asyncio.Future[None]  # the caller awaits it; only the event loop touches it
    state: str = _QUEUED  # queued -> started (by the thread) or skipped (by a cancellation)
    finished: bool = False  # result or error is set; only the event loop touches it
    result: T | None = None
    error: BaseException | None = None


def _wake(call: _Call[Any]) -> None:
    """On the event loop: the thread is done with `call`."""
    call.finished = True
    if not call.waiter.done():
        call.waiter.set_result(None)


def _check_keep(prunes: Iterable[tuple[bytes, str, int]]) -> None:
    for _, _, keep_last in prunes:
        if keep_last < 0:
            raise LocalProtocolError(f"keep_last must be >= 0, got {keep_last}")


def _prune(conn: sqlite3.Connection, neighbor: bytes, kind: str, keep_last: int) -> int:
    """`LedgerStore.prune`'s statements, inside the caller's write transaction."""
    indexed = _indexed(kind)  # a constant: the statements below format in nothing else
    if keep_last == 0:
        cursor = conn.execute(
            "UPDATE entries SET body = NULL WHERE neighbor = ? AND kind = ? AND body IS NOT NULL"  # noqa: S608
            + indexed,
            (neighbor, kind),
        )
        return cursor.rowcount
    oldest_kept = conn.execute(
        # Bodies are only ever dropped oldest first, so the newest `keep_last` entries of a kind
        # are the newest ones that still have a body: the partial index finds them.
        "SELECT seq FROM entries WHERE neighbor = ? AND kind = ? AND body IS NOT NULL"  # noqa: S608
        + indexed
        + " ORDER BY seq DESC LIMIT 1 OFFSET ?",
        (neighbor, kind, keep_last - 1),
    ).fetchone()
    if oldest_kept is None:
        return 0
    cursor = conn.execute(
        "UPDATE entries SET body = NULL "  # noqa: S608
        "WHERE neighbor = ? AND kind = ? AND seq < ? AND body IS NOT NULL" + indexed,
        (neighbor, kind, oldest_kept[0]),
    )
    return cursor.rowcount


def _indexed(kind: str) -> str:
    """The partial index's own condition, for a query on `kind` that it covers: SQLite uses
    a partial index only for a query whose WHERE repeats the index's."""
    return _INDEXED if kind in INDEXED_KINDS else ""


def _entry_from_row(row: _Row) -> Entry:
    return Entry(*row)  # the columns are in Entry's field order


def _row_from_entry(entry: Entry) -> _Row:
    return (
        entry.neighbor,
        entry.seq,
        entry.kind,
        entry.body,
        entry.body_hash,
        entry.prev_hash,
        entry.hash,
        entry.recorded_at,
    )


def _tap_seq(entries: Iterable[Entry], last: list[int]) -> Iterator[Entry]:
    # Streams a chain into verify_chain while remembering the last seq it saw, so a chain of
    # any length is checked without holding it in memory.
    for entry in entries:
        last[0] = entry.seq
        yield entry


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version, 0 for an empty file. Raises ConfigError, having changed
    nothing, if it is not SQLite, not ours, or newer than this version understands."""
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorname == "SQLITE_CORRUPT":  # a ledger, truncated or damaged
            raise _unreadable(path, exc) from None
        raise ConfigError(f"{path}: not a ledger file ({exc})") from None
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: ledger schema version {version} is newer than this "
            f"earendil_py understands ({SCHEMA_VERSION}); upgrade earendil_py"
        )
    if (
        application_id not in (0, APPLICATION_ID)
        or (version and not application_id)
        or (not version and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0])
    ):
        raise ConfigError(f"{path}: not an earendil_py ledger file")
    return version


def _read_ledger_id(conn: sqlite3.Connection, path: Path) -> bytes:
    row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
    if row is None or not isinstance(row[0], bytes) or len(row[0]) != LEDGER_ID_SIZE:
        raise LedgerCorrupt(f"{path}: the ledger's id is missing or malformed", reason="no_id")
    return row[0]


def _open_private(path: Path) -> bool:
    """Create `path` empty with mode 0600 if it does not exist, or tighten its mode (and its
    `-wal`/`-shm` files') to 0600 if group or others may access it. Returns whether it was
    created. Raises ConfigError if it cannot be opened for writing or is not a regular file."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_RDWR)
            created = False
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open ledger: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: cannot use as ledger: not a regular file")
        tightened = {}
        if mode & 0o077:
            os.fchmod(fd, PRIVATE_MODE)
            tightened[str(path)] = f"{stat.S_IMODE(mode):04o}"
        for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            with contextlib.suppress(FileNotFoundError):
                side_mode = side.stat().st_mode
                if side_mode & 0o077:
                    side.chmod(PRIVATE_MODE)
                    tightened[str(side)] = f"{stat.S_IMODE(side_mode):04o}"
    except OSError as exc:
        raise ConfigError(f"{path}: cannot set the ledger's mode to 0600: {exc.strerror}") from None
    finally:
        os.close(fd)
    if tightened:
        # Ledgers made before they were created 0600; the node can fix this itself, so it
        # does instead of refusing to start.
        log.warning("ledger_mode_tightened", files=tightened, mode="0600")
    return created


# -- which ledger is this identity's ---------------------------------------------------------

LEDGER_ID_SIZE = 16
LEDGER_ID_SUFFIX = ".ledger-id"


class LedgerIdRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The content of `<identity file>.ledger-id` (JSON): the ledger this identity keeps its
    balances in."""

    ledger_id: Annotated[str, msgspec.Meta(pattern=rf"^[0-9a-f]{{{2 * LEDGER_ID_SIZE}}}\Z")]
    ledger: str  # its path when it was recorded, to tell the operator where it was
    recorded_at: int  # unix seconds


def ledger_id_file(identity_file: Path) -> Path:
    """Where the id of `identity_file`'s ledger is recorded: beside the identity, because a
    ledger belongs to an identity (its chains are that identity's debts and signatures)."""
    return identity_file.with_name(identity_file.name + LEDGER_ID_SUFFIX)


def claim_ledger(
    path: Path, identity_file: Path, *, new: bool = False, dry_run: bool = False
) -> str:
    """Check, before a node opens `path`, that it is the ledger this identity has used.

    The first ledger an identity runs with is created here, and its id recorded in
    `ledger_id_file(identity_file)`. From then on a ledger at `path` that is missing or empty
    (deleted, truncated to 0 bytes) or carries another id (replaced by a new ledger or by
    another node's) is refused: every balance with every neighbour would be forgotten
    without a word. `new` (the operator's `--new-ledger`) makes the ledger at `path`, created
    if missing or empty, this identity's from now on; it is refused when that is already so,
    so it cannot be left in a service file and turn the check off. `dry_run` (check-config)
    checks the same and creates or writes nothing.

    Returns a few words about the ledger for the operator. Raises ConfigError, one line naming
    the file, for every refusal and unusable path; LedgerCorrupt if the file cannot be read.
    """
    _check_ledger_path(path)
    record_file = ledger_id_file(identity_file)
    try:
        record = _read_record(record_file)
    except ConfigError:
        if not new:
            raise
        record = None  # --new-ledger replaces an unreadable record too
    recorded = None if record is None else record.ledger_id
    empty = not path.exists() or path.stat().st_size == 0
    found = None if empty else _peek_ledger_id(path)  # None for a ledger from before ids
    if new and found is not None and found.hex() == recorded:
        raise ConfigError(
            f"{path}: --new-ledger: this already is this identity's ledger; start without it"
        )
    if not new and record is not None and (found is None or found.hex() != recorded):
        what = (
            f"ledger is {'empty' if path.exists() else 'missing'}"
            if empty
            else ("not the ledger this identity used")
        )
        raise ConfigError(
            f"{path}: {what}: its balances are in ledger {record.ledger_id[:8]} "
            f"({record.ledger}, recorded {_utc(record.recorded_at)}); restore that file, or "
            f"start the daemon once with --new-ledger to use this one and forget them"
        )
    if dry_run:
        if found is None:
            return "will be created on first start" if empty else "will be upgraded at start"
        return f"ledger {found.hex()[:8]}"
    with LedgerStore.open(path, verify=False) as store:  # creates or upgrades it if need be
        ledger_id = store.ledger_id.hex()
    if ledger_id != recorded:
        _write_record(
            record_file, LedgerIdRecord(ledger_id, str(path.absolute()), int(time.time()))
        )
        if new or not empty:  # not the first start: say what changed, and where
            log.info(
                "ledger_recorded",
                ledger=str(path),
                ledger_id=ledger_id[:8],
                replaces=recorded and recorded[:8],
                file=str(record_file),
            )
    return f"ledger {ledger_id[:8]}"


def _check_ledger_path(path: Path) -> None:
    check_writable_directory(path, "ledger")  # SQLite creates its -wal and -shm beside it
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(f"{path}: cannot use as ledger: not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{path}: cannot use as ledger: not readable and writable")


def _peek_ledger_id(path: Path) -> bytes | None:
    """The id of the existing ledger at `path`, None if it has none yet (an older schema),
    read without changing or creating anything."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open ledger: {exc}") from None
    with contextlib.closing(conn):
        version = _schema_version(conn, path)
        try:
            return _read_ledger_id(conn, path) if version >= ID_SINCE_VERSION else None
        except sqlite3.DatabaseError as exc:
            raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> LedgerCorrupt:
    return LedgerCorrupt(f"{path}: unreadable ledger: {exc}", reason="unreadable")


def _read_record(file: Path) -> LedgerIdRecord | None:
    if not file.exists():
        return None
    data = read_file(file, "ledger id file", max_bytes=4096, private=False)
    try:
        return msgspec.json.decode(data, type=LedgerIdRecord)
    except msgspec.DecodeError as exc:
        raise ConfigError(
            f"{file}: not a valid ledger id file ({exc}); if the ledger is the right one, "
            f"start the daemon once with --new-ledger to record it again"
        ) from None


def _write_record(file: Path, record: LedgerIdRecord) -> None:
    """Replace `file` atomically (temporary file, fsync, rename, fsync of the directory)."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
        try:
            os.write(fd, msgspec.json.encode(record) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot write ledger id file: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(file.parent)


def _utc(unix_secs: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_secs))
