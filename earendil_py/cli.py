"""The `earendil-py` command line."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from earendil_py.core.errors import ConfigError
from earendil_py.core.ledger import LedgerCorrupt
from earendil_py.core.text import printable
from earendil_py.runtime.config import check_own_routes, load_config
from earendil_py.runtime.daemon import run_daemon
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.keyfile import (
    check_identity_path,
    create_identity_file,
    load_identity_file,
    load_or_create_identity_file,
)
from earendil_py.runtime.logs import configure_logging
from earendil_py.runtime.store import claim_ledger

EXIT_USAGE = 2


def _keygen(args: argparse.Namespace) -> None:
    identity = create_identity_file(args.identity)
    print(identity.fingerprint.hex())


def _fingerprint(args: argparse.Namespace) -> None:
    print(load_identity_file(args.identity).fingerprint.hex())


def _check_config(args: argparse.Namespace) -> None:
    # What the daemon checks before it starts, in the same order, creating nothing. Whether
    # its ports are free is only known when it binds them.
    config = load_config(args.config, private=True)
    identity = check_identity_path(config.identity_file)
    if identity is not None:
        check_own_routes(config, identity.fingerprint)
    ledger = claim_ledger(config.db_path, config.identity_file, dry_run=True)
    print(f"{config.source}: ok")
    if identity is not None:
        print(f"  identity     {config.identity_file} (fingerprint {identity.fingerprint.hex()})")
    else:
        print(f"  identity     {config.identity_file} (will be created on first start)")
    print(f"  ledger       {config.db_path} ({ledger})")
    print(f"  control      {config.control_listen[0]}:{config.control_listen[1]}")
    for name, route in config.in_routes.items():
        print(f"  listen       {name}: {route.protocol} {route.listen}")
    for name, out in config.out_routes.items():
        print(f"  dial         {name}: {out.protocol} {out.connect} -> {out.fingerprint[:8]}")


def _daemon(args: argparse.Namespace) -> None:
    # Every file the node creates from here on (ledger, its -wal and -shm, the ledger id
    # file, an identity) is for this user only, whatever the umask it was started with.
    os.umask(0o077)
    config = load_config(args.config, private=True)
    configure_logging(config.logging.level, config.logging.format)
    identity = load_or_create_identity_file(config.identity_file)
    check_own_routes(config, identity.fingerprint)
    claim_ledger(config.db_path, config.identity_file, new=args.new_ledger)
    anyio.run(run_daemon, config, identity)


def _api(args: argparse.Namespace, method: str, path: str, body: object | None = None) -> Any:
    host, port = load_config(args.config).control_listen
    return call_api(host, port, method, path, body)


def _show(line: str) -> None:
    """Print one line built from the node's API. Its text may come from a peer (chat, reasons,
    datagrams), so control and bidi characters are escaped."""
    print(printable(line), flush=True)


def _status(args: argparse.Namespace) -> None:
    status = _api(args, "GET", "/api/status")
    relay = status["relay"]
    _show(f"node {status['fingerprint']}  up {status['uptime_secs']:.0f}s")
    _show(
        f"  originated {relay['originated']}  forwarded {relay['forwarded']}  "
        f"peeled {relay['peeled']}  delivered {relay['delivered']}"
    )
    _show(f"  graph: {status['graph']['identities']} nodes, {status['graph']['adjacencies']} links")
    for link in status["links"]:
        _show(
            f"  {link['neighbor'][:8]}  {link['protocol']} {link['direction']:<3} "
            f"{link['route']:<20} sent {link['packets_sent']:>8}  "
            f"received {link['packets_received']:>8}  rtt {link['rtt_ms']} ms"
        )
    if status["drops"]:
        _show("  drops: " + ", ".join(f"{k}={v}" for k, v in sorted(status["drops"].items())))
    for account in status["accounts"]:
        frozen = f"  FROZEN ({account['frozen']})" if account["frozen"] else ""
        _show(
            f"  {account['neighbor'][:8]}  price in/out {account['our_price_umel']}/"
            f"{account['their_price_umel']} uMEL  they owe {account['debt_in_umel']}  "
            f"we owe {account['debt_out_umel']} uMEL{frozen}"
        )


def _reprice(args: argparse.Namespace) -> None:
    body = {"price_umel": args.price, "debt_limit_umel": args.debt_limit}
    answer = _api(args, "POST", f"/api/neighbors/{args.neighbor}/price", body)
    _show("accepted" if answer["accepted"] else "rejected: the previous price stays in force")


def _settle(args: argparse.Namespace) -> None:
    body = {
        "neighbor": args.neighbor,
        "method": args.method,
        "pay_umel": args.amount,
        "request_umel": args.request,
        "prepay": args.prepay,
    }
    answer = _api(args, "POST", "/api/settlements", body)
    reason = f" ({answer['reason']})" if answer["reason"] else ""
    _show(f"settlement {answer['id']}: {answer['state']}{reason}")


def _settlements(args: argparse.Namespace) -> None:
    for s in _api(args, "GET", "/api/settlements")["settlements"]:
        reason = f" ({s['reason']})" if s["reason"] else ""
        _show(
            f"{s['id']}  {s['neighbor'][:8]}  {s['role']:<9}  {s['method']:<6}  "
            f"we pay {s['paid_out_umel']:>9}  they pay {s['paid_in_umel']:>9}  "
            f"{s['state']}{reason}"
        )


def _decide(args: argparse.Namespace) -> None:
    answer = _api(args, "POST", f"/api/settlements/{args.id}/{args.decision}", {})
    reason = f" ({answer['reason']})" if answer["reason"] else ""
    _show(f"settlement {answer['id']}: {answer['state']}{reason}")


def _chat(args: argparse.Namespace) -> None:
    path = f"/api/chat/{args.neighbor}"
    if args.send is not None:
        _api(args, "POST", path, {"text": args.send})
    for m in _api(args, "GET", path)["messages"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["sent_at"]))
        arrow = "<-" if m["direction"] == "in" else "->"
        status = "" if m["status"] == "delivered" else f"  [{m['status']}: {m['reason']}]"
        _show(f"{when} {arrow} {m['text']}{status}")


def _unfreeze(args: argparse.Namespace) -> None:
    _api(args, "POST", f"/api/neighbors/{args.neighbor}/unfreeze", {})
    _show("unfrozen")


def _send(args: argparse.Namespace) -> None:
    body = {
        "destination": args.to,
        "dock": args.dock,
        "data_b64": base64.b64encode(args.data.encode()).decode(),
        "hops": args.hops,
    }
    _api(args, "POST", "/api/send", body)


def _receive(args: argparse.Namespace) -> None:
    while True:
        answer = _api(args, "GET", f"/api/receive?dock={args.dock}")
        for datagram in answer["datagrams"]:
            _show(base64.b64decode(datagram["data_b64"]).decode("utf-8", "replace"))
        if not args.follow:
            return
        time.sleep(0.2)


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
    daemon.add_argument(
        "--new-ledger",
        action="store_true",
        help="start a new ledger for this identity (when its ledger is lost: every balance "
        "with every neighbour is forgotten); needed once, refused when not needed",
    )
    daemon.set_defaults(run=_daemon)

    status = commands.add_parser("status", help="show a running node's links and counters")
    status.add_argument("--config", type=Path, required=True)
    status.set_defaults(run=_status)

    send = commands.add_parser("send", help="send a datagram through the overlay")
    send.add_argument("--config", type=Path, required=True)
    send.add_argument("--to", required=True, help="destination fingerprint (64 hex digits)")
    send.add_argument("--dock", type=int, required=True, help="destination dock (u32)")
    send.add_argument("--hops", type=int, default=None, help="peelers, destination included")
    send.add_argument("data", help="text to send")
    send.set_defaults(run=_send)

    receive = commands.add_parser("receive", help="print datagrams that arrived for a dock")
    receive.add_argument("--config", type=Path, required=True)
    receive.add_argument("--dock", type=int, required=True)
    receive.add_argument("--follow", action="store_true", help="keep printing as they arrive")
    receive.set_defaults(run=_receive)

    reprice = commands.add_parser("reprice", help="offer a neighbour a new price (push_price)")
    reprice.add_argument("--config", type=Path, required=True)
    reprice.add_argument("--neighbor", required=True, help="fingerprint (64 hex digits)")
    reprice.add_argument("--price", type=int, required=True, help="uMEL per packet")
    reprice.add_argument("--debt-limit", type=int, required=True, help="uMEL")
    reprice.set_defaults(run=_reprice)

    unfreeze = commands.add_parser("unfreeze", help="resume traffic after a debt dispute")
    unfreeze.add_argument("--config", type=Path, required=True)
    unfreeze.add_argument("--neighbor", required=True, help="fingerprint (64 hex digits)")
    unfreeze.set_defaults(run=_unfreeze)

    settle = commands.add_parser("settle", help="propose a settlement to a neighbour")
    settle.add_argument("--config", type=Path, required=True)
    settle.add_argument("--neighbor", required=True, help="fingerprint (64 hex digits)")
    settle.add_argument("--amount", type=int, default=0, help="uMEL of our debt we pay")
    settle.add_argument("--request", type=int, default=0, help="uMEL of their debt they pay")
    settle.add_argument("--method", choices=["manual", "pow"], required=True)
    settle.add_argument(
        "--prepay", action="store_true", help="pay even if it is more than we owe them"
    )
    settle.set_defaults(run=_settle)

    listing = commands.add_parser("settlements", help="list settlements, both ways")
    listing.add_argument("--config", type=Path, required=True)
    listing.set_defaults(run=_settlements)

    for decision, what in (
        ("accept", "accept a neighbour's manual settlement"),
        ("reject", "reject a neighbour's manual settlement"),
        ("cancel", "ask the neighbour to cancel our pending proposal"),
    ):
        decide = commands.add_parser(decision, help=what)
        decide.add_argument("--config", type=Path, required=True)
        decide.add_argument("id", help="settlement id (hex, from `earendil-py settlements`)")
        decide.set_defaults(run=_decide, decision=decision)

    chat = commands.add_parser("chat", help="show the chat with a neighbour, or send to it")
    chat.add_argument("--config", type=Path, required=True)
    chat.add_argument("--neighbor", required=True, help="fingerprint (64 hex digits)")
    chat.add_argument("--send", metavar="TEXT", help="send this message first")
    chat.set_defaults(run=_chat)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as exc:
        _error(exc)
        return EXIT_USAGE
    except (ControlApiError, LedgerCorrupt) as exc:
        _error(exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _error(exc: Exception) -> None:
    # One line, escaped: the message can quote a neighbour (a chat refusal) or a damaged file.
    print(f"earendil-py: error: {printable(str(exc))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
