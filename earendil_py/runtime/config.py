"""The node's TOML configuration, decoded into typed structs.

Every problem becomes one `ConfigError` line naming the file, the field path and what is
wrong, e.g. ``node.toml: in_routes.alpha.price.inbound_price_umel: expected int >= 0``.
Relative paths in the file are resolved against the file's own directory, so a config works
the same whatever directory the daemon is started from.

Bounds: money and counts fit the wire's unsigned integers (`core.pricing.Uint`), so every
price and limit we offer can be sent and accepted; timers are finite, at most a day, and
above a floor that keeps a typo such as `keepalive_secs = 1e-9` from becoming a busy loop.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from earendil_py.core.errors import ConfigError
from earendil_py.core.identity import Uint, parse_fingerprint
from earendil_py.core.packet import MAX_HOPS
from earendil_py.core.settlement import MAX_EXPIRY_SECS
from earendil_py.runtime.keyfile import read_file

CONFIG_MAX_BYTES = 1 << 20
DAY_SECS = 86_400.0
# Timers, finite and at most a day (NaN fails both comparisons, so it is refused too). A
# periodic timer runs at most ten times a second; a retry or back-off may start faster.
Seconds = Annotated[float, msgspec.Meta(ge=0.1, le=DAY_SECS)]
RetrySeconds = Annotated[float, msgspec.Meta(ge=0.01, le=DAY_SECS)]

Protocol = Literal["udp", "tcp"]
# A cookie is the only secret guarding a route against probing; short ones are guessable.
Secret = Annotated[str, msgspec.Meta(min_length=16)]

PaymentMethod = Literal["manual", "pow"]


class PriceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-route price terms. All amounts are integer µMEL."""

    inbound_price_umel: Uint = 1
    inbound_debt_limit_umel: Uint = 1_000_000
    outbound_max_price_umel: Uint = 10
    outbound_min_debt_limit_umel: Uint = 10_000


class InRoute(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    protocol: Protocol
    listen: str
    secret: Secret
    price: PriceConfig = PriceConfig()


class OutRoute(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    protocol: Protocol
    connect: str
    fingerprint: str
    secret: Secret
    price: PriceConfig = PriceConfig()


class AppConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A local dock socket for applications (docs/apps.md)."""

    listen: str
    dock: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    # Peelers per route, both ways. Two at least: a reply block for a one-peeler route
    # would name this node as its first peeler.
    hops: Annotated[int, msgspec.Meta(ge=2, le=MAX_HOPS)] = 3
    # Any process that can send to the socket speaks for this node: loopback unless asked.
    allow_remote: bool = False


class SettlementConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    methods: list[PaymentMethod] = msgspec.field(default_factory=lambda: ["pow", "manual"])
    # Start an automatic settlement when our debt reaches this share of the neighbour's limit.
    auto_settle_percent: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    min_settlement_umel: Uint = 1_000
    # The signed proposal carries its expiry, which neighbours refuse beyond MAX_EXPIRY_SECS.
    manual_expiry_secs: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPIRY_SECS)] = 3600


class LinksConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Link timing in seconds (time, unlike money, may be fractional)."""

    keepalive_secs: Seconds = 5.0
    dead_after_secs: Seconds = 20.0  # and above twice keepalive_secs
    handshake_retry_secs: RetrySeconds = 0.5
    redial_min_secs: RetrySeconds = 0.5
    redial_max_secs: RetrySeconds = 30.0  # and at least redial_min_secs


class AccountingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Debt accounting timing and tolerances (docs/accounting.md)."""

    push_debt_secs: Seconds = 60.0
    checkpoint_secs: Seconds = 5.0  # and at most push_debt_secs
    claim_tolerance_packets: Uint = 256
    keep_claims: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    # Received claims are committed in groups: the first waits this long for others. Below
    # the 0.5 s after which a neighbour's RPC client sends the claim again.
    claim_commit_delay_secs: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.25


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class _RawConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """First pass: routes stay untyped so their errors can name the route."""

    identity_file: str
    db_path: str
    control_listen: str = "127.0.0.1:8964"
    control_allow_remote: bool = False
    in_routes: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    out_routes: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    apps: list[dict[str, Any]] = msgspec.field(default_factory=list)
    settlement: SettlementConfig = SettlementConfig()
    links: LinksConfig = LinksConfig()
    accounting: AccountingConfig = AccountingConfig()
    logging: LoggingConfig = LoggingConfig()


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    source: Path
    identity_file: Path
    db_path: Path
    control_listen: tuple[str, int]
    in_routes: dict[str, InRoute]
    out_routes: dict[str, OutRoute]
    settlement: SettlementConfig
    links: LinksConfig
    accounting: AccountingConfig
    logging: LoggingConfig
    apps: list[AppConfig] = msgspec.field(default_factory=list)
    control_allow_remote: bool = False


T = TypeVar("T")

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_FIELD = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<field>[^`]+)`$")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _convert(value: Any, kind: type[T], file: Path, prefix: str) -> T:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        assert match is not None
        what, path = match["what"], match["path"] or ""
        if field := _FIELD.match(what):
            path += "." + field["field"]
            what = "unknown field" if "unknown" in what else "missing required field"
        what = what.replace("`", "")
        what = what[:1].lower() + what[1:]
        raise ConfigError(
            f"{file}: {(prefix + path).lstrip('.') or '(top level)'}: {what}"
        ) from None


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (IPv6 as ``[::1]:port``). Raises ValueError with a reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unbalanced brackets in {text!r}")
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError for a bad literal
    elif ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, as [::1]:port; got {text!r}")
    elif not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
        raise ValueError(f"bad host {host!r}")
    # ASCII digits only: str.isdigit and int() also take other scripts' digits ("٨٠").
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def _address(text: str, file: Path, path: str, *, listen: bool) -> tuple[str, int]:
    try:
        host, port = parse_address(text)
        if listen:
            ipaddress.ip_address(host)  # listeners bind to literal addresses only
        if port == 0 and not listen:
            raise ValueError("port 0 cannot be dialled")
    except ValueError as exc:
        raise ConfigError(f"{file}: {path}: bad address: {exc}") from None
    return host, port


def _overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    if a[1] != b[1] or a[1] == 0:
        return False
    wildcard = {"0.0.0.0", "::"}  # noqa: S104 (comparing, not binding)
    return a[0] == b[0] or a[0] in wildcard or b[0] in wildcard


def load_config(file: Path, *, private: bool = False) -> Config:
    """Read and validate a config file. Raises ConfigError with one line for the operator.

    With `private` (the daemon and check-config), the file is also refused if group or others
    may access it: it holds the route secrets. The identity-dependent check is
    `check_own_routes`, once the identity is known.
    """
    data = read_file(file, "config", max_bytes=CONFIG_MAX_BYTES, private=private)
    try:
        raw_toml = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    raw = _convert(raw_toml, _RawConfig, file, "")
    base = file.parent

    listeners: list[tuple[str, Protocol, tuple[str, int]]] = []
    control = _address(raw.control_listen, file, "control_listen", listen=True)
    # The control API moves money; other hosts reach it only when the operator says so.
    if not ipaddress.ip_address(control[0]).is_loopback and not raw.control_allow_remote:
        raise ConfigError(
            f"{file}: control_listen: {control[0]} is not a loopback address; the control API "
            "can move money: keep it on 127.0.0.1 or [::1], or set control_allow_remote = true"
        )
    listeners.append(("control_listen", "tcp", control))

    in_routes: dict[str, InRoute] = {}
    for name, table in raw.in_routes.items():
        path = f"in_routes.{name}"
        _check_route_name(name, file, path)
        route = _convert(table, InRoute, file, path)
        address = _address(route.listen, file, f"{path}.listen", listen=True)
        for other_path, other_protocol, other in listeners:
            if other_protocol == route.protocol and _overlaps(address, other):
                raise ConfigError(
                    f"{file}: {path}.listen: duplicate {route.protocol} port {address[1]} "
                    f"(also used by {other_path})"
                )
        listeners.append((path, route.protocol, address))
        in_routes[name] = route

    out_routes: dict[str, OutRoute] = {}
    dialled: dict[bytes, str] = {}
    for name, table in raw.out_routes.items():
        path = f"out_routes.{name}"
        _check_route_name(name, file, path)
        out_route = _convert(table, OutRoute, file, path)
        _address(out_route.connect, file, f"{path}.connect", listen=False)
        try:
            fingerprint = parse_fingerprint(out_route.fingerprint)
        except ValueError as exc:
            raise ConfigError(f"{file}: {path}.fingerprint: bad fingerprint: {exc}") from None
        # One link per neighbour: a second route to it would race the first for the same
        # neighbour state (account, price, settlements).
        if fingerprint in dialled:
            raise ConfigError(
                f"{file}: {path}.fingerprint: the same neighbour as {dialled[fingerprint]}"
            )
        dialled[fingerprint] = path
        out_routes[name] = out_route

    apps: list[AppConfig] = []
    docks: dict[int, str] = {}
    for index, table in enumerate(raw.apps):
        path = f"apps[{index}]"
        app = _convert(table, AppConfig, file, path)
        address = _address(app.listen, file, f"{path}.listen", listen=True)
        if not (app.allow_remote or ipaddress.ip_address(address[0]).is_loopback):
            raise ConfigError(
                f"{file}: {path}.listen: {address[0]} is not a loopback address; whoever "
                "reaches an app socket sends as this node: keep it on 127.0.0.1 or [::1], or "
                "set allow_remote = true"
            )
        for other_path, other_protocol, other in listeners:
            if other_protocol == "udp" and _overlaps(address, other):
                raise ConfigError(
                    f"{file}: {path}.listen: duplicate udp port {address[1]} "
                    f"(also used by {other_path})"
                )
        if app.dock in docks:
            raise ConfigError(f"{file}: {path}.dock: dock {app.dock} is also {docks[app.dock]}'s")
        docks[app.dock] = path
        listeners.append((path, "udp", address))
        apps.append(app)

    if raw.links.dead_after_secs <= 2 * raw.links.keepalive_secs:
        raise ConfigError(
            f"{file}: links.dead_after_secs: must exceed twice links.keepalive_secs "
            "(a neighbour that dialled us is PINGed after that long without a word)"
        )
    if raw.links.redial_max_secs < raw.links.redial_min_secs:
        raise ConfigError(f"{file}: links.redial_max_secs: must be >= links.redial_min_secs")
    if raw.accounting.checkpoint_secs > raw.accounting.push_debt_secs:
        raise ConfigError(
            f"{file}: accounting.checkpoint_secs: must not exceed accounting.push_debt_secs"
        )
    if len(set(raw.settlement.methods)) != len(raw.settlement.methods):
        raise ConfigError(f"{file}: settlement.methods: duplicate payment method")

    return Config(
        source=file,
        identity_file=base / raw.identity_file,
        db_path=base / raw.db_path,
        control_listen=control,
        in_routes=in_routes,
        out_routes=out_routes,
        settlement=raw.settlement,
        links=raw.links,
        accounting=raw.accounting,
        logging=raw.logging,
        apps=apps,
        control_allow_remote=raw.control_allow_remote,
    )


def check_own_routes(config: Config, fingerprint: bytes) -> None:
    """Raise ConfigError if an out_route dials `fingerprint`, this node's own identity (a
    link to ourselves would be refused at every handshake, forever)."""
    for name, route in config.out_routes.items():
        if parse_fingerprint(route.fingerprint) == fingerprint:
            raise ConfigError(
                f"{config.source}: out_routes.{name}.fingerprint: is this node's own "
                f"fingerprint (identity_file {config.identity_file})"
            )


def _check_route_name(name: str, file: Path, path: str) -> None:
    if not _ROUTE_NAME.match(name):
        raise ConfigError(f"{file}: {path}: route names are 1-64 letters, digits, '.', '_' or '-'")


# What a running node cannot change (SIGHUP keeps the running value): its identity, its
# ledger and its control address, and timing and policy its services read once at start.
RESTART_FIELDS = (
    "identity_file",
    "db_path",
    "control_listen",
    "settlement",
    "links",
    "accounting",
    "logging",
    "apps",
)

RouteKey = tuple[str, str]  # ("in" or "out", route name)


def route_keys(config: Config) -> Iterator[RouteKey]:
    yield from (("in", name) for name in config.in_routes)
    yield from (("out", name) for name in config.out_routes)


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    """How a new config differs from the running one, as a reload applies it. A route whose
    protocol, address, secret or fingerprint changed is both removed and added."""

    added: list[RouteKey] = field(default_factory=list)
    removed: list[RouteKey] = field(default_factory=list)
    repriced: list[RouteKey] = field(default_factory=list)  # only its `price` changed
    skipped: list[str] = field(default_factory=list)  # changed fields in RESTART_FIELDS


def diff_configs(old: Config, new: Config) -> ConfigChanges:
    changes = ConfigChanges()
    for name in RESTART_FIELDS:
        changes.skipped.extend(_changed(getattr(old, name), getattr(new, name), name))
    for kind in ("in", "out"):
        before, after = getattr(old, f"{kind}_routes"), getattr(new, f"{kind}_routes")
        changes.removed.extend((kind, name) for name in before if name not in after)
        for name, route in after.items():
            if name not in before:
                changes.added.append((kind, name))
            elif msgspec.structs.replace(route, price=before[name].price) != before[name]:
                changes.removed.append((kind, name))
                changes.added.append((kind, name))
            elif route.price != before[name].price:
                changes.repriced.append((kind, name))
    return changes


def _changed(old: object, new: object, path: str) -> list[str]:
    """The dotted paths of the fields that differ between two values of a config field."""
    if old == new:
        return []
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        return [
            changed
            for name in old.__struct_fields__
            for changed in _changed(getattr(old, name), getattr(new, name), f"{path}.{name}")
        ]
    return [path]
