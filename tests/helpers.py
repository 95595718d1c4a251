"""Helpers shared by core and runtime tests."""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from earendil_py.cli import main
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.config import Config, load_config
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import Node


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom."""
    return random.Random(seed).randbytes


class DaemonProcess:
    """An `earendil-py daemon` subprocess whose JSON log lines are collected as they come."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "earendil_py", "daemon", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float, after: int = 0, **fields: Any) -> dict[str, Any]:
        """The first matching log event at index >= `after`; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for logged in self.events[after:]:
                    if logged.get("event") == event and all(
                        logged.get(k) == v for k, v in fields.items()
                    ):
                        return logged
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {event} {fields} within {timeout}s: {self.events}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout)
            assert self.process.stderr is not None
            self.process.stderr.close()


class UdpProxy:
    """A misbehaving wire between one UDP client and one server, on loopback.

    Every datagram is lost with probability `loss`, sent twice if `duplicate`, and held back
    to swap places with the next one if `reorder`. Run `serve()` in a task group.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        loss: float = 0.0,
        duplicate: bool = False,
        reorder: bool = False,
        seed: int = 0,
    ) -> None:
        self.target = target
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self._random = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.setblocking(False)
        self.back.connect(target)
        self.address: tuple[str, int] = self.front.getsockname()
        self.client: tuple[str, int] | None = None
        self.forwarded = 0
        self.reordered = 0
        self._held: dict[int, bytes] = {}

    def _emit(self, sock: socket.socket, data: bytes, to: tuple[str, int] | None) -> None:
        if self._random.random() < self.loss:
            return
        if self.reorder and self._random.random() < 0.5 and id(sock) not in self._held:
            self._held[id(sock)] = data
            self.reordered += 1
            return
        copies = [data, data] if self.duplicate else [data]
        held = self._held.pop(id(sock), None)
        if held is not None:
            copies.append(held)
        for copy in copies:
            self.forwarded += 1
            with contextlib.suppress(OSError):  # the server may be down, as on a real wire
                sock.sendto(copy, to) if to else sock.send(copy)

    async def serve(self) -> None:
        import anyio

        async def pump_front() -> None:
            while True:
                await anyio.wait_readable(self.front)
                data, self.client = self.front.recvfrom(65535)
                self._emit(self.back, data, None)

        async def pump_back() -> None:
            while True:
                await anyio.wait_readable(self.back)
                try:
                    data = self.back.recv(65535)
                except ConnectionRefusedError:
                    continue
                if self.client is not None:
                    self._emit(self.front, data, self.client)

        with self.front, self.back:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump_front)
                tg.start_soon(pump_back)


# --- in-process networks on loopback ---------------------------------------------------

FAST = """
[links]
keepalive_secs = 0.5
dead_after_secs = 3.0
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.5

[logging]
format = "json"
"""

LINE = [Edge(0, 1, "udp"), Edge(1, 2, "tcp"), Edge(2, 3, "udp"), Edge(3, 4, "tcp")]
RING = [*LINE, Edge(4, 0, "udp")]


def make_nodes(
    tmp_path: Path,
    count: int,
    edges: list[Edge],
    *,
    extra_toml: str = "",
    node_toml: dict[int, str] | None = None,
) -> list[Node]:
    generated = generate_network(
        tmp_path, count, edges, extra_toml=FAST + extra_toml, node_toml=node_toml
    )
    return [node_from(g.config) for g in generated]


def node_from(config: Config) -> Node:
    return Node(config, load_identity_file(config.identity_file))


@asynccontextmanager
async def running(nodes: list[Node]) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        for node in nodes:
            await tg.start(node.run)
        yield tg
        tg.cancel_scope.cancel()


async def converged(nodes: list[Node], edges: list[Edge]) -> None:
    """Wait until every node's graph has every node and every link, and every link is
    priced (both offers accepted), so traffic flows."""
    while not all(
        node.graph.statistics().identities == len(nodes)
        and node.graph.statistics().adjacencies == len(edges)
        and all(
            (neighbor := node.accounts.get(fp)) is not None and neighbor.priced for fp in node.links
        )
        for node in nodes
    ):
        await anyio.sleep(0.05)


# --- daemons seen through their control API -------------------------------------------


# A line that a node in this process logged (structlog's console renderer), not a CLI's.
_NODE_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


async def cli_beside_nodes(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a thread while nodes run in this process: its exit code, stdout and
    stderr. The nodes log to the same stdout meanwhile; their lines are left out."""
    capsys.readouterr()

    def own(text: str) -> str:
        lines = text.splitlines(keepends=True)
        return "".join(line for line in lines if not _NODE_LOG_LINE.match(line))

    code = await anyio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return code, own(out), own(err)


def daemon_api(config_path: Path, method: str, path: str, body: object | None = None) -> Any:
    return call_api(load_config(config_path), method, path, body)


def summary_of(config_path: Path, neighbor: str) -> dict[str, Any]:
    """The daemon's account with `neighbor` (hex), from /api/status."""
    status = daemon_api(config_path, "GET", "/api/status")
    (found,) = [a for a in status["accounts"] if a["neighbor"] == neighbor]
    return found


def daemon_priced(config_path: Path, neighbor: str) -> bool:
    return bool(summary_of(config_path, neighbor)["priced"])


def wait_until(check: Callable[[], bool], timeout: float) -> None:
    """Poll `check` until true. A daemon not answering yet (still starting) or without the
    account yet counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (ControlApiError, ValueError):
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def run_cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`earendil-py ARGV` in a process of its own, run to its end (bounded by `timeout`)."""
    return subprocess.run(
        [sys.executable, "-m", "earendil_py", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- strangers on a TCP in_route -----------------------------------------------------

# What a stranger (no cookie) may do to a TCP in_route before any handshake, and the drop
# reason a node counts for it.
TCP_STRANGERS = {
    "close": "tcp_probe",  # connect, then close at once
    "reset": "tcp_probe",  # connect, then reset (SO_LINGER 0)
    "zero_length": "bad_frame",  # a length prefix of 0
    "huge_length": "bad_frame",  # a length prefix of 0xFFFF, then silence
    "garbage": "tcp_probe",  # a well-framed message that is no handshake
}


def tcp_stranger(address: tuple[str, int], attack: str) -> bytes:
    """Connect to `address` and misbehave as TCP_STRANGERS[`attack`] says; returns what came
    back before the connection closed (a node closes such connections without a byte)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(address)
        if attack == "reset":
            linger_now = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_now)
            return b""
        if attack == "close":
            return b""
        payload = {
            "zero_length": b"\0\0",
            "huge_length": b"\xff\xff",
            "garbage": b"\0\x64" + random.Random(7).randbytes(100),
        }[attack]
        sock.sendall(payload)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def silent_tcp_connections(address: tuple[str, int], count: int) -> list[socket.socket]:
    """`count` connections to `address` that never send a byte (a slow loris)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    connections = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        sock.connect(address)
        connections.append(sock)
    return connections


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed `sock` (EOF or reset); waits up to its timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def move_route_to_ipv6(generated: list[Any], listener: int, route: str) -> None:
    """Rewrite the configs so that `listener`'s in_route `route` listens on ::1 and its dialer
    connects there: then that neighbour comes from another source address than strangers
    on 127.0.0.1. Reload the configs (`load_config`) afterwards."""
    listen = generated[listener].config.in_routes[route].listen
    for node in generated:
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace(listen, listen.replace("127.0.0.1", "[::1]")))
