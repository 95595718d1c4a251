"""Identity files on disk: created 0600, refused when group- or world-accessible."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from earendil_py.core.errors import ConfigError
from earendil_py.core.identity import Identity


def create_identity_file(path: Path) -> Identity:
    """Generate a new identity and write it to `path`, which must not exist.

    The file is written to a temporary name with mode 0600, fsynced, then hard-linked into
    place, so a crash never leaves a truncated key file and an existing key is never replaced.
    Raises ConfigError if `path` exists or cannot be written.
    """
    identity = Identity.generate(os.urandom)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
    """Read an identity file. Raises ConfigError if it is missing, unreadable, corrupt or
    accessible by group or others (a leaked identity key cannot be revoked)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open identity file: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: identity file is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        return Identity.from_bytes(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a valid identity file: {exc}") from None


def load_or_create_identity_file(path: Path) -> Identity:
    """Load `path`, creating a fresh identity there first if it does not exist yet."""
    if not path.exists():
        return create_identity_file(path)
    return load_identity_file(path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
