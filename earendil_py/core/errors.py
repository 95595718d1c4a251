"""The project's exception hierarchy.

Errors name the party at fault, as h11 does: a `LocalProtocolError` is our own bug or misuse
of an API (let it crash the task that hit it), a `RemoteProtocolError` is bad input from a
peer (drop it, count it, maybe close the link; never let it escape the relay loop).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

T = TypeVar("T")


class EarendilError(Exception):
    """Root of every error this project raises on purpose."""


class LocalProtocolError(EarendilError):
    """We were asked to do something invalid: a bug on our side."""


class RemoteProtocolError(EarendilError):
    """A peer sent something invalid. `reason` is a short snake_case label for drop counters."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(EarendilError):
    """A configuration or identity file is unusable; the message is one line for the operator."""


def decode_remote(decoder: msgspec.msgpack.Decoder[T], data: bytes, what: str, reason: str) -> T:
    """`decoder.decode(data)`, or RemoteProtocolError(f"{what}: ...", reason) for bytes from a
    peer that are not a well-formed message. msgspec raises UnicodeDecodeError, not
    DecodeError, for invalid UTF-8 in a str field; ValidationError is a DecodeError."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"{what}: {exc}", reason) from None
