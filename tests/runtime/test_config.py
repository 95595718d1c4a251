"""Config files: the example stays valid, and every bad file gets one exact error line."""

import subprocess
import sys
from pathlib import Path

import pytest

from earendil_py.cli import main
from earendil_py.runtime.config import load_config

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
    path.write_text(text)
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
