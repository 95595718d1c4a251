"""Log lines never carry a peer's control or bidi characters to the operator's terminal."""

import json
from collections.abc import Iterator

import pytest
import structlog

from earendil_py.runtime.logs import configure_logging

HOSTILE = "bye\x1b[2J\x1b]0;owned\x07\x00\u202eevil\nfake_event level=info"


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_console_lines_show_peer_text_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    log = structlog.get_logger("test")
    log.info("link_down", reason=HOSTILE, **{"key\x1b": "v"})
    log.info("event\x1b[2J")
    try:
        raise ValueError(f"bad frame: {HOSTILE}")
    except ValueError:
        log.exception("internal_error")
    err = capsys.readouterr().err
    # The renderer's own colours are the only escape sequences: each starts "\x1b[" and a
    # digit, and none of the peer's survives.
    for raw in ("\x1b[2J", "\x1b]", "\x07", "\x00", "\u202e", "\nfake_event"):
        assert raw not in err
    assert "bye\\x1b[2J\\x1b]0;owned\\x07\\x00\\u202eevil\\x0afake_event level=info" in err
    assert "key\\x1b" in err
    assert "event\\x1b[2J" in err
    assert "ValueError: bad frame: bye\\x1b[2J" in err  # the traceback's lines too
    assert "Traceback (most recent call last):\n" in err  # ...which keep their own newlines


def test_json_lines_escape_every_control_and_non_ascii_character(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    structlog.get_logger("test").info("link_down", reason=HOSTILE)
    err = capsys.readouterr().err
    assert err.isascii()
    line, end = err.split("\n")
    assert end == "" and line.isprintable()
    assert json.loads(line)["reason"] == HOSTILE
