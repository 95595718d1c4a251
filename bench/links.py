"""Idle links: what one daemon spends, in memory and CPU, on links that carry no traffic.

One `earendil-py daemon` with one UDP in_route; this process opens LINKS links to it from
lightweight clients: each is a core `Link` (the same Noise handshake, identity proof and
keepalives as a node's) with an identity of its own, all on one UDP socket, driven by this
process without a node around them. A client does what a neighbour does once the link is
up, so that the daemon has nothing left to do for it: it asks for its adjacency in the relay
graph (so the daemon's gossip does not keep asking), prices the link with a core `Neighbor`
of its own (the daemon's offer accepted and its own accepted by the daemon, the RPC answered
and sent as a node would, with no ledger), and answers keepalives. A link left unpriced
would not be idle: the daemon pushes its offer again every few seconds until it is answered.
Clients open their links at most MAX_HANDSHAKING_PER_SOURCE at a time, as the daemon admits
from one address.

For each size in --links (default 100 and 1,000), cumulatively on the same daemon: open the
links, wait --settle seconds for the set-up work to end (default SETTLE_SECS, two keepalive
intervals: a link is idle from the first keepalive after an interval that carried only
keepalives; each neighbour's first claim, one of zero packets each way, comes later, one
`push_debt_secs` (60 s) after its link was priced: `--settle 75` waits for those), then read the
daemon's resident set (VmRSS) and its CPU time (user + system, every thread) over
--seconds. Printed: RSS per link against the daemon with no link (measured the same way
before the first), and the idle CPU as a share of one core. Targets at 1,000 links:
<= 8 KiB per link, <= 2 % of a core.

The keepalives are real work that an idle link still costs: every `keepalive_secs` (5 s by
default) each client, the side that dialled, sends a PING and the daemon answers it. So is
what the daemon does for each neighbour on its own timers (gossip, accounting, settlement),
which is measured too.

RSS counts what the set-up left behind as well as what the links hold: memory freed after
a thousand handshakes and graph floods stays in the allocator's pools, which Python and
malloc do not hand back to the system.

Where the bytes go: with --heap, the daemon is run by this script (as `--serve-daemon`, in
its own process), which takes figures of its allocators when told to, before the first link
and after the last size settled, and prints what grew per link: the resident set by kind,
Python's small-object allocator (blocks in use, and what its arenas hold unused) and
malloc's (in use by the C libraries and larger objects, and free in its heap). --trace takes
`tracemalloc` snapshots at the same two points instead: the bytes per link that their
difference holds, by the lines of our code that allocated them (the innermost frames in
earendil_py), by source line, and by object type (a census of the collector's objects,
shallow sizes).
tracemalloc costs memory and time (the set-up of 1,000 links takes minutes), so the RSS
figures of a traced run are not the daemon's.

Run: .venv/bin/python bench/links.py [--links 100,1000] [--seconds S] [--heap | --trace]
"""

from __future__ import annotations

import _sqlite3
import argparse
import collections
import contextlib
import ctypes
import gc
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
from summary import result

from earendil_py.core.graph import adjacency_unsigned, sign_adjacency
from earendil_py.core.identity import Identity
from earendil_py.core.link import (
    MAX_HANDSHAKING_PER_SOURCE,
    ControlReceived,
    Link,
    LinkClosed,
    LinkEstablished,
    LinkTimers,
    receiver_index,
)
from earendil_py.core.messages import (
    GLOBAL_RPC_DOCK,
    AdjacencyRequest,
    DockMessage,
    decode_control,
    encode_control,
)
from earendil_py.core.neighbor import Answered, Effect, Neighbor, Policy, Refused
from earendil_py.core.pricing import AcceptanceRule, PriceTerms
from earendil_py.core.rpc import (
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    is_request,
)
from earendil_py.netgen import (
    Daemons,
    Edge,
    GeneratedNode,
    RunningDaemon,
    generate_network,
    statuses,
)
from earendil_py.runtime.config import Config, parse_address
from earendil_py.runtime.keyfile import load_identity_file

RSS_TARGET_BYTES = 8 * 1024
CPU_TARGET = 0.02
SETTLE_SECS = 12.0
SWEEP_SECS = 0.05  # the clients' timers are looked at this often
START_SECS = 30.0
SEED = 2026
TRACE_FRAMES = 8  # deep enough to reach our code from inside msgspec, pynacl, the stdlib
TRACE_TOP = 30  # rows printed per grouping
SNAPSHOT_SIGNAL = signal.SIGUSR2
SNAPSHOT_SECS = 600.0  # a traced daemon's last snapshot (census, collection, dump) is slow

DAEMON_TOML = """
[logging]
level = "error"
format = "json"
"""


@dataclass(slots=True)
class Client:
    link: Link
    identity: Identity
    up: bool = False
    closed: str | None = None
    neighbor: Neighbor | None = None  # the daemon, as this client's node would see it
    calls: dict[int, int] | None = None  # our RPC request id -> the Neighbor's call token


def client_policy(config: Config) -> Policy:
    """What the daemon's peer in the generated network would offer and accept (its only
    route's price table), as the daemon's `Neighbors.policy_for` builds it."""
    (route,) = config.out_routes.values()
    price, methods = route.price, tuple(config.settlement.methods)
    return Policy(
        terms=PriceTerms(price.inbound_price_umel, price.inbound_debt_limit_umel, methods),
        rule=AcceptanceRule(
            price.outbound_max_price_umel, price.outbound_min_debt_limit_umel, methods
        ),
        methods=methods,
    )


class Clients:
    """Lightweight link clients on one UDP socket, toward one daemon's UDP in_route."""

    def __init__(
        self,
        target: tuple[str, int],
        secret: str,
        daemon: Identity,
        policy: Policy,
    ) -> None:
        self.target = target
        self.secret = secret
        self.fingerprint = daemon.fingerprint
        self.daemon_public = daemon.identity_public
        self.policy = policy
        self.request_ids = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.by_index: dict[int, Client] = {}
        self.timers = LinkTimers()  # the daemon's defaults: the same keepalives
        self.rng = random.Random(SEED)
        self.up = 0

    def open(self) -> Client:
        identity = Identity.generate(self.rng.randbytes)
        while (index := self.rng.getrandbits(32)) in self.by_index:
            pass
        link = Link(
            initiator=True,
            identity=identity,
            static_private=os.urandom(32),
            secret=self.secret,
            local_index=index,
            now=anyio.current_time(),
            rng=os.urandom,
            expected_fingerprint=self.fingerprint,
            timers=self.timers,
        )
        client = self.by_index[index] = Client(link, identity)
        self.service(client, anyio.current_time())
        return client

    def service(self, client: Client, now: float) -> None:
        link = client.link
        while (event := link.next_event()) is not None:
            match event:
                case LinkEstablished():
                    client.up = True
                    self.up += 1
                    self._request_adjacency(client)
                    client.neighbor = Neighbor(
                        client.identity, self.daemon_public, self.policy, os.urandom
                    )
                    client.calls = {}
                    self._run(client, client.neighbor.on_link_up(time.time(), self.policy))
                case ControlReceived(payload=payload):
                    self._control(client, payload)
                case LinkClosed(reason=reason):
                    client.closed = reason
                    if client.up:
                        self.up -= 1
                    client.up = False
        for message in link.datagrams_to_send():
            # A full buffer loses it, as a wire would: the link retransmits, or its
            # keepalive notices.
            with contextlib.suppress(BlockingIOError):
                self.sock.sendto(message, self.target)

    def _request_adjacency(self, client: Client) -> None:
        now = int(time.time())
        left, right, _ = adjacency_unsigned(client.identity.fingerprint, self.fingerprint, now)
        signature = sign_adjacency(client.identity, left, right, now)
        request = AdjacencyRequest(client.identity.descriptor(now), now, signature)
        client.link.send_control(encode_control(request))

    def _control(self, client: Client, payload: bytes) -> None:
        message = decode_control(payload)
        neighbor, calls = client.neighbor, client.calls
        if not (isinstance(message, DockMessage) and message.dock == GLOBAL_RPC_DOCK):
            return
        if neighbor is None or calls is None:
            return  # no RPC before the link is up
        now = time.time()
        if is_request(message.data):
            request = decode_request(message.data)
            params = None if request.params is msgspec.UNSET else request.params
            effect = neighbor.receive_call(request.method, params, now)
            self._run(client, effect)
            reply = effect.reply
            if isinstance(reply, Refused):
                answer = encode_error(request.id, reply.code, reply.message, reply.data)
            else:
                answer = encode_result(request.id, reply)
            self._send_rpc(client, answer)
            return
        response = decode_response(message.data)
        token = calls.pop(response.id, None) if isinstance(response.id, int) else None
        if token is None:
            return
        if isinstance(response.error, msgspec.UnsetType):
            outcome: Answered | Refused = Answered(response.result)
        else:
            error = response.error
            data = None if error.data is msgspec.UNSET else error.data
            outcome = Refused(error.code, error.message, data)
        self._run(client, neighbor.receive_reply(token, outcome, now))

    def _run(self, client: Client, effect: Effect) -> None:
        """Apply a Neighbor's effect (there is no ledger to write first) and send its calls."""
        assert client.neighbor is not None and client.calls is not None
        client.neighbor.apply(effect)
        for call in effect.calls:
            self.request_ids += 1
            client.calls[self.request_ids] = call.token
            self._send_rpc(client, encode_request(self.request_ids, call.method, call.params))

    def _send_rpc(self, client: Client, payload: bytes) -> None:
        client.link.send_control(encode_control(DockMessage(GLOBAL_RPC_DOCK, payload)))

    async def receive(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            now = anyio.current_time()
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                index = receiver_index(data)
                client = self.by_index.get(index) if index is not None else None
                if client is not None:
                    client.link.receive_datagrams([data], now)
                    self.service(client, now)

    async def keep_timers(self) -> None:
        while True:
            await anyio.sleep(SWEEP_SECS)
            now = anyio.current_time()
            for client in list(self.by_index.values()):
                deadline = client.link.get_timer()
                if deadline is not None and deadline <= now:
                    client.link.handle_timer(now)
                    self.service(client, now)
                neighbor = client.neighbor
                if not client.up or neighbor is None:
                    continue  # nothing to push on a link that closed
                if (due := neighbor.get_timer()) is not None:
                    unix = time.time()
                    if due <= unix and (effect := neighbor.handle_timer(unix)) is not None:
                        self._run(client, effect)
                        self.service(client, now)

    def priced(self) -> int:
        """How many links both sides priced (as this side's Neighbors see it)."""
        return sum(1 for c in self.by_index.values() if c.up and c.neighbor and c.neighbor.priced)

    async def open_many(self, count: int) -> None:
        """Open `count` more links, never more than the daemon admits at once from one
        address still handshaking; returns once they are all up."""
        want = self.up + count
        opened = 0
        while self.up < want:
            handshaking = sum(1 for c in self.by_index.values() if not c.up and not c.closed)
            while opened < count and handshaking < MAX_HANDSHAKING_PER_SOURCE:
                self.open()
                opened += 1
                handshaking += 1
            await anyio.sleep(0.01)


async def idle(daemon: RunningDaemon, seconds: float) -> tuple[int, float]:
    """(RSS at the end, CPU share of one core) of the daemon over `seconds`."""
    start_cpu, start = daemon.cpu_secs(), time.monotonic()
    await anyio.sleep(seconds)
    cpu, elapsed = daemon.cpu_secs() - start_cpu, time.monotonic() - start
    return daemon.rss_bytes(), cpu / elapsed


async def measure(
    sizes: list[int],
    timing: tuple[float, float],
    daemon: RunningDaemon,
    clients: Clients,
    snapshot: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[int, int, float]]:
    """Rows of (links, RSS, CPU share), each after (settle, window) seconds; `snapshot` is
    awaited once with no link and once after the last size settled."""
    settle, seconds = timing
    rows = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(clients.receive)
        tg.start_soon(clients.keep_timers)
        await anyio.sleep(SETTLE_SECS)
        rss, cpu = await idle(daemon, seconds)
        rows.append((0, rss, cpu))
        if snapshot is not None:
            await snapshot()
        for size in sizes:
            start = time.monotonic()
            await clients.open_many(size - clients.up)
            print(f"  {size} links up in {time.monotonic() - start:.1f}s", flush=True)
            await anyio.sleep(settle)
            priced = clients.priced()
            if priced != clients.up:
                print(f"  only {priced} of {clients.up} links priced", flush=True)
            status = await anyio.to_thread.run_sync(daemon.call, "GET", "/api/status")
            rss, cpu = await idle(daemon, seconds)
            rows.append((len(status["links"]), rss, cpu))
        if snapshot is not None:
            await snapshot()
        tg.cancel_scope.cancel()
    return rows


# --- --heap and --trace: where the bytes go -------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_figures(directory: Path) -> dict[str, int]:
    """Where this process's memory is, in bytes: its resident set by kind (/proc), Python's
    small-object allocator (blocks in use, and what its arenas hold unused), and glibc's
    malloc (what the C libraries and Python's larger objects use, and what its heap holds
    free), tracemalloc's own memory aside."""
    figures: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            figures[name] = int(value.split()[0]) * 1024
    stats = directory / "pymalloc.txt"
    with stats.open("w") as out:  # sys._debugmallocstats writes to the C stderr
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    for line in stats.read_text().splitlines():
        name, _, value = line.rpartition("=")
        if name.startswith("# bytes in allocated blocks"):
            figures["pymalloc_used"] = int(value.replace(",", ""))
        elif " arenas * " in name:
            arenas = int(value.replace(",", ""))
    figures["pymalloc_unused"] = arenas - figures["pymalloc_used"]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    tracing = tracemalloc.get_tracemalloc_memory()
    figures["malloc_used"] = info.uordblks + info.hblkhd - tracing
    figures["malloc_free"] = info.fordblks
    sqlite = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used  # the ledger's, through malloc
    sqlite.restype = ctypes.c_int64
    figures["sqlite_used"] = sqlite()
    return figures


def serve_daemon(directory: Path, config: Path, *, trace: bool) -> int:
    """The daemon. On each SNAPSHOT_SIGNAL it writes, if `trace`, a census of the collector's
    objects by type (`N.census.json`: {name: [count, bytes]}) and a tracemalloc snapshot
    (`N.snap`, tracing from the first signal on), else `heap_figures` (`N.json`) and from the
    second signal on the same after a full collection (`N.collected.json`); then an empty
    `N.done`."""
    from earendil_py.cli import main as cli_main

    taken = 0

    def take(signum: int, frame: object) -> None:
        nonlocal taken
        if trace:
            if not tracemalloc.is_tracing():  # the start-up is not traced: it would be slow
                tracemalloc.start(TRACE_FRAMES)
            census: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
            for obj in gc.get_objects():
                entry = census[type(obj).__qualname__]
                entry[0] += 1
                entry[1] += sys.getsizeof(obj)
            tracemalloc.take_snapshot().dump(str(directory / f"{taken}.snap"))
            (directory / f"{taken}.census.json").write_text(json.dumps(census))
        else:  # tracemalloc would hide Python's allocator, whose figures these read
            (directory / f"{taken}.json").write_text(json.dumps(heap_figures(directory)))
            if taken:  # the last one (RSS was read before): what a collection would free
                gc.collect()
                after = heap_figures(directory)
                (directory / f"{taken}.collected.json").write_text(json.dumps(after))
        (directory / f"{taken}.done").touch()
        taken += 1

    signal.signal(SNAPSHOT_SIGNAL, take)
    return cli_main(["daemon", "--config", str(config)])


class ServedDaemons(Daemons):
    """Daemons run by `serve_daemon`, their figures in `directory`."""

    def __init__(self, nodes: list[GeneratedNode], directory: Path, *, trace: bool) -> None:
        super().__init__(nodes)
        self.directory = directory
        self.trace = trace

    def command(self, node: GeneratedNode) -> list[str]:
        script = str(Path(__file__).resolve())
        directory, config = str(self.directory), str(node.config_path)
        traced = ["--trace"] if self.trace else []
        return [sys.executable, script, "--serve-daemon", directory, "--config", config, *traced]


def snapshotter(daemon: RunningDaemon, directory: Path) -> Callable[[], Awaitable[None]]:
    taken = 0

    async def snapshot() -> None:
        nonlocal taken
        daemon.process.send_signal(SNAPSHOT_SIGNAL)
        with anyio.fail_after(SNAPSHOT_SECS):
            while not (directory / f"{taken}.done").exists():
                await anyio.sleep(0.1)
        taken += 1

    return snapshot


def _ours(trace: tracemalloc.Traceback) -> str:
    """The innermost frames of a traceback in our package, up to three, innermost first
    (else its innermost frame)."""
    ours = [
        f"{frame.filename.rsplit('earendil_py/', 1)[-1]}:{frame.lineno}"
        for frame in reversed(trace)  # oldest first: look from the innermost
        if "earendil_py" in frame.filename
    ]
    if ours:
        return " <- ".join(ours[:3])
    frame = trace[-1]
    return f"{frame.filename}:{frame.lineno}"


def print_heap(directory: Path, links: int) -> None:
    """What grew per link between the two `heap_figures`."""
    before = json.loads((directory / "0.json").read_text())
    after = json.loads((directory / "1.json").read_text())
    heap = {name: (value - before[name]) / links for name, value in after.items()}
    collected = json.loads((directory / "1.collected.json").read_text())
    garbage = (after["pymalloc_used"] - collected["pymalloc_used"]) / links
    print(
        "where the resident set grew, bytes per link (tracemalloc's own memory is left out "
        "of malloc's, not of RSS):\n"
        f"  RSS {heap['VmRSS']:,.0f} (anonymous {heap['RssAnon']:,.0f}, file "
        f"{heap['RssFile']:,.0f}, shared {heap['RssShmem']:,.0f})\n"
        f"  Python's small-object allocator: in use {heap['pymalloc_used']:,.0f}, "
        f"held unused in its arenas {heap['pymalloc_unused']:,.0f}; a full collection "
        f"would free {garbage:,.0f} of what is in use (unreachable cycles)\n"
        f"  malloc (C libraries, larger objects): in use {heap['malloc_used']:,.0f} (SQLite "
        f"{heap['sqlite_used']:,.0f}), free in its heap {heap['malloc_free']:,.0f}"
    )


def print_trace(directory: Path, links: int) -> None:
    """Bytes per link between the two snapshots, by our line, by source line, by type."""
    before = tracemalloc.Snapshot.load(str(directory / "0.snap"))
    after = tracemalloc.Snapshot.load(str(directory / "1.snap"))
    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(keep), after.filter_traces(keep)
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"\ntraced Python allocations: {total / links:,.0f} bytes per link")
    by_ours: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for stat in after.compare_to(before, "traceback"):
        by_ours[_ours(stat.traceback)] += stat.size_diff
        counts[_ours(stat.traceback)] += stat.count_diff
    print(f"\nby the line of ours that allocated (bytes/link, objects/link), top {TRACE_TOP}:")
    for where, size in by_ours.most_common(TRACE_TOP):
        print(f"  {size / links:8,.0f} {counts[where] / links:6.1f}  {where}")
    print(f"\nby source line (bytes/link, objects/link), top {TRACE_TOP}:")
    for stat in after.compare_to(before, "lineno")[:TRACE_TOP]:
        frame = stat.traceback[0]
        where = f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
        print(f"  {stat.size_diff / links:8,.0f} {stat.count_diff / links:6.1f}  {where}")
    census_before = json.loads((directory / "0.census.json").read_text())
    census_after = json.loads((directory / "1.census.json").read_text())
    grown = {
        name: (
            count - census_before.get(name, [0, 0])[0],
            size - census_before.get(name, [0, 0])[1],
        )
        for name, (count, size) in census_after.items()
    }
    print(
        f"\nby type, collector-tracked objects (shallow bytes/link, count/link), top {TRACE_TOP}:"
    )
    for name, (count, size) in sorted(grown.items(), key=lambda kv: -kv[1][1])[:TRACE_TOP]:
        print(f"  {size / links:8,.0f} {count / links:6.1f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="100,1000", help="sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="idle window per size")
    parser.add_argument(
        "--settle", type=float, default=SETTLE_SECS, help="wait after the links are up"
    )
    parser.add_argument(
        "--heap", action="store_true", help="print where the RSS per link goes, by allocator"
    )
    parser.add_argument(
        "--trace", action="store_true", help="print the objects per link (tracemalloc)"
    )
    parser.add_argument("--serve-daemon", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_daemon is not None:
        return serve_daemon(args.serve_daemon, args.config, trace=args.trace)
    served = args.heap or args.trace
    sizes = sorted(int(size) for size in args.links.split(","))

    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        # node0 is the daemon; node1 only gives it an in_route, and is not started.
        daemon_node, peer = generate_network(
            Path(tmp), 2, [Edge(1, 0, "udp")], extra_toml=DAEMON_TOML
        )
        (route,) = daemon_node.config.in_routes.values()
        daemon_identity = load_identity_file(daemon_node.directory / "node.key")
        traces = Path(tmp) / "traces"
        traces.mkdir()
        daemons = (
            ServedDaemons([daemon_node], traces, trace=args.trace)
            if served
            else Daemons([daemon_node])
        )
        with daemons as (daemon,):
            deadline = time.monotonic() + START_SECS
            while statuses([daemon]) == [None]:
                if time.monotonic() > deadline or daemon.process.poll() is not None:
                    raise SystemExit("the daemon did not start; see its log")
                time.sleep(0.1)
            clients = Clients(
                parse_address(route.listen),
                route.secret,
                daemon_identity,
                client_policy(peer.config),
            )
            snapshot = snapshotter(daemon, traces) if served else None
            rows = anyio.run(measure, sizes, (args.settle, args.seconds), daemon, clients, snapshot)
        if args.heap and not args.trace:
            print_heap(traces, rows[-1][0])
        if args.trace:
            print_trace(traces, rows[-1][0])
    base_rss = rows[0][1]
    print(f"python {sys.version.split()[0]}; idle windows of {args.seconds:g}s")
    print(f"{'links':>6} {'RSS MiB':>8} {'per link':>12} {'idle cpu':>9}")
    for links, rss, cpu in rows:
        per_link = (rss - base_rss) / links if links else 0
        print(f"{links:>6} {rss / 2**20:8.1f} {per_link / 1024:8.1f} KiB {cpu:8.2%}")
    links, rss, cpu = rows[-1]
    if links >= 1000:
        per_link = (rss - base_rss) / links
        result(
            f"RSS per idle link at {links}",
            per_link / 1024,
            "KiB",
            f"<= {RSS_TARGET_BYTES // 1024} KiB",
            per_link <= RSS_TARGET_BYTES,
        )
        result(
            f"idle CPU at {links} links",
            cpu * 100,
            "% of a core",
            f"<= {CPU_TARGET:.0%}",
            cpu <= CPU_TARGET,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
