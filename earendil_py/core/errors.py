"""The project's exception hierarchy.

Errors name the party at fault, as h11 does: a `LocalProtocolError` is our own bug or misuse
of an API (let it crash the task that hit it), a `RemoteProtocolError` is bad input from a
peer (drop it, count it, maybe close the link; never let it escape the relay loop).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import msgspec

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


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


# Everything msgspec raises for input it will not turn into a value: DecodeError for
# malformed bytes (and its subclass ValidationError for a well-formed value of the wrong
# shape or outside a `Meta` bound), UnicodeDecodeError for invalid UTF-8 in a msgpack str,
# and RecursionError for nesting deeper than the interpreter's recursion limit allows. msgspec
# checks the limit itself (Py_EnterRecursiveCall) and unwinds cleanly, so the error is safe to
# catch; bounding the depth beforehand would need a second parser of both formats, and every
# message we accept nests a few levels at most.
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _Decoder(Protocol[T_co]):
    def decode(self, buf: bytes, /) -> T_co: ...


def decode_remote(
    decoder: _Decoder[T], data: bytes, what: str, reason: str, *, invalid: str | None = None
) -> T:
    """`decoder.decode(data)` (a msgspec msgpack or JSON decoder), for bytes from a peer.

    Raises only RemoteProtocolError(f"{what}: ...", reason), whatever the bytes; `invalid`,
    if given, is the reason instead when they are well formed but not a valid message.
    """
    try:
        return decoder.decode(data)
    except _UNDECODABLE as exc:
        raise _remote_error(exc, what, reason, invalid) from None


def convert_remote(value: object, kind: type[T], what: str, reason: str) -> T:
    """`msgspec.convert(value, kind)` for a value from a peer (JSON-RPC params already
    decoded to builtins): the same rule as `decode_remote`."""
    try:
        return msgspec.convert(value, kind)
    except _UNDECODABLE as exc:
        raise _remote_error(exc, what, reason, None) from None


def _remote_error(
    exc: Exception, what: str, reason: str, invalid: str | None
) -> RemoteProtocolError:
    if isinstance(exc, RecursionError):
        return RemoteProtocolError(f"{what}: nested too deeply", reason)
    if invalid is not None and isinstance(exc, msgspec.ValidationError):
        return RemoteProtocolError(f"{what}: {exc}", invalid)
    return RemoteProtocolError(f"{what}: {exc}", reason)
