"""`make demo`: a local network of relay nodes on loopback, with traffic through it.

Starts five `earendil-py daemon` processes linked in a ring of mixed UDP and TCP links, waits
for their relay graphs to converge, then sends datagrams through multi-hop onion routes via
each node's control API and prints a live summary per node. It stops by itself (or on
Ctrl-C) and always stops the daemons it started.
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
# (source, destination) pairs: every flow crosses at least two links.
FLOWS = [(0, 2), (1, 3), (2, 4), (3, 0), (4, 1)]


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


def wait_converged(nodes: list[RunningDaemon], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            statuses = [n.call("GET", "/api/status") for n in nodes]
        except ControlApiError:
            time.sleep(0.2)
            continue
        if all(
            s["graph"]["identities"] == NODE_COUNT and s["graph"]["adjacencies"] == len(DEMO_EDGES)
            for s in statuses
        ):
            return
        time.sleep(0.2)
    raise SystemExit("demo: the nodes did not converge in time; see demo-net/node*/daemon.log")


def print_summary(nodes: list[RunningDaemon], elapsed: float) -> None:
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


def run_traffic(nodes: list[RunningDaemon], seconds: float, rate: int) -> int:
    """Send `rate` datagrams per second per flow for `seconds`; returns how many were sent."""
    start = time.monotonic()
    next_summary = start
    sent = 0
    while (now := time.monotonic()) < start + seconds:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="earendil-py-demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo-net"), help="network directory")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long to send traffic")
    parser.add_argument("--rate", type=int, default=50, help="datagrams/s per flow")
    args = parser.parse_args(argv)
    if args.dir.exists():
        shutil.rmtree(args.dir)
    print(f"Starting {NODE_COUNT} nodes on loopback in {args.dir}/ (ring of UDP and TCP links)")
    try:
        with Daemons(generate(args.dir)) as nodes:
            return run(nodes, args)
    except KeyboardInterrupt:
        return 130
    finally:
        print("All nodes stopped.")


def run(nodes: list[RunningDaemon], args: argparse.Namespace) -> int:
    """Everything the demo does once its daemons are started; returns the exit status."""
    wait_converged(nodes, timeout=20.0)
    print("Relay graphs converged: every node knows every node and link.")
    for node in nodes:
        status = node.call("GET", "/api/status")
        links = ", ".join(
            f"{link['neighbor'][:6]} ({link['protocol']})" for link in status["links"]
        )
        host, port = node.generated.config.control_listen
        print(
            f"  {node.generated.name} {status['fingerprint'][:6]}: links to {links}; "
            f"dashboard http://{host}:{port}/"
        )
    greeted = greet(nodes)
    print(f"Sending {args.rate} datagrams/s on each of {len(FLOWS)} flows, 3 peelers each.")
    sent = run_traffic(nodes, args.seconds, args.rate)
    time.sleep(1.0)
    received = sum(
        len(node.call("GET", f"/api/receive?dock={DOCK}&max=100000")["datagrams"]) for node in nodes
    )
    print_summary(nodes, args.seconds)
    print(f"\nDatagrams sent {sent}, delivered {received} ({received * 100 // sent}%).")
    settled = summarize_settlements(nodes)
    return 0 if received == sent and settled and greeted else 1


def greet(nodes: list[RunningDaemon]) -> bool:
    """Each node says hello to each neighbour on the chat; True if every message arrived."""
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
    return delivered == total


def summarize_settlements(nodes: list[RunningDaemon]) -> bool:
    """Print what auto-settlement did; True if it settled and no debt limit was hit."""
    completed = limit_drops = 0
    for node in nodes:
        for s in node.call("GET", "/api/settlements")["settlements"]:
            completed += s["role"] == "proposer" and s["state"] == "completed"
        for link in node.call("GET", "/api/status")["links"]:
            limit_drops += link["drops"].get("debt_limit", 0)
            limit_drops += link["drops"].get("debt_limit_out", 0)
    print(
        f"Automatic settlements completed: {completed} (proof of work, co-signed, in each"
        f" node's ledger); packets dropped at a debt limit: {limit_drops}."
    )
    return completed > 0 and limit_drops == 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
