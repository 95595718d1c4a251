"""The project's exception hierarchy.

Errors name the party at fault, as h11 does: a `LocalProtocolError` is our own bug or misuse
of an API (let it crash the task that hit it), a `RemoteProtocolError` is bad input from a
peer (drop it, count it, maybe close the link; never let it escape the relay loop).
"""


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
