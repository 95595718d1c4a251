"""The node's files against a careless operator and a local user: permissions of what it
creates and what it reads, a ledger that lost its contents or had bits flipped, paths that
are not what they should be, and config values the wire or the clock cannot honour.

Each bad case must end in one line naming the file (or the field), no traceback, and a
non-zero exit; a config mistake exits 2, and `check-config` finds what the daemon would.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from earendil_py import cli
from earendil_py.netgen import GeneratedNode, generate_network
from earendil_py.runtime.http import ControlApiError, request_api, token_path
from tests.hostile.harness import JSON_LOGS, Daemon, Pair, route_toml

pytestmark = pytest.mark.timeout(60)

EXIT_SECS = 15.0  # a daemon that should refuse to start must have exited by then


@pytest.fixture(scope="module")
def used(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A target and its neighbour that linked, priced the link and wrote their ledgers."""
    pair = Pair(tmp_path_factory.mktemp("files")).start()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def solo(tmp_path: Path) -> GeneratedNode:
    """A node with no neighbours that has never run."""
    (node,) = generate_network(tmp_path, 1, [], extra_toml=JSON_LOGS)
    return node


def start_daemon(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "earendil_py", "daemon", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(config: Path, *args: str) -> tuple[int, str]:
    """Run the daemon, which must refuse to start: (exit code, stderr)."""
    return refusal(start_daemon(config, *args))


def refusal(process: subprocess.Popen[str]) -> tuple[int, str]:
    """How a daemon that must refuse to start ended: (exit code, stderr)."""
    try:
        _, stderr = process.communicate(timeout=EXIT_SECS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the daemon started") from None
    return process.returncode, stderr


def check_config(config: Path) -> tuple[int, str]:
    """`earendil-py check-config`, in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["check-config", "--config", str(config)])
    return code, err.getvalue()


def assert_one_line(stderr: str, *words: str) -> None:
    """One line for the operator, naming what it must name, and no traceback."""
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, (word, stderr)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what the node creates and reads -------------------------------------------------------


def test_ledger_and_its_side_files_are_private(used: Pair) -> None:
    used.ensure_running()
    db = used.target.config.db_path
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    modes = {path.name: oct(mode(path)) for path in files if path.exists()}
    assert db.name in modes, list(db.parent.iterdir())
    assert set(modes.values()) == {oct(0o600)}, modes
    used.check_unharmed()


def test_control_api_needs_the_token_only_the_nodes_user_can_read(used: Pair) -> None:
    """A local user without the token file gets 401 from every path, and the file is the
    node's user's alone."""
    used.ensure_running()
    config = used.target.config
    assert mode(token_path(config)) == 0o600
    host, port = config.control_listen
    for method, path, body in [
        ("GET", "/api/status", None),
        ("POST", "/api/send", {"destination": used.honest.fingerprint, "dock": 1, "data_b64": ""}),
        ("POST", "/api/settlements", {"neighbor": used.honest.fingerprint, "method": "manual"}),
        ("GET", "/no/such/path", None),
    ]:
        for token in ("", "0" * 64):
            with pytest.raises(ControlApiError) as refused_call:
                request_api(host, port, method, path, body, token=token)
            assert refused_call.value.status == 401, (method, path)
    used.check_unharmed()


@pytest.mark.parametrize("which", ["config", "identity"])
def test_file_readable_by_others_is_refused(solo: GeneratedNode, which: str) -> None:
    path = solo.config_path if which == "config" else solo.config.identity_file
    path.chmod(0o644)
    code, stderr = refused(solo.config_path)
    assert code == 2
    assert_one_line(stderr, str(path))
    assert check_config(solo.config_path)[0] == 2


def test_identity_file_that_is_a_directory(solo: GeneratedNode) -> None:
    identity = solo.config.identity_file
    identity.unlink()
    identity.mkdir(mode=0o700)
    code, stderr = refused(solo.config_path)
    assert code == 2
    assert_one_line(stderr, str(identity))
    code, stderr = check_config(solo.config_path)
    assert code == 2
    assert_one_line(stderr, str(identity))


# --- a ledger that lost its contents or had bits flipped ------------------------------------


@pytest.fixture(scope="module")
def written(used: Pair) -> tuple[Path, Path, bytes]:
    """The pair stopped once it wrote its ledgers: (config, ledger, the ledger's bytes)."""
    used.ensure_running()
    used.check_unharmed()
    assert used.stop() == [0, 0]
    db = used.target.config.db_path
    return used.target.config_path, db, db.read_bytes()


@pytest.fixture
def ledger(written: tuple[Path, Path, bytes]) -> tuple[Path, Path]:
    """(config, ledger) with the ledger as the node left it."""
    config, db, data = written
    drop_side_files(db)
    db.write_bytes(data)
    return config, db


def drop_side_files(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)


def truncate_to(size: int) -> Callable[[Path], None]:
    def damage(db: Path) -> None:
        os.truncate(db, size)
        drop_side_files(db)

    return damage


def flip_in(needle: bytes) -> Callable[[Path], None]:
    """Flip the top bit of the second byte of `needle` wherever it is in the file (the table
    and its index alike): what was ASCII is no longer UTF-8."""

    def damage(db: Path) -> None:
        data = db.read_bytes()
        assert needle in data, f"{needle!r} is not in the ledger"
        flipped = needle[:1] + bytes([needle[1] ^ 0x80]) + needle[2:]
        db.write_bytes(data.replace(needle, flipped))
        drop_side_files(db)

    return damage


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(truncate_to(0), id="empty"),
        pytest.param(truncate_to(4096), id="truncated"),
        pytest.param(flip_in(b"price_offer_sent"), id="bit-flip-in-a-kind"),
        pytest.param(flip_in(b"counts"), id="bit-flip-in-another-kind"),
    ],
)
def test_damaged_ledger_is_refused_in_one_line(
    ledger: tuple[Path, Path], damage: Callable[[Path], None]
) -> None:
    config, db = ledger
    damage(db)
    code, stderr = refused(config)
    assert code in (1, 2), stderr
    assert_one_line(stderr, str(db))


def test_empty_ledger_starts_afresh_only_when_asked(ledger: tuple[Path, Path]) -> None:
    config, db = ledger
    truncate_to(0)(db)
    code, stderr = refused(config)
    assert code in (1, 2)
    assert_one_line(stderr, str(db))
    # The operator says so: a new ledger, and the node serves again.
    daemon = Daemon(config, "--new-ledger")
    try:
        daemon.wait_for("node_started", 10)
        assert daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0


# --- config values and paths ---------------------------------------------------------------


def edit(node: GeneratedNode, old: str, new: str) -> None:
    text = node.config_path.read_text()
    assert old in text, (old, text)
    node.config_path.write_text(text.replace(old, new, 1))


def append(node: GeneratedNode, toml: str) -> None:
    node.config_path.write_text(node.config_path.read_text() + "\n" + toml)


def out_route(name: str, fingerprint: str, port: int) -> str:
    return (
        f'[out_routes.{name}]\nprotocol = "udp"\nconnect = "127.0.0.1:{port}"\n'
        f'fingerprint = "{fingerprint}"\nsecret = "{"s" * 32}"\n'
    )


def port_of(node: GeneratedNode) -> str:
    """The control port's digits, as written in the config."""
    return str(node.config.control_listen[1])


OTHER = "ab" * 32
# case: (the change, what the one line must name: the field, or for a path the path itself).
BAD_CONFIGS: dict[str, tuple[Callable[[GeneratedNode], None], str]] = {
    "infinite timer": (
        lambda n: append(n, "[links]\nkeepalive_secs = 1.0\ndead_after_secs = inf\n"),
        "links.dead_after_secs",
    ),
    "busy keepalive": (
        lambda n: append(n, "[links]\nkeepalive_secs = 1e-9\n"),
        "links.keepalive_secs",
    ),
    "nan timer": (
        lambda n: append(n, "[links]\nhandshake_retry_secs = nan\n"),
        "links.handshake_retry_secs",
    ),
    "price beyond the wire": (
        lambda n: append(
            n,
            route_toml("big", "udp", 40_001, "s" * 32)
            + f"[in_routes.big.price]\ninbound_price_umel = {2**63}\n",
        ),
        "in_routes.big.price.inbound_price_umel",
    ),
    "debt limit beyond the wire": (
        lambda n: append(
            n,
            out_route("far", OTHER, 40_002)
            + f"[out_routes.far.price]\noutbound_min_debt_limit_umel = {2**64}\n",
        ),
        "out_routes.far.price.outbound_min_debt_limit_umel",
    ),
    "two routes to one peer": (
        lambda n: append(n, out_route("a", OTHER, 40_003) + out_route("b", OTHER, 40_004)),
        "out_routes.",
    ),
    "route to ourselves": (
        lambda n: append(n, out_route("me", n.fingerprint, 40_005)),
        "out_routes.me",
    ),
    "non-ASCII port digits": (
        lambda n: edit(n, port_of(n), "".join(chr(0x660 + int(d)) for d in port_of(n))),
        "control_listen",
    ),
    "ledger in a missing directory": (
        lambda n: edit(n, 'db_path = "node.db"', 'db_path = "missing/node.db"'),
        "missing/node.db",
    ),
    "identity in a missing directory": (
        lambda n: edit(n, 'identity_file = "node.key"', 'identity_file = "missing/node.key"'),
        "missing/node.key",
    ),
}


@pytest.fixture(scope="module")
def bad_configs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, tuple[int, str]]]:
    """Each case's config, and how its daemon ended: all started at once, which saves an
    interpreter's start-up per case."""
    started = {}
    for case, (change, _) in BAD_CONFIGS.items():
        (node,) = generate_network(tmp_path_factory.mktemp("bad"), 1, [], extra_toml=JSON_LOGS)
        change(node)
        started[case] = (node.config_path, start_daemon(node.config_path))
    return {case: (config, refusal(process)) for case, (config, process) in started.items()}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_by_check_config_and_daemon(
    bad_configs: dict[str, tuple[Path, tuple[int, str]]], case: str
) -> None:
    named = BAD_CONFIGS[case][1]
    config, (code, stderr) = bad_configs[case]
    assert code == 2, stderr
    assert_one_line(stderr, named)
    code, stderr = check_config(config)
    assert code == 2, stderr
    assert_one_line(stderr, named)
