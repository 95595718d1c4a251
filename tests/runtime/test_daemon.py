"""Real `earendil-py daemon` processes on loopback: shutdown, crash and re-dial, strangers."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earendil_py import __version__
from earendil_py.netgen import Edge, free_port, generate_network
from earendil_py.runtime.config import parse_address
from earendil_py.runtime.http import call_api
from earendil_py.runtime.node import MAX_PENDING_TCP_PER_SOURCE
from tests.helpers import (
    TCP_STRANGERS,
    DaemonProcess,
    closed_by_peer,
    daemon_api,
    move_route_to_ipv6,
    run_cli,
    silent_tcp_connections,
    summary_of,
    tcp_stranger,
    wait_until,
)

TIMING = """
[links]
keepalive_secs = 0.3
dead_after_secs = 1.5
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.4

[logging]
format = "json"
"""


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_sigkilled_neighbour_goes_down_then_comes_back(tmp_path: Path, protocol: str) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, protocol)], extra_toml=TIMING)
    dialer, listener = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    try:
        dialer.wait_for("link_up", 5, link=b.fingerprint[:8])
        listener.wait_for("link_up", 5, link=a.fingerprint[:8])
        mark = dialer.mark()
        listener.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        dialer.wait_for("link_down", 5, after=mark, link=b.fingerprint[:8])
        # Detected within the keepalive timeout (TCP sees the reset at once).
        assert time.monotonic() - killed_at < 1.5 + 1.0
        listener = DaemonProcess(b.config_path)
        dialer.wait_for("link_up", 5, after=mark, link=b.fingerprint[:8])
    finally:
        for daemon in (dialer, listener):
            daemon.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("stopped", ["dialer", "listener"])
def test_signal_shuts_down_cleanly_and_tells_the_neighbour(
    tmp_path: Path, sig: int, stopped: str
) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=TIMING)
    dialer, listener = DaemonProcess(a.config_path), DaemonProcess(b.config_path)
    daemon, neighbour = (dialer, listener) if stopped == "dialer" else (listener, dialer)
    try:
        dialer.wait_for("link_up", 5)
        listener.wait_for("link_up", 5)
        mark = neighbour.mark()
        started = time.monotonic()
        assert daemon.stop(sig) == 0, daemon.events
        assert time.monotonic() - started < 2.0
        assert not [e for e in daemon.events if e.get("level") == "error"]
        daemon.wait_for("shutdown", 0, signal=signal.Signals(sig).name)
        down = neighbour.wait_for("link_down", 1.0, after=mark)
        assert down["by_peer"] is True  # told by a CLOSE frame, not a timeout
    finally:
        for each in (dialer, listener):
            each.stop()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    a, _ = generate_network(tmp_path, 2, [Edge(1, 0, "udp")], extra_toml=TIMING)
    host, port = a.config.in_routes["from_node1_udp"].listen.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((host, int(port)))
        result = subprocess.run(
            [sys.executable, "-m", "earendil_py", "daemon", "--config", str(a.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr == (
        f"earendil-py: error: {a.config_path}: in_routes.from_node1_udp.listen: "
        f"cannot listen on {host}:{port}: Address already in use\n"
    )


def test_strangers_and_a_slow_loris_cannot_stop_the_daemon(tmp_path: Path) -> None:
    generated = generate_network(
        tmp_path, 3, [Edge(0, 1, "tcp"), Edge(2, 1, "tcp")], extra_toml=TIMING
    )
    move_route_to_ipv6(generated, 1, "from_node0_tcp")  # the honest neighbour comes from ::1
    a, b = generated[:2]
    knocked = parse_address(b.config.in_routes["from_node2_tcp"].listen)
    listener = DaemonProcess(b.config_path)
    held: list[socket.socket] = []
    try:
        listener.wait_for("node_started", 5)
        for attack in TCP_STRANGERS:
            for _ in range(3):
                assert tcp_stranger(knocked, attack) == b""
        held = silent_tcp_connections(knocked, MAX_PENDING_TCP_PER_SOURCE + 4)
        dialer = DaemonProcess(a.config_path)
        try:
            dialer.wait_for("link_up", 5)
            listener.wait_for("link_up", 5)
            assert all(closed_by_peer(sock) for sock in held)  # at the handshake deadline
            drops = daemon_api(b.config_path, "GET", "/api/status")["drops"]
        finally:
            dialer.stop()
        assert drops["tcp_pending_full"] == 4
        assert drops["bad_frame"] == 6
        assert drops["tcp_probe"] == 9 + MAX_PENDING_TCP_PER_SOURCE
        assert listener.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        assert listener.stop() == 0
    assert not [e for e in listener.events if e.get("level") == "error"]


def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    a, b = generate_network(tmp_path, 2, [Edge(0, 1, "tcp")], extra_toml=TIMING)
    address = parse_address(b.config.in_routes["from_node0_tcp"].listen)
    listener = DaemonProcess(b.config_path)
    held: list[socket.socket] = []
    try:
        listener.wait_for("node_started", 5)
        pid = listener.process.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, in_use + 3))
        # The daemon takes 3; the kernel queues the rest, which accept() cannot take.
        held = silent_tcp_connections(address, 10)
        listener.wait_for("accept_failed", 5, error="EMFILE")
        for sock in held:
            sock.close()
        # Once it closed the 3 at their handshake deadline, it takes the others from the
        # queue (closed by now), then the honest neighbour, under the same limit.
        dialer = DaemonProcess(a.config_path)
        try:
            listener.wait_for("link_up", 10)
            dialer.wait_for("link_up", 5)
        finally:
            dialer.stop()
        assert listener.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        assert listener.stop() == 0
    assert len([e for e in listener.events if e["event"] == "accept_failed"]) == 1


def test_soft_open_files_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=TIMING)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard limit above 256 (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon
    try:
        daemon = DaemonProcess(node.config_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        daemon.wait_for("node_started", 5)
        logged = daemon.wait_for("open_files_limit", 0)
        assert (logged["raised_from"], logged["soft"], logged["hard"]) == (256, hard, hard)
        assert resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        assert daemon.stop() == 0


# The daemon's ledger fails under it (as a full or failing disk would make it): the node
# stops with one log line and exit status 1.
FAILING_LEDGER = """
import sqlite3, sys
from earendil_py.cli import main
from earendil_py.runtime.neighbors import Neighbors

async def run(self, *, task_status):
    raise sqlite3.OperationalError("disk I/O error")

Neighbors.run = run
sys.exit(main(["daemon", "--config", sys.argv[1]]))
"""


def test_the_nodes_own_failure_is_one_log_line_and_exit_status_1(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=TIMING)
    result = subprocess.run(
        [sys.executable, "-c", FAILING_LEDGER, str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # nothing but log lines
    errors = [line for line in lines if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["node_failed"]
    assert errors[0]["error"] == "OperationalError: disk I/O error"
    assert errors[0]["ledger"] == str(node.config.db_path)
    assert "exception" not in errors[0]  # no traceback: not a bug


# --- SIGHUP reloads the config --------------------------------------------------------


def without(text: str, table: str) -> str:
    """A TOML text without `[table]` and its keys."""
    return re.sub(rf"^\[{re.escape(table)}\]\n(?:[^\[\n].*\n|\n)*", "", text, flags=re.MULTILINE)


def reload_with(daemon: DaemonProcess, text: str) -> int:
    """Write the daemon's config and send it SIGHUP; returns the log mark before."""
    mark = daemon.mark()
    daemon.config_path.write_text(text)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("reload", 10, after=mark)
    return mark


def test_sighup_applies_added_and_removed_routes_and_prices_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    edges = [Edge(0, 1, "udp"), Edge(0, 2, "tcp"), Edge(2, 0, "udp")]
    node0, node1, node2 = generate_network(tmp_path, 3, edges, extra_toml=TIMING)
    full = node0.config_path.read_text()
    # node0 starts with one route: its out_route to node1.
    node0.config_path.write_text(
        without(without(full, "out_routes.node2_tcp"), "in_routes.from_node2_udp")
    )
    daemons = [DaemonProcess(n.config_path) for n in (node0, node1, node2)]
    a, b, c = daemons
    try:
        a.wait_for("link_up", 10, route="node1_udp")
        # Added: an out_route, and an in_route that node2 has been dialling in vain.
        mark = reload_with(a, full)
        reloaded = a.wait_for("reloaded", 10, after=mark)
        assert sorted(reloaded["added"]) == ["in_routes.from_node2_udp", "out_routes.node2_tcp"]
        assert reloaded["removed"] == reloaded["repriced"] == []
        listening = a.wait_for("listening", 0, after=mark, route="from_node2_udp")
        assert listening["address"] == node0.config.in_routes["from_node2_udp"].listen
        a.wait_for("link_up", 10, after=mark, route="node2_tcp")
        a.wait_for("link_up", 10, after=mark, route="from_node2_udp")

        # A new price on one route: offered to that neighbour over the link that is up.
        priced = full + "\n[out_routes.node2_tcp.price]\ninbound_price_umel = 7\n"
        mark_c = c.mark()  # before the reload: its effect may be logged before it returns
        mark = reload_with(a, priced)
        assert a.wait_for("reloaded", 10, after=mark)["repriced"] == ["out_routes.node2_tcp"]
        offer = c.wait_for("price_offer_received", 10, after=mark_c, price_umel=7)
        assert offer["accepted"] is True
        wait_until(
            lambda: summary_of(node0.config_path, node2.fingerprint)["our_price_umel"] == 7, 10
        )

        # Removed: its link is closed and the neighbour told why; the other links stay.
        mark_b = b.mark()
        mark = reload_with(a, without(priced, "out_routes.node1_udp"))
        assert a.wait_for("reloaded", 10, after=mark)["removed"] == ["out_routes.node1_udp"]
        down = b.wait_for("link_down", 10, after=mark_b)
        assert (down["reason"], down["by_peer"]) == ("route_removed", True)
        routes = {
            r["name"]: r for r in daemon_api(node0.config_path, "GET", "/api/status")["routes"]
        }
        assert sorted(routes) == ["from_node2_udp", "node2_tcp"]
        assert routes["node2_tcp"]["state"] == routes["from_node2_udp"]["state"] == "up"
        # Nothing went down on node0 but the removed route's link, since the first start.
        assert [e["route"] for e in a.events if e["event"] == "link_down"] == ["node1_udp"]
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0
    assert not [e for d in daemons for e in d.events if e["level"] == "error"]


def test_sighup_with_a_bad_config_keeps_the_running_one(tmp_path: Path) -> None:
    node0, node1 = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=TIMING)
    good = node0.config_path.read_text()
    taken = node1.config.in_routes["from_node0_udp"].listen
    daemons = [DaemonProcess(n.config_path) for n in (node0, node1)]
    a, _ = daemons
    try:
        a.wait_for("link_up", 10)
        bad = {
            "invalid": good + "\n[settlement]\nauto_settle_percent = 0\n",
            "taken": good + f'\n[in_routes.twin]\nprotocol = "udp"\nlisten = "{taken}"\n'
            'secret = "0123456789abcdef"\n',
        }
        errors = {}
        for name, text in bad.items():
            mark = reload_with(a, text)
            errors[name] = a.wait_for("reload_failed", 10, after=mark)["error"]
        assert errors["invalid"] == (
            f"{node0.config_path}: settlement.auto_settle_percent: expected int >= 1"
        )
        assert errors["taken"] == (
            f"{node0.config_path}: in_routes.twin.listen: cannot listen on {taken}: "
            "Address already in use"
        )
        # What cannot change while running is named, and the rest still applies.
        control = "127.0.0.1:{}".format(free_port("tcp"))
        mark = reload_with(
            a, re.sub(r'control_listen = ".*"', f'control_listen = "{control}"', good)
        )
        assert a.wait_for("reload_skipped", 10, after=mark)["field"] == "control_listen"
        a.wait_for("reloaded", 10, after=mark)
        # The control API still answers where it was, with the link still up.
        status = call_api(node0.config, "GET", "/api/status")
        assert [link["route"] for link in status["links"]] == ["node1_udp"]
        assert not [e for e in a.events if e["event"] == "link_down"]
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0


def test_start_up_lines_name_every_address_and_debug_shows_dials_and_handshakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edges = [Edge(1, 0, "udp"), Edge(2, 0, "tcp")]
    node0, node1, _ = generate_network(tmp_path, 3, edges, extra_toml=TIMING)
    listener = DaemonProcess(node0.config_path)
    monkeypatch.setenv("EARENDIL_LOG_LEVEL", "debug")  # over the config's [logging]
    dialer = DaemonProcess(node1.config_path)
    try:
        started = listener.wait_for("node_started", 10)
        assert (started["version"], started["fingerprint"]) == (__version__, node0.fingerprint)
        listening = {e["route"]: e for e in listener.events if e["event"] == "listening"}
        assert {name: (e["protocol"], e["address"]) for name, e in listening.items()} == {
            name: (route.protocol, route.listen) for name, route in node0.config.in_routes.items()
        }
        control = listener.wait_for("control_api", 0)
        host, port = node0.config.control_listen
        assert control["url"] == f"http://{host}:{port}/"
        assert control["dashboard"].startswith(f"http://{host}:{port}/login?code=")
        assert not [e for e in listener.events if e["level"] == "debug"]

        dialer.wait_for("link_up", 10)
        for event in ("dial", "handshake_started", "handshake_keys_agreed", "gossip_pushed"):
            dialer.wait_for(event, 5)
        sent = dialer.wait_for("rpc_call_sent", 5, method="push_price")
        assert sent["level"] == "debug" and sent["neighbor"] == node0.fingerprint[:8]
        dialer.wait_for("rpc_call_answered", 5, method="push_price", outcome="ResultReceived")
        dialer.wait_for("rpc_request_answered", 5, method="push_price")
    finally:
        for daemon in (dialer, listener):
            assert daemon.stop() == 0
    # Nothing is logged per packet: the debug lines are about links, calls and gossip.
    assert len(dialer.events) < 100


def test_a_bad_log_level_in_the_environment_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=TIMING)
    monkeypatch.setenv("EARENDIL_LOG_LEVEL", "loud")
    result = run_cli("daemon", "--config", str(node.config_path))
    assert result.returncode == 2
    assert result.stderr == (
        "earendil-py: error: EARENDIL_LOG_LEVEL: expected one of debug, info, warning, error; "
        "got 'loud'\n"
    )
    # The flag wins: the environment is not read (this config's own error comes first).
    missing = tmp_path / "missing.toml"
    result = run_cli("daemon", "--config", str(missing), "--log-level", "info")
    assert result.returncode == 2
    assert result.stderr.startswith(f"earendil-py: error: {missing}: ")
