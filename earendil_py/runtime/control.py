"""The control API: what the CLI and the dashboard use to see and steer a running node.

JSON over HTTP on `control_listen` (loopback). Binary data travels base64-encoded. It sees the
node through `ControlledNode`, the narrow view it needs, and does not import the node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec

from earendil_py.core.errors import EarendilError, LocalProtocolError, RemoteProtocolError
from earendil_py.core.graph import RelayGraph
from earendil_py.core.identity import parse_fingerprint
from earendil_py.core.link import LinkStatistics
from earendil_py.core.packet import MAX_HOPS
from earendil_py.core.pricing import PriceTerms
from earendil_py.core.relay import Datagram
from earendil_py.core.settlement import SettlementRecord
from earendil_py.runtime.chat import Chat
from earendil_py.runtime.http import (
    HttpError,
    Request,
    Response,
    Router,
    html_response,
    json_response,
)
from earendil_py.runtime.neighbors import Neighbors

DASHBOARD = Path(__file__).with_name("dashboard.html")
Dock = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]


Umel = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class PriceRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    price_umel: Umel
    debt_limit_umel: Umel


class SettleRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    neighbor: str
    method: str
    pay_umel: Umel = 0  # of our debt to them
    request_umel: Umel = 0  # of their debt to us
    prepay: bool = False  # paying more than we owe is refused unless asked for


class RouteView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def direction(self) -> str: ...


class LinkView(Protocol):
    """What the control API shows of one link."""

    @property
    def peer_fingerprint(self) -> bytes | None: ...

    @property
    def route(self) -> RouteView: ...

    @property
    def peer_address(self) -> tuple[str, int]: ...

    @property
    def packets_sent(self) -> int: ...

    @property
    def packets_received(self) -> int: ...

    def statistics(self) -> LinkStatistics: ...


class RelayView(Protocol):
    @property
    def originated(self) -> int: ...

    @property
    def forwarded(self) -> int: ...

    @property
    def peeled(self) -> int: ...

    @property
    def delivered(self) -> int: ...


class ControlledNode(Protocol):
    """What the control API needs of the node."""

    @property
    def fingerprint(self) -> bytes: ...

    @property
    def started_at(self) -> float: ...

    @property
    def relay(self) -> RelayView: ...

    @property
    def graph(self) -> RelayGraph: ...

    @property
    def links(self) -> Mapping[bytes, Sequence[LinkView]]: ...

    @property
    def accounts(self) -> Neighbors: ...

    @property
    def chat(self) -> Chat: ...

    def drop_counts(self) -> Counter[str]: ...

    def send_datagram(
        self, destination: bytes, dock: int, data: bytes, hops: int | None = None
    ) -> None: ...

    def receive_datagrams_nowait(self, dock: int, limit: int = 1000) -> list[Datagram]: ...


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    text: str


class SendRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    destination: str
    dock: Dock
    data_b64: str
    hops: Annotated[int, msgspec.Meta(ge=1, le=MAX_HOPS)] | None = None


def link_summary(runner: LinkView) -> dict[str, Any]:
    stats = runner.statistics()
    fingerprint = runner.peer_fingerprint
    return {
        "neighbor": fingerprint.hex() if fingerprint else None,
        "route": runner.route.name,
        "protocol": runner.route.protocol,
        "direction": runner.route.direction,
        "peer_address": f"{runner.peer_address[0]}:{runner.peer_address[1]}",
        "packets_sent": runner.packets_sent,
        "packets_received": runner.packets_received,
        "frames_in": stats.frames_in,
        "frames_out": stats.frames_out,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "rtt_ms": None if stats.rtt is None else round(stats.rtt * 1000, 3),
        "drops": dict(stats.drops),
    }


def status(node: ControlledNode) -> dict[str, Any]:
    relay = node.relay
    graph = node.graph.statistics()
    return {
        "fingerprint": node.fingerprint.hex(),
        "uptime_secs": round(time.monotonic() - node.started_at, 3),
        "relay": {
            "originated": relay.originated,
            "forwarded": relay.forwarded,
            "peeled": relay.peeled,
            "delivered": relay.delivered,
        },
        "drops": dict(node.drop_counts()),
        "graph": {"identities": graph.identities, "adjacencies": graph.adjacencies},
        "links": [link_summary(r) for runners in node.links.values() for r in runners],
        "accounts": node.accounts.summaries(),
    }


def build_router(node: ControlledNode) -> Router:
    router = Router()
    page = dashboard_response()

    @router.route("GET", "/")
    async def dashboard(request: Request) -> Response:
        return page

    @router.route("GET", "/api/status")
    async def get_status(request: Request) -> Response:
        return json_response(status(node))

    @router.route("POST", "/api/send")
    async def send(request: Request) -> Response:
        body = request.json(SendRequest)
        try:
            destination = parse_fingerprint(body.destination)
            data = base64.b64decode(body.data_b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise HttpError(400, str(exc)) from None
        try:
            node.send_datagram(destination, body.dock, data, hops=body.hops)
        except LocalProtocolError as exc:
            raise HttpError(422, str(exc)) from None
        return json_response({"sent": 1})

    @router.route("GET", "/api/receive")
    async def receive(request: Request) -> Response:
        try:
            dock = int(request.query["dock"])
            limit = int(request.query.get("max", "1000"))
        except (KeyError, ValueError):
            raise HttpError(400, "query needs dock=N (and optionally max=N)") from None
        datagrams = node.receive_datagrams_nowait(dock, max(1, min(limit, 10_000)))
        return json_response(
            {
                "datagrams": [
                    {"dock": d.dock, "data_b64": base64.b64encode(d.data).decode()}
                    for d in datagrams
                ]
            }
        )

    def neighbor(request: Request) -> bytes:
        try:
            fingerprint = parse_fingerprint(request.params["fingerprint"])
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        if node.accounts.get(fingerprint) is None:
            raise HttpError(404, "no account with this neighbour")
        return fingerprint

    @router.route("POST", "/api/neighbors/{fingerprint}/price")
    async def reprice(request: Request) -> Response:
        fingerprint = neighbor(request)
        body = request.json(PriceRequest)
        methods = tuple(node.accounts.config.settlement.methods)
        terms = PriceTerms(body.price_umel, body.debt_limit_umel, methods)
        try:
            accepted = await node.accounts.reprice(fingerprint, terms)
        except LocalProtocolError as exc:
            raise HttpError(409, str(exc)) from None
        except RemoteProtocolError as exc:
            raise HttpError(504, str(exc)) from None
        return json_response({"accepted": accepted})

    @router.route("POST", "/api/neighbors/{fingerprint}/unfreeze")
    async def unfreeze(request: Request) -> Response:
        try:
            await node.accounts.unfreeze(neighbor(request))
        except EarendilError as exc:
            raise HttpError(503, str(exc)) from None
        return json_response({"frozen": ""})

    @router.route("GET", "/api/chat/{fingerprint}")
    async def chat_history(request: Request) -> Response:
        return json_response({"messages": await node.chat.history(neighbor(request))})

    @router.route("POST", "/api/chat/{fingerprint}")
    async def chat_send(request: Request) -> Response:
        fingerprint = neighbor(request)
        body = request.json(ChatRequest)
        try:
            message = await node.chat.send(fingerprint, body.text)
        except LocalProtocolError as exc:
            raise HttpError(409, str(exc)) from None
        if message["status"] != "delivered":
            raise HttpError(502, f"not delivered: {message['reason']}")
        return json_response({"message": message})

    @router.route("GET", "/api/settlements")
    async def settlements(request: Request) -> Response:
        return json_response({"settlements": node.accounts.settlements()})

    @router.route("POST", "/api/settlements")
    async def settle(request: Request) -> Response:
        body = request.json(SettleRequest)
        try:
            neighbor = parse_fingerprint(body.neighbor)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        if body.pay_umel == body.request_umel == 0:
            raise HttpError(400, "nothing to settle: give pay_umel or request_umel")
        try:
            record = await node.accounts.propose(
                neighbor,
                pay_umel=body.pay_umel,
                request_umel=body.request_umel,
                method=body.method,
                prepay=body.prepay,
            )
        except LocalProtocolError as exc:
            raise HttpError(409, str(exc)) from None
        except RemoteProtocolError as exc:
            raise HttpError(502, f"payment failed: {exc}") from None
        return _settlement_response(record)

    @router.route("POST", "/api/settlements/{id}/{decision}")
    async def decide(request: Request) -> Response:
        decision = request.params["decision"]
        if decision not in ("accept", "reject", "cancel"):
            raise HttpError(404, "not found")
        try:
            settlement_id = bytes.fromhex(request.params["id"])
        except ValueError:
            raise HttpError(400, "a settlement id is hex") from None
        try:
            if decision == "cancel":
                record = await node.accounts.cancel(settlement_id)
            else:
                record = await node.accounts.decide(settlement_id, approve=decision == "accept")
        except LocalProtocolError as exc:
            raise HttpError(409, str(exc)) from None
        return _settlement_response(record)

    return router


def dashboard_response() -> Response:
    """The dashboard page, with a Content-Security-Policy that lets its own inline script and
    style run and nothing else: no other script, no other origin, no framing."""
    page = DASHBOARD.read_text(encoding="utf-8")
    sources = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
        sources[tag] = " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"
    policy = (
        f"default-src 'none'; connect-src 'self'; script-src {sources['script']}; "
        f"style-src {sources['style']}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html_response(page, headers=[("Content-Security-Policy", policy)])


def _settlement_response(record: SettlementRecord) -> Response:
    return json_response(
        {"id": record.proposal.id_hex, "state": str(record.state), "reason": record.reason}
    )
