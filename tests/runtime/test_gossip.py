"""Gossip between in-process nodes on loopback sockets."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from earendil_py.netgen import Edge
from tests.helpers import converged, make_nodes, running


@pytest.mark.anyio
async def test_what_a_neighbor_tells_us_counts_against_its_share(tmp_path: Path) -> None:
    edges = [Edge(0, 1, "udp"), Edge(1, 2, "tcp")]
    nodes = make_nodes(tmp_path, 3, edges)
    first, middle, last = nodes
    with anyio.fail_after(10):
        async with running(nodes):
            await converged(nodes, edges)
            shares = first.graph.shares()
    # Ours: our identity (and our link, unless the neighbour's copy of it came first). The
    # middle node's: itself and what lies behind it.
    assert set(shares) == {None, middle.fingerprint}
    assert shares[None].identities == 1
    assert shares[middle.fingerprint].identities == 2
    assert shares[None].adjacencies + shares[middle.fingerprint].adjacencies == 2
    assert first.graph.next_hop(first.fingerprint, last.fingerprint) == middle.fingerprint
