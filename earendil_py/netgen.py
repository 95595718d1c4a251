"""Generate identities and configs for a local network of nodes on loopback.

Used by the demo and by end-to-end tests: every node gets its own directory with a 0600
identity file and a 0600 `node.toml` whose routes point at its neighbours on 127.0.0.1.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from earendil_py.runtime.config import Config, load_config
from earendil_py.runtime.keyfile import create_identity_file, write_private_file


@dataclass(frozen=True, slots=True)
class Edge:
    """A link: `dialer` dials `listener`'s in_route over `protocol`."""

    dialer: int
    listener: int
    protocol: str


@dataclass(frozen=True, slots=True)
class GeneratedNode:
    name: str
    directory: Path
    config_path: Path
    fingerprint: str
    config: Config


def free_port(protocol: str, held: ExitStack | None = None) -> int:
    """A port the kernel just gave us on 127.0.0.1 (free at the time of asking). With `held`,
    the socket stays bound until that stack closes, so the kernel cannot hand the same port
    out twice meanwhile."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with ExitStack() as own:
        sock = (held or own).enter_context(socket.socket(socket.AF_INET, kind))
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def generate_network(
    root: Path,
    node_count: int,
    edges: list[Edge],
    *,
    extra_toml: str = "",
    node_toml: Mapping[int, str] | None = None,
) -> list[GeneratedNode]:
    """Write `root/nodeN/{node.key,node.toml}` for each node and return them validated.

    `extra_toml` (tables such as `[links]`) is appended to every node's config, and
    `node_toml[N]` to node N's only (e.g. a route's `price` table).
    """
    root.mkdir(parents=True, exist_ok=True)
    fingerprints = []
    for index in range(node_count):
        directory = root / f"node{index}"
        directory.mkdir(exist_ok=True)
        fingerprints.append(create_identity_file(directory / "node.key").fingerprint.hex())

    # Every port stays bound until all are chosen, so no two routes get the same one.
    with ExitStack() as held:
        sections: list[list[str]] = [[] for _ in range(node_count)]
        for edge in edges:
            port = free_port(edge.protocol, held)
            secret = secrets.token_hex(16)
            route = f"from_node{edge.dialer}_{edge.protocol}"
            sections[edge.listener] += [
                f"[in_routes.{route}]",
                f'protocol = "{edge.protocol}"',
                f'listen = "127.0.0.1:{port}"',
                f'secret = "{secret}"',
                "",
            ]
            sections[edge.dialer] += [
                f"[out_routes.node{edge.listener}_{edge.protocol}]",
                f'protocol = "{edge.protocol}"',
                f'connect = "127.0.0.1:{port}"',
                f'fingerprint = "{fingerprints[edge.listener]}"',
                f'secret = "{secret}"',
                "",
            ]

        nodes = []
        for index in range(node_count):
            directory = root / f"node{index}"
            config_path = directory / "node.toml"
            header = [
                'identity_file = "node.key"',
                'db_path = "node.db"',
                f'control_listen = "127.0.0.1:{free_port("tcp", held)}"',
                "",
            ]
            own = (node_toml or {}).get(index, "")
            # 0600 from the start: it holds the route cookies, and the daemon refuses it otherwise.
            write_private_file(config_path, "\n".join([*header, *sections[index], extra_toml, own]))
            nodes.append(
                GeneratedNode(
                    name=f"node{index}",
                    directory=directory,
                    config_path=config_path,
                    fingerprint=fingerprints[index],
                    config=load_config(config_path),
                )
            )
        return nodes
