"""Generate identities and configs for a local network of nodes on loopback, and run them.

Used by the demo, the benchmarks and end-to-end tests: every node gets its own directory with
a 0600 identity file and a 0600 `node.toml` whose routes point at its neighbours on
127.0.0.1. `Daemons` runs them as `earendil-py daemon` processes and stops every one it
started, however the block that runs them ends.

Ports. A port is written into two configs (the listener's and the dialer's) before either
daemon starts, so it must stay free until the listener binds it, which for the last of a
hundred daemons starting on a small machine is tens of seconds later. A port the kernel
picks for `bind(("127.0.0.1", 0))` cannot: it comes from the ephemeral range, from which the
kernel also picks the local port of every outgoing connection and connected UDP socket on
the machine, the daemons' own dials included. So netgen picks ports below the ephemeral
range (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel never hands out by
itself, and reserves them across processes: a file per port in a shared directory, created
under a lock, marks it taken for RESERVATION_SECS; a port that is reserved, or that a test
bind finds in use, is not chosen. Only a program binding such a port explicitly, without
netgen, can still take one in the window. (The alternative, daemons binding port 0 and
reporting what they got, needs every dialer's config rewritten and reloaded after its
listeners started.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earendil_py.runtime.config import Config, load_config
from earendil_py.runtime.http import call_api
from earendil_py.runtime.keyfile import create_identity_file, write_private_file

PORT_LOW = 10_000  # above the well-known and most commonly configured ports
RESERVATION_SECS = 180.0
RESERVATIONS = Path(tempfile.gettempdir()) / f"earendil_py-ports-{os.getuid()}"
_PICK_ATTEMPTS = 20_000
STOP_SECS = 10.0  # a daemon that has not stopped this long after SIGTERM is killed


@dataclass(frozen=True, slots=True)
class Edge:
    """A link: `dialer` dials `listener`'s in_route over `protocol`."""

    dialer: int
    listener: int
    protocol: str


@dataclass(frozen=True, slots=True)
class GeneratedNode:
    name: str
    directory: Path
    config_path: Path
    fingerprint: str
    config: Config


def ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's, else the IANA default)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    except OSError:
        return 49_152
    return int(text.split()[0])


def reserve_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1, free for TCP and UDP now, below the ephemeral
    range, and reserved against every other caller for RESERVATION_SECS (see the module
    docstring). Raises RuntimeError if the range has no free port left."""
    low, high = PORT_LOW, ephemeral_port_low()
    RESERVATIONS.mkdir(mode=0o700, exist_ok=True)
    chosen: list[int] = []
    pick = random.Random().randrange
    with (RESERVATIONS / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        now = time.time()
        for _ in range(_PICK_ATTEMPTS):
            if len(chosen) == count:
                return chosen
            port = pick(low, high)
            marker = RESERVATIONS / str(port)
            with contextlib.suppress(FileNotFoundError):
                if port in chosen or now - marker.stat().st_mtime < RESERVATION_SECS:
                    continue
            if not _bindable(port):
                continue
            marker.touch()
            chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise RuntimeError(f"no {count} free ports between {low} and {high}")


def free_port(protocol: str, held: contextlib.ExitStack | None = None) -> int:
    """One port from `reserve_ports`; with `held`, a `protocol` socket also stays bound on
    it until that stack closes."""
    port = reserve_ports(1)[0]
    if held is not None:
        kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        held.enter_context(socket.socket(socket.AF_INET, kind)).bind(("127.0.0.1", port))
    return port


def _bindable(port: int) -> bool:
    """Whether both a TCP listener (as anyio binds one) and a UDP socket can bind `port`."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def generate_network(
    root: Path,
    node_count: int,
    edges: list[Edge],
    *,
    extra_toml: str = "",
    node_toml: Mapping[int, str] | None = None,
) -> list[GeneratedNode]:
    """Write `root/nodeN/{node.key,node.toml}` for each node and return them validated.

    `extra_toml` (tables such as `[links]`) is appended to every node's config, and
    `node_toml[N]` to node N's only (e.g. a route's `price` table).
    """
    root.mkdir(parents=True, exist_ok=True)
    fingerprints = []
    for index in range(node_count):
        directory = root / f"node{index}"
        directory.mkdir(exist_ok=True)
        fingerprints.append(create_identity_file(directory / "node.key").fingerprint.hex())

    ports = iter(reserve_ports(len(edges) + node_count))
    sections: list[list[str]] = [[] for _ in range(node_count)]
    for edge in edges:
        port = next(ports)
        secret = secrets.token_hex(16)
        route = f"from_node{edge.dialer}_{edge.protocol}"
        sections[edge.listener] += [
            f"[in_routes.{route}]",
            f'protocol = "{edge.protocol}"',
            f'listen = "127.0.0.1:{port}"',
            f'secret = "{secret}"',
            "",
        ]
        sections[edge.dialer] += [
            f"[out_routes.node{edge.listener}_{edge.protocol}]",
            f'protocol = "{edge.protocol}"',
            f'connect = "127.0.0.1:{port}"',
            f'fingerprint = "{fingerprints[edge.listener]}"',
            f'secret = "{secret}"',
            "",
        ]

    nodes = []
    for index in range(node_count):
        directory = root / f"node{index}"
        config_path = directory / "node.toml"
        header = [
            'identity_file = "node.key"',
            'db_path = "node.db"',
            f'control_listen = "127.0.0.1:{next(ports)}"',
            "",
        ]
        own = (node_toml or {}).get(index, "")
        # 0600 from the start: it holds the route cookies, and the daemon refuses it otherwise.
        write_private_file(config_path, "\n".join([*header, *sections[index], extra_toml, own]))
        nodes.append(
            GeneratedNode(
                name=f"node{index}",
                directory=directory,
                config_path=config_path,
                fingerprint=fingerprints[index],
                config=load_config(config_path),
            )
        )
    return nodes


@dataclass
class RunningDaemon:
    """One `earendil-py daemon` process of a generated node."""

    generated: GeneratedNode
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, method: str, path: str, body: object | None = None, **kw: Any) -> Any:
        """The node's control API (`runtime.http.call_api`, with the token the daemon wrote);
        raises ControlApiError."""
        return call_api(self.generated.config, method, path, body, **kw)


class Daemons:
    """Runs generated nodes as daemons: `with Daemons(nodes) as daemons:` starts one process
    per node (its log in `daemon.log` in its directory) and stops every one of them when the
    block ends, whether it ends normally, by an exception or by Ctrl-C: SIGTERM, then SIGKILL
    for any still running STOP_SECS later."""

    def __init__(self, nodes: Sequence[GeneratedNode], *, log_name: str = "daemon.log") -> None:
        self.nodes = list(nodes)
        self.log_name = log_name
        self.running: list[RunningDaemon] = []

    def __enter__(self) -> list[RunningDaemon]:
        return self.start()

    def start(self) -> list[RunningDaemon]:
        """Start a daemon for every node (stopping those started if one cannot be)."""
        try:
            for node in self.nodes:
                with (node.directory / self.log_name).open("ab") as log:
                    process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                        [
                            sys.executable,
                            "-m",
                            "earendil_py",
                            "daemon",
                            "--config",
                            str(node.config_path),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                    )
                self.running.append(RunningDaemon(node, process))
        except BaseException:
            self.stop()
            raise
        return self.running

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[int | None]:
        """Stop every daemon started; returns their exit statuses (None: it was killed)."""
        for daemon in self.running:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECS
        statuses: list[int | None] = []
        for daemon in self.running:
            try:
                statuses.append(daemon.process.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
                statuses.append(None)
        return statuses


def daemon_logs(nodes: Sequence[GeneratedNode], log_name: str = "daemon.log") -> Iterator[str]:
    """The lines of every node's daemon log, node after node."""
    for node in nodes:
        path = node.directory / log_name
        if path.exists():
            yield from path.read_text(errors="replace").splitlines()
