"""Private files on disk: the identity file and the config, which hold secrets.

An identity file is created 0600. Both are refused when group or others may access them, and
read through one open file descriptor, so the mode checked is the mode of the bytes read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from earendil_py.core.errors import ConfigError
from earendil_py.core.identity import Identity

PRIVATE_MODE = 0o600
IDENTITY_MAX_BYTES = 4096


def create_identity_file(path: Path) -> Identity:
    """Generate a new identity and write it to `path`, which must not exist.

    The file is written to a temporary name with mode 0600, fsynced, then hard-linked into
    place, so a crash never leaves a truncated key file and an existing key is never replaced.
    Raises ConfigError if `path` exists or cannot be written.
    """
    identity = Identity.generate(os.urandom)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        try:
            os.write(fd, identity.to_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise ConfigError(f"{path}: identity file already exists; refusing to overwrite") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write identity file: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return identity


def load_identity_file(path: Path) -> Identity:
    """Read an identity file. Raises ConfigError if it is missing, not a regular file,
    unreadable, corrupt or accessible by group or others (a leaked identity key cannot be
    revoked)."""
    data = read_file(path, "identity file", max_bytes=IDENTITY_MAX_BYTES, private=True)
    try:
        return Identity.from_bytes(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a valid identity file: {exc}") from None


def load_or_create_identity_file(path: Path) -> Identity:
    """Load `path`, creating a fresh identity there first if it does not exist yet."""
    if not path.exists():
        return create_identity_file(path)
    return load_identity_file(path)


def check_identity_path(path: Path) -> Identity | None:
    """What `load_or_create_identity_file` would do, without creating anything: the identity
    in `path`, or None if it does not exist and can be created. Raises ConfigError as
    `load_identity_file` does, or if `path`'s directory is missing or not writable."""
    if path.exists():
        return load_identity_file(path)
    check_writable_directory(path, "identity file")
    return None


def read_file(path: Path, what: str, *, max_bytes: int, private: bool) -> bytes:
    """The bytes of the regular file `path`. Raises ConfigError naming `path` and `what` if it
    cannot be opened or read, is not a regular file, is larger than `max_bytes`, or (when
    `private`) is accessible by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(f"{path}: cannot use as {what}: {kind}")
        if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: {what} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )
        chunks = []
        size = 0
        while size <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ConfigError(f"{path}: {what} is larger than {max_bytes} bytes")
    return b"".join(chunks)


def write_private_file(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` with mode 0600, replacing its content if it exists (its
    mode is then tightened to 0600 before anything is written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with open(fd, "w", encoding="utf-8") as file:  # closes fd, whatever happens
        os.fchmod(fd, PRIVATE_MODE)
        file.write(text)


def check_writable_directory(path: Path, what: str) -> None:
    """Raise ConfigError naming `path` and `what` unless `path`'s directory exists and we may
    create files in it."""
    directory = path.parent
    if not directory.is_dir():
        problem = "does not exist" if not directory.exists() else "is not a directory"
        raise ConfigError(f"{path}: cannot use as {what}: directory {directory} {problem}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot use as {what}: directory {directory} is not writable")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
