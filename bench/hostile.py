"""An honest neighbour's traffic through a daemon under a combined attack, against the same
traffic through the same daemon just before.

T is a real `earendil-py daemon` process, started as from a shell with `ulimit -n 1024` (a
soft limit on open files; the hard limit stays). Its honest neighbour H is a real `Node` in
this process, linked to T over UDP, with debt limits no run reaches. H sends --rate
datagrams a second for --seconds, each on the onion route [T, H]: T peels a layer and sends
the packet back, H peels the last one and delivers it to itself. Each datagram carries its
sequence number and its send time, so every round trip through T is timed on one clock.

--rounds (3) rounds of two phases, then one more quiet phase; one run, the same daemon, link
and traffic throughout:
  quiet   the traffic alone;
  attack  the traffic while an attacker process (this script with --attacker: its own
          process, so it takes no CPU from H's event loop; a fresh one each round) keeps
          --idle (1,100) TCP connections open on T's TCP in_route without a byte sent, sends
          --garbage (100,000) datagrams of random bytes to the UDP port H's link uses, spread
          over the phase, and runs --flooders (8) hostile neighbours on one route cookie
          (real handshake and identity proof, tests/hostile/peer.py), each sending --calls
          (256) calls at once when the phase starts (half to a method nobody serves, half to
          one T serves and so remembers: `flood_calls`), and again every --renew seconds (60:
          as long as T remembers an answered call, so as often as each call holds a place
          in T's run-once cache);
  after   the traffic alone again once the last attacker is gone: T recovered.

Printed: each phase's delivery ratio (delivered / sent) and latency (p50, p99); what each
attacker did and what T dropped; the attack phases' figures over the quiet ones', each side
at its best over the rounds as bench/relay.py takes its figures (noise on a shared machine
only adds latency and loss) — except the p99 ratio, whose verdict is the median of the
rounds' paired ratios (each round's is printed, and best/best beside it); and T's resident
memory: VmRSS from /proc/PID/status before the first quiet phase and its highest sample
(every 0.1 s) from the first attack on, so memory kept from one attack to the next counts.
Targets, with verdicts: T alive after the attacks; honest delivery under attack >= 0.99 x
quiet; p99 under attack <= 3 x quiet; RSS growth <= 32 MB.

T runs alone on one CPU, as bench/relay.py runs the process under test; H and the attacker
share the others, the attacker at nice 19: its traffic would come from elsewhere, so its
own CPU should not be taken from T or H (it still sends all it is told to, and says so).
With one CPU all three share it.

Run: .venv/bin/python bench/hostile.py [--seconds S] [--rate R] [--rounds N] [--idle N]
     [--garbage N] [--flooders N] [--calls N] [--renew S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from summary import result

# The hostile neighbour and the probes are the test suite's (tests/hostile/peer.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from earendil_py.core.link import onion_frame
from earendil_py.core.packet import build_packet
from earendil_py.core.relay import encode_datagram
from earendil_py.netgen import Edge, debt_limits_toml, free_port, generate_network
from earendil_py.runtime.config import Config, load_config, parse_address
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import Node
from tests.hostile.harness import Daemon, route_toml
from tests.hostile.peer import (
    HostilePeer,
    Route,
    error_code,
    flood_calls,
    garbage_datagrams,
    tcp_idle,
)

SEED = 2026
DELIVERY_TARGET = 0.99  # attack / quiet
P99_TARGET = 3.0  # attack / quiet
RSS_TARGET_MB = 32.0
SOFT_NOFILE = 1024
DOCK = 7
PROBE_DOCK = 8
DEBT_LIMIT_UMEL = 10**15  # at 1 uMEL a packet, far beyond any run
DRAIN_SECS = 2.0  # after the last send, how long late datagrams may still count
READY_SECS = 30.0
RSS_SAMPLE_SECS = 0.1
FLOODER_SECS = 5.0  # a flooder's handshake, on a loaded machine
GARBAGE_BURST = 500  # datagrams the attacker sends between two looks at the clock
_STAMP = struct.Struct(">Id")  # sequence number, send time (perf_counter)

BENCH_TOML = """
[links]
keepalive_secs = 1.0
dead_after_secs = 10.0
handshake_retry_secs = 0.2

[logging]
level = "warning"
format = "json"
"""


# --- the attacker process ------------------------------------------------------------------


def attacker(spec: dict[str, Any]) -> None:
    """Hold the idle connections and connect the flooders, say "ready", then send garbage
    and calls until stdin closes; print what was done as one JSON line. What T refuses (or a
    T that died) is counted, not raised: the bench reports it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.nice(19)  # a real attacker's CPU is not ours: this one takes only what H leaves
    report: Counter[str] = Counter()
    held: list[socket.socket] = []
    for _ in range(spec["idle"]):
        try:
            held += tcp_idle(tuple(spec["tcp"]), 1)
        except OSError:
            report["idle_refused"] += 1
    route = Route("udp", tuple(spec["flood_route"]), spec["secret"])
    flooders = []
    for _ in range(spec["flooders"]):
        peer = HostilePeer(route, bytes.fromhex(spec["target"]))
        try:
            flooders.append(peer.connect(timeout=FLOODER_SECS))
        except (AssertionError, OSError):
            peer.stop()
            report["flooders_refused"] += spec["flooders"] - len(flooders)
            break  # T is not taking them: do not wait for each in turn
    garbage = garbage_datagrams(spec["garbage"], seed=SEED)
    udp = tuple(spec["udp"])
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    started = next_calls = time.monotonic()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        selectors.DefaultSelector() as selector,
    ):
        selector.register(sys.stdin, selectors.EVENT_READ)
        while not selector.select(timeout=0.01):  # until stdin closes
            now = time.monotonic()
            # The garbage spread evenly over the phase, a burst at a time.
            due = len(garbage) * (now - started) / spec["seconds"] + GARBAGE_BURST
            while report["garbage_sent"] < min(len(garbage), due):
                try:
                    sock.sendto(garbage[report["garbage_sent"]], udp)
                except OSError:
                    report["garbage_refused"] += 1
                report["garbage_sent"] += 1
            if now >= next_calls:
                next_calls += spec["renew"]
                for peer in flooders:
                    for payload in flood_calls(spec["calls"]):
                        peer.send_rpc(payload)
                    report["calls_sent"] += spec["calls"]
    for peer in flooders:
        for response in peer.calls.responses.values():
            report[f"answered {error_code(response)}"] += 1
        peer.stop()
    for held_sock in held:
        held_sock.setblocking(False)
        try:
            report["idle_closed_by_target"] += held_sock.recv(1) == b""
        except BlockingIOError:
            report["idle_held"] += 1
        except OSError:
            report["idle_closed_by_target"] += 1
        held_sock.close()
    print(json.dumps(dict(report)), flush=True)


# --- the honest neighbour ------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    name: str
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, per delivered datagram

    @property
    def delivery(self) -> float:
        return len(self.latencies) / self.sent if self.sent else 0.0

    def percentile(self, q: float) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


class Honest:
    """H: sends datagrams around [T, H] and times their return."""

    def __init__(self, node: Node, target: tuple[bytes, bytes]) -> None:
        self.node = node
        self.route = [target, (node.fingerprint, node.identity.onion_public)]

    def send(self, dock: int, payload: bytes) -> None:
        first, packet = build_packet(self.route, encode_datagram(dock, payload), os.urandom)
        self.node.relay_batch([(None, [onion_frame(first, packet)])], anyio.current_time())

    async def wait_flowing(self) -> None:
        with anyio.fail_after(READY_SECS):
            while True:
                self.send(PROBE_DOCK, b"")
                with anyio.move_on_after(0.2):
                    await self.node.receive_datagram(PROBE_DOCK)
                    return

    async def run(self, phase: Phase, seconds: float, rate: float) -> None:
        arrived: dict[int, float] = {}

        async def receive() -> None:
            while True:
                datagram = await self.node.receive_datagram(DOCK)
                seq, sent_at = _STAMP.unpack_from(datagram.data)
                arrived.setdefault(seq, time.perf_counter() - sent_at)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            start = time.perf_counter()
            count = int(seconds * rate)
            for seq in range(count):
                delay = start + seq / rate - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                self.send(DOCK, _STAMP.pack(seq, time.perf_counter()) + bytes(100))
            phase.sent = count
            deadline = time.perf_counter() + DRAIN_SECS
            while len(arrived) < count and time.perf_counter() < deadline:
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        phase.latencies = list(arrived.values())


# --- the run -------------------------------------------------------------------------------


def wait_listening(config: Config) -> None:
    """Until T answers its control API (it listens on its routes by then)."""
    deadline = time.monotonic() + READY_SECS
    while True:
        try:
            call_api(config, "GET", "/api/status")
            return
        except ControlApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


@dataclass(slots=True)
class Results:
    quiet: list[Phase] = field(default_factory=list)  # one per round
    attack: list[Phase] = field(default_factory=list)
    after: Phase = field(default_factory=lambda: Phase("after"))
    attacker: list[dict[str, Any]] = field(default_factory=list)  # what each round's did
    rss_before: float = 0.0
    rss_peak: float = 0.0
    alive: bool = False
    exit_code: int | None = None
    drops: dict[str, int] = field(default_factory=dict)


def network(root: Path) -> tuple[Any, Any, dict[str, Route]]:
    """T and H, T with a UDP and a TCP in_route for the attacker; debt limits out of reach."""
    with contextlib.ExitStack() as held:  # our ports stay ours while netgen picks its own
        ports = {p: free_port(p, held) for p in ("udp", "tcp")}
        target, honest = generate_network(root, 2, [Edge(1, 0, "udp")], extra_toml=BENCH_TOML)
    secrets_ = {p: os.urandom(16).hex() for p in ports}
    routes = "".join(route_toml(f"hostile_{p}", p, port, secrets_[p]) for p, port in ports.items())
    for node, extra in ((target, routes), (honest, "")):
        text = node.config_path.read_text() + "\n" + extra
        node.config_path.write_text(text + debt_limits_toml(node.config, DEBT_LIMIT_UMEL))
    attack_routes = {p: Route(p, ("127.0.0.1", port), secrets_[p]) for p, port in ports.items()}
    return target, honest, attack_routes


async def measure(args: argparse.Namespace, root: Path, cpus: list[int]) -> Results:
    target, honest_gen, routes = network(root)
    # T alone on the last CPU (inherited from this process at its start, so it sizes its
    # peel threads to it); H and the attacker on the others.
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[-1]})
    daemon = Daemon(target.config_path, nofile=SOFT_NOFILE)
    if len(cpus) >= 2:
        os.sched_setaffinity(0, set(cpus[:-1]))
    pid = daemon.process.pid
    config = load_config(honest_gen.config_path)
    node = Node(config, load_identity_file(config.identity_file))
    t_identity = load_identity_file(target.config.identity_file)
    honest = Honest(node, (t_identity.fingerprint, t_identity.onion_public))
    spec = {
        "tcp": routes["tcp"].address,
        "udp": parse_address(target.config.in_routes["from_node1_udp"].listen),
        "flood_route": routes["udp"].address,
        "secret": routes["udp"].secret,
        "target": target.fingerprint,
        "idle": args.idle,
        "garbage": args.garbage,
        "flooders": args.flooders,
        "calls": args.calls,
        "renew": args.renew,
        "seconds": args.seconds,
    }
    results = Results()
    samples: list[float] = []

    async def sample() -> None:
        while True:
            if (rss := rss_mb(pid)) is not None:
                samples.append(rss)
            await anyio.sleep(RSS_SAMPLE_SECS)

    try:
        async with anyio.create_task_group() as tg:
            await anyio.to_thread.run_sync(wait_listening, target.config)
            await tg.start(node.run)
            await honest.wait_flowing()
            await anyio.sleep(1.0)  # T settles after the link-up's pricing and gossip
            results.rss_before = rss_mb(pid) or 0.0
            for round_ in range(1, args.rounds + 1):
                if daemon.process.poll() is not None:
                    break
                results.quiet.append(quiet := Phase(f"quiet {round_}"))
                await honest.run(quiet, args.seconds, args.rate)
                if not samples:
                    tg.start_soon(sample)
                results.attack.append(attack := Phase(f"attack {round_}"))
                results.attacker.append(await attacked(spec, honest, attack, args))
            if daemon.process.poll() is None:
                await honest.run(results.after, args.seconds, args.rate)
            tg.cancel_scope.cancel()
    finally:
        results.exit_code = daemon.process.poll()
        if results.exit_code is None:
            try:
                results.drops = call_api(target.config, "GET", "/api/status")["drops"]
                results.alive = True
            except ControlApiError:
                results.alive = False
        daemon.stop()
    results.rss_peak = max(samples, default=results.rss_before)
    return results


async def attacked(
    spec: dict[str, Any], honest: Honest, phase: Phase, args: argparse.Namespace
) -> dict[str, Any]:
    """One attack phase: a fresh attacker process (new connections, new identities) set up,
    then H's traffic while it attacks. Returns the attacker's report."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--attacker", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        ready = await anyio.to_thread.run_sync(process.stdout.readline)
        if ready.strip() != "ready":
            raise RuntimeError(f"the attacker did not start: {ready!r}")
        process.stdin.write("go\n")
        process.stdin.flush()
        await honest.run(phase, args.seconds, args.rate)
        process.stdin.close()
        line = await anyio.to_thread.run_sync(process.stdout.readline)
        await anyio.to_thread.run_sync(process.wait, 30)
        return dict(json.loads(line)) if line.strip() else {}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def phase_line(phase: Phase) -> str:
    return (
        f"{phase.name:8}  sent {phase.sent:6,}  delivered {len(phase.latencies):6,} "
        f"({phase.delivery:.4f})  p50 {phase.percentile(50) * 1e3:7.2f} ms  "
        f"p99 {phase.percentile(99) * 1e3:7.2f} ms"
    )


# The best over the rounds, as bench/relay.py takes its figures: noise on a shared machine
# only ever adds latency and loss.
def best_delivery(phases: list[Phase]) -> float:
    return max((p.delivery for p in phases), default=0.0)


def best_p99(phases: list[Phase]) -> float:
    return min((p.percentile(99) for p in phases), default=float("nan"))


def report(args: argparse.Namespace, results: Results, cpus: list[int]) -> None:
    where = (
        f"T alone on cpu {cpus[-1]}, H and the attacker (nice 19) on the rest"
        if len(cpus) >= 2
        else "one cpu for all"
    )
    print(
        f"python {sys.version.split()[0]}, {len(cpus)} cpus ({where}), seed {SEED}; T under "
        f"`ulimit -n {SOFT_NOFILE}`; honest traffic {args.rate:g}/s for {args.seconds:g} s a "
        f"phase, {args.rounds} rounds of quiet then attack"
    )
    print(
        f"attack: {args.idle:,} idle TCP connections, {args.garbage:,} garbage datagrams, "
        f"{args.flooders} identities on one cookie x {args.calls} calls every {args.renew:g} s"
    )
    for quiet, attack in zip(results.quiet, results.attack, strict=True):
        print(phase_line(quiet))
        print(phase_line(attack))
    if results.after.sent:
        print(phase_line(results.after) + "  (quiet again, once the last attacker left)")
    for index, done in enumerate(results.attacker, 1):
        text = ", ".join(f"{k} {v:,}" for k, v in sorted(done.items()))
        print(f"  attacker {index}: {text}")
    if results.drops:
        print("  T's drops: " + ", ".join(f"{k}={v:,}" for k, v in sorted(results.drops.items())))
    how = "" if results.alive else f" (exit code {results.exit_code})"
    print(f"T alive after the attacks{how}: {verdict(results.alive)}")
    result("target alive after the attacks", int(results.alive), "", "1", results.alive)
    quiet_delivery = best_delivery(results.quiet)
    delivery = best_delivery(results.attack) / quiet_delivery if quiet_delivery else 0.0
    print(
        f"honest delivery, attack / quiet   {delivery:8.4f}  best of rounds "
        f"(target >= {DELIVERY_TARGET}: {verdict(delivery >= DELIVERY_TARGET)})"
    )
    result(
        "honest delivery, attack / quiet",
        delivery,
        "",
        f">= {DELIVERY_TARGET}",
        delivery >= DELIVERY_TARGET,
    )
    best = best_p99(results.attack) / best_p99(results.quiet)
    rounds = zip(results.quiet, results.attack, strict=True)
    paired = [attack.percentile(99) / quiet.percentile(99) for quiet, attack in rounds]
    # The verdict takes the median of the paired rounds, not the best: a p99 is a tail, and
    # the best round alone could hide an attack that hurts most of the time.
    median = statistics.median(paired)
    print(
        f"honest p99 latency, attack / quiet {median:8.2f}  median of rounds "
        f"({', '.join(f'{r:.2f}' for r in paired)}; best/best {best:.2f}) "
        f"(target <= {P99_TARGET:g}: {verdict(median <= P99_TARGET)})"
    )
    result(
        "honest p99, attack / quiet (median of rounds)",
        median,
        "x",
        f"<= {P99_TARGET:g}",
        median <= P99_TARGET,
    )
    growth = results.rss_peak - results.rss_before
    print(
        f"T's RSS {results.rss_before:.1f} MB before, {results.rss_peak:.1f} MB at most from "
        f"the first attack on: {growth:+.1f} MB (target <= {RSS_TARGET_MB:g} MB: "
        f"{verdict(growth <= RSS_TARGET_MB)})"
    )
    result(
        "target's RSS growth under attack",
        growth,
        "MB",
        f"<= {RSS_TARGET_MB:g}",
        growth <= RSS_TARGET_MB,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--rate", type=float, default=200.0, help="honest datagrams a second")
    parser.add_argument("--idle", type=int, default=1100, help="idle TCP connections")
    parser.add_argument("--garbage", type=int, default=100_000, help="garbage datagrams")
    parser.add_argument("--flooders", type=int, default=8, help="identities flooding RPC")
    parser.add_argument("--calls", type=int, default=256, help="calls each identity sends")
    parser.add_argument(
        "--renew", type=float, default=60.0, help="seconds until the identities call again"
    )
    parser.add_argument("--rounds", type=int, default=3, help="quiet then attack, each")
    parser.add_argument("--attacker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        attacker(json.loads(args.attacker))
        return 0
    if min(args.seconds, args.rate, args.renew, args.rounds) <= 0:
        parser.error("--seconds, --rate, --renew and --rounds must be positive")
    random.seed(SEED)
    configure_logging("warning", "json")
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        try:
            results = anyio.run(measure, args, Path(tmp), cpus)
        finally:
            os.sched_setaffinity(0, cpus)
    report(args, results, cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
