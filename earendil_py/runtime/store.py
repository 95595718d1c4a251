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
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from itertools import groupby
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import anyio
import anyio.to_thread

from earendil_py.core.errors import ConfigError, LocalProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.ledger import GENESIS, Entry, LedgerCorrupt, build_entry, verify_chain

T = TypeVar("T")

SCHEMA_VERSION = 1  # PRAGMA user_version; bump with a migration, never reinterpret old files
APPLICATION_ID = int.from_bytes(b"EPLg", "big")  # PRAGMA application_id: "this is our ledger"
MIN_SQLITE = (3, 37, 0)  # STRICT tables

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
CREATE INDEX entries_by_kind ON entries (neighbor, kind, seq);
-- Only the rows that still have a body: pruning and `latest` stay fast however long the
-- chain of pruned checkpoints grows.
CREATE INDEX entries_with_body ON entries (neighbor, kind, seq) WHERE body IS NOT NULL;
CREATE TABLE heads (
    neighbor BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    FOREIGN KEY (neighbor, seq) REFERENCES entries (neighbor, seq)
) STRICT;
"""
_Row = tuple[bytes, int, str, bytes | None, bytes, bytes, bytes, int]


class LedgerStore:
    """One SQLite ledger file. Synchronous; use an instance from one thread at a time.

    Create it with `LedgerStore.open`. Every method raises LocalProtocolError once the store is
    closed, and lets `sqlite3.Error` through on I/O failures (disk full, file removed); a
    failed write is rolled back entirely.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = connection

    @classmethod
    def open(cls, path: Path, *, check_same_thread: bool = True) -> LedgerStore:
        """Open the ledger at `path`, creating it if missing, and verify every chain in it.

        Raises ConfigError (message starts with the path) if the file cannot be opened, is not
        a ledger, or has a newer schema than this version understands; raises LedgerCorrupt
        (message starts with the path) if any chain or head does not verify.
        `check_same_thread=False` is only for callers that hand the store from thread to
        thread while never using it from two at once, as AsyncLedger does.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ConfigError(
                f"{path}: the ledger needs SQLite >= {'.'.join(map(str, MIN_SQLITE))}, "
                f"this Python has {sqlite3.sqlite_version}"
            )
        created = not path.exists()
        try:
            # isolation_level=None: the sqlite3 module opens no implicit transactions; every
            # transaction below is an explicit BEGIN ... COMMIT.
            connection = sqlite3.connect(
                path, isolation_level=None, check_same_thread=check_same_thread
            )
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
            store.verify()
        except BaseException:
            connection.close()
            raise
        return store

    @property
    def path(self) -> Path:
        return self._path

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

    def append(self, neighbor: bytes, kind: str, body: bytes, recorded_at: int) -> Entry:
        """Append one entry to `neighbor`'s chain; it is committed and fsynced on return.

        Raises LocalProtocolError for an invalid neighbour, kind or timestamp (nothing is
        written), LedgerCorrupt if the file holds an entry past the recorded head.
        """
        return self.append_many([(neighbor, kind, body)], recorded_at)[0]

    def append_many(
        self,
        items: list[tuple[bytes, str, bytes]],
        recorded_at: int,
        *,
        prune: Sequence[tuple[bytes, str, int]] = (),
    ) -> list[Entry]:
        """Append `(neighbor, kind, body)` items, in order, in ONE transaction: all or none.

        Items may name different neighbours and the same one several times. `prune` holds
        `(neighbor, kind, keep_last)` prunes (as `prune`) run in the same transaction after the
        appends, so they commit with them or not at all; with no items they still run. Raises
        as `append`, and LocalProtocolError (nothing written) if a `keep_last` is negative.
        """
        prune = list(prune)
        _check_keep(prune)
        if not items and not prune:
            return []
        conn = self._connection()
        appended: list[Entry] = []
        with self._transaction(conn, write=True):
            heads: dict[bytes, tuple[int, bytes]] = {}
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
                        "INSERT INTO entries (neighbor, seq, kind, body, body_hash, prev_hash, "
                        "hash, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
                appended.append(entry)
            conn.executemany(
                "INSERT INTO heads (neighbor, seq, hash) VALUES (?, ?, ?) "
                "ON CONFLICT (neighbor) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                [(neighbor, seq, digest) for neighbor, (seq, digest) in heads.items()],
            )
            for neighbor, kind, keep_last in prune:
                _prune(conn, neighbor, kind, keep_last)
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
                "FROM entries WHERE neighbor = ? AND kind = ? AND body IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1",
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
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self._path}: not a ledger file ({exc})") from None
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self._path}: ledger schema version {version} is newer than this "
                f"earendil_py understands ({SCHEMA_VERSION}); upgrade earendil_py"
            )
        if (
            application_id not in (0, APPLICATION_ID)
            or (version and not application_id)
            or (not version and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0])
        ):
            # Refused before anything below changes the file (journal mode, schema).
            raise ConfigError(f"{self._path}: not an earendil_py ledger file")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ConfigError(f"{self._path}: cannot use WAL journal mode here (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")  # see the module docstring for the trade-off
        # macOS fsync() does not flush the drive's cache; F_FULLFSYNC does. No-op elsewhere.
        conn.execute("PRAGMA fullfsync=ON")
        conn.execute("PRAGMA checkpoint_fullfsync=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        if version == SCHEMA_VERSION:
            return
        with self._transaction(conn, write=True):
            # Re-read under the write lock: another process may have created it meanwhile.
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
            if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise ConfigError(f"{self._path}: not an earendil_py ledger file")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
    """A LedgerStore whose calls run in a worker thread, one at a time, in call order.

    The event loop never waits on SQLite or fsync. All calls go through a CapacityLimiter of
    one token, which is FIFO, so calls from many tasks run one after another in the order they
    were made, and appends to one neighbour form a gap-free chain.

    Cancellation: a call cancelled while it waits its turn never runs. Once it has started in
    the worker thread it runs to completion (its transaction commits or rolls back as a whole;
    a transaction is never left half done) and the caller waits for it, shielded; the
    cancellation takes effect at the caller's next checkpoint. So a caller whose append raised
    a cancellation cannot assume either way whether it was committed: compare `head()` if it
    matters. A call made after `aclose` raises anyio.ClosedResourceError; everything else
    raises as the LedgerStore method of the same name.
    """

    def __init__(self, store: LedgerStore, limiter: anyio.CapacityLimiter) -> None:
        self._store = store
        self._limiter = limiter
        self._closing = False

    @classmethod
    async def open(cls, path: Path) -> AsyncLedger:
        """Open (creating if missing) and verify the ledger at `path`.

        Raises as LedgerStore.open.
        """
        limiter = anyio.CapacityLimiter(1)
        # The connection is created in one worker thread and used from whichever worker thread
        # anyio hands the next call to; the limiter guarantees never two at once, which is the
        # condition under which sqlite3's check_same_thread may be turned off.
        store = await anyio.to_thread.run_sync(
            lambda: LedgerStore.open(path, check_same_thread=False), limiter=limiter
        )
        return cls(store, limiter)

    @property
    def path(self) -> Path:
        return self._store.path

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
        """Close the file after the calls already queued have run. Idempotent."""
        self._closing = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._store.close, limiter=self._limiter)

    async def append(self, neighbor: bytes, kind: str, body: bytes, recorded_at: int) -> Entry:
        return await self._run(lambda: self._store.append(neighbor, kind, body, recorded_at))

    async def append_many(
        self,
        items: list[tuple[bytes, str, bytes]],
        recorded_at: int,
        *,
        prune: Sequence[tuple[bytes, str, int]] = (),
    ) -> list[Entry]:
        items = list(items)  # the caller may mutate its lists while we wait our turn
        prunes = list(prune)
        return await self._run(lambda: self._store.append_many(items, recorded_at, prune=prunes))

    async def head(self, neighbor: bytes) -> tuple[int, bytes]:
        return await self._run(lambda: self._store.head(neighbor))

    async def neighbors(self) -> list[bytes]:
        return await self._run(self._store.neighbors)

    async def entries(
        self, neighbor: bytes, *, kinds: Collection[str] | None = None, after_seq: int = 0
    ) -> list[Entry]:
        kinds = None if kinds is None else tuple(kinds)
        return await self._run(
            lambda: self._store.entries(neighbor, kinds=kinds, after_seq=after_seq)
        )

    async def latest(self, neighbor: bytes, kind: str) -> Entry | None:
        return await self._run(lambda: self._store.latest(neighbor, kind))

    async def prune(self, neighbor: bytes, kind: str, keep_last: int) -> int:
        return await self._run(lambda: self._store.prune(neighbor, kind, keep_last))

    async def verify(self) -> None:
        await self._run(self._store.verify)

    async def _run(self, call: Callable[[], T]) -> T:
        if self._closing:
            raise anyio.ClosedResourceError

        def guarded() -> T:
            # aclose may have been queued ahead of us after the check above.
            if self._store.closed:
                raise anyio.ClosedResourceError
            return call()

        return await anyio.to_thread.run_sync(guarded, limiter=self._limiter)


def _check_keep(prunes: Iterable[tuple[bytes, str, int]]) -> None:
    for _, _, keep_last in prunes:
        if keep_last < 0:
            raise LocalProtocolError(f"keep_last must be >= 0, got {keep_last}")


def _prune(conn: sqlite3.Connection, neighbor: bytes, kind: str, keep_last: int) -> int:
    """`LedgerStore.prune`'s statements, inside the caller's write transaction."""
    if keep_last == 0:
        cursor = conn.execute(
            "UPDATE entries SET body = NULL WHERE neighbor = ? AND kind = ? AND body IS NOT NULL",
            (neighbor, kind),
        )
        return cursor.rowcount
    oldest_kept = conn.execute(
        "SELECT seq FROM entries WHERE neighbor = ? AND kind = ? "
        "ORDER BY seq DESC LIMIT 1 OFFSET ?",
        (neighbor, kind, keep_last - 1),
    ).fetchone()
    if oldest_kept is None:
        return 0
    cursor = conn.execute(
        "UPDATE entries SET body = NULL "
        "WHERE neighbor = ? AND kind = ? AND seq < ? AND body IS NOT NULL",
        (neighbor, kind, oldest_kept[0]),
    )
    return cursor.rowcount


def _entry_from_row(row: _Row) -> Entry:
    neighbor, seq, kind, body, body_digest, prev_hash, digest, recorded_at = row
    return Entry(
        neighbor=neighbor,
        seq=seq,
        kind=kind,
        body=body,
        body_hash=body_digest,
        prev_hash=prev_hash,
        hash=digest,
        recorded_at=recorded_at,
    )


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
