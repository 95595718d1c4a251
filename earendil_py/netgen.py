"""Generate identities and configs for a local network of nodes on loopback, and run them.

Used by the demo, the benchmarks and end-to-end tests: every node gets its own directory with
a 0600 identity file and a 0600 `node.toml` whose routes point at its neighbours on
127.0.0.1. `Daemons` runs them as `earendil-py daemon` processes and stops every one it
started, however the block that runs them ends. `random_network`, `wait_routed`,
`TrafficPlan`, `balance_mismatches` and `disputes` are what bench/network.py and its test do
with one.

Traffic. With a `TrafficPlan`, each node runs as `python -m earendil_py.netgen` instead of
`earendil-py daemon`: the same node (config, identity, ledger, control API, signals), plus a
task that, from SIGUSR1 on, sends datagrams to random destinations with `Node.send_datagram`
(what the control API's /api/send calls) and takes those that arrive at its dock, timing
each from its sending (CLOCK_MONOTONIC is one clock for every process on the machine).
Sending through the control API would cost each daemon ~0.8 ms of CPU per datagram in
HTTP alone (on the development VM, with a kept-alive connection), more than the relaying.

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

import argparse
import contextlib
import fcntl
import json
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from earendil_py.core.errors import LocalProtocolError
from earendil_py.runtime.config import Config, load_config
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.keyfile import (
    create_identity_file,
    load_identity_file,
    write_private_file,
)
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import Node
from earendil_py.runtime.store import claim_ledger

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

    def cpu_secs(self) -> float:
        """User and system CPU seconds the process used so far, all its threads (Linux)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """The process's resident set (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")


class Daemons:
    """Runs generated nodes as daemons: `with Daemons(nodes) as daemons:` starts one process
    per node (its log in `daemon.log` in its directory) and stops every one of them when the
    block ends, whether it ends normally, by an exception or by Ctrl-C: SIGTERM, then SIGKILL
    for any still running STOP_SECS later."""

    def __init__(
        self,
        nodes: Sequence[GeneratedNode],
        *,
        log_name: str = "daemon.log",
        traffic: TrafficPlan | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.log_name = log_name
        self.traffic = traffic
        self.running: list[RunningDaemon] = []

    def command(self, node: GeneratedNode) -> list[str]:
        config = ["--config", str(node.config_path)]
        if self.traffic is None:
            return [sys.executable, "-m", "earendil_py", "daemon", *config]
        return [sys.executable, "-m", "earendil_py.netgen", *config, *self.traffic.arguments()]

    def __enter__(self) -> list[RunningDaemon]:
        return self.start()

    def start(self) -> list[RunningDaemon]:
        """Start a daemon for every node (stopping those started if one cannot be)."""
        try:
            for node in self.nodes:
                with (node.directory / self.log_name).open("ab") as log:
                    process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                        self.command(node),
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

    def start_traffic(self) -> None:
        """Tell every node to start sending (its TrafficPlan)."""
        for daemon in self.running:
            daemon.process.send_signal(signal.SIGUSR1)

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


# --- a running network: routing, traffic, balances ---------------------------------------

# A random network's links: mean degree, price and debt limit (automatic settlement starts at
# half of it, so a few minutes of traffic settles), and how often each side pushes its claims.
RANDOM_DEGREE = 3.0
RANDOM_PRICE_UMEL = 2
RANDOM_DEBT_LIMIT_UMEL = 10_000
RANDOM_PUSH_SECS = 5.0
RANDOM_NETWORK_TOML = f"""
[accounting]
push_debt_secs = {RANDOM_PUSH_SECS}
checkpoint_secs = 1.0

[logging]
format = "json"
"""


def debt_limits_toml(config: Config, limit_umel: int) -> str:
    """TOML giving every route of `config` the debt limit `limit_umel` (benches use one no run
    reaches), to append to its file."""
    return "".join(
        f"\n[{kind}.{name}.price]\ninbound_debt_limit_umel = {limit_umel}\n"
        for kind, routes in (("in_routes", config.in_routes), ("out_routes", config.out_routes))
        for name in routes
    )


def random_edges(
    node_count: int, degree: float, seed: int, protocols: Sequence[str] = ("udp", "tcp")
) -> list[Edge]:
    """A random connected graph, the same for the same seed: a random tree (each node links
    to one drawn among those before it), then random links until the mean degree is
    `degree`. Each link's dialer and protocol are drawn too."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    for node in range(1, node_count):
        pairs.add((rng.randrange(node), node))
    wanted = max(node_count - 1, round(degree * node_count / 2))
    wanted = min(wanted, node_count * (node_count - 1) // 2)
    while len(pairs) < wanted:
        a, b = sorted(rng.sample(range(node_count), 2))
        pairs.add((a, b))
    edges = []
    for a, b in sorted(pairs):
        dialer, listener = (a, b) if rng.random() < 0.5 else (b, a)
        edges.append(Edge(dialer, listener, rng.choice(protocols)))
    return edges


def random_network(
    root: Path, node_count: int, seed: int, *, extra_links: Sequence[int] = ()
) -> tuple[list[GeneratedNode], list[Edge]]:
    """`random_edges` among `node_count` nodes, with RANDOM_NETWORK_TOML and every route's
    price and debt limit. With `extra_links`, one more node, linked over UDP to those nodes
    (it dials them), last in both lists."""
    edges = random_edges(node_count, RANDOM_DEGREE, seed)
    extra = [Edge(node_count, node, "udp") for node in extra_links]
    count = node_count + (1 if extra else 0)
    tables: dict[int, list[str]] = {i: [] for i in range(count)}
    for edge in edges + extra:
        for node, route in (
            (edge.listener, f"in_routes.from_node{edge.dialer}_{edge.protocol}"),
            (edge.dialer, f"out_routes.node{edge.listener}_{edge.protocol}"),
        ):
            tables[node] += [
                f"[{route}.price]",
                f"inbound_price_umel = {RANDOM_PRICE_UMEL}",
                f"inbound_debt_limit_umel = {RANDOM_DEBT_LIMIT_UMEL}",
                "",
            ]
    nodes = generate_network(
        root,
        count,
        edges + extra,
        extra_toml=RANDOM_NETWORK_TOML,
        node_toml={node: "\n".join(lines) for node, lines in tables.items()},
    )
    return nodes, edges + extra


def statuses(daemons: Sequence[RunningDaemon]) -> list[dict[str, Any] | None]:
    """Every daemon's /api/status (None for one that does not answer yet)."""
    found: list[dict[str, Any] | None] = []
    for daemon in daemons:
        try:
            found.append(daemon.call("GET", "/api/status", timeout=5.0))
        except ControlApiError:
            found.append(None)
    return found


def wait_answering(daemons: Sequence[RunningDaemon], timeout: float) -> None:
    """Return once every daemon answers its control API. Raises TimeoutError naming those
    that do not after `timeout` seconds, or as soon as one exited."""
    deadline = time.monotonic() + timeout
    while True:
        silent = [
            d.generated.name for d, s in zip(daemons, statuses(daemons), strict=True) if s is None
        ]
        if not silent:
            return
        gone = [d.generated.name for d in daemons if d.process.poll() is not None]
        if gone or time.monotonic() > deadline:
            raise TimeoutError(f"not answering after {timeout:g}s: {silent}; exited: {gone}")
        time.sleep(0.2)


def routed(status: dict[str, Any] | None, node_count: int, edge_count: int) -> bool:
    """Whether a node knows every node and link of the network, and has every link of its
    own priced (both offers accepted), so that it can send anywhere."""
    if status is None:
        return False
    graph = status["graph"]
    neighbors = {link["neighbor"] for link in status["links"]}
    priced = {a["neighbor"] for a in status["accounts"] if a["priced"]}
    return (
        graph["identities"] == node_count
        and graph["adjacencies"] == edge_count
        and bool(neighbors)
        and neighbors <= priced
    )


def wait_routed(
    daemons: Sequence[RunningDaemon], node_count: int, edge_count: int, timeout: float
) -> None:
    """Return once every daemon is `routed` in a network of `node_count` nodes (the daemons
    and any node run otherwise) and `edge_count` links. Raises TimeoutError naming those
    that are not after `timeout` seconds, or as soon as one exited."""
    deadline = time.monotonic() + timeout
    while True:
        late = [
            daemon.generated.name
            for daemon, status in zip(daemons, statuses(daemons), strict=True)
            if not routed(status, node_count, edge_count)
        ]
        if not late:
            return
        gone = [d.generated.name for d in daemons if d.process.poll() is not None]
        if gone or time.monotonic() > deadline:
            raise TimeoutError(f"not routed after {timeout:g}s: {late}; exited: {gone}")
        time.sleep(0.2)


def balance_mismatches(daemons: Sequence[RunningDaemon]) -> tuple[int, list[str]]:
    """(neighbour pairs compared, one line per pair whose two sides disagree on what either
    owes the other, to the µMEL)."""
    by_fingerprint = {d.generated.fingerprint: d for d in daemons}
    views: dict[tuple[str, str], tuple[int, int]] = {}
    for daemon in daemons:
        for account in daemon.call("GET", "/api/status")["accounts"]:
            key = (daemon.generated.fingerprint, account["neighbor"])
            views[key] = (account["debt_in_umel"], account["debt_out_umel"])
    pairs = 0
    mismatches = []
    for (me, neighbor), (owed_me, i_owe) in sorted(views.items()):
        if me > neighbor or neighbor not in by_fingerprint:
            continue
        pairs += 1
        theirs = views.get((neighbor, me))
        if theirs != (i_owe, owed_me):
            mismatches.append(
                f"{by_fingerprint[me].generated.name} says it is owed {owed_me} and owes "
                f"{i_owe} uMEL; {by_fingerprint[neighbor].generated.name} says "
                + ("nothing" if theirs is None else f"it owes {theirs[1]} and is owed {theirs[0]}")
            )
    return pairs, mismatches


def settlements_completed(daemons: Sequence[RunningDaemon]) -> int:
    """Settlements completed in the network, each counted once (by its proposer)."""
    return sum(
        s["role"] == "proposer" and s["state"] == "completed"
        for daemon in daemons
        for s in daemon.call("GET", "/api/settlements")["settlements"]
    )


def disputes(nodes: Sequence[GeneratedNode], log_name: str = "daemon.log") -> int:
    """How many claims the daemons disputed (`debt_dispute` in their logs)."""
    count = 0
    for line in daemon_logs(nodes, log_name):
        with contextlib.suppress(ValueError):
            count += json.loads(line).get("event") == "debt_dispute"
    return count


# --- traffic from inside the nodes ---------------------------------------------------------

TRAFFIC_FILE = "traffic.json"  # in the node's directory, written when it stops
_PAYLOAD = struct.Struct(">IId")  # the sender's number, the datagram's, its monotonic time


@dataclass(frozen=True, slots=True)
class TrafficPlan:
    """What every node sends once told to (`Daemons.start_traffic`): `rate` datagrams a
    second, for `seconds`, each to a destination drawn at random among the other nodes of
    its graph, through `hops` peelers, to `dock`. The schedule is fixed: a node that falls
    behind sends late, not less, so every node offers rate x seconds."""

    rate: float
    seconds: float
    hops: int = 3
    dock: int = 7
    seed: int = 0

    def arguments(self) -> list[str]:
        return [
            f"--{name}={getattr(self, name)}"
            for name in ("rate", "seconds", "hops", "dock", "seed")
        ]

    @property
    def count(self) -> int:
        return round(self.rate * self.seconds)


@dataclass(frozen=True, slots=True)
class TrafficReport:
    """What the nodes of a network sent and received, from their TRAFFIC_FILEs."""

    offered: int
    refused: int  # send_datagram raised: no route, say
    late_secs: float  # the latest any datagram was sent after its time
    delivered: int  # distinct datagrams that arrived
    latencies: list[float]  # seconds, one per datagram that arrived

    @classmethod
    def read(cls, nodes: Sequence[GeneratedNode]) -> TrafficReport:
        """Raises FileNotFoundError for a node that did not write its file (did it stop?)."""
        offered = refused = 0
        late = 0.0
        arrived: dict[tuple[int, int], float] = {}
        for node in nodes:
            report = json.loads((node.directory / TRAFFIC_FILE).read_text())
            offered += report["offered"]
            refused += report["refused"]
            late = max(late, report["late_secs"])
            for sender, number, seconds in report["received"]:
                arrived.setdefault((sender, number), seconds)
        return cls(offered, refused, late, len(arrived), sorted(arrived.values()))


async def _send_traffic(node: Node, plan: TrafficPlan, me: int, report: dict[str, Any]) -> None:
    rng = random.Random(plan.seed * 1_000_003 + me)
    others = [d.fingerprint for d in node.graph.identities() if d.fingerprint != node.fingerprint]
    padding = rng.randbytes(64)
    at = time.monotonic() + rng.random() / plan.rate  # each node's own phase
    for number in range(plan.count):
        report["offered"] += 1
        delay = at - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)
        else:
            report["late_secs"] = max(report["late_secs"], -delay)
        payload = _PAYLOAD.pack(me, number, time.monotonic()) + padding
        try:
            node.send_datagram(rng.choice(others), plan.dock, payload, hops=plan.hops)
        except LocalProtocolError:
            report["refused"] += 1
        at += 1 / plan.rate


async def _receive_traffic(node: Node, dock: int, received: list[list[float]]) -> None:
    while True:
        datagram = await node.receive_datagram(dock)
        sender, number, sent_at = _PAYLOAD.unpack_from(datagram.data)
        received.append([sender, number, time.monotonic() - sent_at])


async def _run_traffic_node(config: Config, plan: TrafficPlan, me: int) -> None:
    node = Node(config, load_identity_file(config.identity_file))
    report: dict[str, Any] = {"offered": 0, "refused": 0, "late_secs": 0.0, "received": []}
    stops = (signal.SIGINT, signal.SIGTERM)
    try:
        with anyio.open_signal_receiver(*stops, signal.SIGUSR1) as signals:
            await node.bind()
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                tg.start_soon(_receive_traffic, node, plan.dock, report["received"])
                async for signum in signals:
                    if signum in stops:
                        break
                    tg.start_soon(_send_traffic, node, plan, me, report)
                tg.cancel_scope.cancel()
    finally:
        write_private_file(config.source.parent / TRAFFIC_FILE, json.dumps(report))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m earendil_py.netgen --config node.toml --rate R ...`: a generated node with
    a TrafficPlan (see the module docstring). Its number is the N of its nodeN directory."""
    parser = argparse.ArgumentParser(prog="python -m earendil_py.netgen")
    parser.add_argument("--config", type=Path, required=True)
    for name, kind in (("rate", float), ("seconds", float), ("hops", int), ("dock", int)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.umask(0o077)
    config = load_config(args.config, private=True)
    configure_logging(config.logging.level, config.logging.format)
    claim_ledger(config.db_path, config.identity_file)
    plan = TrafficPlan(args.rate, args.seconds, args.hops, args.dock, args.seed)
    me = int(args.config.parent.name.removeprefix("node"))
    anyio.run(_run_traffic_node, config, plan, me)


if __name__ == "__main__":
    main()
