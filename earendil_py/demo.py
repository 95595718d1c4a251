"""`make demo`: a local network of relay nodes on loopback, with traffic through it.

Starts five `earendil-py daemon` processes linked in a ring of mixed UDP and TCP links, waits
for their relay graphs to converge, then sends datagrams through multi-hop onion routes via
each node's control API and prints a live summary per node. It stops by itself (or on
Ctrl-C) and always stops the daemons it started.

It waits on what it shows rather than for fixed times, so that a slow or busy machine only
makes it slower: traffic goes on past `--seconds` until an automatic settlement completed,
and the count of datagrams delivered is taken once all arrived (each wait bounded by
`--timeout`). It ends by checking its expectations and names each one that failed, with the
figures.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import time
from pathlib import Path

from earendil_py.netgen import Daemons, Edge, GeneratedNode, RunningDaemon, generate_network
from earendil_py.runtime.http import ControlApiError

DEMO_EDGES = [
    Edge(dialer=0, listener=1, protocol="udp"),
    Edge(dialer=1, listener=2, protocol="tcp"),
    Edge(dialer=2, listener=3, protocol="udp"),
    Edge(dialer=3, listener=4, protocol="tcp"),
    Edge(dialer=4, listener=0, protocol="udp"),
]
NODE_COUNT = 5
DEMO_TOML = """
[accounting]
push_debt_secs = 2.0
checkpoint_secs = 1.0

[links]
keepalive_secs = 1.0
dead_after_secs = 5.0
redial_min_secs = 0.2
redial_max_secs = 2.0

[logging]
format = "json"
"""
DOCK = 7
DEBT_LIMIT_UMEL = 4000  # small on purpose: auto-settlement (pow) starts at half of it
AUTO_SETTLE_UMEL = DEBT_LIMIT_UMEL * 50 // 100  # [settlement] auto_settle_percent's default
# (source, destination) pairs: every flow crosses at least two links.
FLOWS = [(0, 2), (1, 3), (2, 4), (3, 0), (4, 1)]
RunningNode = RunningDaemon


def price_tables() -> dict[int, str]:
    """Each node charges its own price (node N: N+1 uMEL a packet) on every route, with a
    small debt limit, so that automatic settlements must keep the traffic flowing."""
    tables: dict[int, list[str]] = {i: [] for i in range(NODE_COUNT)}
    for edge in DEMO_EDGES:
        for node, route in [
            (edge.listener, f"in_routes.from_node{edge.dialer}_{edge.protocol}"),
            (edge.dialer, f"out_routes.node{edge.listener}_{edge.protocol}"),
        ]:
            tables[node] += [
                f"[{route}.price]",
                f"inbound_price_umel = {node + 1}",
                f"inbound_debt_limit_umel = {DEBT_LIMIT_UMEL}",
                "outbound_min_debt_limit_umel = 1000",
                "",
            ]
    return {node: "\n".join(lines) for node, lines in tables.items()}


def generate(root: Path) -> list[GeneratedNode]:
    return generate_network(
        root, NODE_COUNT, DEMO_EDGES, extra_toml=DEMO_TOML, node_toml=price_tables()
    )


class DemoFailed(Exception):
    """An expectation the demo cannot go on without failed; the message says which."""


def wait_converged(nodes: list[RunningNode], timeout: float) -> None:
    """Return once every node knows every node and link. Raises DemoFailed naming what each
    node knows if that takes more than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    complete = (NODE_COUNT, len(DEMO_EDGES))
    while True:
        known: dict[str, tuple[int, int] | str] = {}
        for node in nodes:
            try:
                graph = node.call("GET", "/api/status")["graph"]
            except ControlApiError as exc:
                known[node.generated.name] = f"no answer ({exc})"
            else:
                known[node.generated.name] = (graph["identities"], graph["adjacencies"])
        if all(graph == complete for graph in known.values()):
            return
        if time.monotonic() >= deadline:
            raise DemoFailed(
                f"the relay graphs did not converge within {timeout:g}s: "
                + "; ".join(
                    f"{name}: {graph}"
                    if isinstance(graph, str)
                    else f"{name} knows {graph[0]} of {complete[0]} nodes and {graph[1]} of "
                    f"{complete[1]} links"
                    for name, graph in known.items()
                )
            )
        time.sleep(0.2)


def print_summary(nodes: list[RunningNode], elapsed: float) -> None:
    print(f"\n--- t={elapsed:5.1f}s " + "-" * 62)
    print(f"{'node':<14}{'links':>6}{'sent':>8}{'relayed':>9}{'peeled':>8}{'delivered':>10}  drops")
    for node in nodes:
        status = node.call("GET", "/api/status")
        relay = status["relay"]
        drops = ", ".join(f"{k}={v}" for k, v in sorted(status["drops"].items())) or "-"
        name = f"{node.generated.name} {status['fingerprint'][:6]}"
        print(
            f"{name:<14}{len(status['links']):>6}{relay['originated']:>8}"
            f"{relay['forwarded']:>9}{relay['peeled']:>8}{relay['delivered']:>10}  {drops}"
        )
        settlements = node.call("GET", "/api/settlements")["settlements"]
        for account in status["accounts"]:
            done = [
                s
                for s in settlements
                if s["neighbor"] == account["neighbor"] and s["state"] == "completed"
            ]
            paid = sum(s["paid_out_umel"] for s in done)
            print(
                f"{'':<14}  with {account['neighbor'][:6]}: price {account['our_price_umel']}"
                f" in / {account['their_price_umel']} out uMEL;"
                f" they owe {account['debt_in_umel']:>5}, we owe {account['debt_out_umel']:>5};"
                f" {len(done)} settlements, we paid {paid}"
            )


def run_traffic(nodes: list[RunningNode], seconds: float, rate: int, timeout: float) -> int:
    """Send `rate` datagrams per second per flow for `seconds`, and on until an automatic
    settlement has completed (for at most `timeout` more seconds); returns how many were
    sent. On a busy machine the control API answers slowly, so fewer are sent per second and
    debts take longer to reach the settlement threshold: the traffic waits for it."""
    start = time.monotonic()
    next_summary = next_check = start
    extended = False
    sent = 0
    while (now := time.monotonic()) < start + seconds + timeout:
        if now >= start + seconds and now >= next_check:
            next_check = now + 1.0
            if completed_settlements(nodes):
                break
            if not extended:
                extended = True
                print(
                    f"\nNo automatic settlement yet after {now - start:.1f}s (debts settle at "
                    f"{AUTO_SETTLE_UMEL} uMEL): sending on until one completes, at most "
                    f"{timeout:.0f}s more."
                )
        for source, destination in FLOWS:
            for _ in range(max(1, rate // 10)):
                payload = f"hello from {nodes[source].generated.name} #{sent}".encode()
                nodes[source].call(
                    "POST",
                    "/api/send",
                    {
                        "destination": nodes[destination].generated.fingerprint,
                        "dock": DOCK,
                        "data_b64": base64.b64encode(payload).decode(),
                        "hops": 3,
                    },
                )
                sent += 1
        if now >= next_summary:
            print_summary(nodes, now - start)
            next_summary = now + 2.0
        time.sleep(0.1)
    return sent


def wait_delivered(nodes: list[RunningNode], sent: int, timeout: float) -> int:
    """Collect the datagrams delivered on every node until `sent` arrived, or none more
    arrived for `timeout` seconds; returns how many arrived."""
    received = 0
    deadline = time.monotonic() + timeout
    while received < sent and time.monotonic() < deadline:
        arrived = sum(drain(node) for node in nodes)
        if arrived:
            received += arrived
            deadline = time.monotonic() + timeout
        else:
            time.sleep(0.1)
    return received


def completed_settlements(nodes: list[RunningNode]) -> int:
    """Settlements completed, counted once (by their proposers)."""
    return sum(
        s["role"] == "proposer" and s["state"] == "completed"
        for node in nodes
        for s in node.call("GET", "/api/settlements")["settlements"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="earendil-py-demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo-net"), help="network directory")
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="how long to send traffic at least"
    )
    parser.add_argument("--rate", type=int, default=50, help="datagrams/s per flow")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="the longest to wait for the graphs to converge, for an automatic settlement "
        "past --seconds, and for the last datagrams to arrive",
    )
    args = parser.parse_args(argv)
    if args.dir.exists():
        shutil.rmtree(args.dir)
    print(f"Starting {NODE_COUNT} nodes on loopback in {args.dir}/ (ring of UDP and TCP links)")
    daemons = Daemons(generate(args.dir))
    nodes = daemons.start()
    try:
        wait_converged(nodes, timeout=args.timeout)
        print("Relay graphs converged: every node knows every node and link.")
        for node in nodes:
            status = node.call("GET", "/api/status")
            links = ", ".join(
                f"{link['neighbor'][:6]} ({link['protocol']})" for link in status["links"]
            )
            link = node.call("POST", "/api/dashboard-link", {})["url"]
            print(f"  {node.generated.name} {status['fingerprint'][:6]}: links to {links}")
            print(f"    dashboard (one-time link): {link}")
        greetings, greeted = greet(nodes)
        print(f"Sending {args.rate} datagrams/s on each of {len(FLOWS)} flows, 3 peelers each.")
        started = time.monotonic()
        sent = run_traffic(nodes, args.seconds, args.rate, args.timeout)
        received = wait_delivered(nodes, sent, args.timeout)
        print_summary(nodes, time.monotonic() - started)
        print(f"\nDatagrams sent {sent}, delivered {received} ({received * 100 // sent}%).")
        completed, limit_drops = summarize_settlements(nodes)
        failures = []
        if received != sent:
            failures.append(f"{sent - received} of {sent} datagrams not delivered")
        if greeted != greetings:
            failures.append(f"{greetings - greeted} of {greetings} chat greetings not delivered")
        if not completed:
            failures.append(
                f"no automatic settlement completed (the largest debt is "
                f"{largest_debt(nodes)} uMEL; settlement starts at {AUTO_SETTLE_UMEL} uMEL)"
            )
        if limit_drops:
            failures.append(f"{limit_drops} packets dropped at a debt limit (expected none)")
        for failure in failures:
            print(f"FAILED: {failure}")
        return 1 if failures else 0
    except DemoFailed as exc:
        print(f"FAILED: {exc}; see {args.dir}/node*/daemon.log")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        daemons.stop()
        print("All nodes stopped.")


def drain(node: RunningNode) -> int:
    """Take every datagram waiting at DOCK on `node`; returns how many there were."""
    count = 0
    while batch := node.call("POST", "/api/receive", {"dock": DOCK, "limit": 10_000})["datagrams"]:
        count += len(batch)
    return count


def greet(nodes: list[RunningNode]) -> tuple[int, int]:
    """Each node says hello to each neighbour on the chat; returns (sent, delivered)."""
    delivered = total = 0
    for node in nodes:
        for link in node.call("GET", "/api/status")["links"]:
            total += 1
            try:
                node.call("POST", f"/api/chat/{link['neighbor']}", {"text": "hello, neighbour"})
            except ControlApiError as exc:
                print(f"  chat from {node.generated.name} not delivered: {exc}")
            else:
                delivered += 1
    print(f"Chat: every node greeted its neighbours, {delivered} of {total} messages delivered.")
    return total, delivered


def summarize_settlements(nodes: list[RunningNode]) -> tuple[int, int]:
    """Print what auto-settlement did; returns (settlements completed, packets dropped at a
    debt limit)."""
    completed, limit_drops = completed_settlements(nodes), 0
    for node in nodes:
        for link in node.call("GET", "/api/status")["links"]:
            limit_drops += link["drops"].get("debt_limit", 0)
            limit_drops += link["drops"].get("debt_limit_out", 0)
    print(
        f"Automatic settlements completed: {completed} (proof of work, co-signed, in each"
        f" node's ledger); packets dropped at a debt limit: {limit_drops}."
    )
    return completed, limit_drops


def largest_debt(nodes: list[RunningNode]) -> int:
    """The most any node owes a neighbour now, in uMEL."""
    return max(
        (
            account["debt_out_umel"]
            for node in nodes
            for account in node.call("GET", "/api/status")["accounts"]
        ),
        default=0,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
