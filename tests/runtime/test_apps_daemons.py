"""Applications on real daemons over loopback: `earendil-py connect` on node A talks through
three peelers to an echo application on node E's dock, E answers through reply blocks, and
neither E's node nor its application ever sees A's fingerprint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from earendil_py.netgen import free_port, generate_network
from earendil_py.runtime.apps import ANONYMOUS, FROM_ANONYMOUS, HELLO, REPLY
from tests.helpers import FAST, LINE, DaemonProcess, daemon_api, wait_until

ECHO_DOCK = 7
CLIENT_DOCK = 1
HOPS = 4  # three relays and the destination, each way: every other node of the line
EARENDIL = [sys.executable, "-m", "earendil_py"]
# Every event a node logs, debug ones included: what E logs is checked for A's fingerprint.
VERBOSE = FAST.replace('format = "json"', 'format = "json"\nlevel = "debug"')


def apps_toml(port: int, dock: int) -> str:
    return f'[[apps]]\nlisten = "127.0.0.1:{port}"\ndock = {dock}\nhops = {HOPS}\n'


class EchoApp:
    """An application on E's echo dock that answers every anonymous datagram and keeps every
    datagram its node delivered to it, byte for byte."""

    def __init__(self, node_address: tuple[str, int]) -> None:
        self.delivered: list[bytes] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.connect(node_address)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._sock.send(bytes([HELLO]))  # until the first datagram: the node may be late
            try:
                data = self._sock.recv(65_535)
            except (TimeoutError, ConnectionRefusedError):
                continue
            self.delivered.append(data)
            if data[0] == FROM_ANONYMOUS:
                endpoint = data[1 : ANONYMOUS.size]
                self._sock.send(ANONYMOUS.pack(REPLY, endpoint) + data[ANONYMOUS.size :])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def status(config: Path) -> dict[str, Any]:
    result: dict[str, Any] = daemon_api(config, "GET", "/api/status")
    return result


def converged(configs: list[Path]) -> bool:
    for config in configs:
        answer = status(config)
        if answer["graph"]["identities"] != len(configs) or not answer["accounts"]:
            return False
        if not all(account["priced"] for account in answer["accounts"]):
            return False
    return True


def link_to(config: Path, neighbor: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(link summary, account summary) of the node at `config` with `neighbor` (hex)."""
    answer = status(config)
    (link,) = [link for link in answer["links"] if link["neighbor"] == neighbor]
    (account,) = [a for a in answer["accounts"] if a["neighbor"] == neighbor]
    return link, account


def connect(config: Path, destination: str, lines: list[str]) -> list[str]:
    """`earendil-py connect` with `lines` on its stdin; the lines it printed."""
    result = subprocess.run(
        [*EARENDIL, "connect", "--config", str(config), destination, "--wait", "20"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_request_response_through_reply_blocks_never_shows_the_asker(tmp_path: Path) -> None:
    a_port, e_port = free_port("udp"), free_port("udp")
    generated = generate_network(
        tmp_path,
        5,
        LINE,
        extra_toml=VERBOSE,
        node_toml={0: apps_toml(a_port, CLIENT_DOCK), 4: apps_toml(e_port, ECHO_DOCK)},
    )
    configs = [node.config_path for node in generated]
    a, e = generated[0], generated[4]
    daemons = [DaemonProcess(config) for config in configs]
    echo = None
    try:
        wait_until(lambda: converged(configs), 30)
        echo = EchoApp(("127.0.0.1", e_port))
        # A burst, faster than the reply blocks that come with it: answers wait for more.
        lines = [f"request {i}" for i in range(20)]
        assert sorted(connect(a.config_path, f"{e.fingerprint}:{ECHO_DOCK}", lines)) == sorted(
            lines
        )
        echo.stop()

        # The same through `serve-echo`: what an operator would run.
        server = subprocess.Popen(
            [*EARENDIL, "serve-echo", "--config", str(e.config_path), "--dock", str(ECHO_DOCK)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            ready = server.stdout.readline()  # "serving dock 7 from 127.0.0.1:PORT"
            assert ready.startswith(f"serving dock {ECHO_DOCK} from "), server.stderr
            address = ready.split()[-1]
            wait_until(
                lambda: (
                    status(e.config_path)["apps"]["sockets"][str(ECHO_DOCK)]["receiver"] == address
                ),
                10,
            )
            more = ["héllo", "world"]
            assert sorted(connect(a.config_path, f"{e.fingerprint}:{ECHO_DOCK}", more)) == more
        finally:
            server.send_signal(signal.SIGINT)
            echoed, errors = server.communicate(timeout=10)
        assert sorted(line.split(": ", 1)[1] for line in echoed.splitlines()) == more, errors
        replies = len(lines) + len(more)

        # Reply traffic, counted and charged on every link it crossed. E originates nothing
        # but replies, so its link to D carries exactly those.
        d = generated[3]
        e_link, e_account = link_to(e.config_path, d.fingerprint)
        d_link, d_account = link_to(d.config_path, e.fingerprint)
        assert e_link["packets_sent"] == d_link["packets_received"] == replies
        assert e_account["debt_out_umel"] == replies * e_account["their_price_umel"] > 0
        assert d_account["debt_in_umel"] == replies * d_account["our_price_umel"] > 0
        for sender, receiver in zip(generated[:0:-1], generated[-2::-1], strict=True):
            out, out_account = link_to(sender.config_path, receiver.fingerprint)
            assert out["packets_sent"] >= replies
            assert out_account["debt_out_umel"] >= replies * out_account["their_price_umel"]
        a_link, _ = link_to(a.config_path, generated[1].fingerprint)
        assert a_link["packets_received"] >= replies
        e_status = status(e.config_path)
        assert e_status["relay"]["originated"] == replies
        shown = json.dumps(e_status)  # what E's operator sees: A is never named
        assert e.fingerprint in shown and a.fingerprint not in shown
    finally:
        if echo is not None:
            echo.stop()
        for daemon in daemons:
            daemon.stop()

    # What E's node logged and its application was given: anonymous endpoints, never A.
    secret = {a.fingerprint, a.fingerprint[:8]}
    logged = [json.dumps(event) for event in daemons[4].events]
    assert any(event.get("level") == "debug" for event in daemons[4].events)
    assert logged and not [line for line in logged if any(s in line for s in secret)]
    assert echo.delivered and {data[0] for data in echo.delivered} == {FROM_ANONYMOUS}
    raw = bytes.fromhex(a.fingerprint)
    assert not [data for data in echo.delivered if raw in data]
    assert not [line for line in echoed.splitlines() if any(s in line for s in secret)]


def test_connect_and_serve_echo_need_an_app_socket_and_say_so(tmp_path: Path) -> None:
    (node,) = generate_network(tmp_path, 1, [], extra_toml=FAST)
    destination = f"{'ab' * 32}:{ECHO_DOCK}"
    for argv in (
        ["connect", "--config", str(node.config_path), destination],
        ["serve-echo", "--config", str(node.config_path), "--dock", str(ECHO_DOCK)],
        ["connect", "--config", str(node.config_path), "not-a-destination"],
    ):
        result = subprocess.run(
            [*EARENDIL, *argv], input="", capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("earendil-py: error:")
