"""The control API: what the CLI and the dashboard use to see and steer a running node.

JSON over HTTP on `control_listen` (loopback), every request authenticated (`http.py` says
how); binary data travels base64-encoded. docs/control-api.md is the reference for every
route, field and error. No GET changes the node's state: a page that makes a browser fetch a
URL (an ``<img>``, a link) can then change nothing. It sees the node through
`views.NodeView`, and does not import the node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec

from earendil_py.core.errors import EarendilError, LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import parse_fingerprint
from earendil_py.core.packet import MAX_HOPS
from earendil_py.core.pricing import PriceTerms
from earendil_py.core.settlement import SettlementRecord
from earendil_py.runtime.http import (
    LOGIN_CODE_SECS,
    ControlAuth,
    HttpError,
    Request,
    Response,
    Router,
    html_response,
    json_response,
)
from earendil_py.runtime.metrics import CONTENT_TYPE, render_metrics
from earendil_py.runtime.views import LinkView, NodeView

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


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    text: str


class ReceiveRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    dock: Dock
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000


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


def status(node: NodeView) -> dict[str, Any]:
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
        "routes": node.routes.summaries(),
        "accounts": [
            {**account, "chat_unread": node.chat.unread[bytes.fromhex(account["neighbor"])]}
            for account in node.accounts.summaries()
        ],
        "apps": node.apps.statistics(),
    }


_PREFIX = re.compile(r"[0-9a-f]{4,64}")
MAX_MATCHES = 16


def matching_fingerprints(node: NodeView, prefix: str) -> list[dict[str, Any]]:
    """The fingerprints the node knows (its neighbours, those its out_routes dial, the relay
    graph's nodes) that start with `prefix`, in order, at most MAX_MATCHES."""
    neighbors = set(node.links) | set(node.accounts.neighbors)
    neighbors.update(r.neighbor for r in node.routes if r.neighbor is not None)
    known = neighbors | {d.fingerprint for d in node.graph.identities()}
    matches = sorted(fp.hex() for fp in known if fp.hex().startswith(prefix))
    return [
        {"fingerprint": fp, "neighbor": bytes.fromhex(fp) in neighbors}
        for fp in matches[:MAX_MATCHES]
    ]


def build_router(node: NodeView, auth: ControlAuth) -> Router:
    router = Router()
    page = dashboard_response()

    @router.route("GET", "/")
    async def dashboard(request: Request) -> Response:
        return page

    # The one route served without authentication: the code is the credential. Spending it
    # is the only state a GET changes, and only the holder of a fresh code can.
    @router.route("GET", "/login", public=True)
    async def login(request: Request) -> Response:
        session = auth.redeem_login_code(request.query.get("code", ""))
        if session is None:
            raise HttpError(
                403, "this dashboard link was used or has expired: run `earendil-py dashboard`"
            )
        cookie = auth.session_cookie(session)
        return Response(303, headers=(("Location", "/"), ("Set-Cookie", cookie)))

    @router.route("POST", "/api/dashboard-link")
    async def dashboard_link(request: Request) -> Response:
        code = auth.mint_login_code()
        # The Host the client reached us by (checked to be a loopback name or an IP literal)
        # is one a browser on this host reaches us by too.
        url = f"http://{request.headers['host']}/login?code={code}"
        return json_response({"url": url, "expires_in_secs": LOGIN_CODE_SECS})

    @router.route("GET", "/metrics")
    async def metrics(request: Request) -> Response:
        return Response(200, render_metrics(node).encode(), CONTENT_TYPE)

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

    @router.route("POST", "/api/receive")  # a POST: it takes the datagrams off the queue
    async def receive(request: Request) -> Response:
        body = request.json(ReceiveRequest)
        datagrams = node.receive_datagrams_nowait(body.dock, body.limit)
        return json_response(
            {
                "datagrams": [
                    {"dock": d.dock, "data_b64": base64.b64encode(d.data).decode()}
                    for d in datagrams
                ],
                "waiting": node.datagrams_waiting(body.dock),
            }
        )

    @router.route("GET", "/api/fingerprints")
    async def fingerprints(request: Request) -> Response:
        prefix = request.query.get("prefix", "").lower()
        if not _PREFIX.fullmatch(prefix):
            raise HttpError(400, "query needs prefix=HEX (4 to 64 hex digits)")
        return json_response({"matches": matching_fingerprints(node, prefix)})

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
            reason = await node.accounts.reprice(fingerprint, terms)
        except LocalProtocolError as exc:  # no link to it
            raise HttpError(409, str(exc)) from None
        return json_response({"accepted": not reason, "reason": reason})

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

    @router.route("POST", "/api/chat/{fingerprint}/read")
    async def chat_read(request: Request) -> Response:
        node.chat.mark_read(neighbor(request))
        return json_response({"unread": 0})

    @router.route("GET", "/api/history/{fingerprint}")
    async def history(request: Request) -> Response:
        fingerprint = neighbor(request)
        return json_response(
            {
                "neighbor": fingerprint.hex(),
                "interval_secs": node.history.interval_secs,
                "window_secs": node.history.window_secs,
                "samples": node.history.series(fingerprint),
            }
        )

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
