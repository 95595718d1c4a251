"""One datagram's trip through 3 relays and back to this process, against 3 bare forwarders.

Three kinds of sample, each a datagram sent from this process and waited for by it, taken
interleaved (one of each kind per round, in a rotating order, a random pause of GAP_SECS
after each) so that the machine's drift hits them alike:

(bare) 3 bare Python UDP forwarders F1 -> F2 -> F3, each its own process: an anyio loop that
    waits for its socket, reads up to UDP_BATCH datagrams and sends each on with sendto. An
    onion-sized datagram goes to F1 and is waited for on a socket of this process.
(forward) 3 relay daemons R1 -> R2 -> R3 (`earendil-py daemon` from netgen configs, UDP
    links); S and D are nodes in this process, S linked to R1 and D to R3. The onion's only
    peeler is D, so each relay decrypts the link frame, sees that it is not the next peeler
    and encrypts the frame for its next link: the forwarding path. Timed from S's encryption
    of the frame to D's node delivering the datagram to the dock this process waits on.
(peel) the same with R1, R2, R3 and D as peelers: each relay also peels one layer (X25519,
    BLAKE3, ChaCha20, the replay filter).

The node kinds include S's link encryption and D's decryption, peel and wake-up of the
waiting task, which the bare kind does not have: that is charged to the node.

Then the same under load: a generator process G, a node linked to R1, sends traffic through
the chain while samples are taken, at LOAD_SHARE of the chain's capacity measured just before
(the rate at which R3 forwards, or peels, while G sends as fast as it can). Forwarding load
ends at E, a node linked to R3 whose process is stopped (SIGSTOP) once its link is priced, so
what reaches it costs the machine nothing; peeling load is peeled by R1, R2 and R3 and
delivered to a dock of R3's that nobody reads. The bare chain gets the same datagrams per
second from G, which F3 sends to a socket nobody reads. Under forwarding load the samples
are bare and forward; under peeling load, bare and peel.

Figures: median and p99 of each kind; targets: median forward <= 1.5x bare's, median peel
<= 1.5x bare's + the crypto of 3 peels (bench/peel.py's floor, measured in this run), p99 of
each <= 3x bare's p99.

Links are UDP, as the targets assume; --protocol tcp measures the same over TCP links (no
targets: see docs/benchmarks.md).

Run: .venv/bin/python bench/latency.py [--samples N] [--no-load] [--protocol tcp]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import blake3
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult
from summary import result

from earendil_py.core.link import MAX_MESSAGE_SIZE, onion_frame
from earendil_py.core.packet import BODY_SIZE, PACKET_SIZE, build_packet
from earendil_py.core.relay import encode_datagram
from earendil_py.netgen import Daemons, Edge, GeneratedNode, RunningDaemon, generate_network
from earendil_py.runtime.config import load_config
from earendil_py.runtime.http import ControlApiError
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import UDP_BATCH, LinkRunner, Node

SEED = 2026
DOCK = 7
GAP_SECS = (0.001, 0.003)  # pause after each sample, uniformly drawn
SAMPLE_TIMEOUT_SECS = 1.0  # a sample not back by then is lost (and counted)
START_SECS = 60.0
MEDIAN_TARGET = 1.5
P99_TARGET = 3.0
LOAD_SHARE = 0.5
BLAST_SECS = 1.2  # G sends as fast as it can; R3's rate is read over the middle 0.8 s
# ... but peeling load at most this fast (twice the peeling capacity of a relay here): each
# packet is used once. A capacity near it would be a lower bound, and is printed as such.
BLAST_PEEL_RATE = 12_000
PACE_SECS = 0.001  # G sends its load in ticks this far apart
LOAD_BLOCK = 50  # samples of one kind in a row under load, with the load on its chain only
LOAD_RAMP_SECS = 0.05  # load running before a block's first sample
BURST = 32  # frames per send while blasting
# Peeling load is unique packets (a relay peels each once), built before the run: enough for
# a blast (14,400) and 1,000 samples under load (~15 ms each with their pauses) at half of a
# peeling capacity of ~6,000/s, ~45,000, with room to spare. G says if it ran out.
PEEL_LOAD_PACKETS = 100_000

# S=0 R1=1 R2=2 R3=3 D=4 E=5 G=6, linked by PAIRS. Keepalives far apart, so that nothing
# but the samples and the load wakes the relays (and stopped E is not declared dead).
PAIRS = [(0, 1), (1, 2), (2, 3), (3, 4), (3, 5), (6, 1)]  # (dialer, listener)
S, R1, R2, R3, D, E, G = range(7)
BENCH_TOML = """
[links]
keepalive_secs = 300.0
dead_after_secs = 900.0

[logging]
level = "warning"
format = "json"
"""

Peer = tuple[bytes, bytes]  # fingerprint, onion public key


# --- processes of their own ------------------------------------------------------------------


class Child:
    """A process started fresh (spawn), and the pipe to it."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=target, args=(*args, theirs), daemon=True)
        self.process.start()
        theirs.close()

    def receive(self, timeout: float = START_SECS) -> Any:
        if not self.conn.poll(timeout):
            raise SystemExit("a child process did not answer in time")
        try:
            return self.conn.recv()
        except EOFError:
            raise SystemExit(f"a child process exited ({self.process.exitcode})") from None

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("stop")
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _run_forwarder(
    destination: tuple[str, int], load_sink: tuple[str, int] | None, conn: Connection
) -> None:
    """A bare forwarder: every datagram on to `destination`; with `load_sink`, those whose
    first byte is 1 (G's load) go there instead."""
    inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (inbound, outbound):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setblocking(False)
    inbound.bind(("127.0.0.1", 0))

    async def forward() -> None:
        recvfrom, sendto = inbound.recvfrom, outbound.sendto
        while True:
            await anyio.wait_readable(inbound)
            for _ in range(UDP_BATCH):
                try:
                    data, _address = recvfrom(MAX_MESSAGE_SIZE + 1)
                except BlockingIOError:
                    break
                to = load_sink if load_sink is not None and data[0] == 1 else destination
                with contextlib.suppress(OSError):  # a full buffer: lost, as on a wire
                    sendto(data, to)
            await anyio.lowlevel.checkpoint()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(forward)
            conn.send(inbound.getsockname())
            await anyio.to_thread.run_sync(conn.recv)  # "stop"
            tg.cancel_scope.cancel()

    anyio.run(main)


def _peer(config_path: Path) -> Peer:
    identity = load_identity_file(load_config(config_path).identity_file)
    return identity.fingerprint, identity.onion_public


def _frames(route: list[Peer], count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed).randbytes
    frames = []
    for _ in range(count):
        first, packet = build_packet(route, encode_datagram(DOCK, rng(100)), rng)
        frames.append(onion_frame(first, packet))
    return frames


def _build_in_parallel(route: list[Peer], count: int) -> list[bytes]:
    """`_frames` on every CPU: unique packets for a load that each relay peels once."""
    workers = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        chunks = pool.map(
            _frames,
            [route] * workers,
            [count // workers] * workers,
            [SEED + 20 + i for i in range(workers)],
        )
        return [frame for chunk in chunks for frame in chunk]


def _run_generator(
    config_path: str, routes: dict[str, list[Peer]], peel: list[bytes], conn: Connection
) -> None:
    """G: a node linked to R1 that sends load on command: ("blast", mode, seconds) as fast as
    it can; ("pace", mode, rate, None) that load at `rate` into R1, or ("pace", mode, rate,
    address) as many plain datagrams to that bare forwarder, until "end"; "stop" ends it.
    Forwarding load is not peeled on the way: a few packets, cycled; peeling load is `peel`,
    each sent once."""
    configure_logging("error", "json")
    config = load_config(Path(config_path))
    node = Node(config, load_identity_file(config.identity_file))
    forward = _frames(routes["forward"], 64, SEED + 10)
    used = {"peel": 0}
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.setblocking(False)
    payload = b"\1" + random.Random(SEED).randbytes(PACKET_SIZE + 60)

    def take(mode: str, count: int) -> list[bytes]:
        if mode == "forward":
            return [forward[i % len(forward)] for i in range(count)]
        start = used["peel"]
        used["peel"] = min(len(peel), start + count)
        return peel[start : used["peel"]]

    async def blast(runner: LinkRunner, mode: str, seconds: float) -> int:
        sent = 0
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if mode == "peel" and sent > elapsed * BLAST_PEEL_RATE:
                await anyio.sleep(PACE_SECS)
                continue
            if not (chunk := take(mode, BURST)):
                break
            runner.send_onions(runner.link.encrypt_onions(chunk))
            sent += len(chunk)
            await anyio.sleep(0)
        return sent

    async def pace(
        runner: LinkRunner, mode: str, rate: float, bare: tuple[str, int] | None
    ) -> tuple[int, int]:
        """Send in ticks of PACE_SECS until told to end; returns (sent, due)."""
        sent = due = 0
        start = time.monotonic()
        while not conn.poll():
            due = int((time.monotonic() - start) * rate)
            if bare is not None:
                for _ in range(due - sent):
                    with contextlib.suppress(OSError):
                        plain.sendto(payload, bare)
                sent = due
            elif due > sent and (chunk := take(mode, due - sent)):
                runner.send_onions(runner.link.encrypt_onions(chunk))
                sent += len(chunk)
            await anyio.sleep(PACE_SECS)
        conn.recv()  # "end"
        return sent, due

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            r1 = routes["peel"][0][0]
            with anyio.fail_after(START_SECS):
                await node.wait_priced({r1})
            runner = node.links[r1][0]
            conn.send("ready")
            while True:
                match await anyio.to_thread.run_sync(conn.recv):
                    case ("blast", mode, seconds):
                        conn.send(await blast(runner, mode, seconds))
                    case ("pace", mode, rate, bare):
                        conn.send(await pace(runner, mode, rate, bare))
                    case _:
                        break
            tg.cancel_scope.cancel()

    anyio.run(main)


# --- sampling ---------------------------------------------------------------------------------


@dataclass
class Chains:
    """What the samples go through, from this process."""

    runner: LinkRunner  # S's link to R1
    sink: Node  # D
    frames: dict[str, list[bytes]]  # per node kind, one frame per sample
    bare_out: socket.socket  # connected to F1
    bare_in: socket.socket  # what F3 sends on to
    used: int = 0

    async def sample(self, kind: str) -> float | None:
        """One sample's seconds, or None if it did not come back in time."""
        start = time.perf_counter()
        with anyio.move_on_after(SAMPLE_TIMEOUT_SECS):
            if kind == "bare":
                payload = b"\0" + self.used.to_bytes(4, "big") * 300
                self.used += 1
                self.bare_out.send(payload)
                while True:
                    await anyio.wait_readable(self.bare_in)
                    with contextlib.suppress(BlockingIOError):
                        if self.bare_in.recv(MAX_MESSAGE_SIZE + 1) == payload:
                            return time.perf_counter() - start
            else:
                frame = self.frames[kind].pop()
                self.runner.send_onions(self.runner.link.encrypt_onions([frame]))
                await self.sink.receive_datagram(DOCK)
                return time.perf_counter() - start
        return None


async def _samples(chains: Chains, kinds: list[str], count: int) -> dict[str, list[float]]:
    rng = random.Random(SEED)
    taken: dict[str, list[float]] = {kind: [] for kind in kinds}
    lost = dict.fromkeys(kinds, 0)
    for index in range(count):
        turn = index % len(kinds)
        for kind in kinds[turn:] + kinds[:turn]:
            value = await chains.sample(kind)
            if value is None:
                lost[kind] += 1
            else:
                taken[kind].append(value)
            await anyio.sleep(rng.uniform(*GAP_SECS))
        # Drain what came late (a lost sample's datagram) so it is not taken for the next.
        chains.sink.receive_datagrams_nowait(DOCK)
    if any(lost.values()):
        print(f"    samples not back within {SAMPLE_TIMEOUT_SECS}s: {lost}")
    return taken


async def _loaded_samples(
    chains: Chains,
    generator: Child,
    *,
    mode: str,
    rate: float,
    bare: tuple[str, int],
    count: int,
) -> dict[str, list[float]]:
    """Samples of bare and `mode` in alternating blocks of LOAD_BLOCK, each block with G's
    load on its own chain only: the other chain's load would take CPU from it too."""
    taken: dict[str, list[float]] = {"bare": [], mode: []}
    for block in range(0, count, LOAD_BLOCK):
        kinds = ["bare", mode] if block // LOAD_BLOCK % 2 == 0 else [mode, "bare"]
        for kind in kinds:
            generator.conn.send(("pace", mode, rate, bare if kind == "bare" else None))
            await anyio.sleep(LOAD_RAMP_SECS)
            for kind_taken in (await _samples(chains, [kind], LOAD_BLOCK)).values():
                taken[kind] += kind_taken
            generator.conn.send("end")
            sent, due = await anyio.to_thread.run_sync(generator.receive)
            if sent < 0.95 * due:
                print(f"    G ran out of {mode} load: {sent:,} of {due:,} sent")
    return taken


def _relay_count(daemon: RunningDaemon, mode: str) -> int:
    relay = daemon.call("GET", "/api/status")["relay"]
    return int(relay["forwarded" if mode == "forward" else "peeled"])


async def _capacity(generator: Child, r3: RunningDaemon, mode: str) -> float:
    """Packets/s R3 forwards (or peels) while G sends as fast as it can, over the middle
    0.8 s of the blast."""
    generator.conn.send(("blast", mode, BLAST_SECS))
    await anyio.sleep((BLAST_SECS - 0.8) / 2)
    first, start = await anyio.to_thread.run_sync(_relay_count, r3, mode), time.monotonic()
    await anyio.sleep(0.8)
    last, end = await anyio.to_thread.run_sync(_relay_count, r3, mode), time.monotonic()
    await anyio.to_thread.run_sync(generator.receive)
    await anyio.sleep(0.5)  # the chain works off its backlog
    return (last - first) / (end - start)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    samples: dict[str, list[float]]
    load: float = 0.0  # packets/s offered by G
    capacity: float = 0.0


def _node(generated: GeneratedNode) -> Node:
    config = load_config(generated.config_path)
    return Node(config, load_identity_file(config.identity_file))


async def _wait_priced(daemon: RunningDaemon, neighbor: str) -> None:
    with anyio.fail_after(START_SECS):
        while True:
            with contextlib.suppress(ControlApiError):
                status = await anyio.to_thread.run_sync(daemon.call, "GET", "/api/status")
                if any(a["neighbor"] == neighbor and a["priced"] for a in status["accounts"]):
                    return
            await anyio.sleep(0.1)


async def _first_delivery(source: Node, sink: Node, relay: bytes) -> LinkRunner:
    """Send probes S -> ... -> D until one arrives: every link up and priced."""
    route = [(sink.fingerprint, sink.identity.onion_public)]
    with anyio.fail_after(START_SECS):
        while True:
            runners = source.links.get(relay)
            if runners and runners[0].neighbor is not None and runners[0].neighbor.priced:
                first, packet = build_packet(route, encode_datagram(DOCK, b""), os.urandom)
                runners[0].send_onions([runners[0].link.encrypt_onion(first, packet)])
                with anyio.move_on_after(0.2):
                    await sink.receive_datagram(DOCK)
                    return runners[0]
            await anyio.sleep(0.1)


async def _run(args: argparse.Namespace, net: list[GeneratedNode]) -> list[Phase]:
    source, sink = _node(net[S]), _node(net[D])
    peers = {i: _peer(net[i].config_path) for i in (R1, R2, R3, D, E)}
    sample_routes = {"forward": [peers[D]], "peel": [peers[R1], peers[R2], peers[R3], peers[D]]}
    load_routes = {"forward": [peers[E]], "peel": [peers[R1], peers[R2], peers[R3]]}
    bare_in = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bare_in.bind(("127.0.0.1", 0))
    bare_in.setblocking(False)
    nobody = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where the bare load ends
    nobody.bind(("127.0.0.1", 0))
    children: list[Child] = []
    phases: list[Phase] = []
    try:
        destination = bare_in.getsockname()
        for index in range(3):
            load_sink = nobody.getsockname() if index == 0 else None  # F3 is started first
            children.append(Child(_run_forwarder, destination, load_sink))
            destination = children[-1].receive()
        bare_out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        bare_out.connect(destination)
        with Daemons([net[R1], net[R2], net[R3], net[E]]) as daemons:
            r3, e = daemons[2], daemons[3]
            if not args.no_load:
                peel_load = _build_in_parallel(load_routes["peel"], PEEL_LOAD_PACKETS)
                children.append(
                    Child(_run_generator, str(net[G].config_path), load_routes, peel_load)
                )
                del peel_load
            async with anyio.create_task_group() as tg:
                await tg.start(source.run)
                await tg.start(sink.run)
                runner = await _first_delivery(source, sink, peers[R1][0])
                frames = {
                    kind: _frames(route, 3 * args.samples, SEED + i)
                    for i, (kind, route) in enumerate(sample_routes.items())
                }
                chains = Chains(runner, sink, frames, bare_out, bare_in)
                if not args.no_load:
                    generator = children[-1]
                    generator.receive()
                    await _wait_priced(r3, net[E].fingerprint)
                    os.kill(e.pid, signal.SIGSTOP)  # E takes the forwarding load: at no cost
                kinds = ["bare", "forward", "peel"]
                phases.append(Phase("no load", await _samples(chains, kinds, args.samples)))
                if not args.no_load:
                    for mode in ("forward", "peel"):
                        capacity = await _capacity(generator, r3, mode)
                        rate = LOAD_SHARE * capacity
                        taken = await _loaded_samples(
                            chains,
                            generator,
                            mode=mode,
                            rate=rate,
                            bare=destination,
                            count=args.samples,
                        )
                        phases.append(Phase(f"{mode} load", taken, rate, capacity))
                tg.cancel_scope.cancel()
            if not args.no_load:
                os.kill(e.pid, signal.SIGCONT)  # so that it can stop
        return phases
    finally:
        for child in children:
            child.stop()
        bare_in.close()
        nobody.close()


def _floor_per_peel(rounds: int = 5, count: int = 300) -> float:
    """bench/peel.py's floor: X25519 + ChaCha20-Poly1305 over a packet + BLAKE3 of a body."""
    rng = random.Random(SEED).randbytes
    secret = rng(32)
    packets = [rng(PACKET_SIZE) for _ in range(count)]
    key, nonce = rng(32), bytes(12)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for packet in packets:
            crypto_scalarmult(secret, packet[:32])
            ChaCha20Poly1305(key).encrypt(nonce, packet, None)
            blake3.blake3(packet[-BODY_SIZE:]).digest()
        best = min(best, time.perf_counter() - start)
    return best / count


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _report(phases: list[Phase], peel_crypto: float) -> None:
    for phase in phases:
        if phase.load:
            limited = "peel" in phase.name and phase.capacity > 0.9 * BLAST_PEEL_RATE
            bound = " (a lower bound)" if limited else ""
            print(
                f"{phase.name}: {phase.load:,.0f} packets/s, {LOAD_SHARE:.0%} of the chain's "
                f"capacity of {phase.capacity:,.0f}/s{bound}"
            )
        else:
            print(f"{phase.name}:")
        bare_median, bare_p99 = _percentiles(phase.samples["bare"])
        for kind, values in phase.samples.items():
            median, p99 = _percentiles(values)
            print(
                f"    {kind:8} median {median * 1e3:7.3f} ms ({median / bare_median:4.2f}x bare)"
                f"  p99 {p99 * 1e3:7.3f} ms ({p99 / bare_p99:4.2f}x)  n={len(values)}"
            )
            if kind == "bare":
                continue
            allowed = MEDIAN_TARGET * bare_median + (peel_crypto if kind == "peel" else 0)
            target = f"<= {MEDIAN_TARGET}x bare" + (" + 3 peels" if kind == "peel" else "")
            where = f"{kind}, {phase.name}"
            result(
                f"median {where}",
                median / bare_median,
                "x bare",
                f"{target} ({allowed / bare_median:.2f}x)",
                median <= allowed,
            )
            result(
                f"p99 {where}",
                p99 / bare_p99,
                "x bare",
                f"<= {P99_TARGET}x",
                p99 <= P99_TARGET * bare_p99,
            )
    print(f"3 peels' crypto floor: {peel_crypto * 1e3:.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="of each kind per phase")
    parser.add_argument("--no-load", action="store_true", help="only the unloaded phase")
    parser.add_argument("--protocol", choices=("udp", "tcp"), default="udp", help="every link's")
    args = parser.parse_args()
    configure_logging("error", "json")
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        edges = [Edge(dialer, listener, args.protocol) for dialer, listener in PAIRS]
        net = generate_network(Path(tmp), 7, edges, extra_toml=BENCH_TOML)
        phases = anyio.run(_run, args, net)
    peel_crypto = 3 * _floor_per_peel()
    print(
        f"python {sys.version.split()[0]}; {args.protocol.upper()} links; "
        f"{args.samples} samples of each kind per phase"
    )
    _report(phases, peel_crypto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
