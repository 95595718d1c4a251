"""A network of N daemons on this machine: routing, traffic, latency, money.

N nodes (default 30, --nodes up to 100) from netgen configs, linked in a seeded random
connected graph of mean degree 3, each link UDP or TCP at random, each route with a price and
a debt limit small enough that automatic settlements happen, each node a process of its own
(`netgen.random_network`, `Daemons`, `TrafficPlan`: what tests/runtime/test_network.py runs
with 10 nodes).

1. Routing: the time from the moment every node answers its control API until every one
   knows every node and link of the network and has all of its own links priced
   (`netgen.wait_routed`). Target at 30 nodes: 10 s.
2. Idle: each node's CPU (user + system, all threads, as a share of one core) and RSS over
   IDLE_SECS.
3. Traffic: each node is offered --rate datagrams a second (default 20) to destinations drawn
   at random, each through --hops peelers (default 3), for --seconds. The traffic starts
   inside each node's process, from a task that calls `Node.send_datagram` (what the control
   API's /api/send does) and takes what arrives at its dock: `netgen.TrafficPlan`. Through
   the control API, HTTP alone would cost each node ~0.8 ms of CPU per datagram on the
   development VM, more than the relaying it is meant to measure. Each node runs the node
   of `earendil-py daemon` (same config, ledger, control API and signals); only this task is
   added.
   Delivery: the share of the *offered* datagrams that arrived (a node that falls behind its
   schedule sends late, not less). Target at 30 nodes and 20/s: >= 0.99. Latency: from the
   sending node's call to the arrival at the destination's dock, both read from
   CLOCK_MONOTONIC (one clock for all processes); target for p50 at 30 nodes and 20/s:
   50 ms. CPU: each node's during the traffic, and all nodes' CPU per delivered datagram
   (its building, every link it crosses, every peel, its delivery).
4. Money: after the traffic and one `push_debt_secs` interval (5 s here), whether the two
   sides of every link agree to the µMEL on what each owes the other (target: all), the
   automatic settlements completed, and the disputes (`debt_dispute` in the nodes' logs;
   target: none). If some pairs disagree, how many still do after up to LATER_INTERVALS more
   intervals (late claims, on a saturated machine, or books that never meet).

Every node started is stopped when the run ends, also on Ctrl-C or a failure.

Run: .venv/bin/python bench/network.py [--nodes N] [--rate R] [--seconds S] [--seed N]
     [--keep DIR]  (build the network in DIR and keep its configs and logs)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from summary import result

from earendil_py.netgen import (
    RANDOM_PUSH_SECS,
    Daemons,
    RunningDaemon,
    TrafficPlan,
    TrafficReport,
    balance_mismatches,
    disputes,
    random_network,
    settlements_completed,
    wait_answering,
    wait_routed,
)
from earendil_py.runtime.http import ControlApiError

IDLE_SECS = 10.0
DELIVERY_SECS = 5.0  # after the traffic, for what is still on its way
LATER_INTERVALS = 4  # push intervals waited, at most, for pairs that disagree after one
ANSWER_SECS = 300.0  # for every node to answer its control API
ROUTE_SECS = 300.0
TARGETS_AT = (30, 20.0)  # nodes, datagrams/s per node: where the targets apply
ROUTING_TARGET_SECS = 10.0
DELIVERY_TARGET = 0.99
P50_TARGET_MS = 50.0


class Usage:
    """CPU seconds and RSS of every node over a window."""

    def __init__(self, daemons: Sequence[RunningDaemon]) -> None:
        self.daemons = daemons
        self.start = time.monotonic()
        self.cpu = [d.cpu_secs() for d in daemons]

    def end(self) -> tuple[list[float], list[int], float]:
        """(each node's share of a core, each one's RSS, the window's seconds)."""
        seconds = time.monotonic() - self.start
        cpu = [(d.cpu_secs() - c) / seconds for d, c in zip(self.daemons, self.cpu, strict=True)]
        return cpu, [d.rss_bytes() for d in self.daemons], seconds


def _spread(values: Sequence[float], scale: float, unit: str) -> str:
    mean, top = statistics.mean(values) * scale, max(values) * scale
    return f"mean {mean:.1f}{unit}, max {top:.1f}{unit}"


def _target(on_target: bool, text: str, met: bool) -> tuple[str, bool | None]:
    return (text, met) if on_target else ("-", None)


def run(args: argparse.Namespace, root: Path) -> None:
    nodes, edges = random_network(root, args.nodes, args.seed)
    on_target = (args.nodes, args.rate) == TARGETS_AT and args.hops == 3
    plan = TrafficPlan(args.rate, args.seconds, args.hops, seed=args.seed)
    print(
        f"{args.nodes} nodes, {len(edges)} links ({sum(e.protocol == 'tcp' for e in edges)} "
        f"TCP), seed {args.seed}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    launched = time.monotonic()
    runner = Daemons(nodes, traffic=plan)
    with runner as daemons:
        wait_answering(daemons, ANSWER_SECS)
        answering = time.monotonic()
        wait_routed(daemons, len(nodes), len(edges), ROUTE_SECS)
        routed_after = time.monotonic() - answering
        print(
            f"every node answering {answering - launched:.1f}s after launch; every graph "
            f"complete and every link priced {routed_after:.1f}s after that",
            flush=True,
        )
        result(
            "routing after every node answers",
            routed_after,
            "s",
            *_target(
                on_target, f"<= {ROUTING_TARGET_SECS:g} s", routed_after <= ROUTING_TARGET_SECS
            ),
        )

        usage = Usage(daemons)
        time.sleep(IDLE_SECS)
        idle_cpu, idle_rss, _ = usage.end()
        print(
            f"idle, per node over {IDLE_SECS:g}s: CPU {_spread(idle_cpu, 100, '%')} of a core; "
            f"RSS {_spread(idle_rss, 2**-20, ' MiB')}",
            flush=True,
        )

        usage = Usage(daemons)
        runner.start_traffic()
        time.sleep(args.seconds + DELIVERY_SECS)
        busy_cpu, busy_rss, busy_secs = usage.end()
        print(
            f"traffic, per node over {busy_secs:.1f}s: CPU {_spread(busy_cpu, 100, '%')} of a "
            f"core; RSS {_spread(busy_rss, 2**-20, ' MiB')}",
            flush=True,
        )
        time.sleep(max(0.0, RANDOM_PUSH_SECS + 2.0 - DELIVERY_SECS))  # claims pushed since
        pairs, mismatches = balance_mismatches(daemons)
        later, intervals = mismatches, 1
        while later and intervals <= LATER_INTERVALS:
            time.sleep(RANDOM_PUSH_SECS)
            intervals += 1
            _, later = balance_mismatches(daemons)
        settled = settlements_completed(daemons)
    traffic = TrafficReport.read(nodes)  # written by each node as it stopped
    disputed = disputes(nodes)

    ratio = traffic.delivered / traffic.offered
    print(
        f"offered {traffic.offered:,} datagrams ({args.rate:g}/s x {args.nodes} nodes x "
        f"{args.seconds:g}s, {args.hops} peelers), refused {traffic.refused:,} (no route), "
        f"sent at worst {traffic.late_secs:.2f}s late; delivered {traffic.delivered:,} "
        f"({ratio:.4f})"
    )
    per_datagram = sum(busy_cpu) * busy_secs / max(traffic.delivered, 1)
    above_idle = (sum(busy_cpu) - sum(idle_cpu)) * busy_secs / max(traffic.delivered, 1)
    print(
        f"all nodes' CPU per delivered datagram: {per_datagram * 1e3:.2f} ms "
        f"({above_idle * 1e3:.2f} ms above idle)"
    )
    result(
        "delivered / offered",
        ratio,
        "",
        *_target(on_target, f">= {DELIVERY_TARGET}", ratio >= DELIVERY_TARGET),
    )
    latencies = traffic.latencies
    if latencies:
        p50 = statistics.median(latencies) * 1e3
        p90, p99 = (latencies[int(q * (len(latencies) - 1))] * 1e3 for q in (0.9, 0.99))
        print(
            f"latency, sending call to arrival: p50 {p50:.1f} ms, p90 {p90:.1f} ms, "
            f"p99 {p99:.1f} ms, max {latencies[-1] * 1e3:.1f} ms"
        )
        result(
            "latency p50",
            p50,
            "ms",
            *_target(on_target, f"<= {P50_TARGET_MS:g} ms", p50 <= P50_TARGET_MS),
        )
        result("latency p99", p99, "ms", "-", None)
    result("CPU per delivered datagram", per_datagram * 1e3, "ms", "-", None)
    result("idle CPU per node (mean)", statistics.mean(idle_cpu) * 100, "% of a core", "-", None)
    result("RSS per node (mean, traffic)", statistics.mean(busy_rss) / 2**20, "MiB", "-", None)
    print(
        f"after one push interval: {pairs - len(mismatches)} of {pairs} neighbour pairs agree "
        f"to the uMEL on both debts; {settled} automatic settlements completed; "
        f"{disputed} disputes"
    )
    for line in mismatches[:10]:
        print(f"    {line}")
    if mismatches:
        print(f"after {intervals} push intervals: {len(later)} of {pairs} pairs still disagree")
        for line in later[:10]:
            print(f"    {line}")
    result("pairs whose balances disagree", len(mismatches), "", "0", not mismatches)
    result("disputes", disputed, "", "0", disputed == 0)
    result("settlements completed", settled, "", "-", None)
    print(f"all {args.nodes} nodes stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=20.0, help="datagrams/s offered per node")
    parser.add_argument("--seconds", type=float, default=30.0, help="of traffic")
    parser.add_argument("--hops", type=int, default=3, help="peelers per datagram")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--keep", type=Path, help="build the network here and keep it")
    args = parser.parse_args()
    if not 3 <= args.nodes <= 100:
        parser.error("--nodes must be between 3 and 100")
    try:
        if args.keep is not None:
            run(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
                run(args, Path(tmp))
    except (TimeoutError, ControlApiError, FileNotFoundError) as exc:
        print(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
