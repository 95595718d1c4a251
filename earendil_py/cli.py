"""The `earendil-py` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from earendil_py.core.errors import ConfigError
from earendil_py.runtime.config import load_config
from earendil_py.runtime.daemon import run_daemon
from earendil_py.runtime.keyfile import (
    create_identity_file,
    load_identity_file,
    load_or_create_identity_file,
)
from earendil_py.runtime.logs import configure_logging

EXIT_USAGE = 2


def _keygen(args: argparse.Namespace) -> None:
    identity = create_identity_file(args.identity)
    print(identity.fingerprint.hex())


def _fingerprint(args: argparse.Namespace) -> None:
    print(load_identity_file(args.identity).fingerprint.hex())


def _check_config(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    print(f"{config.source}: ok")
    if config.identity_file.exists():
        identity = load_identity_file(config.identity_file)
        print(f"  identity     {config.identity_file} (fingerprint {identity.fingerprint.hex()})")
    else:
        print(f"  identity     {config.identity_file} (will be created on first start)")
    print(f"  ledger       {config.db_path}")
    print(f"  control      {config.control_listen[0]}:{config.control_listen[1]}")
    for name, route in config.in_routes.items():
        print(f"  listen       {name}: {route.protocol} {route.listen}")
    for name, out in config.out_routes.items():
        print(f"  dial         {name}: {out.protocol} {out.connect} -> {out.fingerprint[:8]}")


def _daemon(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    identity = load_or_create_identity_file(config.identity_file)
    configure_logging(config.logging.level, config.logging.format)
    anyio.run(run_daemon, config, identity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earendil-py", description="Relay node for an Earendil-style onion overlay."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="create a new identity file (mode 0600)")
    keygen.add_argument("--identity", type=Path, required=True, help="file to create")
    keygen.set_defaults(run=_keygen)

    fingerprint = commands.add_parser("fingerprint", help="print an identity's fingerprint")
    fingerprint.add_argument("--identity", type=Path, required=True)
    fingerprint.set_defaults(run=_fingerprint)

    daemon = commands.add_parser("daemon", help="run a relay node until SIGINT/SIGTERM")
    daemon.add_argument("--config", type=Path, required=True)
    daemon.set_defaults(run=_daemon)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as exc:
        print(f"earendil-py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
