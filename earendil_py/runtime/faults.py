"""Fault boundaries: a failure while handling one peer's input ends at most that peer's
connection or link, never the node (DESIGN.md, "Three rules").

A `Boundary` wraps the handling of one peer's input: a TCP connection, a link's frames or
timers, one control message, one task started for a neighbour. An Exception raised inside is
counted by reason in the boundary's drop counter (a RemoteProtocolError by its own reason,
anything else, a bug, as `internal_error`), then the boundary's `end` callback, if any, ends
what failed (a link is closed with that reason) and the code after the `with` block runs on.
A bug is logged with its traceback, at most once per LOG_INTERVAL_SECS for each place and
exception type, with the count of those not logged since: a peer that can trigger a bug cannot
flood the log with it.

Two kinds of exception go through every boundary: cancellation and the other BaseExceptions
(never ours to catch), and the node's own failures (`is_node_failure`: its ledger cannot be
written or read, or fails its checks), which no peer causes and which stop the node.

A boundary costs two method calls when nothing is raised, so the relay loop puts one around
each link's share of a batch.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any

from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.ledger import LedgerCorrupt

LOG_INTERVAL_SECS = 60.0  # per place and exception type (or log event and key)
INTERNAL_ERROR = "internal_error"


def is_node_failure(exc: BaseException) -> bool:
    """Whether `exc` (or, for a group, any exception in it) is the node's own failure: the
    ledger's disk or file is unusable (SQLite's OperationalError: I/O error, disk full, read
    only; a plain DatabaseError: a malformed file) or fails its checks. SQLite's other errors
    (a constraint, a closed connection) are bugs, contained like any other."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(_is_node_failure) is not None
    return _is_node_failure(exc)


def _is_node_failure(exc: BaseException) -> bool:
    return isinstance(exc, (sqlite3.OperationalError, LedgerCorrupt)) or (
        type(exc) is sqlite3.DatabaseError
    )


class Faults:
    """The node's fault boundaries and their rate-limited log. `log` is a structlog logger."""

    def __init__(self, log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._logged_at: dict[tuple[str, ...], float] = {}
        self._unlogged: Counter[tuple[str, ...]] = Counter()

    def boundary(
        self, drops: Counter[str], where: str, end: Callable[[str], None] | None = None
    ) -> Boundary:
        """A reusable `with` block: see the module docstring. `where` names the place in the
        log; `end(reason)` must not raise."""
        return Boundary(self, drops, where, end)

    def contain(self, exc: Exception, drops: Counter[str], where: str) -> str:
        """Count `exc` in `drops` by reason, log it if it is a bug; returns the reason."""
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # a task group's wrapping of one task's error
        if isinstance(exc, RemoteProtocolError):
            reason = exc.reason
        else:
            reason = INTERNAL_ERROR
            self.log_bug(exc, where)
        drops[reason] += 1
        return reason

    def log_bug(
        self, exc: BaseException, where: str, event: str = INTERNAL_ERROR, **fields: Any
    ) -> None:
        """Log `exc` with its traceback as `event`, rate-limited per (event, where, type)."""
        self.log_limited(
            "error", event, (where, type(exc).__qualname__), where=where, exc_info=exc, **fields
        )

    def log_limited(self, level: str, event: str, key: tuple[str, ...], **fields: Any) -> None:
        """Log `event` unless one with the same `key` was logged in the last
        LOG_INTERVAL_SECS; the next one logged says how many were not (`unlogged`)."""
        key = (event, *key)
        now = self._clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < LOG_INTERVAL_SECS:
            self._unlogged[key] += 1
            return
        self._logged_at[key] = now
        unlogged = self._unlogged.pop(key, 0)
        getattr(self._log, level)(event, **({"unlogged": unlogged} if unlogged else {}), **fields)


class Boundary:
    """See the module docstring and `Faults.boundary`."""

    __slots__ = ("_drops", "_end", "_faults", "_where")

    def __init__(
        self,
        faults: Faults,
        drops: Counter[str],
        where: str,
        end: Callable[[str], None] | None,
    ) -> None:
        self._faults = faults
        self._drops = drops
        self._where = where
        self._end = end

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if not isinstance(exc, Exception) or is_node_failure(exc):
            return False
        reason = self._faults.contain(exc, self._drops, self._where)
        if self._end is not None:
            self._end(reason)
        return True
