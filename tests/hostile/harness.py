"""Daemons under attack: a target, its honest neighbour, and the checks every attack ends with.

`Pair` runs two `earendil-py daemon` processes on loopback: the target T, which also listens
on one UDP and one TCP in_route whose cookies the attackers get (`Pair.routes`), and an
honest neighbour H that dials T over UDP. After an attack `Pair.check_unharmed` asserts what
the node promises a user: T is running and answers its control API, H's datagrams reach T
and T's reach H, and both sides' books moved by exactly that traffic and agree to the
packet and to the µMEL. When the daemons are stopped their ledgers must still verify.

A module shares one `Pair` (starting daemons is what takes time); a test that finds a
daemon dead gets a fresh network, so one crash fails one test, not the ones after it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from earendil_py.core.ledger import LedgerCorrupt
from earendil_py.netgen import Edge, GeneratedNode, free_port, generate_network
from earendil_py.runtime.http import ControlApiError, call_api
from earendil_py.runtime.store import LedgerStore
from tests.helpers import DaemonProcess, wait_until
from tests.hostile.peer import HostilePeer, Route

DOCK = 7
START_SECS = 20.0  # a daemon up, linked and priced, on a loaded machine
ARRIVE_SECS = 10.0

DEAD_AFTER_SECS = 5.0  # also the longest a handshake may take (TCP may cut it shorter)
PUSH_SECS = 2.0  # push_debt and checkpoint intervals: the books agree within one or two
TIMING = f"""
[links]
keepalive_secs = 0.5
dead_after_secs = {DEAD_AFTER_SECS}
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.5

[accounting]
push_debt_secs = {PUSH_SECS}
checkpoint_secs = {PUSH_SECS}
"""
JSON_LOGS = """
[logging]
format = "json"
"""


# What the child runs before the CLI, as a usual shell leaves a process: umask 022 (a file
# the node does not restrict comes out world-readable) and, if given, a soft limit on open
# files as `ulimit -n` sets it. (Not a preexec_fn: unsafe in a process with threads.)
_BOOT = """
import os, resource, sys
os.umask(0o022)
if nofile := int(sys.argv[1]):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
from earendil_py.cli import main
sys.exit(main(sys.argv[2:]))
"""


class Daemon(DaemonProcess):
    """`DaemonProcess` with extra command-line arguments, started as from a usual shell (see
    _BOOT), optionally under a soft limit of `nofile` open files."""

    def __init__(self, config_path: Path, *args: str, nofile: int | None = None) -> None:
        self.config_path = config_path
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        command = ["daemon", "--config", str(config_path), *args]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(nofile or 0), *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def lines(self, after: int = 0) -> list[str]:
        """Log lines as written (console format), from index `after`."""
        with self._cond:
            return [e.get("line", "") for e in self.events[after:]]

    def errors(self, after: int = 0) -> list[dict[str, Any]]:
        """Logged errors (JSON format), and anything on stderr that is not a log line."""
        with self._cond:
            return [
                e
                for e in self.events[after:]
                if e.get("level") in ("error", "critical") or e.get("event") == "unparsed"
            ]


def route_toml(name: str, protocol: str, port: int, secret: str) -> str:
    return (
        f'[in_routes.{name}]\nprotocol = "{protocol}"\nlisten = "127.0.0.1:{port}"\n'
        f'secret = "{secret}"\n'
    )


class Pair:
    """The target daemon and its honest neighbour; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        extra_toml: str = "",
        logs: str = JSON_LOGS,
        nofile: int | None = None,
        late_relay: bool = False,
    ) -> None:
        self.root = root
        self.late_relay = late_relay
        self.extra_toml = extra_toml
        self.logs = logs
        self.nofile = nofile
        self._generation = itertools.count()
        self._payloads = itertools.count()
        self.t: Daemon | None = None
        self.h: Daemon | None = None
        self._new_network()

    def _new_network(self) -> None:
        directory = self.root / f"net{next(self._generation)}"
        # With `late_relay`, a third node that dials H, for a test to start when it likes.
        edges = [Edge(1, 0, "udp"), *([Edge(2, 1, "udp")] if self.late_relay else [])]
        with contextlib.ExitStack() as held:  # our ports stay ours while netgen picks its own
            ports = {p: free_port(p, held) for p in ("udp", "tcp")}
            self.secrets = {p: secrets.token_hex(16) for p in ports}
            routes = "".join(
                route_toml(f"hostile_{p}", p, port, self.secrets[p]) for p, port in ports.items()
            )
            target, honest, *late = generate_network(
                directory,
                len(edges) + 1,
                edges,
                extra_toml=TIMING + self.extra_toml,
                node_toml={0: routes + self.logs, 1: JSON_LOGS, 2: JSON_LOGS},
            )
        self.target, self.honest = target, honest
        self.late = late[0] if late else None
        self.target_fp = bytes.fromhex(target.fingerprint)
        self.honest_fp = bytes.fromhex(honest.fingerprint)
        self.routes = {
            p: Route(p, ("127.0.0.1", port), self.secrets[p]) for p, port in ports.items()
        }

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Pair:
        self.t = Daemon(self.target.config_path, nofile=self.nofile)
        self.h = Daemon(self.honest.config_path)
        wait_until(lambda: self.ready(self.target, self.honest_fp), START_SECS)
        wait_until(lambda: self.ready(self.honest, self.target_fp), START_SECS)
        return self

    @staticmethod
    def ready(node: GeneratedNode, neighbor: bytes) -> bool:
        status = api(node, "GET", "/api/status")
        accounts = [a for a in status["accounts"] if a["neighbor"] == neighbor.hex()]
        return bool(accounts and accounts[0]["priced"] and status["graph"]["adjacencies"])

    def ensure_running(self) -> None:
        """A fresh network if an earlier test left a daemon dead or dying."""
        running = all(d is not None and d.process.poll() is None for d in (self.t, self.h))
        if running and api_or_none(self.target, "GET", "/api/status") is not None:
            return
        self.stop()
        self._new_network()
        self.start()

    def stop(self, sig: int = signal.SIGTERM) -> list[int]:
        codes = [d.stop(sig) for d in (self.t, self.h) if d is not None]
        self.t = self.h = None
        return codes

    @property
    def target_daemon(self) -> Daemon:
        assert self.t is not None
        return self.t

    @property
    def honest_daemon(self) -> Daemon:
        assert self.h is not None
        return self.h

    def peer(self, protocol: str, **kw: Any) -> HostilePeer:
        """A hostile neighbour on T's in_route for `protocol`, not yet connected."""
        return HostilePeer(self.routes[protocol], self.target_fp, **kw)

    def mark(self) -> int:
        return self.target_daemon.mark()

    @contextlib.contextmanager
    def attacking(self) -> Iterator[int]:
        """Around an attack: yields T's log mark. A failure during the attack (a port that
        refuses us, a call never answered) first checks whether T is still up, which names
        the failure when it is not."""
        mark = self.mark()
        try:
            yield mark
        except (OSError, AssertionError):
            self.assert_up()
            raise

    # --- the checks ----------------------------------------------------------------------

    def assert_up(self) -> None:
        """T runs and answers its control API."""
        t = self.target_daemon
        status = api_or_none(self.target, "GET", "/api/status")
        if status is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                t.process.wait(2)  # dying: let it finish, to say how it ended
        code = t.process.poll()
        assert code is None, f"the target exited with {code}: {t.events[-8:]}"
        assert status is not None, f"the target's control API does not answer: {t.events[-8:]}"
        assert status["fingerprint"] == self.target.fingerprint

    def books(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(T's account with H, H's account with T), from their control APIs."""
        return (
            _account(self.target, self.honest_fp),
            _account(self.honest, self.target_fp),
        )

    def books_of(self, neighbor: bytes) -> dict[str, Any]:
        """T's account with `neighbor`."""
        return _account(self.target, neighbor)

    def status(self) -> dict[str, Any]:
        """T's /api/status."""
        status: dict[str, Any] = api(self.target, "GET", "/api/status")
        return status

    def graph(self) -> dict[str, int]:
        """T's graph: how many identities and adjacencies."""
        graph: dict[str, int] = self.status()["graph"]
        return graph

    def exchange(self, count: int = 3) -> None:
        """`count` datagrams from H to T and from T to H, each to arrive within ARRIVE_SECS."""
        for source, destination in ((self.honest, self.target), (self.target, self.honest)):
            payloads = [f"honest {next(self._payloads)}".encode() for _ in range(count)]
            for payload in payloads:
                body = {
                    "destination": destination.fingerprint,
                    "dock": DOCK,
                    "data_b64": base64.b64encode(payload).decode(),
                    "hops": 1,
                }
                api(source, "POST", "/api/send", body)
            got: list[bytes] = []
            deadline = time.monotonic() + ARRIVE_SECS
            while len(got) < len(payloads):
                assert time.monotonic() < deadline, (
                    f"{destination.name} got {len(got)} of {len(payloads)} honest datagrams"
                )
                got += received(destination)
                time.sleep(0.02)
            assert sorted(got) == sorted(payloads)

    def check_unharmed(self, count: int = 3) -> None:
        """T is up, H's traffic flows both ways, and both books moved by exactly it."""
        self.assert_up()
        (t_before, h_before) = self.books()
        self.exchange(count)
        self.assert_up()
        (t_after, h_after) = self.books()
        for account in (t_after, h_after):
            assert account["priced"] and not account["frozen"], account
        assert t_after["packets_in"] - t_before["packets_in"] == count
        assert t_after["packets_out"] - t_before["packets_out"] == count
        assert h_after["packets_in"] - h_before["packets_in"] == count
        assert h_after["packets_out"] - h_before["packets_out"] == count
        price_t, price_h = t_after["our_price_umel"], h_after["our_price_umel"]
        assert t_after["debt_in_umel"] - t_before["debt_in_umel"] == count * price_t
        assert h_after["debt_in_umel"] - h_before["debt_in_umel"] == count * price_h

        # The two books agree to the µMEL, both ways, once the last claims are in: a debtor
        # adopts its creditor's claim, and packets in flight when it was made are charged by
        # the next, a push interval later.
        def agree() -> bool:
            t, h = self.books()
            return (t["debt_in_umel"], t["debt_out_umel"]) == (
                h["debt_out_umel"],
                h["debt_in_umel"],
            )

        wait_until(agree, 3 * PUSH_SECS)

    def assert_no_errors(self, after: int) -> None:
        """T logged no error since `after`: the attack was handled as the input it is, not
        caught as a bug."""
        assert self.target_daemon.errors(after) == []

    def ledger_kinds(self, node: GeneratedNode, neighbor: bytes) -> list[str]:
        """The kinds of `node`'s ledger entries about `neighbor`, oldest first, read while
        the daemon runs (WAL lets a reader in)."""
        uri = f"file:{node.config.db_path}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            rows = conn.execute(
                "SELECT kind FROM entries WHERE neighbor = ? ORDER BY seq", (neighbor,)
            ).fetchall()
        conn.close()
        return [kind for (kind,) in rows]

    def check_ledgers(self) -> None:
        """Stop both daemons, then open both ledgers: every chain verifies, and neither
        records a dispute with the other."""
        codes = self.stop()
        assert codes == [0, 0], codes
        for node, neighbor in ((self.target, self.honest_fp), (self.honest, self.target_fp)):
            try:
                with LedgerStore.open(node.config.db_path) as store:
                    kinds = {e.kind for e in store.entries(neighbor)}
            except LedgerCorrupt as exc:
                raise AssertionError(f"{node.name}'s ledger: {exc}") from None
            assert "dispute" not in kinds, kinds


def received(node: GeneratedNode) -> list[bytes]:
    """What arrived on DOCK at `node` since the last call."""
    answer = api(node, "POST", "/api/receive", {"dock": DOCK})
    return [base64.b64decode(d["data_b64"]) for d in answer["datagrams"]]


def _account(node: GeneratedNode, neighbor: bytes) -> dict[str, Any]:
    status = api(node, "GET", "/api/status")
    (found,) = [a for a in status["accounts"] if a["neighbor"] == neighbor.hex()]
    return dict(found)


def api(node: GeneratedNode, method: str, path: str, body: object = None) -> Any:
    """`node`'s control API, as its config was when generated: a test may have changed the
    file since."""
    return call_api(node.config, method, path, body)


def api_or_none(node: GeneratedNode, method: str, path: str, body: object = None) -> Any:
    """The control API's answer, or None when it cannot be reached."""
    try:
        return api(node, method, path, body)
    except ControlApiError:
        return None
