"""structlog set-up: the one place logging is configured.

Console rendering on a terminal, JSON lines otherwise (for log shippers). Event names are
snake_case facts (`link_up`); fingerprints are logged in their 8-hex short form.

Log values can hold text a peer chose (a CLOSE reason, an error message quoting its input).
The JSON renderer escapes every control and non-ASCII character (json.dumps with its default
`ensure_ascii`); the console renderer prints strings as they are, so for it every string, and
every line of a traceback, first goes through `core.text.printable`.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, ExcInfo, WrappedLogger

from earendil_py.core.text import printable
from earendil_py.runtime.config import LoggingConfig

Level = Literal["debug", "info", "warning", "error"]
Format = Literal["auto", "json", "console"]
LEVEL_ENV = "EARENDIL_LOG_LEVEL"
FORMAT_ENV = "EARENDIL_LOG_FORMAT"


@dataclass(frozen=True, slots=True)
class LogOverrides:
    """The daemon's --log-level/--log-format, else $EARENDIL_LOG_LEVEL/$EARENDIL_LOG_FORMAT:
    each, if set, wins over the config's [logging]."""

    level: Level | None = None
    format: Format | None = None

    @classmethod
    def from_environment(
        cls,
        level: str | None,
        format: str | None,
        environ: Mapping[str, str] = os.environ,
    ) -> LogOverrides:
        """The flags' values (None if not given), else the environment's. Raises ValueError
        naming the variable if it holds an unknown value."""
        return cls(
            _choice(level or environ.get(LEVEL_ENV) or None, LEVEL_ENV, Level),
            _choice(format or environ.get(FORMAT_ENV) or None, FORMAT_ENV, Format),
        )

    def configure(self, config: LoggingConfig) -> None:
        configure_logging(self.level or config.level, self.format or config.format)


def _choice(value: str | None, variable: str, kind: Any) -> Any:
    choices = get_args(kind)
    if value is not None and value not in choices:
        raise ValueError(f"{variable}: expected one of {', '.join(choices)}; got {value!r}")
    return value


def configure_logging(level: Level = "info", format: Format = "auto") -> None:
    use_console = format == "console" or (format == "auto" and sys.stderr.isatty())
    renderers: list[structlog.typing.Processor] = (
        [escape_strings, structlog.dev.ConsoleRenderer(exception_formatter=escaped_traceback)]
        if use_console
        else [structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            *([] if use_console else [structlog.processors.format_exc_info]),  # tracebacks
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


# How the lines of a traceback that are not an exception's own text begin (after any
# exception-group indentation); the separators between chained exceptions begin with "\n".
_TRACEBACK_STRUCTURE = ("Traceback (most recent call last):", "File ", "Exception Group", "+-")


def escape_strings(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A processor: every str key and value through `printable`. Other values are rendered
    with repr(), which already escapes what `printable` does."""
    return {_printable(key): _printable(value) for key, value in event_dict.items()}


def escaped_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """A plain traceback in which an exception's message (or note), which may quote a peer and
    hold newlines of its own, is one escaped line. Frames and the separators between chained
    exceptions come from our own files and keep their line breaks."""
    shown = []
    for chunk in traceback.format_exception(*exc_info):
        text = chunk.removesuffix("\n")
        if chunk.startswith("\n") or chunk.lstrip(" |").startswith(_TRACEBACK_STRUCTURE):
            text = "\n".join(map(printable, text.split("\n")))
        else:
            text = printable(text)
        shown.append(text + "\n" if chunk.endswith("\n") else text)
    sio.write("\n" + "".join(shown).removesuffix("\n"))


def _printable(value: Any) -> Any:
    return printable(value) if isinstance(value, str) else value
