"""The daemon process: a node plus signal handling (stop, reload), the open-files limit and
the exit status."""

from __future__ import annotations

import resource
import signal

import anyio
import structlog

from earendil_py.core.errors import ConfigError
from earendil_py.core.identity import Identity
from earendil_py.runtime.config import Config, check_own_routes, load_config
from earendil_py.runtime.faults import is_node_failure
from earendil_py.runtime.node import Node

log = structlog.get_logger("earendil_py.daemon")

# Each stops the node cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Reloads the config file, as daemons do (and never kills the node, SIGHUP's default action).
RELOAD_SIGNAL = signal.SIGHUP
EXIT_NODE_FAILED = 1


async def run_daemon(config: Config, identity: Identity) -> None:
    """Run a node until SIGINT or SIGTERM, then stop cleanly (every link is told with a
    CLOSE, the ledger is checkpointed and closed, sockets are closed). SIGHUP reloads the
    config file (`Node.reload`); a config that fails its checks is logged (`reload_failed`,
    its one-line error) and the running one kept.

    Raises ConfigError or LedgerCorrupt if the node cannot start (a port is taken, the ledger
    fails its checks). If the node fails while running (its ledger cannot be written, a
    listening socket is gone, a bug outside any peer's fault boundary), logs `node_failed` in
    one line and exits the process with status EXIT_NODE_FAILED.
    """
    # Caught from the start: a signal while the node starts stops it once it has started.
    with anyio.open_signal_receiver(*STOP_SIGNALS, RELOAD_SIGNAL) as signals:
        node = Node(config, identity)
        await node.bind()  # fail before anything starts if a port is taken
        raise_open_files_limit()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                async for signum in signals:
                    if signum == RELOAD_SIGNAL:
                        await _reload(node, identity)
                        continue
                    log.info("shutdown", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    break
        except Exception as exc:
            _log_failure(exc, config)
            raise SystemExit(EXIT_NODE_FAILED) from None


async def _reload(node: Node, identity: Identity) -> None:
    source = node.config.source
    log.info("reload", signal=RELOAD_SIGNAL.name, config=str(source))
    try:
        config = load_config(source, private=True)
        check_own_routes(config, identity.fingerprint)
        await node.reload(config)
    except ConfigError as exc:
        log.error("reload_failed", error=str(exc))


def _log_failure(exc: Exception, config: Config) -> None:
    """One `node_failed` line; a traceback only for a bug."""
    failures = _leaves(exc)
    error = "; ".join(f"{type(failure).__name__}: {failure}" for failure in failures)
    if is_node_failure(exc):
        log.error("node_failed", error=error, ledger=str(config.db_path))
    elif all(isinstance(failure, OSError) for failure in failures):
        log.error("node_failed", error=error)  # a socket gone: no traceback to read
    else:  # a bug outside any peer's fault boundary
        log.error("node_failed", error=error, exc_info=exc)


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


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in `exc`, task groups unwrapped."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
