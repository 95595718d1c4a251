"""The `earendil-py` command line."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from earendil_py import __version__
from earendil_py.core.errors import ConfigError
from earendil_py.core.ledger import LedgerCorrupt
from earendil_py.core.packet import MAX_HOPS
from earendil_py.core.text import printable
from earendil_py.runtime.apps import (
    ANONYMOUS,
    DESTINATION,
    FROM_ANONYMOUS,
    FROM_DESTINATION,
    HELLO,
    REPLY,
    SEND,
)
from earendil_py.runtime.config import Config, check_own_routes, load_config, parse_address
from earendil_py.runtime.daemon import run_daemon
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.keyfile import (
    check_identity_path,
    create_identity_file,
    load_identity_file,
    load_or_create_identity_file,
)
from earendil_py.runtime.logs import LogOverrides
from earendil_py.runtime.store import claim_ledger

# Exit statuses: what happened, for scripts (the epilogue of --help lists them).
EXIT_OK = 0
EXIT_FAILED = 1  # the node failed, cannot be reached, or cannot do what was asked
EXIT_USAGE = 2  # a bad flag, config file or fingerprint (argparse exits 2 as well)
EXIT_REFUSED = 3  # the neighbour refused or did not answer
EXIT_INTERRUPTED = 130

CONFIG_ENV = "EARENDIL_CONFIG"
# Searched in this order when neither --config nor EARENDIL_CONFIG says: the node in the
# directory at hand (as `keygen` and the README lay one out), then the user's own node, then
# the system's (where examples/earendil-py.service keeps it).
CONFIG_NAME = "node.toml"
UMEL_MAX = 2**63 - 1  # the largest amount a signed message carries
DOCK_MAX = 2**32 - 1

CONFIG_HELP = f"""\
config file:
  Commands read the node's config: the --config FILE given, else ${CONFIG_ENV}, else the
  first that exists of ./node.toml (a node kept in the directory at hand),
  $XDG_CONFIG_HOME/earendil_py/node.toml (default ~/.config/earendil_py/node.toml: your
  own node) and /etc/earendil_py/node.toml (a system service's, as in examples/).
"""
EPILOG = f"""\
exit status:
  {EXIT_OK}  done
  {EXIT_FAILED}  the node failed, could not be reached, or could not do it
  {EXIT_USAGE}  usage or config error: a bad flag, config file or fingerprint
  {EXIT_REFUSED}  refused by the neighbour, or it did not answer (the reason is printed)
"""


class _Formatter(argparse.HelpFormatter):
    """Descriptions are wrapped to the terminal; the epilogues, laid out by hand, are not."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """A mistake in what the operator asked: exit status 2."""


class Refused(Exception):
    """The neighbour refused or did not answer: exit status 3."""


# --- the config and the control API -------------------------------------------------------


def config_candidates(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Where a config is looked for when no --config and no EARENDIL_CONFIG say."""
    xdg = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [
        Path(CONFIG_NAME),
        Path(xdg) / "earendil_py" / CONFIG_NAME,
        Path("/etc/earendil_py") / CONFIG_NAME,
    ]


def config_path(given: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The config file to use. Raises UsageError if none is given and none is found."""
    if given is not None:
        return given
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    candidates = config_candidates(environ)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise UsageError(
        f"no config file: give --config FILE or set {CONFIG_ENV} (looked for "
        + ", ".join(map(str, candidates))
        + ")"
    )


def _config(args: argparse.Namespace, *, private: bool = False) -> Config:
    return load_config(config_path(args.config), private=private)


def _api(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: object | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    refused: Sequence[int] = (),
) -> Any:
    """Call the node's control API. An HTTP status in `refused` means the neighbour said
    no (Refused); a 400 is a mistake in a flag, named by `flags` (JSON field -> flag)."""
    try:
        return call_api(_config(args), method, path, body)
    except ControlApiError as exc:
        if exc.status in refused:
            raise Refused(exc.message) from None
        if exc.status == 400:
            raise UsageError(_in_flag_words(exc.message, flags or {})) from None
        raise


# msgspec's validation errors, as the API passes them on: "... - at `$.dock`".
_VALIDATION = re.compile(r"^invalid JSON body: (?P<what>.*?) - at `\$\.(?P<field>\w+)[^`]*`$")


def _in_flag_words(message: str, flags: Mapping[str, str]) -> str:
    """`message` from the API, with a JSON field it names turned into the flag it came from."""
    match = _VALIDATION.match(message)
    if match is None or match["field"] not in flags:
        return message
    what = match["what"].replace("`", "")
    return f"{flags[match['field']]}: {what[:1].lower()}{what[1:]}"


def resolve_fingerprint(
    args: argparse.Namespace, text: str, flag: str, *, neighbors_only: bool
) -> str:
    """The full fingerprint `text` stands for: itself (64 hex digits), or the one node the
    running node knows whose fingerprint starts with it (at least 4 hex digits) among its
    neighbours (`neighbors_only`) or among every node of its relay graph too."""
    prefix = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
        raise UsageError(
            f"{flag}: expected a fingerprint (64 hex digits) or a unique prefix of at least "
            f"4 hex digits, got {text!r}"
        )
    if len(prefix) == 64:
        return prefix
    matches = _api(args, "GET", f"/api/fingerprints?prefix={prefix}")["matches"]
    found = [m["fingerprint"] for m in matches if m["neighbor"] or not neighbors_only]
    known = "neighbour" if neighbors_only else "neighbour or node in the relay graph"
    if not found:
        raise UsageError(f"{flag}: no {known} has a fingerprint starting with {prefix}")
    if len(found) > 1:
        shown = ", ".join(fp[: len(prefix) + 4] + "…" for fp in found[:4])
        more = " and more" if len(found) > 4 else ""
        raise UsageError(f"{flag}: {prefix} is ambiguous ({shown}{more}): give more digits")
    fingerprint: str = found[0]
    return fingerprint


# --- output ------------------------------------------------------------------------------


def _show(line: str) -> None:
    """Print one line built from the node's API. Its text may come from a peer (chat, reasons,
    datagrams), so control and bidi characters are escaped."""
    print(printable(line), flush=True)


def _json(value: object) -> None:
    # One document per line; json.dumps escapes every control and non-ASCII character.
    print(json.dumps(value), flush=True)


def _duration(secs: float) -> str:
    secs = max(int(secs), 0)
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _when(unix: float, now: float) -> str:
    """A past moment as a clock time (with the date if not today) and how long ago."""
    same_day = time.localtime(unix)[:3] == time.localtime(now)[:3]
    clock = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(unix))
    return f"{clock} ({_duration(now - unix)} ago)"


# --- commands ------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> None:
    fingerprint = create_identity_file(args.identity).fingerprint.hex()
    _json({"fingerprint": fingerprint}) if args.json else print(fingerprint)


def _fingerprint(args: argparse.Namespace) -> None:
    fingerprint = load_identity_file(args.identity).fingerprint.hex()
    _json({"fingerprint": fingerprint}) if args.json else print(fingerprint)


def _check_config(args: argparse.Namespace) -> None:
    # What the daemon checks before it starts, in the same order, creating nothing. Whether
    # its ports are free is only known when it binds them.
    config = _config(args, private=True)
    identity = check_identity_path(config.identity_file)
    if identity is not None:
        check_own_routes(config, identity.fingerprint)
    ledger = claim_ledger(config.db_path, config.identity_file, dry_run=True)
    fingerprint = identity.fingerprint.hex() if identity is not None else None
    if args.json:
        _json(
            {
                "config": str(config.source),
                "identity_file": str(config.identity_file),
                "fingerprint": fingerprint,
                "db_path": str(config.db_path),
                "ledger": ledger,
                "control_listen": "{}:{}".format(*config.control_listen),
                "in_routes": {n: r.listen for n, r in config.in_routes.items()},
                "out_routes": {n: r.connect for n, r in config.out_routes.items()},
            }
        )
        return
    print(f"{config.source}: ok")
    if fingerprint is not None:
        print(f"  identity     {config.identity_file} (fingerprint {fingerprint})")
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
    try:
        overrides = LogOverrides.from_environment(args.log_level, args.log_format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = _config(args, private=True)
    overrides.configure(config.logging)
    identity = load_or_create_identity_file(config.identity_file)
    check_own_routes(config, identity.fingerprint)
    claim_ledger(config.db_path, config.identity_file, new=args.new_ledger)
    anyio.run(run_daemon, config, identity)


def _status(args: argparse.Namespace) -> None:
    status = _api(args, "GET", "/api/status")
    if args.json:
        _json(status)
        return
    now = time.time()
    relay = status["relay"]
    _show(f"node {status['fingerprint']}  up {_duration(status['uptime_secs'])}")
    _show(
        f"  originated {relay['originated']}  forwarded {relay['forwarded']}  "
        f"peeled {relay['peeled']}  delivered {relay['delivered']}"
    )
    _show(f"  graph: {status['graph']['identities']} nodes, {status['graph']['adjacencies']} links")
    if status["routes"]:
        _show("routes:")
    for route in status["routes"]:
        for line in _route_lines(route, now):
            _show(line)
    if status["links"]:
        _show("links:")
    for link in status["links"]:
        rtt = "-" if link["rtt_ms"] is None else f"{link['rtt_ms']} ms"
        _show(
            f"  {link['neighbor'][:8]}  {link['protocol']} {link['direction']:<3} "
            f"{link['route']:<20} sent {link['packets_sent']:>8}  "
            f"received {link['packets_received']:>8}  rtt {rtt}"
        )
    if status["accounts"]:
        _show("accounts:")
    for account in status["accounts"]:
        frozen = f"  FROZEN ({account['frozen']})" if account["frozen"] else ""
        _show(
            f"  {account['neighbor'][:8]}  price in/out {account['our_price_umel']}/"
            f"{account['their_price_umel']} uMEL  they owe {account['debt_in_umel']}  "
            f"we owe {account['debt_out_umel']} uMEL{frozen}"
        )
    if status["drops"]:
        _show("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(status["drops"].items())))


def _route_lines(route: dict[str, Any], now: float) -> list[str]:
    """One configured route: where, its state since when, then its last failure if any."""
    where = f"{route['direction']:<3} {route['name']:<20} {route['protocol']} {route['address']}"
    if route["neighbor"]:
        where += f" -> {route['neighbor'][:8]}"
    state = route["state"].replace("_", " ")
    line = f"  {where}  {state} since {_when(route['since'], now)}"
    if route["direction"] == "in" and route["links"]:
        line += f", {route['links']} link{'s' if route['links'] != 1 else ''}"
    if route["last_handshake"] is not None and route["state"] != "up":
        line += f"; last up {_when(route['last_handshake'], now)}"
    if not route["failure_reason"]:
        return [line]
    failed = f"      last failure {_when(route['failed_at'], now)}: {route['failure_reason']}"
    return [line, failed]


# Why a neighbour refuses our price, in words (core/pricing.py AcceptanceRule, core/accounting.py).
_PRICE_REFUSALS = {
    "price_too_high": "the price is above the most it accepts to pay",
    "debt_limit_too_low": "the debt limit is below the least it accepts",
    "no_shared_payment_method": "it accepts none of our payment methods",
    "stale_seq": "it has answered a newer offer already",
}


def _reprice(args: argparse.Namespace) -> None:
    neighbor = resolve_fingerprint(args, args.neighbor, "--neighbor", neighbors_only=True)
    body = {"price_umel": args.price, "debt_limit_umel": args.debt_limit}
    answer = _api(
        args,
        "POST",
        f"/api/neighbors/{neighbor}/price",
        body,
        flags={"price_umel": "--price", "debt_limit_umel": "--debt-limit"},
    )
    if args.json:
        _json(answer)
    if not answer["accepted"]:
        reason = answer["reason"]
        raise Refused(
            f"not accepted by {neighbor[:8]}: {_PRICE_REFUSALS.get(reason, reason)} "
            f"({reason}); the previous price stays in force"
        )
    if not args.json:
        _show(
            f"accepted by {neighbor[:8]}: {args.price} uMEL a packet, "
            f"debt limit {args.debt_limit} uMEL"
        )


def _settle(args: argparse.Namespace) -> None:
    if args.amount == args.request == 0:
        raise UsageError(
            "settle: nothing to settle: give --amount (we pay) or --request (they pay)"
        )
    neighbor = resolve_fingerprint(args, args.neighbor, "--neighbor", neighbors_only=True)
    body = {
        "neighbor": neighbor,
        "method": args.method,
        "pay_umel": args.amount,
        "request_umel": args.request,
        "prepay": args.prepay,
    }
    flags = {"neighbor": "--neighbor", "method": "--method", "pay_umel": "--amount"}
    answer = _api(
        args,
        "POST",
        "/api/settlements",
        body,
        flags={**flags, "request_umel": "--request"},
        refused=(502,),
    )
    reason = f" ({answer['reason']})" if answer["reason"] else ""
    if args.json:
        _json(answer)
    else:
        _show(f"settlement {answer['id']}: {answer['state']}{reason}")
    if answer["state"] == "rejected":
        raise Refused(f"settlement {answer['id']} rejected by {neighbor[:8]}{reason}")


def _settlements(args: argparse.Namespace) -> None:
    answer = _api(args, "GET", "/api/settlements")
    if args.json:
        _json(answer)
        return
    for s in answer["settlements"]:
        reason = f" ({s['reason']})" if s["reason"] else ""
        _show(
            f"{s['id']}  {s['neighbor'][:8]}  {s['role']:<9}  {s['method']:<6}  "
            f"we pay {s['paid_out_umel']:>9}  they pay {s['paid_in_umel']:>9}  "
            f"{s['state']}{reason}"
        )


def _decide(args: argparse.Namespace) -> None:
    if not re.fullmatch(r"[0-9a-fA-F]+", args.id):
        raise UsageError(f"{args.decision}: a settlement id is hex (see `earendil-py settlements`)")
    answer = _api(args, "POST", f"/api/settlements/{args.id}/{args.decision}", {})
    if args.json:
        _json(answer)
    else:
        reason = f" ({answer['reason']})" if answer["reason"] else ""
        _show(f"settlement {answer['id']}: {answer['state']}{reason}")


def _chat(args: argparse.Namespace) -> None:
    neighbor = resolve_fingerprint(args, args.neighbor, "--neighbor", neighbors_only=True)
    path = f"/api/chat/{neighbor}"
    if args.send is not None:
        _api(args, "POST", path, {"text": args.send}, flags={"text": "--send"}, refused=(502,))
    answer = _api(args, "GET", path)
    if args.json:
        _json(answer)
        return
    for m in answer["messages"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["sent_at"]))
        arrow = "<-" if m["direction"] == "in" else "->"
        status = "" if m["status"] == "delivered" else f"  [{m['status']}: {m['reason']}]"
        _show(f"{when} {arrow} {m['text']}{status}")


def _unfreeze(args: argparse.Namespace) -> None:
    neighbor = resolve_fingerprint(args, args.neighbor, "--neighbor", neighbors_only=True)
    answer = _api(args, "POST", f"/api/neighbors/{neighbor}/unfreeze", {})
    _json(answer) if args.json else _show(f"unfrozen: traffic with {neighbor[:8]} resumes")


def _send(args: argparse.Namespace) -> None:
    destination = resolve_fingerprint(args, args.to, "--to", neighbors_only=False)
    data = args.data.encode()
    body = {
        "destination": destination,
        "dock": args.dock,
        "data_b64": base64.b64encode(data).decode(),
        "hops": args.hops,
    }
    flags = {"destination": "--to", "dock": "--dock", "hops": "--hops", "data_b64": "DATA"}
    answer = _api(args, "POST", "/api/send", body, flags=flags)
    if args.json:
        _json(answer)
        return
    hops = f" through {args.hops} peelers" if args.hops else ""
    _show(f"sent {len(data)} bytes to {destination[:8]} dock {args.dock}{hops}")


def _receive(args: argparse.Namespace) -> None:
    while True:
        body = {"dock": args.dock, "limit": args.max}
        answer = _api(
            args, "POST", "/api/receive", body, flags={"dock": "--dock", "limit": "--max"}
        )
        if args.json:
            if answer["datagrams"] or not args.follow:
                _json(answer)
        else:
            for datagram in answer["datagrams"]:
                _show(base64.b64decode(datagram["data_b64"]).decode("utf-8", "replace"))
        if not args.follow:
            if answer["waiting"] and not args.json:
                waiting = answer["waiting"]
                print(
                    f"earendil-py: {waiting} more datagram{'s' if waiting > 1 else ''} "
                    f"waiting on dock {args.dock}: run again, or use --follow",
                    file=sys.stderr,
                )
            return
        if not answer["waiting"]:
            time.sleep(0.2)


def _dashboard(args: argparse.Namespace) -> None:
    answer = _api(args, "POST", "/api/dashboard-link", {})
    if args.json:
        _json(answer)
        return
    minutes = round(answer["expires_in_secs"] / 60)
    print(answer["url"])
    print(f"(open it within {minutes} minutes; it works once)", file=sys.stderr)


HELLO_EVERY_SECS = 5.0  # serve-echo says HELLO again this often: a restarted node forgets it
APP_DATAGRAM_MAX = 65_535


def _app_socket(config: Config, dock: int | None) -> socket.socket:
    """A UDP socket connected to the node's app socket for `dock` (the first one if None).
    Raises ConfigError if the config has none such."""
    apps = [app for app in config.apps if dock is None or app.dock == dock]
    if not apps:
        which = "an app socket" if dock is None else f"an app socket for dock {dock}"
        raise ConfigError(f"{config.source}: apps: no {which} ([[apps]], see docs/apps.md)")
    host, port = parse_address(apps[0].listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    return sock


def _destination(args: argparse.Namespace) -> tuple[bytes, int]:
    """FINGERPRINT:DOCK, the fingerprint possibly a prefix the node resolves."""
    text, _, dock = args.destination.rpartition(":")
    if not text or not re.fullmatch(r"[0-9]{1,10}", dock) or int(dock) > DOCK_MAX:
        raise UsageError(f"FINGERPRINT:DOCK: expected e.g. 0a1b2c3d:7, got {args.destination!r}")
    fingerprint = resolve_fingerprint(args, text, "FINGERPRINT:DOCK", neighbors_only=False)
    return bytes.fromhex(fingerprint), int(dock)


def _connect(args: argparse.Namespace) -> None:
    config = _config(args)
    fingerprint, dock = _destination(args)
    head = DESTINATION.pack(SEND, fingerprint, dock)
    expected = DESTINATION.pack(FROM_DESTINATION, fingerprint, dock)
    stdin = sys.stdin.fileno()
    with _app_socket(config, args.via) as sock:
        sent = answered = 0
        pending = b""  # stdin read but not yet a whole line
        deadline = None  # once stdin is done: how long to wait for the last replies
        sources = [sock.fileno(), stdin]
        while deadline is None or (answered < sent and time.monotonic() < deadline):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(sources, [], [], timeout)
            if stdin in ready:
                # Raw reads: a buffered reader could hold lines that select cannot see.
                chunk = os.read(stdin, APP_DATAGRAM_MAX)
                *lines, pending = (pending + chunk).split(b"\n")
                if not chunk:
                    lines, pending = [pending] if pending else [], b""
                    sources.remove(stdin)
                    deadline = time.monotonic() + args.wait
                for line in lines:
                    sock.send(head + line.rstrip(b"\r"))
                    sent += 1
            if sock.fileno() in ready:
                data = sock.recv(APP_DATAGRAM_MAX)
                if data.startswith(expected):
                    answered += 1
                    _show(data[DESTINATION.size :].decode("utf-8", "replace"))


def _serve_echo(args: argparse.Namespace) -> None:
    with _app_socket(_config(args), args.dock) as sock:
        host, port = sock.getsockname()[:2]
        said_hello = -HELLO_EVERY_SECS
        while True:
            if time.monotonic() - said_hello >= HELLO_EVERY_SECS:
                sock.send(bytes([HELLO]))
                if said_hello < 0:
                    print(f"serving dock {args.dock} from {host}:{port}", flush=True)
                said_hello = time.monotonic()
            ready, _, _ = select.select([sock], [], [], HELLO_EVERY_SECS)
            if not ready:
                continue
            try:
                data = sock.recv(APP_DATAGRAM_MAX)
            except ConnectionRefusedError:  # the node is not up (yet): say HELLO again soon
                said_hello = time.monotonic() - HELLO_EVERY_SECS + 0.5
                continue
            if data[:1] != bytes([FROM_ANONYMOUS]) or len(data) < ANONYMOUS.size:
                continue  # nowhere to answer
            endpoint, text = data[1 : ANONYMOUS.size], data[ANONYMOUS.size :]
            sock.send(ANONYMOUS.pack(REPLY, endpoint) + text)
            _show(f"{endpoint.hex()[:8]}: {text.decode('utf-8', 'replace')}")


# --- the parser --------------------------------------------------------------------------


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`, with an error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earendil-py",
        description="A relay node for an Earendil-style onion-routing overlay, with per-link "
        "debt accounting between neighbours. `earendil-py COMMAND --help` tells more.",
        epilog=CONFIG_HELP + "\n" + EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--json", action="store_true", help="print the result as JSON (full fingerprints)"
    )
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"the node's config file (default: ${CONFIG_ENV}, else ./node.toml, "
        "~/.config/earendil_py/node.toml or /etc/earendil_py/node.toml)",
    )
    node = argparse.ArgumentParser(add_help=False, parents=[output, config])

    def command(
        name: str,
        help: str,
        description: str,
        run: Callable[[argparse.Namespace], None],
        parents: Sequence[argparse.ArgumentParser] = (node,),
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=description,
            parents=list(parents),
            epilog=EPILOG,
            formatter_class=_Formatter,
        )
        sub.set_defaults(run=run)
        return sub

    fingerprint_help = "a fingerprint (64 hex digits) or a unique prefix (4 or more)"

    keygen = command(
        "keygen",
        "create a new identity file",
        "Create a new identity (an Ed25519 identity key and an X25519 onion key) in a file "
        "of mode 0600 and print its fingerprint. Refuses to overwrite an existing file.",
        _keygen,
        [output],
    )
    keygen.add_argument(
        "--identity", type=Path, required=True, metavar="FILE", help="the file to create"
    )

    fingerprint = command(
        "fingerprint",
        "print an identity's fingerprint",
        "Print the fingerprint of an identity file: what neighbours put in their out_routes.",
        _fingerprint,
        [output],
    )
    fingerprint.add_argument(
        "--identity", type=Path, required=True, metavar="FILE", help="the identity file"
    )

    command(
        "check-config",
        "validate a config file and exit",
        "Check a config and the files it names as the daemon would at start, creating "
        "nothing; print what the node would use.",
        _check_config,
    )

    daemon = command(
        "daemon",
        "run a relay node",
        "Run a relay node: listen on every in_route, dial every out_route, relay, account "
        "and settle, and serve the control API and dashboard on control_listen. SIGINT and "
        "SIGTERM stop it cleanly (every neighbour is told); SIGHUP reloads the config file: "
        "routes added and removed and price changes apply at once, other changes at the "
        "next start (logged as reload_skipped).",
        _daemon,
        [config],
    )
    daemon.add_argument(
        "--new-ledger",
        action="store_true",
        help="start a new ledger for this identity (when its ledger is lost: every balance "
        "with every neighbour is forgotten); needed once, refused when not needed",
    )
    daemon.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides [logging] level and $EARENDIL_LOG_LEVEL",
    )
    daemon.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="overrides [logging] format and $EARENDIL_LOG_FORMAT (auto: console on a "
        "terminal, else JSON lines)",
    )

    command(
        "status",
        "show the node's routes, links, accounts and counters",
        "Show a running node: every configured route with its state (up, down, connecting, "
        "listening, never up), since when and its last failure; every link with its "
        "counters; every neighbour's prices and debts; drops by reason.",
        _status,
    )

    send = command(
        "send",
        "send a datagram through the overlay",
        "Send DATA (text) to a dock on a node, through onion routes of the node's relay graph.",
        _send,
    )
    send.add_argument(
        "--to", required=True, metavar="FINGERPRINT", help=f"the destination: {fingerprint_help}"
    )
    send.add_argument(
        "--dock",
        type=_bounded(0, DOCK_MAX),
        required=True,
        help="the destination dock (0 to 2^32-1)",
    )
    send.add_argument(
        "--hops",
        type=_bounded(1, MAX_HOPS),
        default=None,
        help=f"peelers on the route, the destination included (1 to {MAX_HOPS}; "
        "default: the node's)",
    )
    send.add_argument("data", metavar="DATA", help="the text to send")

    receive = command(
        "receive",
        "print the datagrams that arrived on a dock",
        "Print, one a line, the datagrams that arrived on a dock of this node (each is "
        "printed once), and say if more are waiting.",
        _receive,
    )
    receive.add_argument(
        "--dock", type=_bounded(0, DOCK_MAX), required=True, help="the dock (0 to 2^32-1)"
    )
    receive.add_argument(
        "--max",
        type=_bounded(1, 10_000),
        default=1000,
        help="print at most this many (default 1000)",
    )
    receive.add_argument(
        "--follow", action="store_true", help="keep printing datagrams as they arrive"
    )

    reprice = command(
        "reprice",
        "offer a neighbour new price terms",
        "Offer a neighbour a new price per packet and debt limit (a signed push_price). "
        "Exit status 3, with its reason, if the neighbour rejects them; the previous "
        "terms then stay in force.",
        _reprice,
    )
    reprice.add_argument(
        "--neighbor",
        required=True,
        metavar="FINGERPRINT",
        help=f"the neighbour: {fingerprint_help}",
    )
    reprice.add_argument(
        "--price", type=_bounded(0, UMEL_MAX), required=True, help="uMEL it pays us per packet"
    )
    reprice.add_argument(
        "--debt-limit", type=_bounded(0, UMEL_MAX), required=True, help="uMEL it may owe us"
    )

    unfreeze = command(
        "unfreeze",
        "resume traffic with a neighbour after a debt dispute",
        "Lift the freeze a disputed debt claim put on a neighbour, so traffic flows again.",
        _unfreeze,
    )
    unfreeze.add_argument(
        "--neighbor",
        required=True,
        metavar="FINGERPRINT",
        help=f"the neighbour: {fingerprint_help}",
    )

    settle = command(
        "settle",
        "propose a settlement to a neighbour",
        "Propose a settlement to a neighbour: we pay --amount of our debt to it, it pays "
        "--request of its debt to us, or both. A manual one waits for the neighbour's "
        "operator; exit status 3 if the neighbour rejects it.",
        _settle,
    )
    settle.add_argument(
        "--neighbor",
        required=True,
        metavar="FINGERPRINT",
        help=f"the neighbour: {fingerprint_help}",
    )
    settle.add_argument(
        "--amount",
        type=_bounded(0, UMEL_MAX),
        default=0,
        help="uMEL of our debt we pay (default 0)",
    )
    settle.add_argument(
        "--request",
        type=_bounded(0, UMEL_MAX),
        default=0,
        help="uMEL of its debt it pays (default 0)",
    )
    settle.add_argument(
        "--method",
        choices=["manual", "pow"],
        required=True,
        help="manual: the neighbour's operator accepts or rejects; pow: paid by proof of work",
    )
    settle.add_argument(
        "--prepay",
        action="store_true",
        help="pay even if --amount is more than we owe the neighbour now",
    )

    command(
        "settlements",
        "list settlements, both ways",
        "List the settlements with every neighbour, proposed by us or by them, with their state.",
        _settlements,
    )

    for decision, summary, description in (
        (
            "accept",
            "accept a neighbour's manual settlement",
            "Accept a manual settlement a neighbour proposed (its id is in "
            "`earendil-py settlements`).",
        ),
        (
            "reject",
            "reject a neighbour's manual settlement",
            "Reject a manual settlement a neighbour proposed (its id is in "
            "`earendil-py settlements`).",
        ),
        (
            "cancel",
            "cancel our pending settlement proposal",
            "Ask the neighbour to cancel a proposal of ours that is still pending (its id is "
            "in `earendil-py settlements`); it is canceled once the neighbour confirms, or "
            "completed if the neighbour had accepted it first.",
        ),
    ):
        decide = command(decision, summary, description, _decide)
        decide.add_argument("id", help="the settlement id (hex)")
        decide.set_defaults(decision=decision)

    chat = command(
        "chat",
        "show the chat with a neighbour, or send to it",
        "Show the chat with a neighbour (kept in the ledger), after sending --send TEXT if "
        "given. Exit status 3 if the neighbour does not take the message.",
        _chat,
    )
    chat.add_argument(
        "--neighbor",
        required=True,
        metavar="FINGERPRINT",
        help=f"the neighbour: {fingerprint_help}",
    )
    chat.add_argument("--send", metavar="TEXT", help="send this message first")

    connect = command(
        "connect",
        "send lines to a dock from an anonymous endpoint and print the replies",
        "Send each line of standard input as a datagram to FINGERPRINT:DOCK through one of "
        "this node's app sockets ([[apps]], docs/apps.md), from an anonymous endpoint with "
        "reply blocks, and print the replies as they come; stop --wait seconds after the "
        "input ends, or once every line was answered.",
        _connect,
        [config],
    )
    connect.add_argument(
        "destination", metavar="FINGERPRINT:DOCK", help=f"where to: {fingerprint_help}, a dock"
    )
    connect.add_argument(
        "--via",
        type=_bounded(0, DOCK_MAX),
        default=None,
        metavar="DOCK",
        help="use the app socket of this dock (default: the first [[apps]] entry)",
    )
    connect.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="SECS",
        help="how long to wait for replies once the input ends (default 5)",
    )

    serve_echo = command(
        "serve-echo",
        "answer every datagram to a dock with itself",
        "Serve a dock of this node through its app socket ([[apps]], docs/apps.md): answer "
        "every datagram that can be answered with the same bytes, through the sender's "
        "reply blocks, and print one line for each (the sender's endpoint id, the text). "
        "Runs until interrupted.",
        _serve_echo,
        [config],
    )
    serve_echo.add_argument(
        "--dock",
        type=_bounded(0, DOCK_MAX),
        required=True,
        help="a dock with an [[apps]] socket in the config",
    )

    command(
        "dashboard",
        "print a one-time link that opens the web dashboard",
        "Print a link that opens a running node's web dashboard in a browser: it works once, "
        "within minutes, and signs the browser in.",
        _dashboard,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, UsageError) as exc:
        return _error(exc, EXIT_USAGE)
    except (ControlApiError, LedgerCorrupt) as exc:
        return _error(exc, EXIT_FAILED)
    except Refused as exc:
        return _error(exc, EXIT_REFUSED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _error(exc: Exception, status: int) -> int:
    # One line, escaped: the message can quote a neighbour (a chat refusal) or a damaged file.
    print(f"earendil-py: error: {printable(str(exc))}", file=sys.stderr)
    return status
