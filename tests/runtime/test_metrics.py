"""`GET /metrics`: scraped from running nodes with their token, parsed with prometheus-client's
own text-format parser, checked against docs/control-api.md and against `/api/status`."""

from __future__ import annotations

import http.client
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.metrics_core import Metric as ParsedFamily
from prometheus_client.parser import text_string_to_metric_families

from earendil_py import __version__
from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.settlement import SettlementState
from earendil_py.netgen import Edge
from earendil_py.runtime.http import call_api, read_token_file, token_path
from earendil_py.runtime.metrics import CONTENT_TYPE, METRICS, Samples, render
from earendil_py.runtime.node import Node
from tests.helpers import converged, make_nodes, running
from tests.runtime.test_settlement import api, network, owe, record_in

LINE3 = [Edge(0, 1, "udp"), Edge(1, 2, "tcp")]
DOCS = Path(__file__).parents[2] / "docs" / "control-api.md"
DOCK = 9


def documented() -> dict[str, str]:
    """name -> type, from the metrics table of docs/control-api.md."""
    rows = re.findall(
        r"^\| `(earendil_\w+)` \| (counter|gauge) \|", DOCS.read_text("utf-8"), flags=re.M
    )
    table = dict(rows)
    assert len(table) == len(rows)  # no name documented twice
    return table


def _scrape(node: Node) -> tuple[int, str, str]:
    host, port = node.config.control_listen
    token = read_token_file(token_path(node.config))
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.headers["Content-Type"], response.read().decode()
    finally:
        connection.close()


async def scrape(node: Node) -> dict[str, ParsedFamily]:
    """The node's metrics, parsed; keyed by the name the table documents (a counter's
    family is named without `_total` by the parser, its samples with it)."""
    status, content_type, text = await anyio.to_thread.run_sync(_scrape, node)
    assert (status, content_type) == (200, CONTENT_TYPE)
    parsed = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert name not in parsed
        parsed[name] = family
    return parsed


def value(families: dict[str, ParsedFamily], name: str, **labels: str) -> float:
    matching = [s.value for s in families[name].samples if s.labels == labels]
    assert len(matching) == 1, (name, labels, families[name].samples)
    return matching[0]


async def status_of(node: Node) -> Any:
    return await anyio.to_thread.run_sync(call_api, node.config, "GET", "/api/status")


@pytest.mark.anyio
async def test_every_documented_metric_is_scraped_with_its_type_and_agrees_with_status(
    tmp_path: Path,
) -> None:
    table = documented()
    assert {name: metric.kind for name, metric in METRICS.items()} == table
    nodes = make_nodes(tmp_path, 3, LINE3)
    middle = nodes[1]
    async with running(nodes):
        with anyio.fail_after(5):
            await converged(nodes, LINE3)
            for _ in range(5):
                nodes[0].send_datagram(nodes[2].fingerprint, DOCK, b"x", hops=2)
            while nodes[2].relay.delivered < 5:
                await anyio.sleep(0.02)
        status = await status_of(middle)
        families = await scrape(middle)  # after: link frames may only have grown

    assert set(families) == set(table)
    for name, kind in table.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert sample.name == name, "a sample outside its family"

    assert value(families, "earendil_info", fingerprint=status["fingerprint"], version=__version__)
    relay = status["relay"]
    assert relay["peeled"] == 5  # the first of the two peelers
    for name, key in [
        ("earendil_packets_originated_total", "originated"),
        ("earendil_packets_forwarded_total", "forwarded"),
        ("earendil_packets_peeled_total", "peeled"),
        ("earendil_datagrams_delivered_total", "delivered"),
    ]:
        assert value(families, name) == relay[key], name
    assert value(families, "earendil_graph_identities") == status["graph"]["identities"] == 3
    assert value(families, "earendil_uptime_seconds") >= status["uptime_secs"]
    assert {s.labels["reason"]: s.value for s in families["earendil_drops_total"].samples} == (
        status["drops"]
    )

    assert len(status["links"]) == 2
    for link in status["links"]:
        labels = {k: link[k] for k in ("neighbor", "route", "protocol", "direction")}
        assert value(families, "earendil_link_up", **labels) == 1
        assert value(families, "earendil_link_packets_sent_total", **labels) == link["packets_sent"]
        assert (
            value(families, "earendil_link_packets_received_total", **labels)
            == link["packets_received"]
        )
        for name, key in [
            ("earendil_link_frames_received_total", "frames_in"),
            ("earendil_link_frames_sent_total", "frames_out"),
            ("earendil_link_bytes_received_total", "bytes_in"),
            ("earendil_link_bytes_sent_total", "bytes_out"),
        ]:
            assert value(families, name, **labels) >= link[key] > 0, name
        if link["rtt_ms"] is not None:
            assert value(families, "earendil_link_rtt_seconds", **labels) > 0
    packets = {
        s.labels["direction"]: s.value for s in families["earendil_link_packets_sent_total"].samples
    }
    assert packets == {"in": 0, "out": 5}  # relayed on toward node 2, which it dialled

    assert len(status["accounts"]) == 2
    for account in status["accounts"]:
        neighbor = account["neighbor"]
        assert value(families, "earendil_neighbor_priced", neighbor=neighbor) == 1
        assert value(families, "earendil_neighbor_frozen", neighbor=neighbor) == 0
        for field in [
            "our_price_umel",
            "their_price_umel",
            "our_debt_limit_umel",
            "their_debt_limit_umel",
            "debt_in_umel",
            "debt_out_umel",
        ]:
            assert (
                value(families, f"earendil_neighbor_{field}", neighbor=neighbor) == (account[field])
            ), field
    assert sum(s.value for s in families["earendil_neighbor_debt_out_umel"].samples) == 5


@pytest.mark.anyio
async def test_a_configured_route_that_is_down_shows_as_down(tmp_path: Path) -> None:
    dialer, listener = make_nodes(tmp_path, 2, [Edge(0, 1, "tcp")])
    async with running([dialer]):  # the neighbour it dials never starts
        families = await scrape(dialer)
    (sample,) = families["earendil_link_up"].samples
    assert sample.value == 0
    assert sample.labels == {
        "neighbor": listener.fingerprint.hex(),
        "route": "node1_tcp",
        "protocol": "tcp",
        "direction": "out",
    }


@pytest.mark.anyio
async def test_settlements_are_counted_by_method_role_and_state(tmp_path: Path) -> None:
    async with network(tmp_path) as (a, b):
        await owe(a, b, 300)
        settle = {"neighbor": b.fingerprint.hex(), "method": "manual", "pay_umel": 250}
        first = await api(a, "POST", "/api/settlements", settle)
        await api(b, "POST", f"/api/settlements/{first['id']}/accept", {})
        await record_in(a, b, first["id"], SettlementState.COMPLETED)
        second = await api(a, "POST", "/api/settlements", {**settle, "pay_umel": 10})
        await api(b, "POST", f"/api/settlements/{second['id']}/reject", {})
        await record_in(a, b, second["id"], SettlementState.REJECTED)
        of_a, of_b = await scrape(a), await scrape(b)
        status_a = await status_of(a)

    a_hex, b_hex = a.fingerprint.hex(), b.fingerprint.hex()
    counts_a = {
        (s.labels["method"], s.labels["role"], s.labels["state"]): s.value
        for s in of_a["earendil_settlements"].samples
        if s.labels["neighbor"] == b_hex
    }
    assert counts_a == {
        ("manual", "proposer", "completed"): 1,
        ("manual", "proposer", "rejected"): 1,
    }
    assert (
        value(
            of_b,
            "earendil_settlements",
            neighbor=a_hex,
            method="manual",
            role="responder",
            state="completed",
        )
        == 1
    )
    assert value(of_a, "earendil_settled_out_umel_total", neighbor=b_hex) == 250
    assert value(of_a, "earendil_settled_in_umel_total", neighbor=b_hex) == 0
    assert value(of_b, "earendil_settled_in_umel_total", neighbor=a_hex) == 250
    (account,) = status_a["accounts"]
    assert (
        value(of_a, "earendil_neighbor_debt_out_umel", neighbor=b_hex)
        == account["debt_out_umel"]
        == 50
    )


def test_label_values_and_help_are_escaped_and_numbers_exact() -> None:
    samples = Samples()
    awkward = 'back\\slash "quoted"\nnew line ü'
    samples.add("earendil_drops_total", 3, reason=awkward)
    samples.add("earendil_drops_total", 4, reason="plain")
    samples.add("earendil_neighbor_debt_in_umel", 2**63 - 1, neighbor="ab" * 32)
    samples.add("earendil_neighbor_debt_out_umel", -5, neighbor="ab" * 32)
    samples.add(
        "earendil_link_rtt_seconds",
        0.0125,
        neighbor="ab" * 32,
        route="r",
        protocol="udp",
        direction="out",
    )
    text = render(samples)
    assert f'earendil_neighbor_debt_in_umel{{neighbor="{"ab" * 32}"}} 9223372036854775807\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    drops = {s.labels["reason"]: s.value for s in families["earendil_drops"].samples}
    assert drops == {awkward: 3, "plain": 4}
    assert families["earendil_neighbor_debt_out_umel"].samples[0].value == -5
    assert families["earendil_link_rtt_seconds"].samples[0].value == 0.0125
    assert len(families) == len(METRICS)  # every family, with or without samples


def test_a_sample_that_would_make_the_output_invalid_is_our_bug() -> None:
    samples = Samples()
    samples.add("earendil_drops_total", 1, reason="x")
    with pytest.raises(LocalProtocolError, match="twice"):
        samples.add("earendil_drops_total", 2, reason="x")
    with pytest.raises(LocalProtocolError, match="no declared metric"):
        samples.add("earendil_drops_total", 1, why="x")
    with pytest.raises(LocalProtocolError, match="no declared metric"):
        samples.add("earendil_unknown_total", 1)
