"""What debt accounting costs: per packet in the relay loop, and per push_debt interval.

1. The relay loop. A real `Node` (config from `netgen.generate_network`, no sockets) gets
   SOURCES + SINKS neighbours, each a real `LinkRunner` over a `core.link.Link` whose Noise
   handshake and identity proofs were pumped in memory, with a priced `Account` (both offers
   accepted, PRICE_UMEL a packet, debt limits no run reaches: accounting runs on every packet
   but never refuses one). A runner's transport only counts what it is given, so all the
   node's per-frame work is measured and no syscall is. Batches of UDP_BATCH frames (one UDP
   wake-up) arrive round-robin from the SOURCES links as (link, next_peeler, packet), which is
   what `LinkRunner.receive` hands to `Node.relay_batch`. Only `relay_batch` is timed. Each
   frame leaves on a random one of the SINKS links. Two mixes:
     forward  every frame forwarded without onion crypto (next_peeler is a sink). This is the
              worst case for accounting's share, with the least other work per packet.
     mixed    one frame in four peeled here (route [this node, sink]: X25519, KDF, MAC,
              ChaCha20, replay filter), the rest forwarded.
   In both, every frame is re-encrypted for its sink's link (ChaCha20-Poly1305).
   Each round times the same batches once per setting of the module flags `ACCOUNTING` and
   `COUNT_PACKETS`, in a fresh seeded order every round, so drift hits all settings alike.
   Each timing gets a fresh replay filter, so the same onions peel again. Printed: the best
   round of each setting (noise only ever adds time) in ns/packet, wall and CPU, and what
   each flag costs against it being off, best / best, with the median of the per-round
   paired ratios in brackets. An A/A control, the default settings timed twice per round,
   shows the noise floor. Target: accounting adds <= 3 % per packet.
   The difference the flag makes is a few calls per link per batch, near that floor, so the
   same calls are also timed alone. The flag does not remove relay_batch's per-packet
   countdown of each source's allowance, which runs either way and so is in neither figure.

2. push_debt with LINKS neighbours: one node's work in one interval. For each link it signs
   its claim (`Account.make_claim`), verifies and applies the neighbour's claim
   (`Account.on_claim`; the neighbour's account signs it before the timing), and commits
   each with a checkpoint of the account to a real SQLite ledger file in a temp dir, through
   `LedgerStore.append_many`. This runs twice: with one transaction per claim, two per link,
   as `runtime.accounting._commit` does, and with all of them in one transaction. Counts move
   between intervals, and every claim is applied (no disputes). CPU is `time.process_time()`
   (user + system, all threads). Wall time is printed apart, since waiting for fsync is wall,
   not CPU. The share of one core is CPU / push_debt_secs (60 s). Also printed: the cost per
   step and link, the three prunes the runtime adds per link (keep_last=1 stands in for a
   ledger that already holds keep_claims claims), the CPU of the hop to AsyncLedger's worker
   thread that each runtime ledger call pays, their sum as the runtime spends it, and for
   scale the periodic checkpoint of every account. Target: <= 1 % of one core.
   Not included: the RPC that carries each claim (encoding, link encryption, the reply).
   --quick runs the per-transaction parts on a sample of the links and scales them up.

Run: .venv/bin/python bench/accounting.py [--quick] [--rounds R] [--batches B] [--links N]
     [--sample S] [--prune-sample S] [--push-rounds R] [--hops N] [--dir DIR]
     (DIR: where the ledger file goes, to measure a particular disk; default the system temp)
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

import anyio
import msgspec

from earendil_py.core.accounting import Account, AccountState, ClaimApplied, DebtClaim
from earendil_py.core.identity import Identity
from earendil_py.core.link import Link, LinkState
from earendil_py.core.packet import build_packet
from earendil_py.core.pricing import AcceptanceRule, PriceAccepted, PriceTerms
from earendil_py.core.relay import Peeler, encode_datagram
from earendil_py.netgen import generate_network
from earendil_py.runtime import node as node_module
from earendil_py.runtime.config import AccountingConfig
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import UDP_BATCH, LinkRunner, Node, RouteInfo
from earendil_py.runtime.store import AsyncLedger, LedgerStore

SEED = 2026
OVERHEAD_TARGET = 0.03  # accounting on / off - 1, per packet in the relay loop
CORE_SHARE_TARGET = 0.01  # push_debt CPU / push interval
SOURCES = 3  # links a batch arrives on
SINKS = 3  # links its frames leave on
MIXES = {"forward": 0, "mixed": UDP_BATCH // 4}  # frames peeled here per batch
PAYLOAD_BYTES = 200
PRICE_UMEL = 1
DEBT_LIMIT_UMEL = 10**15  # far beyond any run, so no packet is refused
NOW = 1_800_000_000  # unix seconds, for offers and claims
RELAY_NOW = 1000.0  # monotonic seconds, for the replay filter
SECRET = "bench-accounting-route-cookie"
TERMS = PriceTerms(PRICE_UMEL, DEBT_LIMIT_UMEL, ("pow",))
RULE = AcceptanceRule(PRICE_UMEL, DEBT_LIMIT_UMEL, ("pow",))
ACCOUNTING = AccountingConfig()  # push_debt_secs, claim_tolerance_packets, keep_claims

# (label, ACCOUNTING, COUNT_PACKETS). "default again" is the A/A control.
SETTINGS = [
    ("default", True, True),
    ("accounting off", False, True),
    ("counting off", True, False),
    ("default again", True, True),
]

# Ledger calls per link and interval in runtime.accounting: two `_commit`s (push_debt and
# _on_push_debt) and three `prune`s after them.
RUNTIME_CALLS = 5

_encoder = msgspec.msgpack.Encoder()


# --- 1. the relay loop ----------------------------------------------------------------------


class CountingTransport:
    """A `Transport` that accepts every frame and only counts it."""

    def __init__(self) -> None:
        self.frames = 0

    def send(self, message: bytes) -> bool:
        self.frames += 1
        return True

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


def _priced_pair(me: Identity, peer: Identity) -> tuple[Account, Account]:
    """Our account with `peer` and theirs with us, each side's offer accepted by the other."""
    ours = Account(me, peer.identity_public, AccountState(peer.fingerprint))
    theirs = Account(peer, me.identity_public, AccountState(me.fingerprint))
    for offerer, answerer in ((ours, theirs), (theirs, ours)):
        outcome = offerer.on_answer(answerer.on_offer(offerer.propose(TERMS, NOW), RULE, NOW))
        if not isinstance(outcome, PriceAccepted):
            raise SystemExit(f"price not accepted: {outcome}")
    return ours, theirs


@dataclass(slots=True)
class RelaySetup:
    node: Node
    sources: list[LinkRunner]
    sinks: list[LinkRunner]
    transports: list[CountingTransport]
    batches: dict[str, list[list[tuple[LinkRunner | None, bytes, bytes]]]]


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
        # What `Node.add_link` and `Accounting.on_link_up` do, minus the tasks they spawn
        # (gossip, push_price), which need a running node.
        runner.account = _priced_pair(me, peer)[0]
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
    batches: dict[str, list[list[tuple[LinkRunner | None, bytes, bytes]]]] = {}
    for mix, peeled in MIXES.items():
        every = UDP_BATCH // peeled if peeled else 0
        batches[mix] = []
        for _ in range(batch_count):
            batch: list[tuple[LinkRunner | None, bytes, bytes]] = []
            for position in range(UDP_BATCH):
                source = sources[position % SOURCES]
                sink = choose.randrange(SINKS)
                if every and position % every == 0:
                    route = [me_hop, (sink_peers[sink].fingerprint, sink_peers[sink].onion_public)]
                    payload = encode_datagram(1, rng(PAYLOAD_BYTES))
                    batch.append((source, *build_packet(route, payload, rng)))
                else:
                    batch.append((source, *choose.choice(forwarded[sink])))
            batches[mix].append(batch)
    return RelaySetup(node, sources, sinks, transports, batches)


@dataclass(frozen=True, slots=True)
class Timing:
    wall: float  # seconds, time.perf_counter()
    cpu: float  # seconds, time.process_time()


def _time_relay(setup: RelaySetup, mix: str, accounting: bool, counting: bool) -> Timing:
    """Relay every batch of `mix` once with the given flags; the time of that alone."""
    node = setup.node
    node.peeler = Peeler(node.identity.onion_secret)  # a fresh replay filter: peel them again
    relay, batches = node.relay_batch, setup.batches[mix]
    gc.collect()
    node_module.ACCOUNTING, node_module.COUNT_PACKETS = accounting, counting
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            relay(batch, RELAY_NOW)
        return Timing(time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        node_module.ACCOUNTING = node_module.COUNT_PACKETS = True


def _relay_checks(setup: RelaySetup, runs: dict[str, int]) -> str:
    """Every frame reached a sink, nothing was dropped, accounts counted what they should."""
    node = setup.node
    frames = sum(runs[mix] * len(batches) * UDP_BATCH for mix, batches in setup.batches.items())
    accounted = frames * sum(a for _, a, _ in SETTINGS) // len(SETTINGS)
    sent = sum(t.frames for t in setup.transports)
    received = sum(r.account.received for r in setup.sources if r.account is not None)
    charged = sum(r.account.sent for r in setup.sinks if r.account is not None)
    drops = node.drop_counts() + node.peeler.drops
    for runner in setup.sources + setup.sinks:
        drops.update(runner.statistics().drops)
    ok = sent == frames and received == charged == accounted and not drops
    return (
        f"checks: {sent:,} of {frames:,} frames reached a sink link; accounts counted "
        f"{received:,} in and {charged:,} out of the {accounted:,} relayed with accounting on; "
        f"drops: {dict(drops) or 'none'} -> {'ok' if ok else 'FAILED'}"
    )


def _gated_alone(setup: RelaySetup, batches: int) -> float:
    """Seconds per batch of just the calls that ACCOUNTING gates, made as relay_batch and
    send_onions make them: per source link `inbound_allowance()` and its `received` count,
    per sink link `outbound_allowance()` and its `sent` count. Best of a few runs."""
    per_source = UDP_BATCH // SOURCES
    sources = [(runner, runner.account) for runner in setup.sources]
    sinks = [runner.account for runner in setup.sinks]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batches):
            for runner, account in sources:
                runner.inbound_allowance()
                if account is not None:
                    account.received += per_source
            for account in sinks:
                if account is not None:
                    account.outbound_allowance()
                    account.sent += per_source
        best = min(best, time.perf_counter() - start)
    return best / batches


def _bench_relay(args: argparse.Namespace, root: Path) -> list[str]:
    setup = _relay_setup(root, args.batches)
    # Setup made many long-lived objects; frozen, they are not rescanned by every collection.
    gc.collect()
    gc.freeze()
    times: dict[str, dict[str, list[Timing]]] = {
        mix: {label: [] for label, _, _ in SETTINGS} for mix in MIXES
    }
    runs = dict.fromkeys(MIXES, 0)
    order = random.Random(SEED)
    for index in range(args.rounds + 1):  # round 0 warms up and is not kept
        for mix in MIXES:
            # A fresh order each round: no setting always runs first or after the same one.
            for label, accounting, counting in order.sample(SETTINGS, len(SETTINGS)):
                timing = _time_relay(setup, mix, accounting, counting)
                runs[mix] += 1
                if index:
                    times[mix][label].append(timing)
    checks = _relay_checks(setup, runs)
    gated = _gated_alone(setup, 20_000)
    gc.unfreeze()

    packets = args.batches * UDP_BATCH
    lines = [
        f"1. relay loop: Node.relay_batch on {args.batches} batches of {UDP_BATCH} frames "
        f"({packets:,} packets) per timing, arriving from {SOURCES} links and sent on "
        f"{SINKS}; best of {args.rounds} interleaved rounds",
        f"   {'mix':24} {'setting':15} {'ns/packet':>9} {'cpu ns/p':>9}   "
        "the flag costs: best / best (median of paired rounds)",
    ]
    for mix, peeled in MIXES.items():
        runs_of = times[mix]
        best = {label: min(t.wall for t in ts) for label, ts in runs_of.items()}
        best_cpu = {label: min(t.cpu for t in ts) for label, ts in runs_of.items()}
        for label, _, _ in SETTINGS:
            note = ""
            if label != "default":
                paired = statistics.median(
                    d.wall / o.wall for d, o in zip(runs_of["default"], runs_of[label], strict=True)
                )
                overhead = best["default"] / best[label] - 1
                what = {
                    "accounting off": "accounting",
                    "counting off": "counting",
                    "default again": "A/A noise",
                }[label]
                note = f"   {what} {overhead:+.1%} ({paired - 1:+.1%})"
                if label == "accounting off":
                    verdict = "PASS" if overhead <= OVERHEAD_TARGET else "MISS"
                    note += f"  {verdict} (target <= {OVERHEAD_TARGET:.0%})"
            name = f"{mix} ({peeled}/{UDP_BATCH} peeled)" if label == "default" else ""
            lines.append(
                f"   {name:24} {label:15} {best[label] / packets * 1e9:9,.0f} "
                f"{best_cpu[label] / packets * 1e9:9,.0f}{note}"
            )
    forward_ns = min(t.wall for t in times["forward"]["default"]) / packets * 1e9
    gated_ns = gated / UDP_BATCH * 1e9
    lines += [
        f"   the calls ACCOUNTING gates, timed alone: {gated * 1e6:.2f} us per batch = "
        f"{gated_ns:.0f} ns/packet, {gated_ns / forward_ns:.1%} of forward's default "
        "(relay_batch's per-packet allowance countdown runs either way: in neither figure)",
        "   " + checks,
    ]
    return lines


# --- 2. push_debt ---------------------------------------------------------------------------


@dataclass(slots=True)
class Interval:
    """One push_debt interval of one node, or part of one."""

    links: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    sign: float = 0.0  # make_claim, seconds (perf_counter: CPU-bound, so ~CPU)
    verify: float = 0.0  # on_claim
    encode: float = 0.0  # the claim records and the two account snapshots
    transactions: int = 0
    prune_cpu: float = 0.0
    prune_wall: float = 0.0
    prune_links: int = 0

    def scaled(self, links: int) -> Interval:
        """This interval's figures for `links` links, from the ones it measured."""
        f = links / self.links
        g = links / self.prune_links if self.prune_links else 0.0
        return Interval(
            links,
            self.cpu * f,
            self.wall * f,
            self.sign * f,
            self.verify * f,
            self.encode * f,
            round(self.transactions * f),
            self.prune_cpu * g,
            self.prune_wall * g,
            links if self.prune_links else 0,
        )


def _record(*items: object) -> bytes:
    """A ledger event body, as runtime.accounting._record makes it."""
    return _encoder.encode(items)


def _move_counts(pairs: list[tuple[Account, Account]], rng: random.Random) -> None:
    """Traffic both ways since the last interval, a few packets lost in flight each way."""
    for ours, theirs in pairs:
        out, back = rng.randrange(1_000, 100_000), rng.randrange(1_000, 100_000)
        ours.sent += out
        theirs.received += out - rng.randrange(10)
        theirs.sent += back
        ours.received += back - rng.randrange(10)


def _push_interval(
    pairs: list[tuple[Account, Account]],
    store: LedgerStore,
    *,
    batched: bool,
    prune_links: int = 0,
) -> Interval:
    """Our side of one push_debt interval with each of `pairs`: sign our claim and commit it,
    verify and apply the neighbour's claim and commit it. The neighbours' own work (signing
    their claims before, applying ours after) is not timed. With `prune_links`, the first that
    many links also prune as the runtime does after each claim, timed apart."""
    tolerance = ACCOUNTING.claim_tolerance_packets
    their_claims = [theirs.make_claim(NOW) for _, theirs in pairs]
    our_claims: list[DebtClaim] = []
    result = Interval(len(pairs), prune_links=prune_links)
    pending: list[tuple[bytes, str, bytes]] = []
    applied = 0
    clock = time.perf_counter
    gc.collect()
    wall, cpu = clock(), time.process_time()
    for (ours, _), their_claim in zip(pairs, their_claims, strict=True):
        neighbor = ours.neighbor
        t0 = clock()
        claim = ours.make_claim(NOW)
        t1 = clock()
        sent = [
            (neighbor, "claim_sent", _record(claim)),
            (neighbor, "checkpoint", _encoder.encode(ours.snapshot())),
        ]
        t2 = clock()
        if batched:
            pending += sent
        else:
            store.append_many(sent, NOW)
        t3 = clock()
        outcome = ours.on_claim(their_claim, NOW, tolerance)
        t4 = clock()
        received = [
            (neighbor, "claim_received", _record(their_claim)),
            (neighbor, "checkpoint", _encoder.encode(ours.snapshot())),
        ]
        t5 = clock()
        if batched:
            pending += received
        else:
            store.append_many(received, NOW)
        result.sign += t1 - t0
        result.encode += t2 - t1 + t5 - t4
        result.verify += t4 - t3
        applied += isinstance(outcome, ClaimApplied)
        our_claims.append(claim)
    if batched:
        store.append_many(pending, NOW)
    result.cpu, result.wall = time.process_time() - cpu, clock() - wall
    result.transactions = 1 if batched else 2 * len(pairs)
    if applied != len(pairs):
        raise SystemExit(f"only {applied} of {len(pairs)} claims were applied")

    # What runtime.accounting does after each claim; keep_last=1 stands in for a ledger that
    # already holds keep_claims claims, where every call drops a body or two.
    wall, cpu = clock(), time.process_time()
    for ours, _ in pairs[:prune_links]:
        store.prune(ours.neighbor, "claim_sent", 1)
        store.prune(ours.neighbor, "claim_received", 1)
        store.prune(ours.neighbor, "checkpoint", 1)
    result.prune_cpu, result.prune_wall = time.process_time() - cpu, clock() - wall

    for (_, theirs), claim in zip(pairs, our_claims, strict=True):
        theirs.on_claim(claim, NOW, tolerance)
    return result


def _checkpoint_all(pairs: list[tuple[Account, Account]], store: LedgerStore) -> Timing:
    """What `Accounting.checkpoint` does every checkpoint_secs once every account's counts
    moved: a snapshot of each, all in one transaction."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    items = [(ours.neighbor, "checkpoint", _encoder.encode(ours.snapshot())) for ours, _ in pairs]
    store.append_many(items, NOW)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def _hop_cpu(path: Path, calls: int) -> float:
    """CPU seconds that `AsyncLedger`, which the runtime goes through, adds to each ledger
    call: the hop to its worker thread and back. `head()` through it minus `head()` on the
    store, best of 3 each."""
    neighbor = bytes(32)

    async def through_thread() -> float:
        ledger = await AsyncLedger.open(path)
        try:
            best = float("inf")
            for _ in range(3):
                cpu = time.process_time()
                for _ in range(calls):
                    await ledger.head(neighbor)
                best = min(best, time.process_time() - cpu)
            return best / calls
        finally:
            await ledger.aclose()

    hopped = anyio.run(through_thread)
    with LedgerStore.open(path) as store:
        direct = float("inf")
        for _ in range(3):
            cpu = time.process_time()
            for _ in range(calls):
                store.head(neighbor)
            direct = min(direct, time.process_time() - cpu)
    return hopped - direct / calls


def _ledger_cpu(interval: Interval) -> float:
    """CPU spent in the ledger: everything the stamps did not put elsewhere."""
    return interval.cpu - interval.sign - interval.verify - interval.encode


def _share(cpu: float) -> str:
    share = cpu / ACCOUNTING.push_debt_secs
    verdict = "PASS" if share <= CORE_SHARE_TARGET else "MISS"
    return f"{share:6.2%} of a core  {verdict} (target <= {CORE_SHARE_TARGET:.0%})"


def _bench_push_debt(args: argparse.Namespace, ledger_dir: Path) -> list[str]:
    rng = random.Random(SEED)
    me = Identity.generate(rng.randbytes)
    pairs = [_priced_pair(me, Identity.generate(rng.randbytes)) for _ in range(args.links)]
    sample = min(args.sample, args.links)
    prune_sample = min(args.prune_sample, sample)
    hop = _hop_cpu(ledger_dir / "hops.db", args.hops)
    with LedgerStore.open(ledger_dir / "ledger.db") as store:
        _move_counts(pairs, rng)
        _push_interval(pairs, store, batched=True)  # warm-up: every chain and head exists
        each: list[Interval] = []
        batched: list[Interval] = []
        checkpoints: list[Timing] = []
        for _ in range(args.push_rounds):
            _move_counts(pairs, rng)
            each.append(
                _push_interval(pairs[:sample], store, batched=False, prune_links=prune_sample)
            )
            _move_counts(pairs, rng)
            batched.append(_push_interval(pairs, store, batched=True))
            _move_counts(pairs, rng)
            checkpoints.append(_checkpoint_all(pairs, store))
        size = (ledger_dir / "ledger.db").stat().st_size
    one = min(each, key=lambda i: i.cpu).scaled(args.links)
    many = min(batched, key=lambda i: i.cpu)
    interval, every = ACCOUNTING.push_debt_secs, ACCOUNTING.checkpoint_secs
    runtime_cpu = one.cpu + one.prune_cpu + RUNTIME_CALLS * args.links * hop
    checkpoint = min(checkpoints, key=lambda t: t.cpu)
    sampled = "" if sample == args.links else f", measured on {sample} links and scaled"
    pruned = "" if prune_sample == args.links else f", measured on {prune_sample} links and scaled"
    per_link = 1e6 / args.links
    lines = [
        f"2. push_debt, one interval ({interval:g} s) of one node with {args.links:,} "
        f"neighbours: per link sign our claim, verify + apply theirs, commit both with a "
        f"checkpoint (ledger {ledger_dir}, {size / 1e6:.1f} MB after the run); "
        f"best of {args.push_rounds}",
        f"   per-claim transactions ({one.transactions:,}, as _commit{sampled}):",
        f"       cpu {one.cpu:6.3f} s  wall {one.wall:6.2f} s  -> {_share(one.cpu)}",
        f"   one transaction for all ({len(pairs) * 4:,} entries):",
        f"       cpu {many.cpu:6.3f} s  wall {many.wall:6.2f} s  -> {_share(many.cpu)}",
        f"   per link, cpu: make_claim {many.sign * per_link:.0f} us, on_claim "
        f"{many.verify * per_link:.0f} us, claim records + 2 snapshots "
        f"{many.encode * per_link:.0f} us, ledger {_ledger_cpu(many) * per_link:.0f} us "
        f"batched / {_ledger_cpu(one) * per_link:.0f} us "
        f"in 2 transactions ({one.wall / one.transactions * 1e3:.1f} ms wall each)",
        f"   + the runtime's 3 prunes per link ({3 * args.links:,} more transactions{pruned}):",
        f"       cpu {one.prune_cpu:6.3f} s  wall {one.prune_wall:6.2f} s",
        f"   as the runtime does it: per-claim commits, prunes, and {RUNTIME_CALLS} ledger "
        f"calls per link through AsyncLedger ({hop * 1e6:.0f} us cpu each for the thread hop):",
        f"       cpu {runtime_cpu:6.3f} s  -> {_share(runtime_cpu)}; its ledger thread waits "
        f"{(one.wall + one.prune_wall):.1f} s of every {interval:g} s",
        f"   not push_debt, for scale: the checkpoint every {every:g} s of all {args.links:,} "
        f"accounts (one transaction): cpu {checkpoint.cpu * 1e3:.0f} ms, wall "
        f"{checkpoint.wall * 1e3:.0f} ms -> {checkpoint.cpu / every:.2%} of a core",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 10 s: fewer rounds, samples")
    parser.add_argument("--rounds", type=int, help="relay loop rounds (default 60, quick 12)")
    parser.add_argument("--batches", type=int, help="batches per timing (default 25, quick 20)")
    parser.add_argument("--links", type=int, default=1000, help="push_debt neighbours")
    parser.add_argument("--sample", type=int, help="links given per-claim transactions")
    parser.add_argument("--prune-sample", type=int, help="links whose prunes are timed")
    parser.add_argument("--push-rounds", type=int, help="push_debt rounds (default 2, quick 1)")
    parser.add_argument("--hops", type=int, help="AsyncLedger calls timed (default 500)")
    parser.add_argument("--dir", type=Path, help="where the ledger file goes")
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (12 if quick else 60)
    args.batches = args.batches or (20 if quick else 25)
    args.sample = args.sample or (100 if quick else args.links)
    args.prune_sample = args.prune_sample or (100 if quick else 250)
    args.push_rounds = args.push_rounds or (1 if quick else 2)
    args.hops = args.hops or (200 if quick else 500)
    if min(args.rounds, args.batches, args.links, args.sample, args.prune_sample, args.hops) < 1:
        parser.error("counts must be positive")
    configure_logging("warning", "json")

    started = time.perf_counter()
    print(f"python {sys.version.split()[0]}, seed {SEED}{', --quick' if quick else ''}")
    with tempfile.TemporaryDirectory(prefix="bench-accounting-") as tmp:
        for line in _bench_relay(args, Path(tmp) / "net"):
            print(line, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-accounting-", dir=args.dir) as tmp:
        for line in _bench_push_debt(args, Path(tmp)):
            print(line, flush=True)
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
