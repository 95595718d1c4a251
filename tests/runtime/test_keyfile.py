import os
from pathlib import Path

import pytest

from earendil_py.cli import main
from earendil_py.core.errors import ConfigError
from earendil_py.runtime.keyfile import (
    create_identity_file,
    load_identity_file,
    load_or_create_identity_file,
)


def test_keygen_creates_0600_file_and_prints_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.key"
    assert main(["keygen", "--identity", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert printed == load_identity_file(path).fingerprint.hex()
    assert main(["fingerprint", "--identity", str(path)]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.key"
    first = create_identity_file(path)
    assert main(["keygen", "--identity", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_identity_file(path).fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_identity_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    create_identity_file(path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"accessible by group or others \\(mode {mode:04o}\\)"):
        load_identity_file(path)


def test_corrupt_identity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    create_identity_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a valid identity file"):
        load_identity_file(path)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = load_or_create_identity_file(path)
    assert load_or_create_identity_file(path).fingerprint == first.fingerprint
