"""Packets per second through one relay process, against a bare Python UDP forwarder.

Everything runs in one run over 127.0.0.1, with the process under test alone on one CPU and
this process (the source and the sink) on the other:

(a) A bare forwarder: an anyio loop that waits for its socket, drains up to UDP_BATCH
    datagrams per wake-up with recvfrom and sends each on with sendto from a second socket.
    That is the relay loop's I/O and nothing else. Its datagrams are onion-frame sized.
(a2) (a) with the node's own UDP I/O (runtime/udp.py): where the kernel has them, reads that
    return a run of datagrams from one sender at once (UDP GRO) and one segmented sendmsg
    per run of up to 46 frames (UDP GSO). The sources send as the node does, so runs arrive.
    The targets are against (a), the bare forwarder; b / a2 shows what the node costs on top
    of the same I/O, since a forwarder can use the offloads as well as the node.
(b) Our node forwarding: a source S, the relay R under test and a sink D in a line. The
    route's only peeler is D, so R decrypts the link frame, sees that next_peeler is not
    itself and re-encrypts the packet for D's link, with no onion crypto.
(c) Our node peeling: the route is [R, D], so R peels one layer (X25519, BLAKE3 KDF, the MAC,
    ChaCha20, the replay filter) and forwards the inner packet to D. R runs as a daemon does:
    with two CPUs it peels each batch on two threads (runtime/peeling.py).
(c1) (c) with R's second peel thread idle, in rounds alternating with (c)'s: what the second
    thread brings on this machine, printed as "two peel threads / one".
(d) What counting costs: (b) again, with R's per-neighbour accounting switched off between
    rounds (`LinkRunner.take` and `send_onions` swapped for copies without the neighbour's
    allowance and count: what a build without accounting would run). (b)
    and (d) rounds alternate on the same process, sockets and links, so drift and the
    process's own state hit both alike.
(e) Whether a thread pool helps peeling on this machine: a batch peeled serially and split
    in two halves over a 2-thread ThreadPoolExecutor, for batches of UDP_BATCH (one relay
    wake-up) and of 1024. The same ratio is shown for each primitive alone, which shows which
    of the bindings releases the GIL.

R is a real `Node` with a config from `netgen.generate_network`, run in its own process like a
daemon. S and D are real nodes too, run in this process, so that every link is established
and priced as the node requires. The debt limits are raised past anything a run can reach
(the prices stay at their defaults), so accounting runs but never gates a round. During a
round this process does not run their event loop. S only encrypts frames on its link to R
and hands them to its `LinkRunner.send_onions`, so neither S nor D peels or runs relay logic,
and the source outruns R ("offered" is printed next to each rate). Between rounds D catches
up with what reached it, which checks that R forwarded real onions (printed at the end).

R is measured by its own counters (`relay.forwarded`, `relay.peeled`). Two snapshots are read
in R's event loop between its batches and timed by R's clock. The forwarder counts the same
way. Each snapshot also reads the process's CPU time (`time.process_time()`), so each rate is
also given per CPU-second the process got, with the share of the window it had the CPU. On a
machine shared with other work, the wall-clock rate drops whenever the process is preempted
but the rate per CPU-second does not, so both verdicts are printed side by side.

(a), (a2), (b) and (d) are open loop: the source sends as fast as it can, R's receive buffer
stays full and the kernel drops the excess, so what is timed is R at saturation, after a
warm-up.
Nothing reads the sink's socket during a round, so once its buffer is full the kernel drops
what R sends, at the end of R's sendto. That is the same for (a) and (b), and R's cost does
not depend on how fast the sink consumes.
(c) is closed loop because each onion packet can be peeled only once. R's replay filter drops
a second copy, and only after paying for the crypto. So at most WINDOW frames are ahead of
R's counter, and S refills as R reports progress. R answers about one snapshot per batch of
UDP_BATCH peels, well under 1% of its time. R always has work and no prebuilt packet is
wasted. It is timed between 10% and 90% of the packets.

The forwarders and both relays are pinned to the same CPU, and only one of them is fed at a
time. For the relays that is their event loop's thread; the peel thread may run on either
CPU, as it would in a daemon, so in (c) R uses up to two: its rate per CPU-second counts both
threads, so for (c) it measures efficiency, while packets/s is the throughput the target is
about. Each waits until its backlog is worked off before the next round starts.

The crypto floor is bench/peel.py's: one X25519, one ChaCha20-Poly1305 pass over PACKET_SIZE
bytes and the MAC's two primitives (keyed BLAKE3 over 320 bytes, an AES-GCM tag over 998) per
packet, converted to packets/s. It is measured in this process between the rounds, once
after each round's peeling, so that it sees the same machine as the rounds do (a floor
measured after them once read 55 us against 36 us in the next run); the best of those is
the floor, as the best round is each rate. Figures are the best of
--rounds rounds, because noise only ever removes packets per second. The targets are
b/a >= 0.5, c/min(a, floor) >= 0.7 and counting on/off >= 0.97.

Run: .venv/bin/python bench/relay.py [--seconds S] [--packets N] [--rounds R] [--profile]
     [--each]   (every round's rate, to see the noise)

--profile adds one (b) round and one (c) round against the counting relay with cProfile
enabled in it. They run after the figures, which they do not affect, and print R's top
functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import blake3
from accounting import _accounting
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult
from summary import result

from earendil_py.core.identity import Identity
from earendil_py.core.link import MAX_MESSAGE_SIZE, onion_frame
from earendil_py.core.packet import BODY_SIZE, PACKET_SIZE, build_packet, peel_packet
from earendil_py.core.relay import encode_datagram
from earendil_py.netgen import Edge, GeneratedNode, debt_limits_toml, generate_network
from earendil_py.runtime.config import InRoute, load_config
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import UDP_BATCH, LinkRunner, Node
from earendil_py.runtime.udp import (
    UdpTransport,
    datagram_reader,
    new_udp_socket,
    read_batch,
)

FORWARD_TARGET = 0.5  # b / a
PEEL_TARGET = 0.7  # c / min(a, floor)
COUNTING_TARGET = 0.97  # b with counting / b without
SEED = 2026
DOCK = 7
PROBE_DOCK = 8
BURST = 32  # frames the source sends between two looks at the clock
WINDOW = 256  # closed loop: frames ahead of R's counter, ~20 ms of peeling, far below a buffer
WARMUP_SECS = 0.2  # open loop: fill R's receive buffer before the window opens
IDLE_POLL_SECS = 0.02
STALL_SECS = 1.0  # closed loop: end a round if R's counter stands still this long
ANSWER_SECS = 10.0
POOL_ITEMS = 2048
PROFILE_TOP = 15
ROUND_KEYS = ("a", "a2", "b", "c", "c1", "d")
DEBT_LIMIT_UMEL = 10**15  # at 1 uMEL a packet, far beyond any run

# S (node0) and D (node2) both dial R (node1), so R receives on one in_route's socket and
# sends to D from the other, as the forwarder does with its two sockets. Keepalives are
# pushed past the run: while a round runs, nothing should wake R but the frames under test.
EDGES = [Edge(0, 1, "udp"), Edge(2, 1, "udp")]
BENCH_TOML = """
[links]
keepalive_secs = 300.0
dead_after_secs = 900.0

[logging]
level = "warning"
format = "json"
"""


# --- the processes under test ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counters read in the process under test, between two of its batches."""

    time: float  # its time.monotonic() (one clock for all processes on Linux)
    cpu: float  # its time.process_time(): CPU seconds it got, user and system
    through: int  # packets it sent on toward the sink
    counted: int  # the relay's per-link packets_sent, 0 while counting is off


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


async def _answer(
    conn: Connection,
    snapshot: Callable[[], Snapshot],
    drops: Callable[[], dict[str, int]],
    settings: dict[str, Callable[[], None]] | None = None,
) -> None:
    """Answer the benchmark's commands until it says stop. This runs as one more task in the
    loop under test, so a snapshot always falls between two batches. `settings` are the
    commands that change how the process runs."""
    profiler = cProfile.Profile()
    while True:
        await anyio.wait_readable(conn.fileno())
        match conn.recv():
            case "snapshot":
                conn.send(snapshot())
            case "drops":
                conn.send(drops())
            case "profile":
                profiler = cProfile.Profile()
                profiler.enable()
                conn.send(None)
            case "profile_report":
                profiler.disable()
                conn.send(_profile_rows(profiler))
            case "stop":
                return
            case command if settings is not None and command in settings:
                settings[command]()
                conn.send(None)


def _profile_rows(profiler: cProfile.Profile) -> list[tuple[float, int, str, str]]:
    """Every function profiled as (own seconds, calls, file name, where), biggest first."""
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [
        (own, calls, Path(file).name, f"{Path(file).name}:{line}({name})")
        for (file, line, name), (_, calls, own, _, _) in stats.items()
    ]
    rows.sort(reverse=True)
    return rows


def _run_relay(config_path: str, cpu: int | None, conn: Connection) -> None:
    """A relay process: the node from `config_path`. Its event loop's thread is pinned to
    `cpu` once the node runs; the threads the node started (its peel thread) keep every CPU."""
    config = load_config(Path(config_path))
    configure_logging(config.logging.level, config.logging.format)
    node = Node(config, load_identity_file(config.identity_file))

    def snapshot() -> Snapshot:
        relay = node.relay
        return Snapshot(
            time.monotonic(),
            time.process_time(),
            relay.forwarded + relay.peeled - relay.delivered,
            sum(runner.packets_sent for runners in node.links.values() for runner in runners),
        )

    def drops() -> dict[str, int]:
        total = node.drop_counts() + node.peeler.drops
        for runners in node.links.values():
            for runner in runners:
                total.update(runner.statistics().drops)
        return dict(total)

    def setting(target: object, name: str, value: object) -> Callable[[], None]:
        # The peel thread stays up, idle: started again from this thread, it would be pinned.
        return lambda: setattr(target, name, value)

    def accounting(on: bool) -> Callable[[], None]:
        return lambda: _accounting(on=on)

    settings = {
        "one_peel_thread": setting(node.peeling, "parallel", False),
        "two_peel_threads": setting(node.peeling, "parallel", True),
        "counting_off": accounting(False),
        "counting_on": accounting(True),
    }

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            _pin(cpu)  # this thread only
            conn.send(None)
            await _answer(conn, snapshot, drops, settings)
            tg.cancel_scope.cancel()

    anyio.run(main)


def _run_forwarder(sink: tuple[str, int], offload: bool, cpu: int | None, conn: Connection) -> None:
    """The baseline process: the relay loop's receive and send, with nothing in between.
    `offload`: the node's own UDP I/O instead (runtime/udp.py: where the kernel has them,
    coalesced reads and one segmented sendmsg per run)."""
    _pin(cpu)
    inbound, outbound = new_udp_socket(socket.AF_INET), new_udp_socket(socket.AF_INET)
    inbound.bind(("127.0.0.1", 0))
    forwarded = 0
    drops: Counter[str] = Counter()

    async def forward() -> None:
        nonlocal forwarded
        recvfrom, sendto = inbound.recvfrom, outbound.sendto
        while True:
            await anyio.wait_readable(inbound)
            sent = 0
            for _ in range(UDP_BATCH):
                try:
                    data, _address = recvfrom(MAX_MESSAGE_SIZE + 1)
                except BlockingIOError:
                    break
                try:
                    sendto(data, sink)
                except OSError:
                    drops["send_failed"] += 1
                    continue
                sent += 1
            forwarded += sent
            await anyio.lowlevel.checkpoint()

    async def forward_offloaded() -> None:
        nonlocal forwarded
        read, send_many = datagram_reader(inbound), UdpTransport(outbound, sink).send_many
        while True:
            await anyio.wait_readable(inbound)
            batch = read_batch(read, UDP_BATCH)
            sent = send_many(batch)
            drops["send_failed"] += len(batch) - sent
            forwarded += sent
            await anyio.lowlevel.checkpoint()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(forward_offloaded if offload else forward)
            conn.send(inbound.getsockname())
            await _answer(
                conn,
                lambda: Snapshot(time.monotonic(), time.process_time(), forwarded, 0),
                lambda: dict(drops),
            )
            tg.cancel_scope.cancel()

    anyio.run(main)


class Child:
    """A process under test, and the pipe to its command task."""

    def __init__(self, name: str, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, nothing inherited
        self.name = name
        self._conn, theirs = context.Pipe()
        self.process = context.Process(target=target, args=(*args, theirs), daemon=True)
        self.process.start()
        theirs.close()

    def receive(self) -> Any:
        if not self._conn.poll(ANSWER_SECS):
            raise SystemExit(f"{self.name}: no answer within {ANSWER_SECS}s")
        try:
            return self._conn.recv()
        except EOFError:
            raise SystemExit(f"{self.name}: process exited ({self.process.exitcode})") from None

    def ask(self, command: str) -> Any:
        self._conn.send(command)
        return self.receive()

    def snapshot(self) -> Snapshot:
        snapshot: Snapshot = self.ask("snapshot")
        return snapshot

    def wait_idle(self) -> None:
        """Wait until it has worked off its receive buffer, so the next round runs alone."""
        last = self.snapshot().through
        while True:
            time.sleep(IDLE_POLL_SECS)
            now = self.snapshot().through
            if now == last:
                return
            last = now

    def stop(self) -> None:
        if self.process.is_alive():
            self._conn.send("stop")
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self._conn.close()


# --- the source and the sink ----------------------------------------------------------------


@dataclass(slots=True)
class Line:
    """S -> R -> D for one relay process; S and D run in this process."""

    relay: Child
    relay_identity: Identity
    source: Node
    sink: Node
    delivered: int = 0  # datagrams D delivered between rounds


def _network(root: Path) -> list[GeneratedNode]:
    """Three nodes; if this version of the config has prices, debt limits no run reaches."""
    generated = generate_network(root, 3, EDGES, extra_toml=BENCH_TOML)
    if "price" not in InRoute.__struct_fields__:
        return generated
    for node in generated:
        text = node.config_path.read_text() + debt_limits_toml(node.config, DEBT_LIMIT_UMEL)
        node.config_path.write_text(text)
    return generated


def _node(generated: GeneratedNode) -> Node:
    """S or D. Their event loop does not run during a round, so nothing raises their outbound
    lease then (runtime/neighbors.py): they get one that no run uses up."""
    config = load_config(generated.config_path)
    node = Node(config, load_identity_file(config.identity_file))
    policy_for = node.accounts.policy_for
    node.accounts.policy_for = lambda price: replace(policy_for(price), lease_packets=2**40)  # type: ignore[method-assign]
    return node


async def _wait_flowing(line: Line) -> LinkRunner:
    """Send probes S -> R -> D until one is delivered: links up and priced, whatever the node
    requires before it relays. Returns S's link to R."""
    sink, relay = line.sink, line.relay_identity.fingerprint
    route = [(sink.fingerprint, sink.identity.onion_public)]
    with anyio.fail_after(ANSWER_SECS):
        while True:
            runners = line.source.links.get(relay)
            if runners and relay in sink.links:
                first, packet = build_packet(route, encode_datagram(PROBE_DOCK, b""), os.urandom)
                runners[0].send_onions([runners[0].link.encrypt_onion(first, packet)])
            with anyio.move_on_after(0.1):
                await sink.receive_datagram(PROBE_DOCK)
                assert runners
                return runners[0]


async def _catch_up(line: Line) -> None:
    """Let D work off what reached it during the round, and take what it delivered."""
    sink = line.sink
    last = -1
    while (now := sink.relay.peeled + sum(sink.peeler.drops.values())) != last:
        last = now
        await anyio.sleep(IDLE_POLL_SECS)
        line.delivered += len(sink.receive_datagrams_nowait(DOCK, 1_000_000))


def _drain(sock: socket.socket) -> int:
    count, recv = 0, sock.recv
    while True:
        try:
            recv(MAX_MESSAGE_SIZE + 1)
        except BlockingIOError:
            return count
        count += 1


@dataclass(frozen=True, slots=True)
class Round:
    rate: float  # packets/s the process under test sent on
    cpu_rate: float  # the same per CPU-second it got, so preemption does not count
    busy: float  # CPU seconds it got per second of the window
    offered: float  # packets/s the source sent it meanwhile (0 in the closed loop)
    counted_ok: bool  # R's per-link counters moved exactly as its relay counters did


def _round(first: Snapshot, last: Snapshot, offered: int) -> Round:
    seconds, cpu = last.time - first.time, last.cpu - first.cpu
    through = last.through - first.through
    counted = last.counted - first.counted
    return Round(
        through / seconds, through / cpu, cpu / seconds, offered / seconds, counted == through
    )


def _open_loop(child: Child, burst: Callable[[], int], seconds: float) -> Round:
    deadline = time.monotonic() + WARMUP_SECS
    while time.monotonic() < deadline:
        burst()
    first = child.snapshot()
    offered = 0
    deadline = first.time + seconds
    while time.monotonic() < deadline:
        offered += burst()
    last = child.snapshot()
    child.wait_idle()
    return _round(first, last, offered)


def _plain_burst(sock: socket.socket, datagrams: list[bytes]) -> Callable[[], int]:
    """Send a burst as the node sends a batch (segmented where the kernel can), so that the
    source outruns even (a2). A full buffer of our own loses a run: R is far behind anyway."""
    send_many = UdpTransport(sock, None).send_many
    return lambda: send_many(datagrams)


def _onion_burst(runner: LinkRunner, onions: list[tuple[bytes, bytes]]) -> Callable[[], int]:
    """Encrypt a burst on S's link and send it as the node sends a batch. R does not peel in
    (b), so a few packets are cycled, each frame with its own link counter."""
    encrypt, send_onions = runner.link.encrypt_onions, runner.send_onions
    frames = [onion_frame(next_peeler, packet) for next_peeler, packet in onions]

    def burst() -> int:
        before = runner.packets_sent
        send_onions(encrypt(frames))
        return runner.packets_sent - before

    return burst


def _closed_loop(child: Child, runner: LinkRunner, onions: list[tuple[bytes, bytes]]) -> Round:
    encrypt, send_onions = runner.link.encrypt_onions, runner.send_onions
    total = len(onions)
    low, high = total // 10, total - total // 10
    start = child.snapshot()
    first = last = None
    sent = done = 0
    moved_at = time.monotonic()
    while done < total:
        if sent - done < WINDOW and sent < total:
            chunk = onions[sent : min(total, done + WINDOW)]
            send_onions(
                encrypt([onion_frame(next_peeler, packet) for next_peeler, packet in chunk])
            )
            sent += len(chunk)
        snapshot = child.snapshot()  # answered after R's current batch
        if snapshot.through - start.through != done:
            done, moved_at = snapshot.through - start.through, time.monotonic()
        elif time.monotonic() - moved_at > STALL_SECS:
            break  # frames were lost: end the round with what got through
        if first is None and done >= low:
            first = snapshot
        if last is None and done >= high:
            last = snapshot
    if first is None or last is None or last.time == first.time:
        raise SystemExit(
            f"{child.name}: the relay stalled after {done} of {total} packets "
            f"(its drops: {child.ask('drops')})"
        )
    child.wait_idle()
    return _round(first, last, 0)


# --- onion packets and the CPU-only measurements --------------------------------------------


def _build_chunk(
    route: list[tuple[bytes, bytes]], seed: int, count: int
) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed).randbytes
    return [build_packet(route, encode_datagram(DOCK, rng(100)), rng) for _ in range(count)]


def _build(route: list[tuple[bytes, bytes]], count: int, workers: int) -> list[tuple[bytes, bytes]]:
    """`count` distinct packets. A 2-hop build costs ~5 peels, so it is spread over cores."""
    shares = [count // workers + (i < count % workers) for i in range(workers)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        chunks = pool.map(_build_chunk, [route] * workers, range(SEED, SEED + workers), shares)
        return [onion for chunk in chunks for onion in chunk]


def _best_per_item(run: Callable[[], object], items: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / items


def _floor_per_packet(packets: list[bytes], secret: bytes, rounds: int) -> tuple[float, float]:
    """bench/peel.py's floor: the primitives a peel cannot avoid, inputs prepared beforehand.
    Seconds per packet, by the wall clock and by this thread's CPU time."""
    alphas = [packet[:32] for packet in packets]
    # The MAC's two parts: BLAKE3 over beta's routing fields, an AES-GCM tag over the rest.
    routing = [packet[48 : 48 + 320] for packet in packets]
    covered = [packet[-(16 + 80 + BODY_SIZE) :] for packet in packets]
    nonce, key = bytes(12), random.Random(SEED).randbytes(32)

    def floor_all() -> None:
        for alpha, packet, head, rest in zip(alphas, packets, routing, covered, strict=True):
            crypto_scalarmult(secret, alpha)
            ChaCha20Poly1305(key).encrypt(nonce, packet, None)
            blake3.blake3(head, key=key).digest(16)
            AESGCM(key[:16]).encrypt(nonce, b"", rest)

    wall = cpu = float("inf")
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        floor_all()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.thread_time() - start_cpu)
    return wall / len(packets), cpu / len(packets)


def _pool_speedup(
    pool: ThreadPoolExecutor,
    work: Callable[[list[bytes]], object],
    items: list[bytes],
    batch: int,
    rounds: int,
) -> tuple[float, float]:
    """Serial items/s, and pooled / serial, for `items` cut into batches split in halves."""
    batches = [items[i : i + batch] for i in range(0, len(items) - batch + 1, batch)]
    halves = [(chunk[: batch // 2], chunk[batch // 2 :]) for chunk in batches]
    count = len(batches) * batch

    def serial() -> None:
        for chunk in batches:
            work(chunk)

    def pooled() -> None:
        for pair in halves:
            for _ in pool.map(work, pair):
                pass

    serial_s = pooled_s = float("inf")
    for _ in range(rounds):  # interleaved, best of each
        serial_s = min(serial_s, _best_per_item(serial, count, 1))
        pooled_s = min(pooled_s, _best_per_item(pooled, count, 1))
    return 1 / serial_s, serial_s / pooled_s


def _pool_lines(packets: list[bytes], secret: bytes, rounds: int) -> list[str]:
    key, nonce = random.Random(SEED).randbytes(32), bytes(12)
    work: list[tuple[str, Callable[[list[bytes]], object]]] = [
        ("peel_packet", lambda chunk: [peel_packet(p, secret) for p in chunk]),
        ("X25519", lambda chunk: [crypto_scalarmult(secret, p[:32]) for p in chunk]),
        (
            "ChaCha20-Poly1305",
            lambda chunk: [ChaCha20Poly1305(key).encrypt(nonce, p, None) for p in chunk],
        ),
        ("BLAKE3", lambda chunk: [blake3.blake3(p).digest() for p in chunk]),
    ]
    lines = []
    with ThreadPoolExecutor(2) as pool:
        for name, run in work:
            serial, small = _pool_speedup(pool, run, packets, UDP_BATCH, rounds)
            _, large = _pool_speedup(pool, run, packets, 1024, rounds)
            lines.append(
                f"    {name:18} batch {UDP_BATCH}: x{small:4.2f}   batch 1024: x{large:4.2f}   "
                f"(serial {serial:>9,.0f}/s)"
            )
    return lines


# --- the run --------------------------------------------------------------------------------


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def _rates(rounds: list[Round]) -> str:
    best = max(rounds, key=lambda r: r.rate)
    text = (
        f"{best.rate:10,.0f} packets/s  (median {statistics.median(r.rate for r in rounds):,.0f}; "
        f"per cpu-s {max(r.cpu_rate for r in rounds):,.0f}; had the cpu {best.busy:.0%}"
    )
    if not best.offered:
        return f"{text}; closed loop)"
    note = "" if best.offered > 1.1 * best.rate else ": source-limited, a lower bound"
    return f"{text}; offered {best.offered:,.0f}/s{note})"


def _ratio(name: str, wall: float, cpu: float, target: float, note: str = "") -> str:
    return (
        f"{name:24} {wall:10.3f}  wall, {cpu:.3f} per cpu-s{note} "
        f"(target >= {target}: {_verdict(wall, target)}, {_verdict(cpu, target)})"
    )


def _profile_lines(title: str, child: Child, run: Callable[[], object]) -> list[str]:
    """cProfile's top functions (by own time) in `child` while `run()` drives it."""
    child.ask("profile")
    start = child.snapshot().through
    run()
    packets = child.snapshot().through - start
    rows: list[tuple[float, int, str, str]] = child.ask("profile_report")
    total = sum(row[0] for row in rows)
    by_file: dict[str, float] = {}
    for own, _, file, _ in rows:
        name = "C functions" if file == "~" else file
        by_file[name] = by_file.get(name, 0.0) + own
    biggest = sorted(by_file.items(), key=lambda item: item[1], reverse=True)[:8]
    lines = [f"{title}: {packets} packets, {total:.2f}s profiled in R's event loop thread"]
    lines.append(
        "  own time by file: " + ", ".join(f"{file} {own / total:.0%}" for file, own in biggest)
    )
    lines += [
        f"  {own / total:6.1%} {own / packets * 1e6:7.2f} us/packet {calls:>9}  {where}"
        for own, calls, _, where in rows[:PROFILE_TOP]
    ]
    return lines


@dataclass(slots=True)
class Results:
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    frame_size: int = 0
    relay_secret: bytes = b""  # the counting relay's onion key, for the CPU-only figures
    packets: list[bytes] = field(default_factory=list)  # onions for it, ditto
    checks: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    floors: list[tuple[float, float]] = field(default_factory=list)  # per round: wall, CPU


async def _measure(
    args: argparse.Namespace,
    root: Path,
    cpus: list[int],
    cleanup: tuple[list[Child], list[socket.socket]],
) -> Results:
    """Every round against the processes under test. Appends what it starts to `cleanup`."""
    rounds = args.rounds
    children, sockets = cleanup
    driver_cpu, child_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    net = _network(root)

    plain_sink = new_udp_socket(socket.AF_INET)
    sockets.append(plain_sink)
    plain_sink.bind(("127.0.0.1", 0))
    forwarders = {
        key: Child(f"forwarder ({key})", _run_forwarder, plain_sink.getsockname(), gso, child_cpu)
        for key, gso in (("a", False), ("a2", True))
    }
    children += forwarders.values()
    relay = Child("relay", _run_relay, str(net[1].config_path), child_cpu)
    children.append(relay)
    line = Line(
        relay, load_identity_file(net[1].config.identity_file), _node(net[0]), _node(net[2])
    )

    # The children start up in fresh interpreters while the peeling packets are built.
    r_id, d_id = line.relay_identity, line.sink.identity
    route = [(r_id.fingerprint, r_id.onion_public), (d_id.fingerprint, d_id.onion_public)]
    onions = _build(route, args.packets * (2 * rounds + args.profile), len(cpus))
    plain_sources = {}
    for key, forwarder in forwarders.items():
        plain_sources[key] = new_udp_socket(socket.AF_INET)
        sockets.append(plain_sources[key])
        plain_sources[key].connect(forwarder.receive())
    for child in children[len(forwarders) :]:
        child.receive()

    results = Results(
        {key: [] for key in ROUND_KEYS},
        relay_secret=r_id.onion_secret,
        packets=[packet for _, packet in onions[:POOL_ITEMS]],
    )
    rng = random.Random(SEED).randbytes
    async with anyio.create_task_group() as tg:
        await tg.start(line.source.run)
        await tg.start(line.sink.run)
        to_relay = await _wait_flowing(line)
        route = [(line.sink.fingerprint, line.sink.identity.onion_public)]
        cycled = [build_packet(route, encode_datagram(DOCK, rng(100)), rng) for _ in range(BURST)]
        bursts = {"b": _onion_burst(to_relay, cycled)}
        results.frame_size = len(to_relay.link.encrypt_onion(*cycled[0]))
        plain = [rng(results.frame_size) for _ in range(BURST)]
        for key, source in plain_sources.items():
            bursts[key] = _plain_burst(source, plain)

        # During a round this loop does not yield, so S and D (and their timers) stand still.
        _pin(driver_cpu)
        for index in range(rounds):
            for key, forwarder in forwarders.items():
                results.rounds[key].append(_open_loop(forwarder, bursts[key], args.seconds))
                _drain(plain_sink)
            # Alternate which of each pair goes first, so that neither always follows the other.
            for key in ("b", "d") if index % 2 == 0 else ("d", "b"):
                relay.ask("counting_on" if key == "b" else "counting_off")
                results.rounds[key].append(_open_loop(relay, bursts["b"], args.seconds))
                await _catch_up(line)
            relay.ask("counting_on")
            # (c) as the node runs, and with its peel thread stopped.
            for key in ("c", "c1") if index % 2 == 0 else ("c1", "c"):
                relay.ask("two_peel_threads" if key == "c" else "one_peel_thread")
                start = (2 * index + (key == "c1")) * args.packets
                share = onions[start : start + args.packets]
                results.rounds[key].append(_closed_loop(relay, to_relay, share))
                await _catch_up(line)
            relay.ask("two_peel_threads")
            results.floors.append(_floor_per_packet(results.packets, results.relay_secret, 1))

        if args.profile:
            results.profile += _profile_lines(
                "profile (b)", relay, lambda: _open_loop(relay, bursts["b"], args.seconds)
            )
            await _catch_up(line)
            share = onions[2 * rounds * args.packets :]
            results.profile += _profile_lines(
                "profile (c)", relay, lambda: _closed_loop(relay, to_relay, share)
            )
            await _catch_up(line)
        os.sched_setaffinity(0, cpus)

        sink = line.sink
        frames = sink.links[line.relay_identity.fingerprint][0].packets_received
        drops = sink.peeler.drops + sink.drop_counts()
        replays = drops.pop("replay", 0)
        results.checks.append(
            f"sink D: of the {frames:,} frames from R its buffer held, D peeled "
            f"{sink.relay.peeled:,} ({line.delivered:,} delivered to the bench's dock) and "
            f"caught {replays:,} as replays of the {BURST} packets (b) and (d) cycle; "
            f"other drops: {dict(drops) or 'none'}"
        )
        results.checks.append(
            f"relay R drops, set-up probes included: {relay.ask('drops') or 'none'}"
        )
        tg.cancel_scope.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="per open-loop round")
    parser.add_argument("--packets", type=int, default=3000, help="per peeling round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--each", action="store_true", help="also print every round's rate")
    args = parser.parse_args()
    if args.packets < 2 * WINDOW or args.rounds < 1 or args.seconds <= 0:
        parser.error(f"need --packets >= {2 * WINDOW}, --rounds >= 1 and --seconds > 0")
    configure_logging("warning", "json")

    cpus = sorted(os.sched_getaffinity(0))
    children: list[Child] = []
    sockets: list[socket.socket] = []
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        try:
            results = anyio.run(_measure, args, Path(tmp), cpus, (children, sockets))
        finally:
            os.sched_setaffinity(0, cpus)
            for child in children:
                child.stop()
            for sock in sockets:
                sock.close()
    return _report(args, cpus, results)


def _report(args: argparse.Namespace, cpus: list[int], results: Results) -> int:
    """Measure what needs no process under test (using every core) and print it all."""
    packets = results.packets
    floor_s = min(wall for wall, _ in results.floors)
    floor_cpu_s = min(cpu for _, cpu in results.floors)
    pool_lines = _pool_lines(packets, results.relay_secret, args.rounds)
    rounds = results.rounds

    def _paired(key: str, base: str) -> str:
        """Best / best, and the median of the ratios of rounds run side by side."""
        pairs = list(zip(rounds[key], rounds[base], strict=True))
        wall = statistics.median(r.rate / b.rate for r, b in pairs)
        per_cpu = statistics.median(r.cpu_rate / b.cpu_rate for r, b in pairs)
        return (
            f" (best / best; median of {len(pairs)} paired rounds: {wall:.3f} wall, "
            f"{per_cpu:.3f} per cpu-s)"
        )

    best = {key: max(r.rate for r in rounds[key]) for key in rounds}
    cpu = {key: max(r.cpu_rate for r in rounds[key]) for key in rounds}
    counted = all(r.counted_ok for r in rounds["b"] + rounds["c"] + rounds["c1"])
    where = (
        f"this process on cpu {cpus[0]}, the one under test on cpu {cpus[1]}"
        if len(cpus) >= 2
        else "one cpu shared: the source competes with the relay"
    )
    print(f"python {sys.version.split()[0]}, {len(cpus)} cpus ({where}), best of {args.rounds}")
    print(
        f"frames of {results.frame_size} bytes (onion {PACKET_SIZE} + link) over 127.0.0.1; "
        f"open-loop rounds of {args.seconds:g}s, peeling rounds of {args.packets} packets"
    )
    print(f"(a) bare UDP forwarder   {_rates(rounds['a'])}")
    print(f"(a2) a, node's UDP I/O   {_rates(rounds['a2'])}")
    print(f"(b) node, forward only   {_rates(rounds['b'])}")
    print(f"(c) node, peel + forward {_rates(rounds['c'])}")
    print(f"(c1) c, one peel thread  {_rates(rounds['c1'])}")
    print(
        f"crypto floor             {1 / floor_s:10,.0f} packets/s  (per cpu-s "
        f"{1 / floor_cpu_s:,.0f}; {floor_s * 1e6:.2f} us of X25519 + ChaCha20-Poly1305 + MAC;"
        f" best of {len(results.floors)} between rounds, worst "
        f"{max(wall for wall, _ in results.floors) * 1e6:.2f} us)"
    )
    print(
        _ratio(
            "b / a", best["b"] / best["a"], cpu["b"] / cpu["a"], FORWARD_TARGET, _paired("b", "a")
        )
    )
    forward = best["b"] / best["a"]
    result(
        "forward / bare forwarder", forward, "", f">= {FORWARD_TARGET}", forward >= FORWARD_TARGET
    )
    print(
        f"    b / a2 (no target)     {best['b'] / best['a2']:10.3f}  wall, "
        f"{cpu['b'] / cpu['a2']:.3f} per cpu-s{_paired('b', 'a2')}"
    )
    print(
        _ratio(
            "c / min(a, floor)",
            best["c"] / min(best["a"], 1 / floor_s),
            cpu["c"] / min(cpu["a"], 1 / floor_cpu_s),
            PEEL_TARGET,
        )
    )
    peel = best["c"] / min(best["a"], 1 / floor_s)
    result("peel / min(bare, crypto floor)", peel, "", f">= {PEEL_TARGET}", peel >= PEEL_TARGET)
    print(
        f"    two peel threads / one {best['c'] / best['c1']:10.3f}  wall, "
        f"{cpu['c'] / cpu['c1']:.3f} per cpu-s{_paired('c', 'c1')}"
    )
    print(f"(d) b, counting off      {_rates(rounds['d'])}")
    print(
        _ratio(
            "    counting on / off",
            best["b"] / best["d"],
            cpu["b"] / cpu["d"],
            COUNTING_TARGET,
            _paired("b", "d"),
        )
    )
    counting = best["b"] / best["d"]
    result("counting on / off", counting, "", f">= {COUNTING_TARGET}", counting >= COUNTING_TARGET)
    if args.each:
        for key in ROUND_KEYS:
            label = f"({key})"
            each = "  ".join(
                f"{r.rate / 1000:.1f}k/{r.cpu_rate / 1000:.1f}k/{r.offered / 1000:.0f}k"
                for r in rounds[key]
            )
            print(f"    {label} each round, wall/per cpu-s/offered: {each}")
    print("(e) 2-thread pool / serial, each batch split in two halves:")
    for line in pool_lines:
        print(line)
    agree = "agree with" if counted else "DIFFER from"
    print(f"checks: R's per-link counters {agree} its relay counters in every round")
    for line in results.checks + results.profile:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
