"""What a node does with one onion frame: forward it untouched, or peel it.

A frame names its `next_peeler`. If that is not us we are a plain relay: the packet goes on
toward the next peeler with no onion crypto at all. If it is us we peel one layer (one X25519),
check the per-hop replay tag, and either forward the inner packet or deliver its payload.

Datagrams delivered to a node are addressed to a *dock* (like a port number): the final
payload is `dock (u32 big-endian) | data`.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.packet import MAX_PAYLOAD, Delivered, Forward, peel_packet
from earendil_py.core.replay import ReplayFilter

DOCK = struct.Struct(">I")
MAX_DATAGRAM = MAX_PAYLOAD - DOCK.size
# Replay tags are remembered for at least this long, and at most this many at once.
REPLAY_WINDOW_SECS = 600.0
REPLAY_MAX_ENTRIES = 1_000_000
# One onion layer peeled: or why it could not be.
Layer = Forward | Delivered | RemoteProtocolError


@dataclass(frozen=True, slots=True)
class Datagram:
    """A datagram that arrived for this node."""

    dock: int
    data: bytes


def encode_datagram(dock: int, data: bytes) -> bytes:
    """The onion payload for `data` sent to `dock`. Raises LocalProtocolError if too big."""
    if not 0 <= dock < 2**32:
        raise LocalProtocolError("a dock is a u32")
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"a datagram carries at most {MAX_DATAGRAM} bytes")
    return DOCK.pack(dock) + data


class Peeler:
    """Peels onion layers addressed to us, with replay protection. Never raises for bad
    packets: they are dropped and counted in `drops` by reason."""

    def __init__(self, onion_secret: bytes, replay: ReplayFilter | None = None) -> None:
        self._onion_secret = onion_secret
        self._replay = replay or ReplayFilter(REPLAY_WINDOW_SECS, REPLAY_MAX_ENTRIES)
        self.drops: Counter[str] = Counter()

    def peel(self, packet: bytes, now: float) -> tuple[bytes, bytes] | Datagram | None:
        """(next_peeler, inner packet) to forward, a Datagram for us, or None (dropped)."""
        return self.accept(self.peel_layer(packet), now)

    def peel_layer(self, packet: bytes) -> Layer:
        """The onion crypto of `peel`, and nothing else: it reads only the key and writes
        nothing, so several threads may call it at once. Pass the result to `accept`."""
        try:
            return peel_packet(packet, self._onion_secret)
        except RemoteProtocolError as exc:
            return exc

    def accept(self, layer: Layer, now: float) -> tuple[bytes, bytes] | Datagram | None:
        """What `peel` returns for a `peel_layer` result: drops counted, the replay filter
        checked, a datagram's dock parsed."""
        if isinstance(layer, RemoteProtocolError):
            self.drops[layer.reason] += 1
            return None
        # The tag is only recorded once the MAC verified, so forged packets cannot fill it.
        if not self._replay.check_and_insert(layer.replay_tag, now):
            self.drops["replay"] += 1
            return None
        if isinstance(layer, Delivered):
            if len(layer.payload) < DOCK.size:
                self.drops["bad_datagram"] += 1
                return None
            (dock,) = DOCK.unpack_from(layer.payload)
            return Datagram(dock, layer.payload[DOCK.size :])
        return layer.next_peeler, layer.packet
