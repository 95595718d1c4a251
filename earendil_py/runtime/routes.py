"""Every configured route's state as the operator needs it: up or not, since when, and why.

A route is an in_route we listen on or an out_route we dial. Its state:

    out_routes:  connecting -> up -> down -> up ...      (down: it was up once)
                 connecting -> never_up -> up ...        (never_up: every dial failed so far)
    in_routes:   listening <-> up                        (up: at least one neighbour's link)
                 down                                    (could not listen, after a reload)

`since` is when the route entered its state (wall clock, for people), `last_handshake` when a
link on it last came up, and the last failure is kept as a code (snake_case, as in the logs)
and in the operator's words, naming what to check. A failure does not change an in_route's
state: anyone holding its secret may fail a handshake there, and the route still listens.

The table hands out the `RouteInfo` each route's links carry; a link reports into the table
only while its route is the one configured under that name, so the links of a route removed
by a reload, still closing, change nothing.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, eq=False)
class RouteInfo:
    """What a link knows of its route. Compared by identity: a route configured again under
    the same name gets a new one."""

    name: str
    protocol: str
    direction: str  # "in" or "out"


class RouteState(enum.StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    NEVER_UP = "never_up"
    LISTENING = "listening"


# A dial over UDP whose handshake got no answer at all. A listener drops a handshake with the
# wrong secret without a reply, by design (docs/links.md), so this is all the dialer can see.
NO_REPLY = "no_reply"
_HINT = "check the route secret and fingerprint"


def describe(code: str, *, protocol: str, address: str, detail: str = "") -> str:
    """A failure in the operator's words. `detail` is what the code's own text cannot know:
    the error of a failed connect, the fingerprint proven instead, the neighbour's reason."""
    match code:
        case "no_reply":
            return f"no reply: {_HINT}"
        case "connection_refused":
            return f"connection refused by {address}: is the neighbour's node running?"
        case "connect_failed":
            return f"cannot connect to {address}: {detail}"
        case "listen_failed":
            return f"cannot listen on {address}: {detail}"
        case "wrong_fingerprint":
            return f"wrong fingerprint: {address} proved to be {detail}, not the configured one"
        case "handshake_timeout":
            return "handshake timed out"
        case "handshake_closed":
            # A TCP listener closes a connection whose handshake has the wrong secret.
            return f"closed by {address} during the handshake: {_HINT}"
        case "keepalive_timeout":
            return "the neighbour stopped answering (keepalive timeout)"
        case "closed_by_peer":
            return f"closed by the neighbour: {detail}"
        case "connection_closed":
            return f"connection to {address} lost" if protocol == "tcp" else "link lost"
        case "bad_identity_proof":
            return "the peer's identity proof was invalid"
        case "too_many_neighbors":
            return "refused: this node already has its maximum of neighbours"
        case _:
            return code.replace("_", " ")


@dataclass(slots=True)
class Failure:
    code: str
    message: str
    at: float


@dataclass(slots=True)
class RouteStatus:
    info: RouteInfo
    address: str  # where it listens or what it dials, as configured
    neighbor: bytes | None  # an out_route's configured fingerprint
    state: RouteState
    since: float
    links: int = 0  # links up on it
    last_handshake: float | None = None
    failure: Failure | None = None

    def summary(self) -> dict[str, Any]:
        failure, handshake = self.failure, self.last_handshake
        return {
            "name": self.info.name,
            "direction": self.info.direction,
            "protocol": self.info.protocol,
            "address": self.address,
            "neighbor": self.neighbor.hex() if self.neighbor is not None else None,
            "state": str(self.state),
            "since": round(self.since, 3),
            "links": self.links,
            "last_handshake": None if handshake is None else round(handshake, 3),
            "failure": None if failure is None else failure.code,
            "failure_reason": None if failure is None else failure.message,
            "failed_at": None if failure is None else round(failure.at, 3),
        }


class RouteTable:
    """The status of every configured route. `clock` is wall-clock seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._routes: dict[tuple[str, str], RouteStatus] = {}

    def add(
        self, direction: str, name: str, protocol: str, address: str, neighbor: bytes | None = None
    ) -> RouteInfo:
        """Start tracking a route (replacing one of that name); returns its links' RouteInfo."""
        info = RouteInfo(name, protocol, direction)
        state = RouteState.CONNECTING if direction == "out" else RouteState.LISTENING
        self._routes[direction, name] = RouteStatus(info, address, neighbor, state, self._clock())
        return info

    def remove(self, info: RouteInfo) -> None:
        if self._status(info) is not None:
            del self._routes[info.direction, info.name]

    def __iter__(self) -> Iterator[RouteStatus]:
        return iter(self._routes.values())

    def summaries(self) -> list[dict[str, Any]]:
        """Every route's status: in_routes, then out_routes, each by name."""
        return [self._routes[key].summary() for key in sorted(self._routes)]

    def link_up(self, info: RouteInfo) -> None:
        status = self._status(info)
        if status is None:
            return
        now = self._clock()
        status.links += 1
        status.last_handshake = now
        if status.state is not RouteState.UP:
            status.state, status.since = RouteState.UP, now

    def link_down(self, info: RouteInfo, code: str, detail: str = "") -> None:
        """A link that was up on this route closed, for `code`."""
        status = self._status(info)
        if status is None:
            return
        status.links = max(status.links - 1, 0)
        self._fail(status, code, detail)
        if status.links == 0:
            down = RouteState.DOWN if info.direction == "out" else RouteState.LISTENING
            status.state, status.since = down, self._clock()

    def failed(self, info: RouteInfo, code: str, detail: str = "") -> None:
        """A dial or a handshake on this route failed, for `code`."""
        status = self._status(info)
        if status is None:
            return
        self._fail(status, code, detail)
        if status.state is RouteState.CONNECTING:
            status.state = RouteState.NEVER_UP  # since the start, when it began connecting

    def cannot_listen(self, info: RouteInfo, detail: str) -> None:
        status = self._status(info)
        if status is not None:
            self._fail(status, "listen_failed", detail)
            status.state, status.since = RouteState.DOWN, self._clock()

    def failure_of(self, info: RouteInfo) -> Failure | None:
        status = self._status(info)
        return None if status is None else status.failure

    def _fail(self, status: RouteStatus, code: str, detail: str) -> None:
        message = describe(
            code, protocol=status.info.protocol, address=status.address, detail=detail
        )
        status.failure = Failure(code, message, self._clock())

    def _status(self, info: RouteInfo) -> RouteStatus | None:
        status = self._routes.get((info.direction, info.name))
        return status if status is not None and status.info is info else None
