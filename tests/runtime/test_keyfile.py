import os
from pathlib import Path

import pytest

from earendil_py.cli import main
from earendil_py.core.errors import ConfigError
from earendil_py.runtime.keyfile import (
    check_identity_path,
    create_identity_file,
    load_identity_file,
    load_or_create_identity_file,
    write_private_file,
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


def test_an_identity_path_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    for load in (load_identity_file, load_or_create_identity_file, check_identity_path):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path)
        assert str(caught.value) == f"{tmp_path}: cannot use as identity file: a directory"


def test_check_identity_path_creates_nothing(tmp_path: Path) -> None:
    assert check_identity_path(tmp_path / "node.key") is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=f"directory {tmp_path / 'keys'} does not exist"):
        check_identity_path(tmp_path / "keys" / "node.key")
    created = create_identity_file(tmp_path / "node.key")
    found = check_identity_path(tmp_path / "node.key")
    assert found is not None and found.fingerprint == created.fingerprint


def test_private_files_are_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    old = os.umask(0o022)
    try:
        write_private_file(path, "a = 1\n")
        assert os.stat(path).st_mode & 0o777 == 0o600
        path.chmod(0o644)
        write_private_file(path, "a = 2\n")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_text() == "a = 2\n"


def test_an_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_private_file(path, "x" * 5000)
    with pytest.raises(ConfigError, match="identity file is larger than 4096 bytes"):
        load_identity_file(path)
