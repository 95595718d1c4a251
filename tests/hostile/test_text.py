"""Text a hostile neighbour writes for the operator to read: chat messages, a settlement's
rejection reason, a link's CLOSE reason. Terminal control codes (clear screen, set the
window title), NUL, BEL and a right-to-left override in it must reach the operator's
terminal escaped, from the CLI and from the console log. And a chat message sent again
under the same id, spelt another way, is kept once.

The target logs in console format here, as it does on an operator's terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from earendil_py.core.neighbor import SettlementAnswer, unwire, wire
from earendil_py.core.rpc import INVALID_PARAMS
from earendil_py.core.settlement import Proposal, SettlementState, make_rejection
from earendil_py.runtime.gossip import unix_now
from tests.helpers import wait_until
from tests.hostile.harness import Pair, api
from tests.hostile.peer import HostilePeer, error_code

pytestmark = pytest.mark.timeout(60)

CONSOLE_LOGS = """
[logging]
format = "console"
"""
PAIR = {"logs": CONSOLE_LOGS}
MARKER = "hostile-marker"
# Clear the screen, set the window title (OSC ... BEL), NUL, reverse the text's direction.
NASTY = ["\x1b[2J", "\x1b]0;pwned\x07", "\x00", "\u202e", "\x07", "\x9b"]
NASTY_TEXT = f"{NASTY[0]}{NASTY[1]}{NASTY[2]}{NASTY[3]}{MARKER}{NASTY[5]}"
# At least settlement.min_settlement_umel (1,000 by default), or the target refuses it itself.
MANUAL_REQUEST = ["--method", "manual", "--request", "1000"]
assert len(NASTY_TEXT) <= 64  # a CLOSE reason and a rejection reason are at most 64 chars


def cli(pair: Pair, *args: str, code: int = 0) -> str:
    """An `earendil-py` command against the target, which must exit with `code`; all it
    printed, stdout and stderr, undecodable bytes kept."""
    result = subprocess.run(
        [sys.executable, "-m", "earendil_py", *args, "--config", str(pair.target.config_path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    printed = (result.stdout + result.stderr).decode("utf-8", "surrogateescape")
    assert result.returncode == code, repr(printed)
    return printed


def assert_shown_escaped(text: str) -> None:
    """`text` shows the marker, and none of the raw control or bidi characters. (Failures
    show the text as repr: raw, it would clear the terminal of whoever runs the tests.)"""
    assert MARKER in text, repr(text)
    leaked = [raw for raw in NASTY if raw in text]
    assert not leaked, f"reached the terminal raw: {text!r}"


def assert_logged_escaped(pair: Pair, after: int) -> None:
    """The console log has a line with the marker, and none with a raw nasty sequence (the
    renderer's own colour codes are fine: they are not the peer's)."""
    wait_until(lambda: any(MARKER in line for line in pair.target_daemon.lines(after)), 10)
    for line in pair.target_daemon.lines(after):
        leaked = [raw for raw in NASTY if raw in line]
        assert not leaked, f"reached the log raw: {line!r}"


def chat(peer: HostilePeer, message_id: str, text: str) -> Any:
    return peer.call("chat", {"id": message_id, "text": text})


def test_chat_text_is_shown_escaped(pair: Pair) -> None:
    with pair.attacking(), pair.peer("udp") as peer:
        peer.connect()
        answer = chat(peer, os.urandom(16).hex(), NASTY_TEXT)
        assert answer.result == {"ok": True}, answer
        shown = cli(pair, "chat", "--neighbor", peer.fingerprint.hex())
    assert_shown_escaped(shown)
    pair.check_unharmed()


def test_chat_message_sent_again_under_another_spelling_is_kept_once(pair: Pair) -> None:
    message_id = os.urandom(16).hex()
    spellings = [
        message_id,
        message_id.upper(),
        " ".join(message_id[i : i + 2] for i in range(0, 32, 2)),
        f" {message_id} ",
    ]
    with pair.attacking(), pair.peer("udp") as peer:
        peer.connect()
        for spelling in spellings:
            answer = chat(peer, spelling, f"once {MARKER}")
            # Kept (once) or refused as a malformed id; never kept again.
            assert answer.result == {"ok": True} or error_code(answer) == INVALID_PARAMS
        history = api(pair.target, "GET", f"/api/chat/{peer.fingerprint.hex()}")["messages"]
        assert [m["text"] for m in history] == [f"once {MARKER}"]
        assert pair.ledger_kinds(pair.target, peer.fingerprint).count("chat") == 1
    pair.check_unharmed()


def test_close_reason_is_logged_escaped(pair: Pair) -> None:
    with pair.attacking() as mark:
        peer = pair.peer("tcp").connect()
        peer.close(NASTY_TEXT)
        assert_logged_escaped(pair, mark)
    pair.check_unharmed()


def test_rejection_reason_is_shown_and_logged_escaped(pair: Pair) -> None:
    def reject(params: Any) -> Any:
        proposal = unwire(params, Proposal)
        rejection = make_rejection(peer.identity, proposal, NASTY_TEXT, unix_now())
        return wire(SettlementAnswer(SettlementState.REJECTED, rejection=rejection))

    with pair.attacking() as mark:
        peer = pair.peer("udp", handlers={"start_settlement": reject}).connect()
        with peer:
            peer.push_price()  # so that the target may propose a manual settlement to it
            neighbor = peer.fingerprint.hex()
            # Exit status 3: the neighbour refused.
            answer = cli(pair, "settle", "--neighbor", neighbor, *MANUAL_REQUEST, code=3)
            assert "rejected" in answer
            assert_shown_escaped(answer)
            assert_shown_escaped(cli(pair, "settlements"))
            assert_logged_escaped(pair, mark)
    pair.check_unharmed()
