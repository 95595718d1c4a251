"""The daemon process: a node plus signal handling, the open-files limit and the exit status."""

from __future__ import annotations

import resource
import signal

import anyio
import structlog

from earendil_py.core.identity import Identity
from earendil_py.runtime.config import Config
from earendil_py.runtime.node import Node

log = structlog.get_logger("earendil_py.daemon")

# Each stops the node cleanly. SIGHUP too: a daemon whose terminal or supervisor goes away
# should not die half-way (its default action); it does not reload the config (yet).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_NODE_FAILED = 1


async def run_daemon(config: Config, identity: Identity) -> None:
    """Run a node until SIGINT, SIGTERM or SIGHUP, then stop cleanly (every link is told with
    a CLOSE, the ledger is checkpointed and closed, sockets are closed).

    Raises ConfigError or LedgerCorrupt if the node cannot start (a port is taken, the ledger
    fails its checks). If the node fails while running (its ledger cannot be written, a
    listening socket is gone, a bug outside any peer's fault boundary), logs `node_failed` in
    one line and exits the process with status EXIT_NODE_FAILED.
    """
    node = Node(config, identity)
    await node.bind()  # fail before anything starts if a port is taken
    raise_open_files_limit()
    try:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                async for signum in signals:
                    log.info("shutdown", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    break
    except Exception as exc:
        log.error("node_failed", error=_describe(exc), exc_info=exc)
        raise SystemExit(EXIT_NODE_FAILED) from None


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit: every connection and session
    costs a descriptor, and the usual soft limit of 1024 is soon reached by a public relay."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open_files_limit", soft=soft, hard=hard)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps lower
        log.warning("open_files_limit", soft=soft, hard=hard, error=str(exc))
        return
    log.info("open_files_limit", soft=hard, hard=hard, raised_from=soft)


def _describe(exc: BaseException) -> str:
    """What failed, in one line: each exception in a (task) group as `Type: message`."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
