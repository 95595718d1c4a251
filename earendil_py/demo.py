"""`make demo`: a local network of nodes on loopback.

Today it generates identities and validated configs for a four-node network mixing UDP and
TCP links; running the nodes joins it when the daemon lands.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from earendil_py.netgen import Edge, generate_network

DEMO_EDGES = [
    Edge(dialer=0, listener=1, protocol="udp"),
    Edge(dialer=1, listener=2, protocol="tcp"),
    Edge(dialer=2, listener=3, protocol="udp"),
    Edge(dialer=3, listener=0, protocol="tcp"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="earendil-py-demo")
    parser.add_argument("--dir", type=Path, default=Path("demo-net"), help="network directory")
    args = parser.parse_args(argv)
    if args.dir.exists():
        shutil.rmtree(args.dir)
    nodes = generate_network(args.dir, 4, DEMO_EDGES)
    print(f"Generated a {len(nodes)}-node loopback network in {args.dir}/")
    for node in nodes:
        config = node.config
        links = [f"listen {r.protocol} {r.listen}" for r in config.in_routes.values()]
        links += [f"dial {r.protocol} {r.connect}" for r in config.out_routes.values()]
        print(f"  {node.name}  {node.fingerprint[:8]}  " + ", ".join(links))
    print("Each config validated; inspect one with:")
    print(f"  .venv/bin/earendil-py check-config --config {nodes[0].config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
