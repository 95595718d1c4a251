"""The command line: peer text shown escaped, and every file problem one line and an exit code."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from earendil_py import __version__
from earendil_py.cli import _in_flag_words, build_parser, main
from earendil_py.core.identity import Identity
from earendil_py.core.neighbor import REFUSED
from earendil_py.core.settlement import SettlementState
from earendil_py.netgen import Edge, GeneratedNode, generate_network
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.rpc import RpcError
from earendil_py.runtime.store import LedgerStore, ledger_id_file
from tests.helpers import (
    cli_beside_nodes,
    converged,
    daemon_api,
    make_nodes,
    run_cli,
    running,
    seeded_rng,
    wait_until,
)
from tests.runtime.test_control import LINE3, config_path
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
        code, out, _ = await cli_beside_nodes(
            capsys, "chat", "--config", config_path(a), "--neighbor", b.fingerprint.hex()
        )
        assert code == 0
        assert shown_line(out, " <- ").endswith(" <- " + SHOWN)

        # The neighbour's reason for rejecting our settlement.
        await owe(a, b, 50)
        code, out, _ = await cli_beside_nodes(
            capsys, "settle", "--config", config_path(a), "--neighbor", b.fingerprint.hex(),
            "--amount", "50", "--method", "manual",
        )  # fmt: skip
        assert code == 0
        (line,) = [line for line in out.splitlines() if line.startswith("settlement ")]
        settlement_id = line.split()[1].rstrip(":")
        record = await record_in(b, a, settlement_id, SettlementState.PENDING)
        await b.accounts.decide(record.settlement_id, approve=False, reason=HOSTILE)
        await record_in(a, b, settlement_id, SettlementState.REJECTED)
        code, out, _ = await cli_beside_nodes(capsys, "settlements", "--config", config_path(a))
        assert code == 0
        assert shown_line(out, f"{settlement_id}  {b.fingerprint.hex()[:8]}").endswith(
            f"rejected ({SHOWN})"
        )

        # The neighbour's error message, quoted in our error line.
        async def refuses(neighbor: bytes, params: object) -> object:
            raise RpcError(REFUSED, HOSTILE)

        b.rpc._handlers["chat"] = refuses
        code, out, err = await cli_beside_nodes(
            capsys, "chat", "--config", config_path(a), "--neighbor", b.fingerprint.hex(),
            "--send", "hello?",
        )  # fmt: skip
        assert code == 3  # refused by the neighbour
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


# --- help, config file, fingerprints and exit statuses ------------------------------------


def test_every_command_and_flag_is_described(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"earendil-py {__version__}\n"

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(commands.choices) == {
        "keygen", "fingerprint", "check-config", "daemon", "status", "send", "receive",
        "reprice", "unfreeze", "settle", "settlements", "accept", "reject", "cancel", "chat",
        "dashboard", "connect", "serve-echo",
    }  # fmt: skip
    for name, command in commands.choices.items():
        assert helps[name] and command.description, name
        for action in command._actions:
            assert action.help, (name, action.dest)
        assert "exit status:" in command.format_help()
    for text in ("exit status:", "EARENDIL_CONFIG", "/etc/earendil_py/node.toml"):
        assert text in parser.format_help()


def test_the_config_comes_from_the_flag_the_environment_or_a_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (node,) = generate_network(tmp_path / "net", 1, [])
    home, empty = tmp_path / "home", tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("EARENDIL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.chdir(empty)
    assert main(["check-config"]) == 2
    assert capsys.readouterr().err == (
        "earendil-py: error: no config file: give --config FILE or set EARENDIL_CONFIG "
        f"(looked for node.toml, {home}/earendil_py/node.toml, /etc/earendil_py/node.toml)\n"
    )

    def checked(*argv: str) -> str:
        assert main(["check-config", "--json", *argv]) == 0
        config: str = json.loads(capsys.readouterr().out)["config"]
        return config

    assert checked("--config", str(node.config_path)) == str(node.config_path)
    monkeypatch.setenv("EARENDIL_CONFIG", str(node.config_path))
    assert checked() == str(node.config_path)
    monkeypatch.delenv("EARENDIL_CONFIG")
    (home / "earendil_py").mkdir(parents=True)
    (home / "earendil_py" / "node.toml").symlink_to(node.config_path)
    assert checked() == f"{home}/earendil_py/node.toml"
    monkeypatch.chdir(node.directory)  # ./node.toml comes first
    assert checked() == "node.toml"


@pytest.fixture
def quiet() -> Iterator[None]:
    """In-process nodes' log lines, which would otherwise be printed among the CLI's output,
    are captured instead."""
    with capture_logs():
        yield


def colliding_identities(prefix_digits: int) -> tuple[Identity, Identity]:
    """Two identities whose fingerprints share their first `prefix_digits` hex digits."""
    seen: dict[str, Identity] = {}
    rng = seeded_rng(14)
    while True:
        identity = Identity.generate(rng)
        prefix = identity.fingerprint.hex()[:prefix_digits]
        if prefix in seen:
            return seen[prefix], identity
        seen[prefix] = identity


@pytest.mark.anyio
async def test_a_fingerprint_prefix_names_a_neighbour_or_a_node_of_the_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    nodes = make_nodes(tmp_path, 3, LINE3)  # node0 - node1 - node2
    config = config_path(nodes[0])
    one, two = (node.fingerprint.hex() for node in nodes[1:])
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, LINE3)
        # A node of the graph is a destination, but not a neighbour.
        code, out, err = await cli_beside_nodes(
            capsys, "send", "--config", config, "--to", two[:6], "--dock", "9", "hi"
        )
        assert (code, out, err) == (0, f"sent 2 bytes to {two[:8]} dock 9\n", "")
        with anyio.fail_after(5):
            assert (await nodes[2].receive_datagram(9)).data == b"hi"
        code, _, err = await cli_beside_nodes(
            capsys, "chat", "--config", config, "--neighbor", two[:6]
        )
        assert code == 2
        assert err == (
            f"earendil-py: error: --neighbor: no neighbour has a fingerprint starting with "
            f"{two[:6]}\n"
        )
        code, _, _ = await cli_beside_nodes(
            capsys, "chat", "--config", config, "--neighbor", one[:4].upper()
        )
        assert code == 0

        code, _, err = await cli_beside_nodes(
            capsys, "chat", "--config", config, "--neighbor", "abc"
        )
        assert code == 2
        assert "--neighbor: expected a fingerprint (64 hex digits) or a unique prefix" in err

        # Two nodes of the graph whose fingerprints begin alike.
        first, second = colliding_identities(4)
        for identity in (first, second):
            assert nodes[0].graph.insert_identity(
                identity.descriptor(int(time.time())), int(time.time()), source=None
            )
        prefix = first.fingerprint.hex()[:4]
        code, _, err = await cli_beside_nodes(
            capsys, "send", "--config", config, "--to", prefix, "--dock", "9", "x"
        )
        assert code == 2
        assert err.startswith(f"earendil-py: error: --to: {prefix} is ambiguous (")
        assert err.endswith("): give more digits\n")


@pytest.mark.anyio
async def test_exit_statuses_and_errors_name_what_happened_in_the_clis_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    nodes = make_nodes(tmp_path, 2, [Edge(0, 1, "udp")])
    config, me = config_path(nodes[0]), nodes[0].fingerprint.hex()
    neighbour = nodes[1].fingerprint.hex()
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, [Edge(0, 1, "udp")])
        # Refused by the neighbour: above the most it pays (outbound_max_price_umel = 10).
        code, out, err = await cli_beside_nodes(
            capsys, "reprice", "--config", config, "--neighbor", neighbour[:8],
            "--price", "11", "--debt-limit", "100000",
        )  # fmt: skip
        assert (code, out) == (3, "")
        assert err == (
            f"earendil-py: error: not accepted by {neighbour[:8]}: the price is above the most it "
            "accepts to pay (price_too_high); the previous price stays in force\n"
        )
        code, out, _ = await cli_beside_nodes(
            capsys, "reprice", "--config", config, "--neighbor", neighbour[:8],
            "--price", "2", "--debt-limit", "100000",
        )  # fmt: skip
        assert (code, out) == (
            0,
            f"accepted by {neighbour[:8]}: 2 uMEL a packet, debt limit 100000 uMEL\n",
        )
        # A usage error names the flags.
        code, _, err = await cli_beside_nodes(
            capsys, "settle", "--config", config, "--neighbor", neighbour, "--method", "manual"
        )
        assert code == 2
        assert err == (
            "earendil-py: error: settle: nothing to settle: give --amount (we pay) or "
            "--request (they pay)\n"
        )
        with pytest.raises(SystemExit) as exited:
            main(["send", "--config", config, "--to", me, "--dock", "-1", "x"])
        assert exited.value.code == 2
        assert "argument --dock: expected 0 to 4294967295, got -1" in capsys.readouterr().err
        # What the API says of a bad field is said of the flag it came from.
        with pytest.raises(ControlApiError) as refused:
            body = {"destination": me, "dock": -1, "data_b64": ""}
            await anyio.to_thread.run_sync(call_api, nodes[0].config, "POST", "/api/send", body)
        assert refused.value.message == "invalid JSON body: Expected `int` >= 0 - at `$.dock`"
        assert _in_flag_words(refused.value.message, {"dock": "--dock"}) == (
            "--dock: expected int >= 0"
        )

        # receive says when more are waiting than it printed.
        for text in ("one", "two", "three"):
            code, _, _ = await cli_beside_nodes(
                capsys, "send", "--config", config, "--to", me, "--dock", "5", text
            )
            assert code == 0
        code, out, err = await cli_beside_nodes(
            capsys, "receive", "--config", config, "--dock", "5", "--max", "2"
        )
        assert (code, out) == (0, "one\ntwo\n")
        assert err == "earendil-py: 1 more datagram waiting on dock 5: run again, or use --follow\n"
        code, out, err = await cli_beside_nodes(
            capsys, "receive", "--config", config, "--dock", "5", "--json"
        )
        answer = json.loads(out)
        assert (code, err, answer["waiting"]) == (0, "", 0)
        assert [base64.b64decode(d["data_b64"]) for d in answer["datagrams"]] == [b"three"]

        # --json has the full fingerprints and every route.
        code, out, _ = await cli_beside_nodes(capsys, "status", "--config", config, "--json")
        status = json.loads(out)
        assert code == 0 and status["fingerprint"] == me
        (route,) = status["routes"]
        assert (route["name"], route["state"], route["neighbor"]) == ("node1_udp", "up", neighbour)
        assert [link["neighbor"] for link in status["links"]] == [neighbour]
    # Once the node is gone: a node failure.
    code, _, err = await cli_beside_nodes(capsys, "status", "--config", config)
    assert code == 1 and "cannot reach the node's control API" in err
