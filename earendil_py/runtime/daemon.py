"""The daemon process: a node plus signal handling."""

from __future__ import annotations

import signal

import anyio
import structlog

from earendil_py.core.identity import Identity
from earendil_py.runtime.config import Config
from earendil_py.runtime.node import Node

log = structlog.get_logger("earendil_py.daemon")


async def run_daemon(config: Config, identity: Identity) -> None:
    """Run a node until SIGINT or SIGTERM, then shut down (links are told, sockets closed).

    Raises OSError if a listen address cannot be bound.
    """
    node = Node(config, identity)
    await node.bind()  # fail before anything starts if a port is taken
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            async for signum in signals:
                log.info("shutdown", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                break
