"""One signing rule for every signed wire struct.

A signature covers the struct's own msgpack encoding with its signature field emptied, under a
domain of the struct's own (`identity.sign` length-prefixes the domain). The signed bytes are
derived from the struct, never listed by hand: a field added to a struct is signed the day it
is added, and cannot be forgotten in a hand-written tuple. msgspec encodes every field of an
`array_like` struct, defaults included, in declaration order, so the encoding is canonical.

Two parties may sign the same struct (a settlement proposal and its approval): both sign the
bytes with the proposer's signature field emptied, so the second signature covers exactly what
the first did.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from earendil_py.core.identity import Identity, verify

S = TypeVar("S", bound=msgspec.Struct)

SIGNATURE = "signature"

_encoder = msgspec.msgpack.Encoder()


def signed_part(message: msgspec.Struct, field: str = SIGNATURE) -> bytes:
    """The bytes `message`'s `field` signs: its encoding with that field emptied."""
    return _encoder.encode(msgspec.structs.replace(message, **{field: b""}))


def sign(identity: Identity, domain: bytes, unsigned: S, field: str = SIGNATURE) -> S:
    """`unsigned` with `field` set to `identity`'s signature over `signed_part`."""
    signature = identity.sign(domain, signed_part(unsigned, field))
    return msgspec.structs.replace(unsigned, **{field: signature})


def verify_signed(
    public: bytes, domain: bytes, message: msgspec.Struct, field: str = SIGNATURE
) -> None:
    """Raises RemoteProtocolError("bad_signature") unless `public` signed `message`."""
    signature = getattr(message, field)
    verify(public, domain, signed_part(message, field), signature)
