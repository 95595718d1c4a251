"""A network of N daemons on this machine: routing, traffic, latency, money.

N `earendil-py daemon` processes (default 30, --nodes up to 100) from netgen configs, linked
in a seeded random connected graph of mean degree 3, each link UDP or TCP at random, each
route with a price and a debt limit small enough that automatic settlements happen
(`netgen.random_network`, `Daemons` and the rest: the code tests/runtime/test_network.py runs
with 10 daemons).

1. Routing: the time from the moment every daemon answers its control API until every one
   knows every node and link of the network and has all of its own links priced
   (`netgen.wait_routed`). Target at 30 nodes: 10 s.
2. Idle: each daemon's CPU (user + system, all threads, as a share of one core) and RSS
   over IDLE_SECS.
3. Traffic: each daemon is offered --rate datagrams a second (default 20) to destinations
   drawn at random, each through --hops peelers (default 3), for --seconds (`netgen.Traffic`:
   POST /api/send over one kept-alive connection per daemon, from a thread per daemon of this
   process). Delivery: the share of the *offered* datagrams that arrived (each is numbered;
   every daemon's dock is drained after). Target at 30 nodes and 20/s: >= 0.99. CPU: each
   daemon's during the traffic, and all daemons' CPU per delivered datagram (the sending
   daemon's control API call included, since that is how the traffic enters).
4. Latency: meanwhile a probe node P, run in a process of its own and linked to PROBE_LINKS
   daemons, sends itself a datagram through 2 daemons drawn at random (3 peelers, as the
   traffic) every few ms, one at a time, and times each from building it to its delivery.
   The control API has no arrival times, so P's datagrams stand for the traffic's: they
   cross the same daemons under the same load. Target for p50 at 30 nodes and 20/s: 50 ms.
5. Money: after the traffic and one `push_debt_secs` interval (5 s here), whether the
   two sides of every link agree to the µMEL on what each owes the other (target: all),
   the automatic settlements completed, and the disputes (`debt_dispute` in the daemons'
   logs; target: none).

Every daemon started is stopped when the run ends, also on Ctrl-C or a failure.

Run: .venv/bin/python bench/network.py [--nodes N] [--rate R] [--seconds S] [--seed N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
from summary import result

from earendil_py.core.link import onion_frame
from earendil_py.core.packet import build_packet
from earendil_py.core.relay import encode_datagram
from earendil_py.netgen import (
    RANDOM_PUSH_SECS,
    Daemons,
    GeneratedNode,
    RunningDaemon,
    Traffic,
    balance_mismatches,
    disputes,
    random_network,
    settlements_completed,
    wait_answering,
    wait_routed,
)
from earendil_py.runtime.config import load_config
from earendil_py.runtime.http import ControlApiError
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.node import Node

DOCK = 7
PROBE_DOCK = 8
PROBE_LINKS = 2
PROBE_GAP_SECS = (0.01, 0.03)
PROBE_TIMEOUT_SECS = 2.0
IDLE_SECS = 10.0
DELIVERY_SECS = 5.0  # after the traffic, for what is still on its way
ANSWER_SECS = 300.0  # for every daemon to answer its control API
ROUTE_SECS = 300.0
TARGETS_AT = (30, 20.0)  # nodes, datagrams/s per node: where the targets apply
ROUTING_TARGET_SECS = 10.0
DELIVERY_TARGET = 0.99
P50_TARGET_MS = 50.0


# --- the probe ---------------------------------------------------------------------------


def _run_probe(config_path: str, node_count: int, edge_count: int, conn: Connection) -> None:
    """P: once routed, send itself datagrams through 2 random daemons until told to stop;
    then answer with (seconds of each, how many were lost)."""
    configure_logging("error", "json")
    config = load_config(Path(config_path))
    node = Node(config, load_identity_file(config.identity_file))
    rng = random.Random(len(config_path))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            with anyio.fail_after(ROUTE_SECS):
                while not (
                    node.graph.statistics().identities == node_count
                    and node.graph.statistics().adjacencies == edge_count
                    and len(node.links) == PROBE_LINKS
                    and all(r[0].account and r[0].account.priced for r in node.links.values())
                ):
                    await anyio.sleep(0.1)
            me = (node.fingerprint, node.identity.onion_public)
            others = [
                (d.fingerprint, d.onion_public)
                for d in node.graph.identities()
                if d.fingerprint != node.fingerprint
            ]
            conn.send("ready")
            await anyio.to_thread.run_sync(conn.recv)  # "go"
            seconds: list[float] = []
            lost = 0
            while not conn.poll():
                route = [*rng.sample(others, 2), me]
                first, packet = build_packet(
                    route, encode_datagram(PROBE_DOCK, b"probe"), os.urandom
                )
                start = time.perf_counter()
                node.relay_batch([(None, [onion_frame(first, packet)])], anyio.current_time())
                with anyio.move_on_after(PROBE_TIMEOUT_SECS) as waited:
                    await node.receive_datagram(PROBE_DOCK)
                    seconds.append(time.perf_counter() - start)
                lost += waited.cancelled_caught
                node.receive_datagrams_nowait(PROBE_DOCK)  # a late one is not the next's
                await anyio.sleep(rng.uniform(*PROBE_GAP_SECS))
            conn.recv()
            conn.send((seconds, lost))
            tg.cancel_scope.cancel()

    anyio.run(main)


class Probe:
    def __init__(self, node: GeneratedNode, node_count: int, edge_count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(
            target=_run_probe,
            args=(str(node.config_path), node_count, edge_count, theirs),
            daemon=True,
        )
        self.process.start()
        theirs.close()

    def wait_ready(self) -> None:
        if not self.conn.poll(ROUTE_SECS) or self.conn.recv() != "ready":
            raise SystemExit("the probe node was not routed in time")

    def start(self) -> None:
        self.conn.send("go")

    def finish(self) -> tuple[list[float], int]:
        self.conn.send("stop")
        if not self.conn.poll(30):
            raise SystemExit("the probe did not answer")
        answer: tuple[list[float], int] = self.conn.recv()
        return answer

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)


# --- measuring -----------------------------------------------------------------------------


class Usage:
    """CPU seconds and RSS of every daemon over a window."""

    def __init__(self, daemons: Sequence[RunningDaemon]) -> None:
        self.daemons = daemons
        self.start = time.monotonic()
        self.cpu = [d.cpu_secs() for d in daemons]

    def end(self) -> tuple[list[float], list[int], float]:
        """(each daemon's share of a core, each one's RSS, the window's seconds)."""
        seconds = time.monotonic() - self.start
        cpu = [(d.cpu_secs() - c) / seconds for d, c in zip(self.daemons, self.cpu, strict=True)]
        return cpu, [d.rss_bytes() for d in self.daemons], seconds


def _spread(values: Sequence[float], scale: float, unit: str) -> str:
    return f"mean {statistics.mean(values) * scale:.1f}{unit}, max {max(values) * scale:.1f}{unit}"


def run(args: argparse.Namespace, root: Path) -> None:
    links = random.Random(args.seed).sample(range(args.nodes), PROBE_LINKS)
    nodes, edges = random_network(root, args.nodes, args.seed, extra_links=links)
    daemon_nodes = nodes[: args.nodes]
    on_target = (args.nodes, args.rate) == TARGETS_AT and args.hops == 3
    print(
        f"{args.nodes} daemons, {len(edges) - PROBE_LINKS} links "
        f"({sum(e.protocol == 'tcp' for e in edges)} TCP), seed {args.seed}; probe node P "
        f"on {PROBE_LINKS} links; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    launched = time.monotonic()
    probe: Probe | None = None
    with Daemons(daemon_nodes) as daemons:
        try:
            wait_answering(daemons, ANSWER_SECS)
            answering = time.monotonic()
            probe = Probe(nodes[-1], len(nodes), len(edges))
            wait_routed(daemons, len(nodes), len(edges), ROUTE_SECS)
            routed_after = time.monotonic() - answering
            print(
                f"every daemon answering {answering - launched:.1f}s after launch; every "
                f"graph complete and every link priced {routed_after:.1f}s after that",
                flush=True,
            )
            result(
                "routing after every daemon answers",
                routed_after,
                "s",
                f"<= {ROUTING_TARGET_SECS:g} s" if on_target else "-",
                routed_after <= ROUTING_TARGET_SECS if on_target else None,
            )
            probe.wait_ready()

            usage = Usage(daemons)
            time.sleep(IDLE_SECS)
            idle_cpu, idle_rss, _ = usage.end()
            print(
                f"idle, per daemon over {IDLE_SECS:g}s: CPU {_spread(idle_cpu, 100, '%')} "
                f"of a core; RSS {_spread(idle_rss, 2**-20, ' MiB')}"
            )

            traffic = Traffic(daemons, args.rate, args.hops, DOCK, args.seed)
            usage = Usage(daemons)
            probe.start()
            traffic.run(args.seconds)
            busy_cpu, busy_rss, busy_secs = usage.end()
            samples, lost = probe.finish()
            time.sleep(DELIVERY_SECS)
            traffic.collect()
            delivered = len(traffic.delivered)
            ratio = delivered / traffic.offered
            print(
                f"traffic, per daemon over {busy_secs:.1f}s: CPU {_spread(busy_cpu, 100, '%')}"
                f" of a core; RSS {_spread(busy_rss, 2**-20, ' MiB')}"
            )
            print(
                f"offered {traffic.offered:,} datagrams ({args.rate:g}/s x {args.nodes} "
                f"daemons x {args.seconds:g}s, {args.hops} peelers), refused by the API "
                f"{traffic.refused:,}, sent at worst {traffic.late_secs:.2f}s late; delivered "
                f"{delivered:,} ({ratio:.4f})"
            )
            # P's datagrams cross the daemons too: they count as delivered traffic here.
            carried = delivered + len(samples)
            per_datagram = sum(busy_cpu) * busy_secs / max(carried, 1)
            above_idle = (sum(busy_cpu) - sum(idle_cpu)) * busy_secs / max(carried, 1)
            print(
                f"all daemons' CPU per delivered datagram (P's {len(samples):,} included): "
                f"{per_datagram * 1e3:.2f} ms ({above_idle * 1e3:.2f} ms above idle)"
            )
            result(
                "delivered / offered",
                ratio,
                "",
                f">= {DELIVERY_TARGET}" if on_target else "-",
                ratio >= DELIVERY_TARGET if on_target else None,
            )
            result("CPU per delivered datagram", per_datagram * 1e3, "ms", "-", None)
            result("idle CPU per daemon (mean)", statistics.mean(idle_cpu) * 100, "%", "-", None)
            result(
                "RSS per daemon (mean, traffic)",
                statistics.mean(busy_rss) / 2**20,
                "MiB",
                "-",
                None,
            )
            ordered = sorted(samples)
            if ordered:
                p50 = statistics.median(ordered) * 1e3
                p90 = ordered[int(0.9 * (len(ordered) - 1))] * 1e3
                p99 = ordered[int(0.99 * (len(ordered) - 1))] * 1e3
                print(
                    f"latency of P's {len(ordered):,} datagrams through 3 peelers "
                    f"({lost} lost): p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, "
                    f"max {ordered[-1] * 1e3:.1f} ms"
                )
                result(
                    "latency p50",
                    p50,
                    "ms",
                    f"<= {P50_TARGET_MS:g} ms" if on_target else "-",
                    p50 <= P50_TARGET_MS if on_target else None,
                )
                result("latency p99", p99, "ms", "-", None)

            time.sleep(RANDOM_PUSH_SECS + 2.0)  # every side pushed its claims once since
            pairs, mismatches = balance_mismatches(daemons)
            settled = settlements_completed(daemons)
            disputed = disputes(daemon_nodes)
            print(
                f"after one push interval: {pairs - len(mismatches)} of {pairs} neighbour "
                f"pairs agree to the uMEL on both debts; {settled} automatic settlements "
                f"completed; {disputed} disputes"
            )
            for line in mismatches[:10]:
                print(f"    {line}")
            result("pairs whose balances disagree", len(mismatches), "", "0", not mismatches)
            result("disputes", disputed, "", "0", disputed == 0)
            result("settlements completed", settled, "", "-", None)
        finally:
            if probe is not None:
                probe.stop()
    print(f"all {args.nodes} daemons stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=20.0, help="datagrams/s offered per node")
    parser.add_argument("--seconds", type=float, default=30.0, help="of traffic")
    parser.add_argument("--hops", type=int, default=3, help="peelers per datagram")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--keep", type=Path, help="build the network here and keep its logs")
    args = parser.parse_args()
    if not 3 <= args.nodes <= 100:
        parser.error("--nodes must be between 3 and 100")
    try:
        if args.keep is not None:
            run(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
                run(args, Path(tmp))
    except (TimeoutError, ControlApiError) as exc:
        print(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
