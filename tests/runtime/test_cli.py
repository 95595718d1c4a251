"""The command line: peer text shown escaped, and every file problem one line and an exit code."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from earendil_py.cli import main
from earendil_py.core.neighbor import REFUSED
from earendil_py.core.settlement import SettlementState
from earendil_py.netgen import GeneratedNode, generate_network
from earendil_py.runtime.rpc import RpcError
from earendil_py.runtime.store import LedgerStore, ledger_id_file
from tests.helpers import daemon_api, run_cli, wait_until
from tests.runtime.test_control import cli, config_path
from tests.runtime.test_settlement import network, owe, record_in

# What a hostile neighbour puts in its text: clear the screen, retitle the window, reverse the
# rest of the line, end the C string, and forge a line of its own.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\u202eevil\x00\nforged"
SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil\\x00\\x0aforged"
RAW = ("\x1b", "\x07", "\u202e", "\x00", "\nforged")


def shown_line(output: str, marker: str) -> str:
    """The one line of `output` holding `marker` (the nodes' own logs may be in `output`)."""
    (line,) = [line for line in output.split("\n") if marker in line]
    assert SHOWN in line
    assert not [raw for raw in RAW if raw in line]
    return line


@pytest.mark.anyio
async def test_peer_text_is_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with network(tmp_path) as (a, b):
        # The neighbour's chat message.
        await b.chat.send(a.fingerprint, HOSTILE)
        code, out, _ = await cli(
            capsys, "chat", "--config", config_path(a), "--neighbor", b.fingerprint.hex()
        )
        assert code == 0
        assert shown_line(out, " <- ").endswith(" <- " + SHOWN)

        # The neighbour's reason for rejecting our settlement.
        await owe(a, b, 50)
        code, out, _ = await cli(
            capsys, "settle", "--config", config_path(a), "--neighbor", b.fingerprint.hex(),
            "--amount", "50", "--method", "manual",
        )  # fmt: skip
        assert code == 0
        (line,) = [line for line in out.splitlines() if line.startswith("settlement ")]
        settlement_id = line.split()[1].rstrip(":")
        record = await record_in(b, a, settlement_id, SettlementState.PENDING)
        await b.accounts.decide(record.settlement_id, approve=False, reason=HOSTILE)
        await record_in(a, b, settlement_id, SettlementState.REJECTED)
        code, out, _ = await cli(capsys, "settlements", "--config", config_path(a))
        assert code == 0
        assert shown_line(out, f"{settlement_id}  {b.fingerprint.hex()[:8]}").endswith(
            f"rejected ({SHOWN})"
        )

        # The neighbour's error message, quoted in our error line.
        async def refuses(neighbor: bytes, params: object) -> object:
            raise RpcError(REFUSED, HOSTILE)

        b.rpc._handlers["chat"] = refuses
        code, out, err = await cli(
            capsys, "chat", "--config", config_path(a), "--neighbor", b.fingerprint.hex(),
            "--send", "hello?",
        )  # fmt: skip
        assert code == 1
        assert shown_line(err, "earendil-py: error: ").endswith(SHOWN)


# --- the daemon's checks before it starts, and check-config's ----------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[GeneratedNode]:
    """One generated node. The daemon command, run in this process, sets the umask and the
    logging set-up: both are put back afterwards."""
    umask = os.umask(0o022)
    os.umask(umask)
    logging = structlog.get_config()
    yield generate_network(tmp_path, 1, [])[0]
    os.umask(umask)
    structlog.configure(**logging)


def set_field(node: GeneratedNode, field: str, value: str) -> None:
    lines = node.config_path.read_text().splitlines()
    text = "\n".join(
        f"{field} = {value}" if line.startswith(f"{field} =") else line for line in lines
    )
    node.config_path.write_text(text)


def config_mode(node: GeneratedNode) -> str:
    node.config_path.chmod(0o644)
    return f"{node.config_path}: config is accessible by group or others (mode 0644); " + (
        f"run: chmod 600 {node.config_path}"
    )


def identity_mode(node: GeneratedNode) -> str:
    key = node.directory / "node.key"
    key.chmod(0o640)
    return (
        f"{key}: identity file is accessible by group or others (mode 0640); run: chmod 600 {key}"
    )


def identity_directory(node: GeneratedNode) -> str:
    set_field(node, "identity_file", '"."')
    return f"{node.directory}: cannot use as identity file: a directory"


def identity_corrupt(node: GeneratedNode) -> str:
    key = node.directory / "node.key"
    key.write_bytes(b"\xff" * 65)
    return f"{key}: not a valid identity file: "


def ledger_directory_missing(node: GeneratedNode) -> str:
    set_field(node, "db_path", '"data/node.db"')
    data = node.directory / "data"
    return f"{data}/node.db: cannot use as ledger: directory {data} does not exist"


def ledger_is_a_directory(node: GeneratedNode) -> str:
    (node.directory / "node.db").mkdir()
    return f"{node.directory}/node.db: cannot use as ledger: not a regular file"


def route_to_ourselves(node: GeneratedNode) -> str:
    with node.config_path.open("a") as config:
        config.write(
            f'\n[out_routes.me]\nprotocol = "udp"\nconnect = "127.0.0.1:9"\n'
            f'fingerprint = "{node.fingerprint}"\nsecret = "0123456789abcdef"\n'
        )
    return (
        f"{node.config_path}: out_routes.me.fingerprint: is this node's own fingerprint "
        f"(identity_file {node.directory / 'node.key'})"
    )


@pytest.mark.parametrize(
    "spoil",
    [
        config_mode,
        identity_mode,
        identity_directory,
        identity_corrupt,
        ledger_directory_missing,
        ledger_is_a_directory,
        route_to_ourselves,
    ],
)
@pytest.mark.parametrize("command", ["check-config", "daemon"])
def test_a_file_problem_is_one_line_and_exit_2_before_anything_starts(
    node: GeneratedNode,
    capsys: pytest.CaptureFixture[str],
    spoil: Callable[[GeneratedNode], str],
    command: str,
) -> None:
    message = spoil(node)
    before = sorted(p.name for p in node.directory.iterdir())
    assert main([command, "--config", str(node.config_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"earendil-py: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in node.directory.iterdir()) == before  # nothing created


# --- the ledger across restarts, with real daemon processes -------------------------------


def start_and_stop(node: GeneratedNode, *extra: str) -> None:
    """Run the daemon until its control API answers, then stop it with SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "earendil_py", "daemon", "--config", str(node.config_path), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: bool(daemon_api(node.config_path, "GET", "/api/status")), 20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def refused(node: GeneratedNode, *extra: str) -> str:
    result = run_cli("daemon", "--config", str(node.config_path), *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def recorded_id(node: GeneratedNode) -> str:
    record = ledger_id_file(node.directory / "node.key")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    ledger_id: str = json.loads(record.read_text())["ledger_id"]
    return ledger_id


def test_a_lost_ledger_stops_the_daemon_until_the_operator_starts_a_new_one(
    tmp_path: Path,
) -> None:
    (node,) = generate_network(tmp_path, 1, [])
    db = node.directory / "node.db"
    start_and_stop(node)
    first = recorded_id(node)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in node.directory.iterdir()}
    assert set(modes.values()) == {0o600}, modes  # ledger, ledger id, identity, config

    db.write_bytes(b"")  # truncated to nothing
    assert f"{db}: ledger is empty: its balances are in ledger {first[:8]} " in refused(node)
    assert db.read_bytes() == b""  # left as it was, for the operator to look at
    db.unlink()
    assert "--new-ledger" in refused(node) and not db.exists()

    start_and_stop(node, "--new-ledger")
    second = recorded_id(node)
    assert second != first
    start_and_stop(node)  # from now on without the flag
    assert "--new-ledger: this already is this identity's ledger" in refused(node, "--new-ledger")
    assert recorded_id(node) == second


def test_an_unreadable_ledger_is_one_line_naming_it(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [])
    db = node.directory / "node.db"
    start_and_stop(node)
    with LedgerStore.open(db) as store:
        store.append(bytes(32), "price", b"terms", 1)
    with sqlite3.connect(db) as conn:  # a bit flipped in a TEXT column
        conn.execute("UPDATE entries SET kind = CAST(X'ff6b' AS TEXT) WHERE seq = 1")
    conn.close()
    result = run_cli("daemon", "--config", str(node.config_path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"earendil-py: error: {db}: unreadable ledger: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
