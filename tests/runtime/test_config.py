"""Config files: the example stays valid, and every bad file gets one exact error line."""

import subprocess
import sys
from pathlib import Path

import pytest

from earendil_py.cli import main
from earendil_py.core.errors import ConfigError
from earendil_py.runtime.config import check_own_routes, diff_configs, load_config
from earendil_py.runtime.keyfile import create_identity_file, write_private_file

REPO = Path(__file__).resolve().parents[2]
FP = "ab" * 32
GOOD = f"""
identity_file = "node.key"
db_path = "node.db"
control_listen = "127.0.0.1:8964"

[in_routes.a]
protocol = "udp"
listen = "127.0.0.1:5000"
secret = "0123456789abcdef"

[out_routes.b]
protocol = "tcp"
connect = "localhost:6000"
fingerprint = "{FP}"
secret = "0123456789abcdef"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    write_private_file(path, text)
    return path


def test_example_config_is_valid() -> None:
    config = load_config(REPO / "config.example.toml")
    assert config.in_routes and config.out_routes
    assert config.identity_file == REPO / "node.key"


def test_good_config_resolves_paths_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.db_path == tmp_path / "node.db"
    assert config.in_routes["a"].price.inbound_price_umel == 1
    assert config.out_routes["b"].fingerprint == FP
    assert config.settlement.auto_settle_percent == 50


BAD_CASES = [
    (
        "bogus = 1\n" + GOOD,
        "node.toml: bogus: unknown field",
    ),
    (
        GOOD.replace('listen = "127.0.0.1:5000"', 'listen = "127.0.0.1:5000"\ncolour = "red"'),
        "node.toml: in_routes.a.colour: unknown field",
    ),
    (
        GOOD + '\n[in_routes.a.price]\ninbound_price_umel = "ten"\n',
        "node.toml: in_routes.a.price.inbound_price_umel: expected int, got str",
    ),
    (
        GOOD + "\n[in_routes.a.price]\ninbound_price_umel = -5\n",
        "node.toml: in_routes.a.price.inbound_price_umel: expected int >= 0",
    ),
    (
        GOOD + "\n[out_routes.b.price]\noutbound_max_price_umel = 1.5\n",
        "node.toml: out_routes.b.price.outbound_max_price_umel: expected int, got float",
    ),
    (
        GOOD.replace('listen = "127.0.0.1:5000"', 'listen = "127.0.0.1:99999"'),
        "node.toml: in_routes.a.listen: bad address: bad port '99999'",
    ),
    (
        GOOD.replace('listen = "127.0.0.1:5000"', 'listen = "example.org:5000"'),
        "node.toml: in_routes.a.listen: bad address: "
        "'example.org' does not appear to be an IPv4 or IPv6 address",
    ),
    (
        GOOD.replace('connect = "localhost:6000"', 'connect = "::1:6000"'),
        "node.toml: out_routes.b.connect: bad address: "
        "IPv6 addresses need brackets, as [::1]:port; got '::1:6000'",
    ),
    (
        GOOD.replace(FP, "ab" * 31),
        "node.toml: out_routes.b.fingerprint: bad fingerprint: "
        "a fingerprint is 64 hex digits, got 62",
    ),
    (
        GOOD.replace(FP, "xy" * 32),
        "node.toml: out_routes.b.fingerprint: bad fingerprint: "
        "a fingerprint is hex digits only (0-9, a-f)",
    ),
    (
        GOOD + '\n[in_routes.c]\nprotocol = "udp"\nlisten = "0.0.0.0:5000"\n'
        'secret = "0123456789abcdef"\n',
        "node.toml: in_routes.c.listen: duplicate udp port 5000 (also used by in_routes.a)",
    ),
    (
        GOOD + '\n[in_routes.c]\nprotocol = "tcp"\nlisten = "127.0.0.1:8964"\n'
        'secret = "0123456789abcdef"\n',
        "node.toml: in_routes.c.listen: duplicate tcp port 8964 (also used by control_listen)",
    ),
    (
        GOOD.replace('protocol = "udp"', 'protocol = "quic"'),
        "node.toml: in_routes.a.protocol: invalid enum value 'quic'",
    ),
    (
        GOOD.replace('db_path = "node.db"', ""),
        "node.toml: db_path: missing required field",
    ),
    (
        GOOD.replace('secret = "0123456789abcdef"', 'secret = "short"', 1),
        "node.toml: in_routes.a.secret: expected str of length >= 16",
    ),
    (
        "identity_file = \n",
        "node.toml: invalid TOML: Invalid value (at line 1, column 17)",
    ),
    # Timers: finite, at most a day, above a floor.
    (
        GOOD + "\n[links]\ndead_after_secs = inf\n",
        "node.toml: links.dead_after_secs: expected float <= 86400.0",
    ),
    (
        GOOD + "\n[links]\nkeepalive_secs = nan\n",
        "node.toml: links.keepalive_secs: expected float >= 0.1",
    ),
    (
        GOOD + "\n[links]\nkeepalive_secs = 1e-9\n",
        "node.toml: links.keepalive_secs: expected float >= 0.1",
    ),
    (
        GOOD + "\n[links]\nhandshake_retry_secs = 0.001\n",
        "node.toml: links.handshake_retry_secs: expected float >= 0.01",
    ),
    (
        GOOD + "\n[links]\nredial_min_secs = -inf\n",
        "node.toml: links.redial_min_secs: expected float >= 0.01",
    ),
    (
        GOOD + "\n[links]\nredial_max_secs = 1e6\n",
        "node.toml: links.redial_max_secs: expected float <= 86400.0",
    ),
    (
        GOOD + "\n[accounting]\npush_debt_secs = 0.0\n",
        "node.toml: accounting.push_debt_secs: expected float >= 0.1",
    ),
    (
        GOOD + "\n[accounting]\ncheckpoint_secs = inf\n",
        "node.toml: accounting.checkpoint_secs: expected float <= 86400.0",
    ),
    (
        GOOD + "\n[accounting]\nclaim_commit_delay_secs = nan\n",
        "node.toml: accounting.claim_commit_delay_secs: expected float >= 0.0",
    ),
    (
        GOOD + "\n[settlement]\nmanual_expiry_secs = 604801\n",
        "node.toml: settlement.manual_expiry_secs: expected int <= 604800",
    ),
    (
        GOOD + "\n[accounting]\nkeep_claims = 0\n",
        "node.toml: accounting.keep_claims: expected int >= 1",
    ),
    # Money within what a signed offer carries.
    (
        GOOD + f"\n[in_routes.a.price]\ninbound_price_umel = {2**63}\n",
        "node.toml: in_routes.a.price.inbound_price_umel: expected int <= 9223372036854775807",
    ),
    (
        GOOD + f"\n[out_routes.b.price]\ninbound_debt_limit_umel = {2**64 - 1}\n",
        "node.toml: out_routes.b.price.inbound_debt_limit_umel: "
        "expected int <= 9223372036854775807",
    ),
    (
        GOOD + f"\n[settlement]\nmin_settlement_umel = {2**63}\n",
        "node.toml: settlement.min_settlement_umel: expected int <= 9223372036854775807",
    ),
    # One out_route per neighbour, however its fingerprint is spelt.
    (
        GOOD + f'\n[out_routes.c]\nprotocol = "udp"\nconnect = "127.0.0.1:7000"\n'
        f'fingerprint = "{FP.upper()}"\nsecret = "0123456789abcdef"\n',
        "node.toml: out_routes.c.fingerprint: the same neighbour as out_routes.b",
    ),
    # Ports in ASCII digits: Arabic-Indic, fullwidth and superscript digits are refused.
    (
        GOOD.replace('listen = "127.0.0.1:5000"', 'listen = "127.0.0.1:\u0665\u0660\u0660\u0660"'),
        "node.toml: in_routes.a.listen: bad address: bad port '\u0665\u0660\u0660\u0660'",
    ),
    (
        GOOD.replace(
            'connect = "localhost:6000"', 'connect = "localhost:\uff16\uff10\uff10\uff10"'
        ),
        "node.toml: out_routes.b.connect: bad address: bad port '\uff16\uff10\uff10\uff10'",
    ),
    (
        GOOD.replace('control_listen = "127.0.0.1:8964"', 'control_listen = "127.0.0.1:8\u00b2"'),
        "node.toml: control_listen: bad address: bad port '8\u00b2'",
    ),
    (
        GOOD.replace('listen = "127.0.0.1:5000"', 'listen = "127.0.0.1:+5000"'),
        "node.toml: in_routes.a.listen: bad address: bad port '+5000'",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CASES)
def test_bad_config_prints_one_clear_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"earendil-py: error: {tmp_path}/{message}\n"


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.endswith(
        "nope.toml: cannot read config: No such file or directory\n"
    )


def test_console_script_reports_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\n" + GOOD)
    result = subprocess.run(
        [sys.executable, "-m", "earendil_py", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"earendil-py: error: {path}: bogus: unknown field"


def test_the_largest_wire_amount_is_accepted(tmp_path: Path) -> None:
    top = 2**63 - 1  # core.pricing.Uint
    price = f"\n[in_routes.a.price]\ninbound_price_umel = {top}\n"
    assert load_config(write(tmp_path, GOOD + price)).in_routes["a"].price.inbound_price_umel == top


def test_a_route_to_our_own_fingerprint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = create_identity_file(tmp_path / "node.key").fingerprint
    path = write(tmp_path, GOOD.replace(FP, own.hex()))
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        check_own_routes(config, own)
    check_own_routes(config, bytes.fromhex(FP))  # another node's is fine
    line = (
        f"{path}: out_routes.b.fingerprint: is this node's own fingerprint "
        f"(identity_file {tmp_path / 'node.key'})"
    )
    assert str(caught.value) == line
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"earendil-py: error: {line}\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_check_config_refuses_a_config_others_may_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    path = write(tmp_path, GOOD)
    path.chmod(mode)
    load_config(path)  # the commands that only read the control address do not mind
    with pytest.raises(ConfigError):
        load_config(path, private=True)
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"earendil-py: error: {path}: config is accessible by group or others "
        f"(mode {mode:04o}); run: chmod 600 {path}\n"
    )


def test_a_config_that_is_a_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"earendil-py: error: {tmp_path}: cannot use as config: a directory\n"
    )


PATH_CASES = [
    (
        'identity_file = "keys/node.key"',
        "{dir}/keys/node.key: cannot use as identity file: directory {dir}/keys does not exist",
    ),
    ('identity_file = "."', "{dir}: cannot use as identity file: a directory"),
    (
        'db_path = "data/node.db"',
        "{dir}/data/node.db: cannot use as ledger: directory {dir}/data does not exist",
    ),
    ('db_path = "."', "{dir}: cannot use as ledger: not a regular file"),
    (
        'db_path = "node.toml/node.db"',
        "{dir}/node.toml/node.db: cannot use as ledger: directory {dir}/node.toml is not a "
        "directory",
    ),
]


@pytest.mark.parametrize(("line", "message"), PATH_CASES)
def test_check_config_checks_the_paths_the_daemon_will_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    key = line.partition(" = ")[0]
    text = "\n".join(line if row.startswith(key + " ") else row for row in GOOD.split("\n"))
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"earendil-py: error: {message.format(dir=tmp_path)}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["node.toml"]  # nothing was created


def test_check_config_on_a_good_config_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"  identity     {tmp_path}/node.key (will be created on first start)\n" in out
    assert f"  ledger       {tmp_path}/node.db (will be created on first start)\n" in out
    assert [p.name for p in tmp_path.iterdir()] == ["node.toml"]


APP = '\n[[apps]]\nlisten = "127.0.0.1:9000"\ndock = 7\n'
APP_CASES = [
    (GOOD + APP + "colour = 1\n", "node.toml: apps[0].colour: unknown field"),
    (GOOD + APP.replace("dock = 7", ""), "node.toml: apps[0].dock: missing required field"),
    (GOOD + APP + "hops = 1\n", "node.toml: apps[0].hops: expected int >= 2"),
    (GOOD + APP + "hops = 6\n", "node.toml: apps[0].hops: expected int <= 5"),
    (GOOD + APP.replace("dock = 7", "dock = -1"), "node.toml: apps[0].dock: expected int >= 0"),
    (
        GOOD + APP.replace("127.0.0.1:9000", "10.1.2.3:9000"),
        "node.toml: apps[0].listen: 10.1.2.3 is not a loopback address; whoever reaches an "
        "app socket sends as this node: keep it on 127.0.0.1 or [::1], or set allow_remote = true",
    ),
    (
        GOOD + APP.replace("127.0.0.1:9000", "localhost:9000"),
        "node.toml: apps[0].listen: bad address: 'localhost' does not appear to be an IPv4 or "
        "IPv6 address",
    ),
    (
        GOOD + APP.replace(":9000", ":5000"),
        "node.toml: apps[0].listen: duplicate udp port 5000 (also used by in_routes.a)",
    ),
    (
        GOOD + APP + APP.replace(":9000", ":9001"),
        "node.toml: apps[1].dock: dock 7 is also apps[0]'s",
    ),
    (GOOD + '\n[apps]\nlisten = "127.0.0.1:9000"\n', "node.toml: apps: expected array, got object"),
]


@pytest.mark.parametrize(("text", "message"), APP_CASES)
def test_a_bad_app_socket_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    assert main(["check-config", "--config", str(write(tmp_path, text))]) == 2
    assert capsys.readouterr().err == f"earendil-py: error: {tmp_path}/{message}\n"


def test_app_sockets_take_loopback_of_either_family_or_any_address_when_allowed(
    tmp_path: Path,
) -> None:
    second = APP.replace("127.0.0.1:9000", "[::1]:9001").replace("dock = 7", "dock = 8")
    third = APP.replace("127.0.0.1:9000", "10.1.2.3:9002").replace("dock = 7", "dock = 9")
    config = load_config(write(tmp_path, GOOD + APP + second + third + "allow_remote = true\n"))
    assert [(app.listen, app.dock, app.hops) for app in config.apps] == [
        ("127.0.0.1:9000", 7, 3),
        ("[::1]:9001", 8, 3),
        ("10.1.2.3:9002", 9, 3),
    ]


def test_a_reload_leaves_app_sockets_to_the_next_start(tmp_path: Path) -> None:
    old = load_config(write(tmp_path, GOOD + APP))
    new = load_config(write(tmp_path, GOOD + APP.replace("dock = 7", "dock = 8")))
    assert diff_configs(old, new).skipped == ["apps"]
