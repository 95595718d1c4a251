"""What debt accounting costs: per packet in the relay loop, and per push_debt interval.

1. The relay loop. A real `Node` (config from `netgen.generate_network`, no sockets) gets
   SOURCES + SINKS neighbours, each a real `LinkRunner` over a `core.link.Link` whose Noise
   handshake and identity proofs were pumped in memory, with a priced `Account` (both offers
   accepted, PRICE_UMEL a packet, debt limits no run reaches: accounting runs on every packet
   but never refuses one). A runner's transport only counts what it is given, so all the
   node's per-frame work is measured and no syscall is. Batches of UDP_BATCH onion frames
   (one UDP wake-up) arrive round-robin from the SOURCES links, handed to `Node.relay_batch`
   per link as the UDP listener does. Only `relay_batch` is timed. Each frame leaves on a
   random one of the SINKS links. Two mixes:
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
   same calls are also timed alone.

2. push_debt with LINKS neighbours: one node's work in one interval, as runtime.accounting
   does it. Sending: `push_debts` signs a claim for every neighbour (`Account.make_claim`)
   and commits all of them, each with a checkpoint of its account, in ONE `append_many`
   transaction. Receiving: each neighbour's claim (signed by its account before the timing)
   is verified and applied (`Account.on_claim`) and committed with a checkpoint in its own
   transaction (`commit`), since it must be on disk before it is acknowledged. Old claim
   bodies are pruned at every PRUNE_EVERY-th claim, inside those same transactions (the
   `prune` of `append_many`): claim_sent in push_debts' transaction, claim_received in that
   claim's `commit`; so per interval 1 / PRUNE_EVERY of the links prune each kind (the
   runtime prunes a link at its claim seqs divisible by PRUNE_EVERY: the same on average).
   No prune is a ledger call or a transaction of its own. Every ledger call goes through
   AsyncLedger, per interval one for all the sent claims and one per received claim; the CPU
   of its thread hop is measured apart and added. Printed: each part, their sum and its share
   of one core (CPU / push_debt_secs, 60 s; target <= 1 %), and the cost per link of each step.
   Checkpoint bodies are not pruned on the claim path: `Accounting.checkpoint`, every
   checkpoint_secs, writes a checkpoint of each account whose counts moved and, in the same
   transaction, prunes the old checkpoints of the accounts whose turn it is (each at one tick
   in PRUNE_EVERY, offset by its fingerprint: 1 / PRUNE_EVERY of them per tick). Printed
   apart, for scale: that transaction for every account, with its prunes and its hop.
   The prunes run on extra neighbours ("ghosts", LINKS / PRUNE_EVERY of them, so as many
   prunes of each kind as the runtime makes per interval, or per periodic checkpoint) whose
   ledger holds what a prune finds there: the bodies the previous prune kept (keep_claims
   claims of each kind, KEEP_CHECKPOINTS checkpoints) and what was written since, interleaved
   across neighbours as time writes them: PRUNE_EVERY claims of each kind, and for the
   checkpoints the PRUNE_EVERY periodic ones plus those written with a claim in those
   PRUNE_EVERY * checkpoint_secs (sent and received, each with the chance it falls in that
   window, by the ghost's phase). Each prune drops as many bodies as in the runtime (checked).
   A prune's statements read only the rows of its kind that still have a body (and the newest
   keep_last of its kind), so older, already pruned rows are left out. Ghosts whose received
   claim is not in the timed sample are pruned untimed, to keep their ledgers in step.
   Reference points, both sides without prunes or hops: every commit in its own transaction,
   as push_debts did before it batched (its send side timed that way, plus the same receive
   side), and all entries in one transaction, which receiving cannot do.
   The ledger is a real SQLite file in a temp dir (or DIR). Counts move between intervals,
   and every claim is applied (no disputes). CPU is `time.process_time()` (user + system, all
   threads). Wall time is printed apart, since waiting for fsync is wall, not CPU. Not
   included: the RPC that carries each claim (encoding, link encryption, the reply). The
   receive side (and the per-claim reference) runs on --sample links and is scaled up (all of
   them by default, 100 with --quick).

Run: .venv/bin/python bench/accounting.py [--quick] [--rounds R] [--batches B] [--links N]
     [--sample S] [--push-rounds R] [--hops N] [--dir DIR]
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
from itertools import takewhile
from pathlib import Path

import anyio
import msgspec
from summary import result

from earendil_py.core.accounting import Account, AccountState, ClaimApplied, DebtClaim
from earendil_py.core.identity import Identity
from earendil_py.core.link import Link, LinkState, onion_frame
from earendil_py.core.packet import build_packet
from earendil_py.core.pricing import AcceptanceRule, PriceAccepted, PriceTerms
from earendil_py.core.relay import Peeler, encode_datagram
from earendil_py.netgen import generate_network
from earendil_py.runtime import node as node_module
from earendil_py.runtime.accounting import KEEP_CHECKPOINTS, PRUNE_EVERY
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
    gated_ns = gated / UDP_BATCH * 1e9
    lines += [
        f"   the calls ACCOUNTING gates, timed alone: {gated * 1e6:.2f} us per batch = "
        f"{gated_ns:.0f} ns/packet, {gated_ns / forward_ns:.1%} of forward's default",
        "   " + checks,
    ]
    return lines


# --- 2. push_debt ---------------------------------------------------------------------------

Item = tuple[bytes, str, bytes]  # (neighbor, kind, body): one ledger entry to append
Prune = tuple[bytes, str, int]  # (neighbor, kind, keep_last): one prune in a transaction

# Periodic checkpoints per push interval.
PERIODIC = round(ACCOUNTING.push_debt_secs / ACCOUNTING.checkpoint_secs)
# What each prune keeps, per kind (the bodies it drops: `_ghost_drops`).
PRUNES = (
    ("claim_sent", ACCOUNTING.keep_claims),  # push_debts
    ("claim_received", ACCOUNTING.keep_claims),  # _on_push_debt's commit
    ("checkpoint", KEEP_CHECKPOINTS),  # checkpoint
)


@dataclass(slots=True)
class Work:
    """CPU and wall time of one part of one push_debt interval, over `links` links."""

    links: int
    cpu: float = 0.0  # time.process_time(): user + system, all threads
    wall: float = 0.0  # time.perf_counter()
    crypto: float = 0.0  # make_claim or on_claim (perf_counter: CPU-bound, so ~CPU)
    encode: float = 0.0  # the claim records and the account snapshots
    transactions: int = 0

    @property
    def ledger(self) -> float:
        """CPU spent in the ledger: everything the stamps did not put elsewhere."""
        return self.cpu - self.crypto - self.encode

    def scaled(self, links: int) -> Work:
        """This part's figures for `links` links, from the ones it measured."""
        f = links / self.links
        return Work(
            links,
            self.cpu * f,
            self.wall * f,
            self.crypto * f,
            self.encode * f,
            round(self.transactions * f),
        )

    def __add__(self, other: Work) -> Work:
        return Work(
            max(self.links, other.links),
            self.cpu + other.cpu,
            self.wall + other.wall,
            self.crypto + other.crypto,
            self.encode + other.encode,
            self.transactions + other.transactions,
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


def _send(
    pairs: list[tuple[Account, Account]],
    store: LedgerStore,
    commit: str,
    prune: list[Prune] | None = None,
) -> tuple[Work, list[DebtClaim], list[Item]]:
    """Our claims to `pairs`, as `push_debts` makes them: sign each, encode it and a checkpoint
    of its account, and commit them. `commit`: "all" in one transaction (push_debts), with
    `prune` in it, "each" in one transaction per claim (push_debts before it batched), "later"
    not at all (the entries are returned). Returns the timing, the claims (for the neighbours
    to apply, untimed) and the uncommitted entries."""
    result = Work(len(pairs))
    claims: list[DebtClaim] = []
    items: list[Item] = []
    clock = time.perf_counter
    gc.collect()
    wall, cpu = clock(), time.process_time()
    for ours, _ in pairs:
        neighbor = ours.neighbor
        t0 = clock()
        claim = ours.make_claim(NOW)
        t1 = clock()
        entries = [
            (neighbor, "claim_sent", _record(claim)),
            (neighbor, "checkpoint", ours.checkpoint()),
        ]
        t2 = clock()
        if commit == "each":
            store.append_many(entries, NOW)
        else:
            items += entries
        result.crypto += t1 - t0
        result.encode += t2 - t1
        claims.append(claim)
    if commit == "all":
        store.append_many(items, NOW, prune=prune or ())
        items = []
    result.cpu, result.wall = time.process_time() - cpu, clock() - wall
    result.transactions = {"all": 1, "each": len(pairs), "later": 0}[commit]
    return result, claims, items


def _receive(
    pairs: list[tuple[Account, Account]],
    claims: list[DebtClaim],
    store: LedgerStore,
    groups: list[range] | None,
    prunes: dict[int, Prune] | None = None,
) -> tuple[Work, list[Item]]:
    """The neighbours' `claims` to us, as `_on_push_debt` takes them: verify and apply each
    (`on_claim`) as it arrives, then encode each with a checkpoint of its account and commit
    them, one transaction per group of `groups` (`_commit_claim`: on disk before any is
    acknowledged), each with the prunes `prunes[i]` of its members i that have one.
    `groups` None: not committed at all (the entries are returned)."""
    prunes = prunes or {}
    tolerance = ACCOUNTING.claim_tolerance_packets
    result = Work(len(pairs))
    items: list[Item] = []
    applied = 0
    clock = time.perf_counter
    gc.collect()
    wall, cpu = clock(), time.process_time()
    for group in groups or [range(len(pairs))]:
        for index in group:
            t0 = clock()
            outcome = pairs[index][0].on_claim(claims[index], NOW, tolerance)
            result.crypto += clock() - t0
            applied += isinstance(outcome, ClaimApplied)
        t1 = clock()
        entries: list[Item] = []
        for index in group:
            ours = pairs[index][0]
            entries += [
                (ours.neighbor, "claim_received", _record(claims[index])),
                (ours.neighbor, "checkpoint", ours.checkpoint()),
            ]
        result.encode += clock() - t1
        if groups is None:
            items += entries
        else:
            group_prunes = [prunes[index] for index in group if index in prunes]
            store.append_many(entries, NOW, prune=group_prunes)
    result.cpu, result.wall = time.process_time() - cpu, clock() - wall
    result.transactions = 0 if groups is None else len(groups)
    if applied != len(pairs):
        raise SystemExit(f"only {applied} of {len(pairs)} claims were applied")
    return result, items


def _arrivals(links: int, rng: random.Random) -> list[range]:
    """How `_commit_claim` groups the claims of `links` neighbours in one push interval: each
    neighbour pushes at a phase of its own (uniformly random), a group is the first claim and
    those arriving within claim_commit_delay_secs of it. Claims are numbered in arrival order,
    so each group is a range."""
    times = sorted(rng.uniform(0, ACCOUNTING.push_debt_secs) for _ in range(links))
    delay = ACCOUNTING.claim_commit_delay_secs
    starts = [0]
    for index in range(1, links):
        if times[index] >= times[starts[-1]] + delay:
            starts.append(index)
    return [range(a, b) for a, b in zip(starts, [*starts[1:], links], strict=True)]


def _commit_all(items: list[Item], store: LedgerStore, links: int) -> Work:
    """`items` in one transaction, timed."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    store.append_many(items, NOW)
    return Work(links, time.process_time() - cpu, time.perf_counter() - wall, transactions=1)


def _their_claims(pairs: list[tuple[Account, Account]]) -> list[DebtClaim]:
    """The neighbours' claims to us, signed before the timing."""
    return [theirs.make_claim(NOW) for _, theirs in pairs]


def _deliver(pairs: list[tuple[Account, Account]], claims: list[DebtClaim]) -> None:
    """The neighbours apply our claims (their work, untimed)."""
    tolerance = ACCOUNTING.claim_tolerance_packets
    for (_, theirs), claim in zip(pairs, claims, strict=True):
        if not isinstance(theirs.on_claim(claim, NOW, tolerance), ClaimApplied):
            raise SystemExit("a neighbour did not apply our claim")


def _claims_in_window(index: int) -> tuple[bool, bool]:
    """Whether ghost `index`'s sent and received claim (one each per push interval, at phases
    of their own) fall in the PRUNE_EVERY periodic checkpoints since its last checkpoint
    prune: by its phase, as often as PRUNE_EVERY / PERIODIC of the ghosts."""
    return index % PERIODIC < PRUNE_EVERY, (index + PERIODIC // 2) % PERIODIC < PRUNE_EVERY


def _ghost_drops(index: int) -> dict[str, int]:
    """The bodies each prune of ghost `index` drops, per kind."""
    sent, received = _claims_in_window(index)
    return {
        "claim_sent": PRUNE_EVERY,
        "claim_received": PRUNE_EVERY,
        "checkpoint": PRUNE_EVERY + sent + received,
    }


def _ghost_entries(ghosts: list[bytes], bodies: dict[str, bytes]) -> list[Item]:
    """What each ghost's ledger gained since its previous prunes, interleaved across the ghosts
    as time interleaves them: PRUNE_EVERY steps of claim_sent, claim_received and a periodic
    checkpoint, the checkpoints written with the claims in the first step (`_ghost_drops`)."""
    items: list[Item] = []
    for step in range(PRUNE_EVERY):
        for index, ghost in enumerate(ghosts):
            sent, received = _claims_in_window(index) if step == 0 else (False, False)
            kinds = ["claim_sent", *["checkpoint"] * sent, "claim_received"]
            kinds += ["checkpoint"] * (received + 1)
            items += [(ghost, kind, bodies[kind]) for kind in kinds]
    return items


def _kept_entries(ghosts: list[bytes], bodies: dict[str, bytes]) -> list[Item]:
    """What the previous prunes left each ghost with a body: the newest keep_last of each kind
    (written interleaved, oldest first)."""
    most = max(keep for _, keep in PRUNES)
    return [
        (ghost, kind, bodies[kind])
        for age in range(most, 0, -1)
        for ghost in ghosts
        for kind, keep in PRUNES
        if age <= keep
    ]


def _ghost_prunes(ghosts: list[bytes], kind: str) -> list[Prune]:
    keep = dict(PRUNES)[kind]
    return [(ghost, kind, keep) for ghost in ghosts]


def _pruned(ghosts: list[bytes], store: LedgerStore) -> list[dict[str, int]]:
    """Per ghost, per kind: how many of its entries have no body (untimed)."""
    counts = []
    for ghost in ghosts:
        entries = store.entries(ghost)
        counts.append(
            {kind: sum(e.kind == kind and e.body is None for e in entries) for kind, _ in PRUNES}
        )
    return counts


def _check_drops(ghosts: list[bytes], store: LedgerStore, before: list[dict[str, int]]) -> None:
    """Every ghost's prunes dropped what it gained since its previous ones, as in the runtime."""
    for index, (was, now) in enumerate(zip(before, _pruned(ghosts, store), strict=True)):
        for kind, drops in _ghost_drops(index).items():
            if now[kind] - was[kind] != drops:
                raise SystemExit(
                    f"ghost {index} {kind}: dropped {now[kind] - was[kind]}, not {drops}"
                )


def _checkpoint_all(
    pairs: list[tuple[Account, Account]], store: LedgerStore, prune: list[Prune]
) -> Timing:
    """What `Accounting.checkpoint` does every checkpoint_secs once every account's counts
    moved: a snapshot of each, and the checkpoint prunes of the accounts whose turn it is, all
    in one transaction."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    items = [(ours.neighbor, "checkpoint", ours.checkpoint()) for ours, _ in pairs]
    store.append_many(items, NOW, prune=prune)
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


def _share(cpu: float, verdict: bool = True, *, figure: bool = False) -> str:
    share = cpu / ACCOUNTING.push_debt_secs
    if not verdict:
        return f"{share:6.2%} of a core"
    if figure:
        result(
            "push_debt CPU, 1,000 links",
            share * 100,
            "% of a core",
            f"<= {CORE_SHARE_TARGET:.0%}",
            share <= CORE_SHARE_TARGET,
        )
    mark = "PASS" if share <= CORE_SHARE_TARGET else "MISS"
    return f"{share:6.2%} of a core  {mark} (target <= {CORE_SHARE_TARGET:.0%})"


def _best(works: list[Work]) -> Work:
    return min(works, key=lambda w: w.cpu)


def _bench_push_debt(args: argparse.Namespace, ledger_dir: Path) -> list[str]:
    rng = random.Random(SEED)
    me = Identity.generate(rng.randbytes)
    links = args.links
    pairs = [_priced_pair(me, Identity.generate(rng.randbytes)) for _ in range(links)]
    # The received claims timed: whole arrival groups, from the first, until `sample` claims.
    groups = _arrivals(links, rng)
    timed_groups = list(takewhile(lambda g: g.start < min(args.sample, links), groups))
    sample = timed_groups[-1].stop
    singles = [range(index, index + 1) for index in range(sample)]
    # As many ghosts as links prune each kind per interval (or per periodic checkpoint).
    ghosts = [rng.randbytes(32) for _ in range(max(1, round(links / PRUNE_EVERY)))]
    # The sampled received claims that prune, each on a ghost of its own: every PRUNE_EVERY-th.
    receive_prunes = {
        index: (ghosts[index // PRUNE_EVERY], "claim_received", ACCOUNTING.keep_claims)
        for index in range(0, min(sample, len(ghosts) * PRUNE_EVERY), PRUNE_EVERY)
    }
    unsampled = [ghost for ghost, _, _ in receive_prunes.values()]
    unsampled = [ghost for ghost in ghosts if ghost not in unsampled]
    hop = _hop_cpu(ledger_dir / "hops.db", args.hops)
    sends: list[Work] = []
    receives: list[Work] = []
    sends_each: list[Work] = []
    receives_each: list[Work] = []
    ones: list[Work] = []
    checkpoints: list[Timing] = []
    with LedgerStore.open(ledger_dir / "ledger.db") as store:
        # Warm-up: every chain and head exists; its entries are the ghosts' bodies.
        _move_counts(pairs, rng)
        their = _their_claims(pairs)
        _, ours, items = _send(pairs, store, "later")
        _, more = _receive(pairs, their, store, None)
        store.append_many(items + more, NOW)
        _deliver(pairs, ours)
        first = pairs[0][0].neighbor
        bodies = {}
        for kind, _ in PRUNES:
            entry = store.latest(first, kind)
            assert entry is not None and entry.body is not None
            bodies[kind] = entry.body
        store.append_many(_kept_entries(ghosts, bodies), NOW)
        for _ in range(args.push_rounds):
            # What the ghosts gained since their previous prunes (untimed).
            store.append_many(_ghost_entries(ghosts, bodies), NOW)
            before = _pruned(ghosts, store)
            # As the runtime does it: push_debts to all, _on_push_debt from each, the claim
            # prunes in their transactions.
            _move_counts(pairs, rng)
            their = _their_claims(pairs[:sample])
            send, ours, _ = _send(pairs, store, "all", _ghost_prunes(ghosts, "claim_sent"))
            receive, _ = _receive(pairs[:sample], their, store, timed_groups, receive_prunes)
            _deliver(pairs, ours)
            sends.append(send)
            receives.append(receive)
            # The received claims' prunes outside the sample, untimed: ghosts stay in step.
            store.append_many([], NOW, prune=_ghost_prunes(unsampled, "claim_received"))
            # Reference: one transaction per claim, sent (as push_debts was before it batched)
            # and received (as with claim_commit_delay_secs = 0), without prunes.
            _move_counts(pairs, rng)
            their = _their_claims(pairs[:sample])
            send_each, ours, _ = _send(pairs[:sample], store, "each")
            receive_each, _ = _receive(pairs[:sample], their, store, singles)
            _deliver(pairs[:sample], ours)
            sends_each.append(send_each)
            receives_each.append(receive_each)
            # Reference: both sides' entries in one transaction.
            _move_counts(pairs, rng)
            their = _their_claims(pairs)
            send, ours, items = _send(pairs, store, "later")
            receive, more = _receive(pairs, their, store, None)
            ones.append(send + receive + _commit_all(items + more, store, links))
            _deliver(pairs, ours)
            # The periodic checkpoint, with the checkpoint prunes whose turn it is.
            _move_counts(pairs, rng)
            checkpoints.append(_checkpoint_all(pairs, store, _ghost_prunes(ghosts, "checkpoint")))
            _check_drops(ghosts, store, before)
        size = (ledger_dir / "ledger.db").stat().st_size

    send, receive = _best(sends), _best(receives).scaled(links)
    send_each, one = _best(sends_each).scaled(links), _best(ones)
    receive_each = _best(receives_each).scaled(links)
    each = send_each + receive_each
    # AsyncLedger calls per interval: one append_many for all sent claims (its prunes in it),
    # one per group of received claims (their prunes in it). No prune is a call of its own.
    calls = 1 + len(groups)
    alone_cpu = send.cpu + receive_each.cpu + (1 + links) * hop
    runtime_cpu = send.cpu + receive.cpu + calls * hop
    runtime_wall = send.wall + receive.wall
    checkpoint = min(checkpoints, key=lambda t: t.cpu)
    checkpoint_cpu = checkpoint.cpu + hop
    interval, every = ACCOUNTING.push_debt_secs, ACCOUNTING.checkpoint_secs
    delay = ACCOUNTING.claim_commit_delay_secs
    scaled = "" if sample == links else f", timed on {sample} links and scaled"
    drops = [_ghost_drops(index) for index in range(len(ghosts))]
    checkpoint_drops = sum(d["checkpoint"] for d in drops) / len(ghosts)
    claim_prunes = len(ghosts)
    per_link = 1e6 / links

    def row(label: str, cpu: float, wall: float | None, note: str = "") -> str:
        walled = "-" if wall is None else f"{wall:.2f}"
        return f"     {label:<56} {cpu:7.3f} {walled:>7}   {note}".rstrip()

    base_cpu, base_wall = send.cpu + receive.cpu, send.wall + receive.wall
    return [
        f"2. push_debt, one interval ({interval:g} s) of one node with {links:,} neighbours "
        f"(ledger {ledger_dir}, {size / 1e6:.1f} MB after the run); best of {args.push_rounds}",
        f"   {'as the runtime does it':<58} {'cpu s':>7} {'wall s':>7}",
        row(
            f"push_debts: sign all, 1 transaction ({2 * links:,} entries)",
            send.cpu,
            send.wall,
            f"with {claim_prunes:,} claim_sent prunes (keep {ACCOUNTING.keep_claims}, "
            f"dropping {PRUNE_EVERY} bodies each)",
        ),
        row(
            f"_on_push_debt: verify, commit in groups ({receive.transactions:,} transactions)",
            receive.cpu,
            receive.wall,
            f"committed before acked, {links / len(groups):.1f} claims a group "
            f"(claim_commit_delay_secs {delay:g}); every {PRUNE_EVERY}th claim with its "
            f"claim_received prune (keep {ACCOUNTING.keep_claims}, dropping {PRUNE_EVERY})"
            f"{scaled}",
        ),
        row(
            f"AsyncLedger thread hops ({calls:,} calls)",
            calls * hop,
            None,
            f"{hop * 1e6:.0f} us each: 1 for all sent claims, 1 per group of received claims",
        ),
        row("total", runtime_cpu, runtime_wall, "-> " + _share(runtime_cpu, figure=True)),
        f"   per link, cpu: make_claim {send.crypto * per_link:.0f} us, on_claim "
        f"{receive.crypto * per_link:.0f} us, claim records + snapshots "
        f"{(send.encode + receive.encode) * per_link:.0f} us; ledger, with the claim prunes: "
        f"sending {send.ledger * per_link:.0f} us (a 1/{links:,} share of its transaction), "
        f"receiving {receive.ledger * per_link:.0f} us (a share of its group's transaction, "
        f"{receive.wall / receive.transactions * 1e3:.1f} ms wall each), hops "
        f"{calls * hop * per_link:.0f} us",
        row(
            "the same with claim_commit_delay_secs 0 (each claim alone)",
            alone_cpu,
            None,
            f"-> {_share(alone_cpu, False)}  ({links + 1:,} transactions and hops, "
            f"no receive prunes{scaled})",
        ),
        "   for reference, both sides without hops (the last two also without prunes):",
        row(
            "as the runtime does it (the first two above)",
            base_cpu,
            base_wall,
            _share(base_cpu, False),
        ),
        row(
            f"every commit its own transaction ({each.transactions:,})",
            each.cpu,
            each.wall,
            f"{_share(each.cpu, False)}  (push_debts before it batched, claims received "
            f"alone{scaled})",
        ),
        row(
            f"all in 1 transaction ({4 * links:,} entries)",
            one.cpu,
            one.wall,
            f"{_share(one.cpu, False)}  (not allowed: received claims wait at most {delay:g} s)",
        ),
        f"   not push_debt, for scale: the checkpoint every {every:g} s of all {links:,} "
        f"accounts, with the {len(ghosts):,} checkpoint prunes whose turn it is (keep "
        f"{KEEP_CHECKPOINTS}, dropping {checkpoint_drops:.2f} bodies each on average), one "
        f"transaction and hop: cpu {checkpoint_cpu * 1e3:.0f} ms, wall "
        f"{checkpoint.wall * 1e3:.0f} ms -> {checkpoint_cpu / every:.2%} of a core",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 10 s: fewer rounds, samples")
    parser.add_argument("--rounds", type=int, help="relay loop rounds (default 60, quick 12)")
    parser.add_argument("--batches", type=int, help="batches per timing (default 25, quick 20)")
    parser.add_argument("--links", type=int, default=1000, help="push_debt neighbours")
    parser.add_argument("--sample", type=int, help="links whose received claims are timed")
    parser.add_argument("--push-rounds", type=int, help="push_debt rounds (default 2, quick 1)")
    parser.add_argument("--hops", type=int, help="AsyncLedger calls timed (default 500)")
    parser.add_argument("--dir", type=Path, help="where the ledger file goes")
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (12 if quick else 60)
    args.batches = args.batches or (20 if quick else 25)
    args.sample = args.sample or (100 if quick else args.links)
    args.push_rounds = args.push_rounds or (1 if quick else 2)
    args.hops = args.hops or (200 if quick else 500)
    if min(args.rounds, args.batches, args.links, args.sample, args.hops) < 1:
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
