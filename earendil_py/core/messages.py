"""Control messages exchanged between neighbours inside CONTROL link frames.

Frozen, array-like, integer-tagged msgspec structs; tags are never reused and new fields are
only ever appended with defaults. Every field is bounded at its type (no message is larger
than a link message anyway), and decoding raises only RemoteProtocolError.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from earendil_py.core.errors import decode_remote
from earendil_py.core.graph import AdjacencyDescriptor
from earendil_py.core.identity import IdentityDescriptor, Signature, Timestamp
from earendil_py.core.link import MAX_MESSAGE_SIZE

Payload = Annotated[bytes, msgspec.Meta(max_length=MAX_MESSAGE_SIZE)]


class GraphPush(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """Descriptors for the neighbour's relay graph: one `graph.encode_dumps` message."""

    dump: Payload


class GraphPull(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """Asks the neighbour for its whole graph (answered with GraphPush messages)."""


class AdjacencyRequest(msgspec.Struct, frozen=True, array_like=True, tag=3):
    """Half of an adjacency descriptor: the sender's signature over (left, right, timestamp),
    with the sender's identity descriptor so the receiver can verify it and route to it."""

    identity: IdentityDescriptor
    timestamp: Timestamp
    signature: Signature


class AdjacencyGrant(msgspec.Struct, frozen=True, array_like=True, tag=4):
    """The countersigned adjacency descriptor, answering an AdjacencyRequest."""

    descriptor: AdjacencyDescriptor


class DockMessage(msgspec.Struct, frozen=True, array_like=True, tag=5):
    """A message for a service on the neighbour, addressed by dock number (GlobalRPC is
    dock GLOBAL_RPC_DOCK)."""

    dock: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    data: Payload


GLOBAL_RPC_DOCK = 100001

ControlMessage = GraphPush | GraphPull | AdjacencyRequest | AdjacencyGrant | DockMessage

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)


def encode_control(message: ControlMessage) -> bytes:
    return _encoder.encode(message)


def decode_control(data: bytes) -> ControlMessage:
    """Raises RemoteProtocolError("bad_control") for anything but a valid message."""
    return decode_remote(_decoder, data, "bad control message", "bad_control")
