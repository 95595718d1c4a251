"""`GET /metrics`: the node's counters in the Prometheus text exposition format, version 0.0.4.

Every value is read at scrape time from what the node already keeps for `/api/status` and its
own statistics (`RelayStatistics`, `LinkStatistics`, drop counters, the RPC and ledger
statistics, the accounting and settlement summaries): nothing is counted twice, and a scrape
costs nothing between scrapes.

The format is rendered here rather than through prometheus-client: its collectors would only
wrap these same reads, and what the format asks of us is small and fully specified (one
``# HELP`` and ``# TYPE`` line per family, ``name{label="value"} number`` per sample, with
``\\``, ``"`` and newlines escaped in label values and ``\\`` and newlines in help text).
The test suite parses the output with prometheus-client's own parser.

Names follow Prometheus's conventions: the ``earendil_`` prefix, base units in the name
(``_seconds``, ``_bytes``; money in integer µMEL as ``_umel``), ``_total`` on counters. Every
family is declared once in METRICS; docs/control-api.md documents each (a test checks both
ways). Label values are bounded: neighbours by the node's neighbour cap, routes by the config,
reasons and states by the code.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from earendil_py import __version__
from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.identity import parse_fingerprint
from earendil_py.runtime.views import LinkView, NodeView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LINK = ("neighbor", "route", "protocol", "direction")
NEIGHBOR = ("neighbor",)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...]
    help: str


# A table, one metric per entry: formatted by hand.
# fmt: off
METRICS = {
    metric.name: metric
    for metric in [
        # --- the node ---------------------------------------------------------------------
        Metric("earendil_info", "gauge", ("fingerprint", "version"),
               "Always 1; the labels say which node and software"),
        Metric("earendil_uptime_seconds", "gauge", (),
               "Seconds since the node started"),
        Metric("earendil_packets_originated_total", "counter", (),
               "Onion packets this node built (datagrams it sent)"),
        Metric("earendil_packets_forwarded_total", "counter", (),
               "Onion packets relayed toward another peeler without onion crypto"),
        Metric("earendil_packets_peeled_total", "counter", (),
               "Onion layers this node peeled"),
        Metric("earendil_datagrams_delivered_total", "counter", (),
               "Datagrams that ended at this node"),
        Metric("earendil_drops_total", "counter", ("reason",),
               "Input dropped outside any link (probes, socket errors, relay faults), by reason"),
        Metric("earendil_graph_identities", "gauge", (),
               "Nodes in this node's relay graph"),
        Metric("earendil_graph_adjacencies", "gauge", (),
               "Links in this node's relay graph"),
        # --- neighbour RPC ------------------------------------------------------------------
        Metric("earendil_rpc_server_requests_total", "counter", (),
               "RPC requests received from neighbours"),
        Metric("earendil_rpc_server_dispatched_total", "counter", (),
               "RPC requests run (new ones, not retransmissions)"),
        Metric("earendil_rpc_server_cache_hits_total", "counter", (),
               "Retransmitted RPC requests answered from the response cache"),
        Metric("earendil_rpc_server_in_progress_hits_total", "counter", (),
               "Retransmitted RPC requests that arrived while the first still ran"),
        Metric("earendil_rpc_server_parse_errors_total", "counter", (),
               "RPC requests that were not valid JSON"),
        Metric("earendil_rpc_server_invalid_requests_total", "counter", (),
               "RPC requests that were not valid JSON-RPC 2.0"),
        Metric("earendil_rpc_server_unknown_methods_total", "counter", (),
               "RPC requests for a method this node does not serve"),
        Metric("earendil_rpc_server_busy_total", "counter", ("bound",),
               "RPC requests refused because a response-cache bound was reached, by bound"),
        Metric("earendil_rpc_server_id_conflicts_total", "counter", (),
               "RPC requests reusing a cached id with other content: dropped"),
        Metric("earendil_rpc_server_expired_total", "counter", (),
               "RPC responses dropped from the cache after their time"),
        Metric("earendil_rpc_server_cached_entries", "gauge", (),
               "RPC requests remembered now, running or answered"),
        Metric("earendil_rpc_server_cached_bytes", "gauge", (),
               "Bytes charged to the RPC response cache now"),
        Metric("earendil_rpc_client_calls_total", "counter", (),
               "RPC calls this node started"),
        Metric("earendil_rpc_client_retransmissions_total", "counter", (),
               "RPC requests sent again for want of an answer"),
        Metric("earendil_rpc_client_completed_total", "counter", (),
               "RPC calls answered (with a result or an error)"),
        Metric("earendil_rpc_client_failed_total", "counter", (),
               "RPC calls that timed out after their last attempt"),
        Metric("earendil_rpc_client_cancelled_total", "counter", (),
               "RPC calls cancelled before an answer"),
        Metric("earendil_rpc_client_unmatched_responses_total", "counter", (),
               "RPC responses to no pending call: discarded"),
        Metric("earendil_rpc_client_malformed_responses_total", "counter", (),
               "RPC responses that could not be decoded: discarded"),
        Metric("earendil_rpc_client_pending", "gauge", (),
               "RPC calls waiting for an answer now"),
        Metric("earendil_rpc_handlers_running", "gauge", (),
               "RPC handlers running now"),
        Metric("earendil_rpc_dropped_not_running_total", "counter", (),
               "RPC requests that arrived while the RPC service was not running"),
        # --- the ledger ---------------------------------------------------------------------
        Metric("earendil_ledger_group_commits_total", "counter", (),
               "Ledger transactions that committed several writers' entries at once"),
        Metric("earendil_ledger_grouped_appends_total", "counter", (),
               "Ledger appends committed in those shared transactions"),
        # --- links --------------------------------------------------------------------------
        Metric("earendil_link_up", "gauge", LINK,
               "1 if the link is established; 0 for a configured out_route that is not"),
        Metric("earendil_link_frames_received_total", "counter", LINK,
               "Link frames received and authenticated"),
        Metric("earendil_link_frames_sent_total", "counter", LINK,
               "Link frames sent"),
        Metric("earendil_link_bytes_received_total", "counter", LINK,
               "Bytes received on the link, authenticated or not"),
        Metric("earendil_link_bytes_sent_total", "counter", LINK,
               "Bytes of link frames sent, headers included"),
        Metric("earendil_link_packets_received_total", "counter", LINK,
               "Onion packets received over the link"),
        Metric("earendil_link_packets_sent_total", "counter", LINK,
               "Onion packets sent over the link"),
        Metric("earendil_link_drops_total", "counter", (*LINK, "reason"),
               "Input dropped on the link, by reason"),
        Metric("earendil_link_rtt_seconds", "gauge", LINK,
               "Smoothed round-trip time of the link (absent until measured)"),
        # --- neighbours (accounting and settlement) -----------------------------------------
        Metric("earendil_neighbor_priced", "gauge", NEIGHBOR,
               "1 once both price offers are accepted (traffic may flow)"),
        Metric("earendil_neighbor_frozen", "gauge", NEIGHBOR,
               "1 while a debt dispute freezes traffic with the neighbour"),
        Metric("earendil_neighbor_our_price_umel", "gauge", NEIGHBOR,
               "Our price per packet the neighbour sends us, in uMEL"),
        Metric("earendil_neighbor_their_price_umel", "gauge", NEIGHBOR,
               "The neighbour's price per packet we send it, in uMEL"),
        Metric("earendil_neighbor_our_debt_limit_umel", "gauge", NEIGHBOR,
               "The most the neighbour may owe us, in uMEL"),
        Metric("earendil_neighbor_their_debt_limit_umel", "gauge", NEIGHBOR,
               "The most we may owe the neighbour, in uMEL"),
        Metric("earendil_neighbor_debt_in_umel", "gauge", NEIGHBOR,
               "What the neighbour owes us now, in uMEL"),
        Metric("earendil_neighbor_debt_out_umel", "gauge", NEIGHBOR,
               "What we owe the neighbour now, in uMEL"),
        Metric("earendil_settlements", "gauge", (*NEIGHBOR, "method", "role", "state"),
               "Settlements with the neighbour, by payment method, our role and state"),
        Metric("earendil_settled_in_umel_total", "counter", NEIGHBOR,
               "Debt the neighbour paid us in completed settlements, in uMEL"),
        Metric("earendil_settled_out_umel_total", "counter", NEIGHBOR,
               "Debt we paid the neighbour in completed settlements, in uMEL"),
    ]
}
# fmt: on


Labels = tuple[str, ...]


class Samples:
    """The samples of one scrape, by family. `add` raises LocalProtocolError on an unknown
    name, the wrong labels or a repeated label set: each would make the output invalid."""

    def __init__(self) -> None:
        self.values: dict[str, dict[Labels, float]] = {name: {} for name in METRICS}

    def add(self, name: str, value: float, **labels: str) -> None:
        metric = METRICS.get(name)
        if metric is None or tuple(labels) != metric.labels:
            raise LocalProtocolError(f"sample {name} {sorted(labels)} matches no declared metric")
        key = tuple(labels.values())
        if key in self.values[name]:
            raise LocalProtocolError(f"sample {name} {labels} added twice")
        self.values[name][key] = value


def render_metrics(node: NodeView) -> str:
    """`node`'s metrics now, as the body of a `/metrics` answer (CONTENT_TYPE)."""
    return render(collect(node))


def render(samples: Samples) -> str:
    """The text exposition format (0.0.4) of `samples`, every declared family included."""
    lines: list[str] = []
    for name, metric in METRICS.items():
        lines.append(f"# HELP {name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {name} {metric.kind}")
        for key, value in sorted(samples.values[name].items()):
            labels = ",".join(
                f'{label}="{_escape_label(text)}"'
                for label, text in zip(metric.labels, key, strict=True)
            )
            lines.append(
                f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def collect(node: NodeView) -> Samples:
    """Read every metric from `node`'s own counters and summaries."""
    out = Samples()
    relay = node.relay
    out.add("earendil_info", 1, fingerprint=node.fingerprint.hex(), version=__version__)
    out.add("earendil_uptime_seconds", round(time.monotonic() - node.started_at, 3))
    out.add("earendil_packets_originated_total", relay.originated)
    out.add("earendil_packets_forwarded_total", relay.forwarded)
    out.add("earendil_packets_peeled_total", relay.peeled)
    out.add("earendil_datagrams_delivered_total", relay.delivered)
    for reason, count in node.drop_counts().items():
        out.add("earendil_drops_total", count, reason=reason)
    graph = node.graph.statistics()
    out.add("earendil_graph_identities", graph.identities)
    out.add("earendil_graph_adjacencies", graph.adjacencies)
    _collect_rpc(node, out)
    ledger = node.ledger
    if ledger is not None:
        stats = ledger.statistics()
        out.add("earendil_ledger_group_commits_total", stats.group_commits)
        out.add("earendil_ledger_grouped_appends_total", stats.grouped_appends)
    _collect_links(node, out)
    _collect_neighbors(node, out)
    return out


def _collect_rpc(node: NodeView, out: Samples) -> None:
    rpc = node.rpc.statistics()
    server, client = rpc.server, rpc.client
    for name, value in [
        ("requests", server.requests_received),
        ("dispatched", server.dispatched),
        ("cache_hits", server.cache_hits),
        ("in_progress_hits", server.in_progress_hits),
        ("parse_errors", server.parse_errors),
        ("invalid_requests", server.invalid_requests),
        ("unknown_methods", server.unknown_methods),
        ("id_conflicts", server.id_conflicts),
        ("expired", server.expired),
    ]:
        out.add(f"earendil_rpc_server_{name}_total", value)
    for bound, count in server.busy.items():
        out.add("earendil_rpc_server_busy_total", count, bound=bound)
    out.add("earendil_rpc_server_cached_entries", server.cached_entries)
    out.add("earendil_rpc_server_cached_bytes", server.cached_bytes)
    for name, value in [
        ("calls", client.sent),
        ("retransmissions", client.retransmitted),
        ("completed", client.completed),
        ("failed", client.failed),
        ("cancelled", client.cancelled),
        ("unmatched_responses", client.unmatched_responses),
        ("malformed_responses", client.malformed),
    ]:
        out.add(f"earendil_rpc_client_{name}_total", value)
    out.add("earendil_rpc_client_pending", client.pending)
    out.add("earendil_rpc_handlers_running", rpc.handlers_running)
    out.add("earendil_rpc_dropped_not_running_total", rpc.dropped_not_running)


def _collect_links(node: NodeView, out: Samples) -> None:
    # Links are labelled by neighbour and route. A neighbour may have two links on one route
    # for a moment (a new session before the old one is closed): their counters are summed
    # and the RTT is the older link's, which the node still sends on.
    groups: dict[Labels, list[LinkView]] = defaultdict(list)
    for fingerprint, runners in node.links.items():
        for runner in runners:
            info = runner.route
            groups[(fingerprint.hex(), info.name, info.protocol, info.direction)].append(runner)
    for name, route in node.config.out_routes.items():
        down: Labels = (parse_fingerprint(route.fingerprint).hex(), name, route.protocol, "out")
        if down not in groups:
            out.add("earendil_link_up", 0, **dict(zip(LINK, down, strict=True)))
    for key, runners in groups.items():
        labels = dict(zip(LINK, key, strict=True))
        stats = [runner.statistics() for runner in runners]
        out.add("earendil_link_up", 1, **labels)
        for name, value in [
            ("frames_received", sum(s.frames_in for s in stats)),
            ("frames_sent", sum(s.frames_out for s in stats)),
            ("bytes_received", sum(s.bytes_in for s in stats)),
            ("bytes_sent", sum(s.bytes_out for s in stats)),
            ("packets_received", sum(r.packets_received for r in runners)),
            ("packets_sent", sum(r.packets_sent for r in runners)),
        ]:
            out.add(f"earendil_link_{name}_total", value, **labels)
        drops: Counter[str] = Counter()
        for s in stats:
            drops.update(s.drops)
        for reason, count in drops.items():
            out.add("earendil_link_drops_total", count, **labels, reason=reason)
        if stats[0].rtt is not None:
            out.add("earendil_link_rtt_seconds", stats[0].rtt, **labels)


def _collect_neighbors(node: NodeView, out: Samples) -> None:
    for account in node.accounts.summaries():
        neighbor = account["neighbor"]
        out.add("earendil_neighbor_priced", int(account["priced"]), neighbor=neighbor)
        out.add("earendil_neighbor_frozen", int(bool(account["frozen"])), neighbor=neighbor)
        for field in [
            "our_price_umel",
            "their_price_umel",
            "our_debt_limit_umel",
            "their_debt_limit_umel",
            "debt_in_umel",
            "debt_out_umel",
        ]:
            if account[field] is not None:  # no offer yet
                out.add(f"earendil_neighbor_{field}", account[field], neighbor=neighbor)
        out.add("earendil_settled_in_umel_total", account["settled_in_umel"], neighbor=neighbor)
        out.add("earendil_settled_out_umel_total", account["settled_out_umel"], neighbor=neighbor)
    for fingerprint, neighbor in node.accounts.neighbors.items():
        # A proposal names its method; only ours become label values (settlement_counts).
        for (method, role, state), count in neighbor.settlement_counts().items():
            out.add(
                "earendil_settlements",
                count,
                neighbor=fingerprint.hex(),
                method=method,
                role=role,
                state=state,
            )


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):  # exact, however large (a float would round it)
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
