"""What the control API and the metrics see of the node: narrow, read-mostly views, so that
neither imports `runtime/node.py` (which imports them) and runtime/ has no import cycle.

`Node` and `LinkRunner` satisfy these protocols structurally; tests may pass anything that
does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Protocol

from earendil_py.core.graph import RelayGraph
from earendil_py.core.link import LinkStatistics
from earendil_py.core.relay import Datagram
from earendil_py.runtime.apps import Apps
from earendil_py.runtime.chat import Chat
from earendil_py.runtime.config import Config
from earendil_py.runtime.history import History
from earendil_py.runtime.neighbors import Neighbors
from earendil_py.runtime.routes import RouteInfo, RouteTable
from earendil_py.runtime.rpc import GlobalRpc
from earendil_py.runtime.store import AsyncLedger


class LinkView(Protocol):
    """One link to a neighbour."""

    @property
    def peer_fingerprint(self) -> bytes | None: ...

    @property
    def route(self) -> RouteInfo: ...

    @property
    def peer_address(self) -> tuple[str, int]: ...

    @property
    def packets_sent(self) -> int: ...

    @property
    def packets_received(self) -> int: ...

    def statistics(self) -> LinkStatistics: ...


class RelayView(Protocol):
    """The relay loop's counters."""

    @property
    def originated(self) -> int: ...

    @property
    def forwarded(self) -> int: ...

    @property
    def peeled(self) -> int: ...

    @property
    def delivered(self) -> int: ...


class NodeView(Protocol):
    """The node, as the control API and the metrics use it."""

    @property
    def fingerprint(self) -> bytes: ...

    @property
    def config(self) -> Config: ...

    @property
    def started_at(self) -> float: ...

    @property
    def relay(self) -> RelayView: ...

    @property
    def graph(self) -> RelayGraph: ...

    @property
    def links(self) -> Mapping[bytes, Sequence[LinkView]]: ...

    @property
    def routes(self) -> RouteTable: ...

    @property
    def accounts(self) -> Neighbors: ...

    @property
    def chat(self) -> Chat: ...

    @property
    def apps(self) -> Apps: ...

    @property
    def history(self) -> History: ...

    @property
    def rpc(self) -> GlobalRpc: ...

    @property
    def ledger(self) -> AsyncLedger | None: ...

    def drop_counts(self) -> Counter[str]: ...

    def send_datagram(
        self, destination: bytes, dock: int, data: bytes, hops: int | None = None
    ) -> None: ...

    def receive_datagrams_nowait(self, dock: int, limit: int = 1000) -> list[Datagram]: ...

    def datagrams_waiting(self, dock: int) -> int: ...
