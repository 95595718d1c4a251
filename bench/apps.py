"""Datagrams from a local app socket against the control API, and the sending node's CPU per
datagram against its crypto floor, all measured in one run.

Three daemons on loopback in a line, S - R - D, each an `earendil-py daemon` process. S and D
have an app socket (`[[apps]]`, hops = 2), so every datagram is built by S for the route
[R, D]: delivered at a destination two peelers away. This process is the applications: a
sender on S's app socket, and a sink on D's that counts what D delivers (it said HELLO).

(a) App socket: the sender keeps WINDOW datagrams in flight (sent, not yet seen at the sink)
    of PAYLOAD bytes each, as SEND datagrams to S's app socket. Closed loop, so that what is
    timed is S at saturation rather than the kernel dropping what S cannot take.
(b) Control API: THREADS threads each POST /api/send on a keep-alive connection with the
    node's token, as fast as the answers come: the best a script can do through the API.
    The same payload, destination, dock and hops.

Both are timed after a warm-up, by datagrams the sink received per second; rounds alternate
(a) and (b) and the best of each is kept. The target is (a) / (b) >= 10.

(c) S's CPU per originated datagram in (a): the CPU time S's process used (all its threads,
    from /proc/PID/stat, so Linux only) over the datagrams it originated (its
    `relay.originated`), against the crypto floor of one such datagram, timed alone in this
    process in the same run, on S's CPU just before and just after each (a) (the network
    idle), in this thread's CPU time as S's is: for each of the two hops one fixed-base and
    one variable-base X25519, the BLAKE3 key derivation, the ChaCha20 keystream
    (ChaCha20-Poly1305 over 1382 bytes) and the MAC (BLAKE3 over 320 bytes, an AES-GCM tag
    over 998), then the link frame's ChaCha20-Poly1305 seal with the link's AEAD object, as
    the node keeps one per session; the ephemeral keys are drawn before the clock starts,
    since randomness is not crypto work. Each round's (c) is divided by
    the lower of its two floors; the figure is the median of the rounds' ratios, since (c)
    and its floor move together with the machine's load (another process on S's CPU slows
    both) and only a pair measured together compares them. Target (c) / floor <= 1.3. The
    same CPU figure for (b) is printed beside it: what the API costs S per datagram.

Why (a) / (b) is bounded well under 10 here: both (a) and (b) are bound by S's one CPU, so
their ratio cannot exceed S's CPU per datagram through the API over that through the app
socket, and the latter cannot go below the crypto floor (four X25519s for two hops, ~120 us
on this VM). With the API at ~550 us a datagram the bound is ~4.5 even if the app path cost
nothing but its crypto. Only more CPUs for S's builds (runtime/peeling.py's threads: the
X25519s let go of the GIL) raise (a) without raising (b), which is single-threaded.

S runs alone on one CPU and everything else (R, D and this process) on the other, as
bench/relay.py runs its relay, so that S's CPU time is its own work, not its share of a core
it contends for. With one CPU, S builds on its event loop's thread alone (runtime/peeling.py
starts no second thread). Left free on this 2-core VM, S did worse on both counts, 224-242
against 163-186 us a datagram and 4,300 against 4,800-5,500 datagrams/s, in rounds
alternating with pinned ones: the GIL changes hands around every X25519, and the second
thread's parallelism does not pay for that while the other CPU is busy with R and D.

The first WARMUP_SECS of each round are not timed: S's first datagrams to D carry reply
blocks (core/endpoints.py: until D is estimated to hold enough), which cost another onion's
X25519s each. Debt limits are raised past anything a run reaches, so accounting counts and
charges every packet but never refuses one. The machine's load average is printed at the
start and the end: figures taken while other work runs are worth little.

Run: .venv/bin/python bench/apps.py [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from summary import result

from earendil_py.core.packet import KDF_CONTEXT, PACKET_SIZE
from earendil_py.netgen import Edge, debt_limits_toml, free_port, generate_network
from earendil_py.runtime.apps import DESTINATION, HELLO, SEND
from earendil_py.runtime.config import load_config
from earendil_py.runtime.http import ControlApiError, call_api, read_token_file, token_path

TARGET_RATE = 10.0
TARGET_CPU = 1.3
HOPS = 2
DOCK = 7
PAYLOAD = 100
WINDOW = 512
THREADS = 4
WARMUP_SECS = 2.0
DEBT_LIMIT_UMEL = 10**15
BENCH_TOML = """
[links]
keepalive_secs = 1.0
dead_after_secs = 10.0
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 1.0

[logging]
level = "warning"
format = "json"
"""


def _apps_toml(port: int, dock: int) -> str:
    return f'[[apps]]\nlisten = "127.0.0.1:{port}"\ndock = {dock}\nhops = {HOPS}\n'


DAEMON = [sys.executable, "-m", "earendil_py", "daemon", "--config"]


def _pinned(cpus: list[int]) -> list[str]:
    """A command prefix that runs the command on `cpus` only (taskset execs it: same pid)."""
    return ["taskset", "-c", ",".join(map(str, cpus))]


def _cpu_secs(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Network:
    """S - R - D as daemons, with S's and D's app sockets."""

    def __init__(self, root: Path, cpus: list[int]) -> None:
        self.s_port, self.d_port = free_port("udp"), free_port("udp")
        generated = generate_network(
            root,
            3,
            [Edge(0, 1, "udp"), Edge(1, 2, "udp")],
            extra_toml=BENCH_TOML,
            node_toml={0: _apps_toml(self.s_port, 1), 2: _apps_toml(self.d_port, DOCK)},
        )
        for node in generated:
            text = node.config_path.read_text() + debt_limits_toml(node.config, DEBT_LIMIT_UMEL)
            node.config_path.write_text(text)
        self.configs = [load_config(node.config_path) for node in generated]
        self.d_fingerprint = bytes.fromhex(generated[2].fingerprint)
        # taskset pins each daemon before it starts, so S never starts a second peel thread.
        self.processes = [
            subprocess.Popen(
                [*_pinned(cpus[:1] if i == 0 else cpus[1:]), *DAEMON, str(node.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, node in enumerate(generated)
        ]
        self.s_pid = self.processes[0].pid

    def api(self, index: int, method: str, path: str, body: object | None = None) -> Any:
        return call_api(self.configs[index], method, path, body)

    def wait_converged(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                statuses = [self.api(i, "GET", "/api/status") for i in range(3)]
            except ControlApiError:
                time.sleep(0.2)
                continue
            if all(
                s["graph"]["identities"] == 3
                and s["accounts"]
                and all(a["priced"] for a in s["accounts"])
                for s in statuses
            ):
                return
            time.sleep(0.2)
        raise SystemExit("the three daemons did not link up and agree on prices in time")

    def originated(self) -> int:
        return int(self.api(0, "GET", "/api/status")["relay"]["originated"])

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Sink:
    """The application on D's app socket: counts every datagram D delivers to it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.received = 0
        self.sock.send(bytes([HELLO]))

    def drain(self, wait: float) -> None:
        if select.select([self.sock], [], [], wait)[0]:
            while True:
                try:
                    self.sock.recv(65_535)
                except BlockingIOError:
                    return
                self.received += 1


class Round:
    """One timed stretch: datagrams/s at the sink, and S's CPU per originated datagram."""

    def __init__(self, network: Network, sink: Sink) -> None:
        self.network, self.sink = network, sink
        self.start = time.monotonic()
        self.cpu = _cpu_secs(network.s_pid)
        self.originated = network.originated()
        self.received = sink.received

    def finish(self) -> tuple[float, float]:
        elapsed = time.monotonic() - self.start
        cpu = _cpu_secs(self.network.s_pid) - self.cpu
        originated = self.network.originated() - self.originated
        rate = (self.sink.received - self.received) / elapsed
        return rate, cpu / max(originated, 1) * 1e6


def app_round(network: Network, sink: Sink, seconds: float) -> tuple[float, float]:
    """(a): datagrams/s and S's µs of CPU per datagram, through S's app socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sender.connect(("127.0.0.1", network.s_port))
        sender.setblocking(False)
        datagram = DESTINATION.pack(SEND, network.d_fingerprint, DOCK) + os.urandom(PAYLOAD)
        sent = sink.received
        began = time.monotonic()
        timed: Round | None = None
        progress = (sink.received, began)
        while True:
            now = time.monotonic()
            if timed is None and now - began >= WARMUP_SECS:
                timed = Round(network, sink)
            elif timed is not None and now - timed.start >= seconds:
                return timed.finish()
            while sent - sink.received < WINDOW:
                try:
                    sender.send(datagram)
                except BlockingIOError:
                    break
                sent += 1
            sink.drain(0.01)
            if sink.received != progress[0]:
                progress = (sink.received, now)
            elif now - progress[1] > 0.5:  # some were lost on the way: do not stall
                sent, progress = sink.received, (sink.received, now)


def api_round(network: Network, sink: Sink, seconds: float) -> tuple[float, float]:
    """(b): the same through POST /api/send, THREADS keep-alive connections at once."""
    config = network.configs[0]
    host, port = config.control_listen
    token = read_token_file(token_path(config))
    body = json.dumps(
        {
            "destination": network.d_fingerprint.hex(),
            "dock": DOCK,
            "data_b64": base64.b64encode(os.urandom(PAYLOAD)).decode(),
            "hops": HOPS,
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    stop = threading.Event()
    failures: list[str] = []

    def post_forever() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            while not stop.is_set():
                connection.request("POST", "/api/send", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}")
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=post_forever) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        began = time.monotonic()
        while time.monotonic() - began < WARMUP_SECS:
            sink.drain(0.01)
        timed = Round(network, sink)
        while time.monotonic() - timed.start < seconds:
            sink.drain(0.01)
        result = timed.finish()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        raise SystemExit(f"the control API refused a send: {failures[0]}")
    return result


def floor_us(rounds: int) -> float:
    """The crypto of building one 2-hop onion and sealing its link frame, µs of this
    thread's CPU, best of `rounds`: see the module docstring."""
    rng = os.urandom
    onion_public = crypto_scalarmult_base(rng(32))
    zero_stream, routing, covered = bytes(1382), rng(320), rng(998)
    frame, header = rng(1 + 32 + PACKET_SIZE), rng(13)
    nonce = bytes(12)
    count = 500
    # Drawn before the clock starts: randomness is not part of the floor.
    ephemerals = [rng(32) for _ in range(count * HOPS)]
    # The link's AEAD is made once per session, not per frame (core/link.py).
    link = ChaCha20Poly1305(rng(32))

    def build_all() -> None:
        draws = iter(ephemerals)
        for _ in range(count):
            for _hop in range(HOPS):
                ephemeral = next(draws)
                crypto_scalarmult_base(ephemeral)
                shared = crypto_scalarmult(ephemeral, onion_public)
                keys = blake3.blake3(shared, derive_key_context=KDF_CONTEXT).digest(96)
                ChaCha20Poly1305(keys[48:80]).encrypt(nonce, zero_stream, None)
                blake3.blake3(routing, key=keys[:32]).digest(16)
                AESGCM(keys[32:48]).encrypt(nonce, b"", covered)
            link.encrypt(nonce, frame, header)

    return min(_cpu_timed(build_all) for _ in range(rounds)) / count * 1e6


def _cpu_timed(run: Callable[[], object]) -> float:
    """Seconds of this thread's CPU that `run()` took: what S's CPU time is compared with,
    undisturbed by the time other processes on the same CPU take."""
    start = time.thread_time()
    run()
    return time.thread_time() - start


def _floor_on(cpu: int, rest: list[int]) -> float:
    """`floor_us` timed on `cpu` (S's), this process then back on `rest`."""
    os.sched_setaffinity(0, [cpu])
    try:
        return floor_us(3)
    finally:
        os.sched_setaffinity(0, rest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("bench/apps.py reads process CPU times from /proc (Linux)")

    load_before = _load()
    # S alone on the first CPU, the rest of the network and this process on the others.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        raise SystemExit(
            "bench/apps.py needs two CPUs and taskset: S on one, the rest on the other"
        )
    with tempfile.TemporaryDirectory(prefix="bench-apps-") as root:
        network = Network(Path(root), cpus)
        os.sched_setaffinity(0, cpus[1:])
        try:
            network.wait_converged(60)
            sink = Sink(network.d_port)
            app: list[tuple[float, float]] = []
            api: list[tuple[float, float]] = []
            floors: list[float] = []
            for _ in range(args.rounds):
                before = _floor_on(cpus[0], cpus[1:])
                app.append(app_round(network, sink, args.seconds))
                floors.append(min(before, _floor_on(cpus[0], cpus[1:])))
                api.append(api_round(network, sink, args.seconds))
        finally:
            network.stop()

    app_rate, app_cpu = max(r for r, _ in app), min(c for _, c in app)
    api_rate, api_cpu = max(r for r, _ in api), min(c for _, c in api)
    ratios = [cpu / floor for (_, cpu), floor in zip(app, floors, strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"python {sys.version.split()[0]}, {args.rounds} rounds of {args.seconds:g} s "
        f"(after {WARMUP_SECS:g} s warm-up), datagrams of {PAYLOAD} bytes, {HOPS} peelers "
        f"(R, D), best of each but (c) / floor"
    )
    print(f"load average before: {load_before}; S on CPU {cpus[0]}, the rest on {cpus[1:]}")
    print(f"(a) app socket       {app_rate:9,.0f} datagrams/s delivered  (window {WINDOW})")
    print(f"(b) control API      {api_rate:9,.0f} datagrams/s delivered  ({THREADS} connections)")
    verdict = "ok" if app_rate / api_rate >= TARGET_RATE else "under target"
    print(
        f"(a) / (b)            {app_rate / api_rate:9.2f}   (target >= {TARGET_RATE:g}: {verdict})"
    )
    met = app_rate / api_rate >= TARGET_RATE
    result(
        "app socket / control API, datagrams/s",
        app_rate / api_rate,
        "x",
        f">= {TARGET_RATE:g}",
        met,
    )
    print(f"(c) S's CPU, app     {app_cpu:9.1f} us/datagram")
    print(f"    S's CPU, API     {api_cpu:9.1f} us/datagram")
    print(
        f"    crypto floor     {min(floors):9.1f} us/datagram  (4 X25519, keystreams, MACs, "
        "link seal; CPU time)"
    )
    verdict = "ok" if ratio <= TARGET_CPU else "over target"
    print(
        f"(c) / floor          {ratio:9.2f}   (median of the rounds; "
        f"target <= {TARGET_CPU}: {verdict})"
    )
    result("sender's CPU / crypto floor", ratio, "x", f"<= {TARGET_CPU}", ratio <= TARGET_CPU)
    for i, ((rate_a, cpu_a), (rate_b, cpu_b)) in enumerate(zip(app, api, strict=True)):
        print(
            f"  round {i + 1}: (a) {rate_a:,.0f}/s {cpu_a:.0f} us, (b) {rate_b:,.0f}/s "
            f"{cpu_b:.0f} us, floor {floors[i]:.0f} us, (c) / floor {ratios[i]:.2f}"
        )
    print(f"load average after:  {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
