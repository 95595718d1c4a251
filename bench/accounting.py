"""What debt accounting costs: per packet in the relay loop, per push interval, and idle.

1. The relay loop. A real `Node` (config from `netgen.generate_network`, no sockets) gets
   SOURCES + SINKS neighbours, each a real `LinkRunner` over a `core.link.Link` whose Noise
   handshake and identity proofs were pumped in memory, with a priced `core.neighbor.Neighbor`
   attached (both offers accepted in memory, PRICE_UMEL a packet, debt limits and outbound
   leases no run reaches: accounting runs on every batch but never refuses one). A runner's
   transport only counts what it is given, so all the node's per-frame work is measured and no
   syscall is. Batches of UDP_BATCH onion frames (one UDP wake-up) arrive round-robin from the
   SOURCES links, handed to `Node.relay_batch` per link as the UDP listener does. Only
   `relay_batch` is timed. Each frame leaves on a random one of the SINKS links. Two mixes:
     forward  every frame forwarded without onion crypto (next_peeler is a sink). This is the
              worst case for accounting's share, with the least other work per packet.
     mixed    one frame in four peeled here (route [this node, sink]: X25519, KDF, MAC,
              ChaCha20, replay filter), the rest forwarded.
   In both, every frame is re-encrypted for its sink's link (ChaCha20-Poly1305).
   Accounting in the relay loop is `LinkRunner.take` (a source's inbound allowance, read once
   per batch, and its count) and `LinkRunner.send_onions` (a sink's outbound allowance and its
   count). "accounting off" swaps both for copies without the neighbour (what a build without
   accounting would run). Each round times the same batches once per setting, in a fresh
   seeded order every round, so drift hits all settings alike. Each timing gets a fresh replay
   filter, so the same onions peel again. Printed: the best round of each setting (noise only
   ever adds time) in ns/packet, wall and CPU, and what accounting costs against it being off,
   best / best, with the median of the per-round paired ratios in brackets. An A/A control,
   the default timed twice per round, shows the noise floor. Target: accounting adds <= 3 %
   per packet. The difference is a few calls per link per batch, near that floor, so the same
   calls are also timed alone. Raising an outbound lease is a ledger write the timer loop
   makes (part 2's kind of work), once per lease used up (it doubles, up to 64 times
   `Policy.lease_packets`), not relay-loop work: the leases here are set past any run.

2. push_debt with LINKS neighbours: one push interval of one node's `Neighbors` service
   (runtime/neighbors.py), as it runs, with a real SQLite ledger through `AsyncLedger`.
   Sending: the timer loop finds every neighbour's claim due (`Neighbors._handle_due`): each
   Neighbor's `handle_timer` signs its claim (and a `counts` entry, and the prunes whose turn
   it is), all in ONE transaction; then the calls go out, each answered at once by a stand-in
   for GlobalRpc with the neighbour's ack, and each ack is handed back (`receive_reply`).
   Receiving: every neighbour's claim (signed by its own Neighbor before the timing) arrives
   as the RPC server hands it over (`Neighbors._on_call`), is verified and applied, and is
   committed in a group commit before it is answered: the claims arriving within
   claim_commit_delay_secs of the first share a transaction. Arrival groups are drawn as the
   neighbours' phases make them (uniform over the push interval); each group's claims are
   handed over together and the service's delay is shortened, so its sleep costs no wall time
   (it never cost CPU). Old claim and counts bodies are pruned in these same transactions, at
   every PRUNE_EVERY-th claim of each neighbour (their seqs are staggered by a warm-up, so a
   tenth of them prune each interval), keeping keep_claims, lowered to KEEP_CLAIMS here so
   that the warm-up leaves as many bodies behind as 100 would after 110 intervals: a prune
   drops the same PRUNE_EVERY bodies either way. Counts move between intervals (traffic both
   ways, a few packets lost in flight), and every claim is applied. CPU is
   `time.process_time()` (user + system, all threads: the ledger's thread included); the
   share is CPU / push_debt_secs (the configured 60 s: the work per interval does not depend
   on its length; the run itself uses PUSH_SECS so that its clock stays within the claims'
   clock skew). Target <= 1 %. Not included: the RPC that carries each claim (encoding, link
   encryption, the reply). For scale: the checkpoint tick (`Neighbors._checkpoint`): a
   `counts` entry for every neighbour whose counts moved, one transaction, every
   checkpoint_secs.

3. Idle: LINKS neighbours linked and priced, no traffic, the service's timer loop running for
   --idle seconds with push_debt_secs and checkpoint_secs divided by SPEEDUP (so every timer
   fires SPEEDUP times as often as configured). Its CPU (process_time) divided by SPEEDUP and
   by the run's length is the share of a core the timers cost at the configured intervals.
   Target <= 2 %.

Run: .venv/bin/python bench/accounting.py [--quick] [--rounds R] [--batches B] [--links N]
     [--push-rounds R] [--idle S] [--dir DIR]
     (DIR: where the ledger files go, to measure a particular disk; default the system temp)
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from summary import result

from earendil_py.core.identity import Identity
from earendil_py.core.link import Link, LinkState, onion_frame
from earendil_py.core.neighbor import (
    PRUNE_EVERY,
    Answered,
    DebtAck,
    Effect,
    Neighbor,
    Policy,
    Refused,
    wire,
)
from earendil_py.core.packet import build_packet
from earendil_py.core.pricing import AcceptanceRule, PriceTerms
from earendil_py.core.relay import Peeler, encode_datagram
from earendil_py.netgen import generate_network
from earendil_py.runtime.config import AccountingConfig, Config, PriceConfig, load_config
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.neighbors import Neighbors
from earendil_py.runtime.node import UDP_BATCH, LinkRunner, Node
from earendil_py.runtime.routes import RouteInfo
from earendil_py.runtime.rpc import RpcError
from earendil_py.runtime.store import AsyncLedger
from earendil_py.runtime.udp import UdpTransport

SEED = 2026
OVERHEAD_TARGET = 0.03  # accounting on / off - 1, per packet in the relay loop
CORE_SHARE_TARGET = 0.01  # push_debt CPU / push interval
IDLE_TARGET = 0.02  # idle timers' CPU / wall
SOURCES = 3  # links a batch arrives on
SINKS = 3  # links its frames leave on
MIXES = {"forward": 0, "mixed": UDP_BATCH // 4}  # frames peeled here per batch
PAYLOAD_BYTES = 200
PRICE_UMEL = 1
DEBT_LIMIT_UMEL = 10**15  # far beyond any run, so no packet is refused
FAR = 2**50  # an outbound lease no run uses up
RELAY_NOW = 1000.0  # monotonic seconds, for the replay filter
SECRET = "bench-accounting-route-cookie"
CONFIGURED = AccountingConfig()  # the defaults: push_debt_secs, checkpoint_secs, delays
PUSH_SECS = 1.0  # the push interval the service runs with in part 2 (see the docstring)
KEEP_CLAIMS = 3  # keep_claims in part 2 (see the docstring)
GROUP_DELAY_SECS = 0.002  # the service's claim_commit_delay_secs in part 2
SPEEDUP = 10  # part 3: timers fire this many times as often as configured
PRICE = PriceConfig(
    inbound_price_umel=PRICE_UMEL,
    inbound_debt_limit_umel=DEBT_LIMIT_UMEL,
    outbound_max_price_umel=PRICE_UMEL,
    outbound_min_debt_limit_umel=DEBT_LIMIT_UMEL,
)

# (label, accounting on). "default again" is the A/A control.
SETTINGS = [("default", True), ("accounting off", False), ("default again", True)]


# --- neighbours pumped in memory ------------------------------------------------------------


def _policy(push_debt_secs: float = CONFIGURED.push_debt_secs) -> Policy:
    methods = ("pow",)
    return Policy(
        terms=PriceTerms(PRICE_UMEL, DEBT_LIMIT_UMEL, methods),
        rule=AcceptanceRule(PRICE_UMEL, DEBT_LIMIT_UMEL, methods),
        methods=methods,
        push_debt_secs=push_debt_secs,
        lease_packets=FAR,
    )


def _pump(side: Neighbor, other: Neighbor, effect: Effect, now: float) -> None:
    """Apply `effect` (nothing is written: no ledger here), carry its calls to `other` and
    their replies back, until both are quiet."""
    side.apply(effect)
    for call in effect.calls:
        answer = other.receive_call(call.method, call.params, now)
        _pump(other, side, answer, now)
        reply = answer.reply
        outcome = reply if isinstance(reply, Refused) else Answered(reply)
        _pump(side, other, side.receive_reply(call.token, outcome, now), now)


def _priced_pair(me: Identity, peer: Identity, policy: Policy) -> tuple[Neighbor, Neighbor]:
    """Our Neighbor for `peer` and its Neighbor for us, each side's offer accepted."""
    rng = random.Random(SEED).randbytes
    ours = Neighbor(me, peer.identity_public, policy, rng)
    theirs = Neighbor(peer, me.identity_public, policy, rng)
    now = time.time()
    _pump(ours, theirs, ours.on_link_up(now, policy), now)
    _pump(theirs, ours, theirs.on_link_up(now, policy), now)
    if not (ours.priced and theirs.priced):
        raise SystemExit("price not accepted")
    return ours, theirs


# --- 1. the relay loop ----------------------------------------------------------------------


class CountingTransport:
    """A `Transport` that accepts every frame and only counts it."""

    def __init__(self) -> None:
        self.frames = 0

    def send(self, message: bytes) -> bool:
        self.frames += 1
        return True

    def send_many(self, messages: list[bytes]) -> int:
        self.frames += len(messages)
        return len(messages)

    def close(self) -> None:
        """Nothing to close."""


def _established_link(
    me: Identity, peer: Identity, index: int, rng: Callable[[int], bytes]
) -> Link:
    """Our end of a link to `peer` after the handshake and both identity proofs, in memory."""
    ours = Link(
        initiator=False,
        identity=me,
        static_private=rng(32),
        secret=SECRET,
        local_index=index,
        now=0.0,
        rng=rng,
    )
    theirs = Link(
        initiator=True,
        identity=peer,
        static_private=rng(32),
        secret=SECRET,
        local_index=index,
        now=0.0,
        rng=rng,
        expected_fingerprint=me.fingerprint,
    )
    for _ in range(10):
        for message in theirs.datagrams_to_send():
            ours.receive_datagram(message, 0.0)
        for message in ours.datagrams_to_send():
            theirs.receive_datagram(message, 0.0)
    if not ours.state is theirs.state is LinkState.ESTABLISHED:
        raise SystemExit(f"handshake failed: {ours.state} / {theirs.state}")
    return ours


def _take_all(runner: LinkRunner, frames: list[bytes]) -> list[bytes]:
    """`LinkRunner.take` without accounting: every frame, uncounted."""
    return frames


def _send_uncounted(runner: LinkRunner, frames: list[bytes]) -> None:
    """`LinkRunner.send_onions` without the neighbour's allowance and count."""
    transport = runner.transport
    if type(transport) is UdpTransport:
        sent = transport.send_many(frames)
    else:
        sent = sum(transport.send(frame) for frame in frames)
    if sent != len(frames):
        runner.link.statistics().drops["queue_full"] += len(frames) - sent


ACCOUNTED = (LinkRunner.take, LinkRunner.send_onions)
UNACCOUNTED = (_take_all, _send_uncounted)


def _accounting(*, on: bool) -> None:
    take, send_onions = ACCOUNTED if on else UNACCOUNTED
    setattr(LinkRunner, "take", take)  # noqa: B010 (a method swapped for a plain function)
    setattr(LinkRunner, "send_onions", send_onions)  # noqa: B010


Batch = list[tuple[LinkRunner | None, list[bytes]]]  # what Node.relay_batch takes


@dataclass(slots=True)
class RelaySetup:
    node: Node
    sources: list[LinkRunner]
    sinks: list[LinkRunner]
    transports: list[CountingTransport]
    batches: dict[str, list[Batch]]


def _relay_setup(root: Path, batch_count: int) -> RelaySetup:
    generated = generate_network(root, 1, [])[0]
    config = generated.config
    node = Node(config, load_identity_file(config.identity_file))
    me = node.identity
    rng = random.Random(SEED).randbytes
    runners, transports, peers = [], [], []
    for index in range(SOURCES + SINKS):
        peer = Identity.generate(rng)
        transport = CountingTransport()
        runner = LinkRunner(
            node,
            _established_link(me, peer, index + 1, rng),
            transport,
            RouteInfo(f"neighbour{index}", "udp", "in"),
            ("127.0.0.1", 40000 + index),
        )
        # What `Node.add_link` and the Neighbors service do at link-up, minus the tasks and
        # the ledger (a running node's): the runner gets its priced Neighbor.
        runner.attach(_priced_pair(me, peer, _policy())[0])
        node.links[peer.fingerprint] = [runner]
        runners.append(runner)
        transports.append(transport)
        peers.append(peer)
    sources, sinks = runners[:SOURCES], runners[SOURCES:]
    sink_peers = peers[SOURCES:]
    # Forwarded packets are never peeled here, so a few per sink can be reused.
    forwarded = [
        [
            build_packet(
                [(p.fingerprint, p.onion_public)], encode_datagram(1, rng(PAYLOAD_BYTES)), rng
            )
            for _ in range(8)
        ]
        for p in sink_peers
    ]
    choose = random.Random(SEED)
    me_hop = (me.fingerprint, me.onion_public)
    batches: dict[str, list[Batch]] = {}
    for mix, peeled in MIXES.items():
        every = UDP_BATCH // peeled if peeled else 0
        batches[mix] = []
        for _ in range(batch_count):
            # As the UDP listener hands a wake-up's datagrams over: per link, in order.
            frames: dict[LinkRunner, list[bytes]] = {source: [] for source in sources}
            for position in range(UDP_BATCH):
                source = sources[position % SOURCES]
                sink = choose.randrange(SINKS)
                if every and position % every == 0:
                    route = [me_hop, (sink_peers[sink].fingerprint, sink_peers[sink].onion_public)]
                    payload = encode_datagram(1, rng(PAYLOAD_BYTES))
                    onion = build_packet(route, payload, rng)
                else:
                    onion = choose.choice(forwarded[sink])
                frames[source].append(onion_frame(*onion))
            batches[mix].append(list(frames.items()))
    return RelaySetup(node, sources, sinks, transports, batches)


@dataclass(frozen=True, slots=True)
class Timing:
    wall: float  # seconds, time.perf_counter()
    cpu: float  # seconds, time.process_time()


def _time_relay(setup: RelaySetup, mix: str, accounting: bool) -> Timing:
    """Relay every batch of `mix` once, accounting on or off; the time of that alone."""
    node = setup.node
    node.peeler = Peeler(node.identity.onion_secret)  # a fresh replay filter: peel them again
    relay, batches = node.relay_batch, setup.batches[mix]
    gc.collect()
    _accounting(on=accounting)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            relay(batch, RELAY_NOW)
        return Timing(time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        _accounting(on=True)


def _counters(runners: list[LinkRunner]) -> list[Any]:
    return [r.neighbor.counters for r in runners if r.neighbor is not None]


def _relay_checks(setup: RelaySetup, runs: dict[str, int]) -> str:
    """Every frame reached a sink, nothing was dropped, the neighbours counted what they
    should."""
    node = setup.node
    frames = sum(runs[mix] * len(batches) * UDP_BATCH for mix, batches in setup.batches.items())
    accounted = frames * sum(on for _, on in SETTINGS) // len(SETTINGS)
    sent = sum(t.frames for t in setup.transports)
    received = sum(c.packets_in for c in _counters(setup.sources))
    charged = sum(c.packets_out for c in _counters(setup.sinks))
    drops = node.drop_counts() + node.peeler.drops
    for runner in setup.sources + setup.sinks:
        drops.update(runner.statistics().drops)
    ok = sent == frames and received == charged == accounted and not drops
    return (
        f"checks: {sent:,} of {frames:,} frames reached a sink link; the neighbours counted "
        f"{received:,} in and {charged:,} out of the {accounted:,} relayed with accounting on; "
        f"drops: {dict(drops) or 'none'} -> {'ok' if ok else 'FAILED'}"
    )


def _accounting_alone(setup: RelaySetup, batches: int) -> float:
    """Seconds per batch of just the accounting calls, made as `take` and `send_onions` make
    them: per source link its inbound allowance and count, per sink link its outbound
    allowance, count and wake-mark check. Best of a few runs."""
    per_source = UDP_BATCH // SOURCES
    sources = [r.neighbor for r in setup.sources if r.neighbor is not None]
    sinks = [r.neighbor for r in setup.sinks if r.neighbor is not None]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batches):
            for neighbor in sources:
                neighbor.inbound_allowance()
                neighbor.counters.packets_in += per_source
            for neighbor in sinks:
                neighbor.outbound_allowance()
                counters = neighbor.counters
                counters.packets_out += per_source
                if counters.packets_out >= neighbor.wake_mark:
                    raise SystemExit("a wake mark was reached")
        best = min(best, time.perf_counter() - start)
    return best / batches


def _bench_relay(args: argparse.Namespace, root: Path) -> list[str]:
    setup = _relay_setup(root, args.batches)
    # Setup made many long-lived objects; frozen, they are not rescanned by every collection.
    gc.collect()
    gc.freeze()
    times: dict[str, dict[str, list[Timing]]] = {
        mix: {label: [] for label, _ in SETTINGS} for mix in MIXES
    }
    runs = dict.fromkeys(MIXES, 0)
    order = random.Random(SEED)
    for index in range(args.rounds + 1):  # round 0 warms up and is not kept
        for mix in MIXES:
            # A fresh order each round: no setting always runs first or after the same one.
            for label, accounting in order.sample(SETTINGS, len(SETTINGS)):
                timing = _time_relay(setup, mix, accounting)
                runs[mix] += 1
                if index:
                    times[mix][label].append(timing)
    checks = _relay_checks(setup, runs)
    alone = _accounting_alone(setup, 20_000)
    gc.unfreeze()

    packets = args.batches * UDP_BATCH
    lines = [
        f"1. relay loop: Node.relay_batch on {args.batches} batches of {UDP_BATCH} frames "
        f"({packets:,} packets) per timing, arriving from {SOURCES} links and sent on "
        f"{SINKS}; best of {args.rounds} interleaved rounds",
        f"   {'mix':24} {'setting':15} {'ns/packet':>9} {'cpu ns/p':>9}   "
        "accounting costs: best / best (median of paired rounds)",
    ]
    for mix, peeled in MIXES.items():
        runs_of = times[mix]
        best = {label: min(t.wall for t in ts) for label, ts in runs_of.items()}
        best_cpu = {label: min(t.cpu for t in ts) for label, ts in runs_of.items()}
        for label, _ in SETTINGS:
            note = ""
            if label != "default":
                paired = statistics.median(
                    d.wall / o.wall for d, o in zip(runs_of["default"], runs_of[label], strict=True)
                )
                overhead = best["default"] / best[label] - 1
                what = "accounting" if label == "accounting off" else "A/A noise"
                note = f"   {what} {overhead:+.1%} ({paired - 1:+.1%})"
                if label == "accounting off":
                    verdict = "PASS" if overhead <= OVERHEAD_TARGET else "MISS"
                    note += f"  {verdict} (target <= {OVERHEAD_TARGET:.0%})"
                    result(
                        f"relay loop with / without accounting - 1, {mix}",
                        overhead * 100,
                        "%",
                        f"<= {OVERHEAD_TARGET:.0%}",
                        overhead <= OVERHEAD_TARGET,
                    )
            name = f"{mix} ({peeled}/{UDP_BATCH} peeled)" if label == "default" else ""
            lines.append(
                f"   {name:24} {label:15} {best[label] / packets * 1e9:9,.0f} "
                f"{best_cpu[label] / packets * 1e9:9,.0f}{note}"
            )
    forward_ns = min(t.wall for t in times["forward"]["default"]) / packets * 1e9
    alone_ns = alone / UDP_BATCH * 1e9
    lines += [
        f"   the accounting calls, timed alone: {alone * 1e6:.2f} us per batch = "
        f"{alone_ns:.0f} ns/packet, {alone_ns / forward_ns:.1%} of forward's default",
        "   " + checks,
    ]
    return lines


# --- the Neighbors service, with neighbours pumped in memory --------------------------------


class StandInRpc:
    """What the service uses of GlobalRpc: `register`, and `call`, which hands the call to
    the neighbour's own Neighbor (`forward`) or answers a claim with its ack at once."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.peers: dict[bytes, Neighbor] = {}
        self.forward = True
        self.calls = 0

    def register(self, method: str, handler: Any) -> None:
        self.handlers[method] = handler

    async def call(self, neighbor: bytes, method: str, params: Any) -> Any:
        self.calls += 1
        if not self.forward and method == "push_debt":
            return wire(DebtAck(0))
        peer = self.peers[neighbor]
        effect = peer.receive_call(method, params, time.time())
        peer.apply(effect)  # its own calls, if any, are not made: it only answers here
        if isinstance(effect.reply, Refused):
            raise RpcError(effect.reply.code, effect.reply.message, effect.reply.data)
        return effect.reply


@dataclass(slots=True)
class Service:
    service: Neighbors
    rpc: StandInRpc
    peers: dict[bytes, Neighbor]  # by fingerprint: each neighbour's Neighbor for us


def _config(root: Path, **accounting: Any) -> Config:
    generated = generate_network(root, 1, [])[0]
    config = load_config(generated.config_path)
    changed = msgspec.structs.replace(config.accounting, **accounting)
    return msgspec.structs.replace(config, accounting=changed)


async def _idle(service: Neighbors) -> None:
    """Until no neighbour's lock is held and nothing it spawned is still running."""
    for _ in range(1000):
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        if not any(lock.locked() for lock in service._locks.values()):
            return
        await anyio.sleep(0.001)
    raise SystemExit("the service did not settle")


async def _start(
    config: Config, ledger: AsyncLedger, links: int, tg: Any, *, timers: bool
) -> Service:
    """A running service with `links` neighbours, linked and priced both ways. `timers`:
    its timer loop runs (part 3); else the bench fires the timers itself (part 2), and the
    service only gets the task group its calls run in."""
    rng = random.Random(SEED)
    me = Identity.generate(rng.randbytes)
    rpc = StandInRpc()
    service = Neighbors(me, config, rpc)  # type: ignore[arg-type]
    service.start(ledger)
    if timers:
        await tg.start(service.run)
    else:
        service._task_group = tg
    policy = service.policy_for(PRICE)
    peers: dict[bytes, Neighbor] = {}
    for _ in range(links):
        peer = Identity.generate(rng.randbytes)
        theirs = Neighbor.restore(peer, me.identity_public, policy, rng.randbytes, [])
        peers[peer.fingerprint] = rpc.peers[peer.fingerprint] = theirs
        service.on_link_up(peer.fingerprint, peer.identity_public, PRICE, lambda n: None)
    await _idle(service)
    for fp, theirs in peers.items():
        await _deliver(service, fp, theirs, theirs.on_link_up(time.time(), policy))
    await _idle(service)
    if not all(n.priced for n in service.neighbors.values()) or len(service.neighbors) != links:
        raise SystemExit("the neighbours are not all priced")
    return Service(service, rpc, peers)


async def _deliver(service: Neighbors, fp: bytes, theirs: Neighbor, effect: Effect) -> None:
    """A neighbour runs `effect`: its calls reach the service as its RPC server hands them."""
    theirs.apply(effect)
    for call in effect.calls:
        try:
            outcome: Any = Answered(await service._on_call(fp, call.method, call.params))
        except RpcError as exc:
            outcome = Refused(exc.code, exc.message, exc.data)
        await _deliver(service, fp, theirs, theirs.receive_reply(call.token, outcome, time.time()))


def _move_counts(setup: Service, rng: random.Random) -> None:
    """Traffic both ways since the last interval, a few packets lost in flight each way."""
    for fp, theirs in setup.peers.items():
        ours = setup.service.neighbors[fp].counters
        out, back = rng.randrange(1_000, 100_000), rng.randrange(1_000, 100_000)
        ours.packets_out += out
        theirs.counters.packets_in += out - rng.randrange(10)
        theirs.counters.packets_out += back
        ours.packets_in += back - rng.randrange(10)


def _arrivals(links: int, rng: random.Random) -> list[int]:
    """How the group commit groups the claims of `links` neighbours in one configured push
    interval: each pushes at a phase of its own (uniform), a group is the first claim and those
    arriving within claim_commit_delay_secs of it. Returns the groups' sizes."""
    times = sorted(rng.uniform(0, CONFIGURED.push_debt_secs) for _ in range(links))
    delay = CONFIGURED.claim_commit_delay_secs
    starts = [0]
    for index in range(1, links):
        if times[index] >= times[starts[-1]] + delay:
            starts.append(index)
    return [b - a for a, b in zip(starts, [*starts[1:], links], strict=True)]


@dataclass(slots=True)
class Work:
    cpu: float = 0.0  # the process's
    wall: float = 0.0
    transactions: int = 0
    loop: float = 0.0  # the event loop's thread's part of `cpu` (the rest is the ledger's)


async def _send(setup: Service, now: float, fps: set[bytes]) -> Work:
    """The timer loop's tick at which these neighbours' claims are due: all signed, one
    transaction, then the calls and their acks."""
    service = setup.service
    gc.collect()
    wall, cpu, loop = time.perf_counter(), time.process_time(), time.thread_time()
    await service._handle_due(set(fps), now)
    await _idle(service)
    return Work(time.process_time() - cpu, time.perf_counter() - wall, 1, time.thread_time() - loop)


def _claims_due(setup: Service, now: float, fps: list[bytes]) -> list[tuple[bytes, int, Any]]:
    """Every neighbour's claim, signed by its own Neighbor (untimed): (fp, token, params)."""
    claims: list[tuple[bytes, int, Any]] = []
    for fp in fps:
        theirs = setup.peers[fp]
        effect = theirs.handle_timer(now)
        if effect is None:
            raise SystemExit("a neighbour had no claim due")
        theirs.apply(effect)
        (call,) = [c for c in effect.calls if c.method == "push_debt"]
        claims.append((fp, call.token, call.params))
    return claims


async def _receive(setup: Service, now: float, groups: list[int], fps: list[bytes]) -> Work:
    """Every neighbour's claim, signed by its Neighbor (untimed), handed to the service in
    arrival groups; each group commits in one transaction before its claims are answered."""
    claims = _claims_due(setup, now, fps)
    service = setup.service
    answers: dict[bytes, Any] = {}

    async def hand_over(fp: bytes, params: Any) -> None:
        answers[fp] = await service._on_call(fp, "push_debt", params)

    gc.collect()
    wall, cpu, loop = time.perf_counter(), time.process_time(), time.thread_time()
    position = 0
    for size in groups:
        async with anyio.create_task_group() as tg:
            for fp, _, params in claims[position : position + size]:
                tg.start_soon(hand_over, fp, params)
        position += size
    work = Work(
        time.process_time() - cpu,
        time.perf_counter() - wall,
        len(groups),
        time.thread_time() - loop,
    )
    for fp, token, _ in claims:  # each neighbour takes its ack (untimed: its work)
        theirs = setup.peers[fp]
        theirs.apply(theirs.receive_reply(token, Answered(answers[fp]), now))
    return work


async def _commit(
    setup: Service, effects: list[tuple[bytes, Effect]], recorded_at: int
) -> dict[bytes, bytes]:
    """The effects' entries and prunes in one transaction, through the AsyncLedger hop, as
    `Neighbors._commit` makes it; the neighbours' new heads."""
    ledger = setup.service.ledger
    assert ledger is not None
    items = [(fp, kind, body) for fp, effect in effects for kind, body in effect.entries]
    prunes = [(fp, kind, keep) for fp, effect in effects for kind, keep in effect.prunes]
    entries = await ledger.append_many(items, recorded_at, prune=prunes)
    return {entry.neighbor: entry.hash for entry in entries}


async def _send_work(setup: Service, now: float, fps: list[bytes]) -> Work:
    """What sending the claims costs without the service's event-loop plumbing (its tasks,
    locks and waits), as the bench before Neighbors measured it: every due Neighbor's
    `handle_timer`, one transaction, `apply`, and each ack handed back (`loop` here: the
    Neighbors' own work)."""
    neighbors = setup.service.neighbors
    ack = Answered(wire(DebtAck(0)))
    gc.collect()
    wall, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    effects = [(fp, effect) for fp in fps if (effect := neighbors[fp].handle_timer(now))]
    work = time.thread_time() - own
    heads = await _commit(setup, effects, int(now))
    own = time.thread_time()
    for fp, effect in effects:
        neighbor = neighbors[fp]
        neighbor.apply(effect, ledger_head=heads.get(fp))
        for call in effect.calls:
            neighbor.apply(neighbor.receive_reply(call.token, ack, now))
    work += time.thread_time() - own
    return Work(time.process_time() - cpu, time.perf_counter() - wall, 1, work)


async def _receive_work(setup: Service, now: float, groups: list[int], fps: list[bytes]) -> Work:
    """What receiving the claims costs without the service's plumbing: for each arrival
    group, every claim's `receive_call`, one transaction, `apply` (`loop`: the Neighbors'
    own work)."""
    neighbors = setup.service.neighbors
    claims = _claims_due(setup, now, fps)
    answers: dict[bytes, Any] = {}
    gc.collect()
    wall, cpu, work = time.perf_counter(), time.process_time(), 0.0
    position = 0
    for size in groups:
        own = time.thread_time()
        effects = [
            (fp, neighbors[fp].receive_call("push_debt", params, now))
            for fp, _, params in claims[position : position + size]
        ]
        work += time.thread_time() - own
        heads = await _commit(setup, effects, int(now))
        own = time.thread_time()
        for fp, effect in effects:
            neighbors[fp].apply(effect, ledger_head=heads.get(fp))
            answers[fp] = effect.reply
        work += time.thread_time() - own
        position += size
    done = Work(time.process_time() - cpu, time.perf_counter() - wall, len(groups), work)
    for fp, token, _ in claims:
        theirs = setup.peers[fp]
        theirs.apply(theirs.receive_reply(token, Answered(answers[fp]), now))
    return done


def _share(
    cpu: float, target: float = CORE_SHARE_TARGET, verdict: bool = True, *, figure: str = ""
) -> str:
    share = cpu / CONFIGURED.push_debt_secs
    if not verdict:
        return f"{share:6.2%} of a core"
    if figure:
        result(figure, share * 100, "% of a core", f"<= {target:.0%}", share <= target)
    mark = "PASS" if share <= target else "MISS"
    return f"{share:6.2%} of a core  {mark} (target <= {target:.0%})"


async def _push_debt(args: argparse.Namespace, root: Path, ledger_dir: Path) -> list[str]:
    links = args.links
    config = _config(
        root,
        push_debt_secs=PUSH_SECS,
        checkpoint_secs=PUSH_SECS,
        keep_claims=KEEP_CLAIMS,
        claim_commit_delay_secs=GROUP_DELAY_SECS,
    )
    rng = random.Random(SEED)
    ledger = await AsyncLedger.open(ledger_dir / "ledger.db")
    sends: list[Work] = []
    receives: list[Work] = []
    works: list[tuple[Work, Work]] = []
    checkpoints: list[Work] = []
    try:
        async with anyio.create_task_group() as tg:
            setup = await _start(config, ledger, links, tg, timers=False)
            fps = list(setup.peers)
            setup.rpc.forward = False  # from here on a claim's ack comes at once
            now = time.time()
            # Warm-up: enough claims that prunes find bodies to drop, and staggered seqs (a
            # tenth of the neighbours prune each interval).
            warm = KEEP_CLAIMS + PRUNE_EVERY
            for step in range(warm + PRUNE_EVERY):
                now = max(now + PUSH_SECS, time.time())
                due = {fp for index, fp in enumerate(fps) if step >= index % PRUNE_EVERY}
                _move_counts(setup, rng)
                await _send(setup, now, due)
                await _receive(setup, now, [len(due)], [fp for fp in fps if fp in due])
            for _ in range(args.push_rounds):
                now = max(now + PUSH_SECS, time.time())
                _move_counts(setup, rng)
                sends.append(await _send(setup, now, set(fps)))
                receives.append(await _receive(setup, now, _arrivals(links, rng), fps))
                # The next interval, without the service's plumbing.
                now = max(now + PUSH_SECS, time.time())
                _move_counts(setup, rng)
                sent = await _send_work(setup, now, fps)
                works.append((sent, await _receive_work(setup, now, _arrivals(links, rng), fps)))
                # The checkpoint tick, after traffic that no claim has counted yet.
                _move_counts(setup, rng)
                gc.collect()
                wall, cpu = time.perf_counter(), time.process_time()
                await setup.service._checkpoint(now)
                checkpoints.append(Work(time.process_time() - cpu, time.perf_counter() - wall, 1))
            tg.cancel_scope.cancel()
    finally:
        await ledger.aclose()
    size = (ledger_dir / "ledger.db").stat().st_size

    send, receive = min(sends, key=lambda w: w.cpu), min(receives, key=lambda w: w.cpu)
    work_send, work_receive = min(works, key=lambda pair: pair[0].cpu + pair[1].cpu)
    checkpoint = min(checkpoints, key=lambda w: w.cpu)
    total = send.cpu + receive.cpu
    work_total = work_send.cpu + work_receive.cpu
    interval = CONFIGURED.push_debt_secs
    per_link = 1e6 / links

    def row(label: str, work: Work, loop: str, note: str = "") -> str:
        split = f"({loop} {work.loop:.3f}, ledger {work.cpu - work.loop:.3f})"
        return f"     {label:<58} {work.cpu:7.3f} {work.wall:7.2f}   {split} {note}".rstrip()

    group = CONFIGURED.claim_commit_delay_secs
    work_share = _share(work_total, figure=f"push_debt CPU, {links:,} links")
    return [
        f"2. push_debt, one interval ({interval:g} s) of one node with {links:,} neighbours "
        f"(ledger {ledger_dir}, {size / 1e6:.1f} MB after the run); best of "
        f"{args.push_rounds}; the ledger's part is its thread's CPU and the hops to it",
        f"   {'the accounting work (the scope of the target, as before)':<60} "
        f"{'cpu s':>7} {'wall s':>7}",
        row(
            "sending: handle_timer, 1 transaction, apply, the acks",
            work_send,
            "Neighbors",
            f"{work_send.cpu * per_link:.0f} us a link",
        ),
        row(
            f"receiving: receive_call, {work_receive.transactions:,} transactions, apply",
            work_receive,
            "Neighbors",
            f"{work_receive.cpu * per_link:.0f} us a link; "
            f"{links / work_receive.transactions:.1f} claims a group",
        ),
        f"     {'total':<58} {work_total:7.3f} {'':7}   -> {work_share}",
        f"   {'the whole Neighbors service (its tasks, locks and waits too)':<60}",
        row(
            "sending: every claim due at one tick, 1 transaction",
            send,
            "event loop",
            f"{send.cpu * per_link:.0f} us a link: the timer tick, the commit (claims, "
            "counts, a tenth's prunes), a task per call and its ack",
        ),
        row(
            f"receiving: verified, applied, {receive.transactions:,} group commits",
            receive,
            "event loop",
            f"{receive.cpu * per_link:.0f} us a link; {links / receive.transactions:.1f} "
            f"claims a group (claim_commit_delay_secs {group:g}, phases uniform); the RPC "
            "server's task per call included",
        ),
        f"     {'total':<58} {total:7.3f} {'':7}   -> {_share(total, verdict=False)}",
        f"   not push_debt, for scale: the checkpoint tick (every "
        f"{CONFIGURED.checkpoint_secs:g} s) with all {links:,} neighbours' counts moved, one "
        f"transaction: cpu {checkpoint.cpu * 1e3:.0f} ms, wall {checkpoint.wall * 1e3:.0f} ms "
        f"-> {checkpoint.cpu / CONFIGURED.checkpoint_secs:.2%} of a core",
    ]


async def _idle_cost(args: argparse.Namespace, root: Path, ledger_dir: Path) -> list[str]:
    links = args.links
    push, every = CONFIGURED.push_debt_secs / SPEEDUP, CONFIGURED.checkpoint_secs / SPEEDUP
    config = _config(root, push_debt_secs=push, checkpoint_secs=every)
    ledger = await AsyncLedger.open(ledger_dir / "idle.db")
    try:
        async with anyio.create_task_group() as tg:
            setup = await _start(config, ledger, links, tg, timers=True)
            await anyio.sleep(push)  # the claims and counts of the link-ups are behind
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            await anyio.sleep(args.idle)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if len(setup.service.neighbors) != links:
                raise SystemExit("a neighbour went missing")
            tg.cancel_scope.cancel()
    finally:
        await ledger.aclose()
    share = cpu / wall / SPEEDUP
    mark = "PASS" if share <= IDLE_TARGET else "MISS"
    result(
        f"idle timers of {links:,} neighbours",
        share * 100,
        "% of a core",
        f"<= {IDLE_TARGET:.0%}",
        share <= IDLE_TARGET,
    )
    return [
        f"3. idle: {links:,} neighbours linked and priced, no traffic; the timer loop for "
        f"{wall:.1f} s with every interval {SPEEDUP}x shorter (push {push:g} s, checkpoint "
        f"{every:g} s): cpu {cpu:.3f} s = {cpu / wall:.2%} of a core, so at the configured "
        f"intervals ({CONFIGURED.push_debt_secs:g} s, {CONFIGURED.checkpoint_secs:g} s) "
        f"{share:.3%} of a core  {mark} (target <= {IDLE_TARGET:.0%})",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs")
    parser.add_argument("--rounds", type=int, help="relay loop rounds (default 60, quick 12)")
    parser.add_argument("--batches", type=int, help="batches per timing (default 25, quick 20)")
    parser.add_argument("--links", type=int, default=1000, help="neighbours in parts 2 and 3")
    parser.add_argument("--push-rounds", type=int, help="push_debt rounds (default 3, quick 1)")
    parser.add_argument("--idle", type=float, help="idle seconds (default 10, quick 4)")
    parser.add_argument("--dir", type=Path, help="where the ledger files go")
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (12 if quick else 60)
    args.batches = args.batches or (20 if quick else 25)
    args.push_rounds = args.push_rounds or (1 if quick else 3)
    args.idle = args.idle or (4.0 if quick else 10.0)
    if min(args.rounds, args.batches, args.links, args.push_rounds) < 1 or args.idle <= 0:
        parser.error("counts and durations must be positive")
    configure_logging("warning", "json")

    started = time.perf_counter()
    print(f"python {sys.version.split()[0]}, seed {SEED}{', --quick' if quick else ''}")
    with tempfile.TemporaryDirectory(prefix="bench-accounting-") as tmp:
        for line in _bench_relay(args, Path(tmp) / "net"):
            print(line, flush=True)
    for part in (_push_debt, _idle_cost):
        with (
            tempfile.TemporaryDirectory(prefix="bench-accounting-") as tmp,
            tempfile.TemporaryDirectory(prefix="bench-accounting-", dir=args.dir) as ledgers,
        ):
            for line in anyio.run(part, args, Path(tmp) / "net", Path(ledgers)):
                print(line, flush=True)
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
