"""The UDP relay loop's fast paths count exactly what the general path counts."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from earendil_py.core.link import DATA_HEADER, Link
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime import udp
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import Node
from earendil_py.runtime.udp import UdpTransport
from tests.helpers import running

FAST = """
[links]
keepalive_secs = 0.2
dead_after_secs = 1.0
handshake_retry_secs = 0.1
redial_min_secs = 0.1
redial_max_secs = 0.5
"""


class FlakySocket:
    """Refuses every message that starts with b"x", as a full buffer would; a segmented send
    fails whole if any of its messages does, or with `refuse_segments` as a path that will
    not segment."""

    def __init__(self, refuse_segments: int | None = None) -> None:
        self.sent: list[tuple[bytes, object]] = []
        self.calls: list[int] = []  # messages per call
        self.refuse_segments = refuse_segments

    def send(self, message: bytes) -> int:
        return self.sendto(message, None)

    def sendto(self, message: bytes, address: object) -> int:
        if message.startswith(b"x"):
            raise BlockingIOError
        self.calls.append(1)
        self.sent.append((message, address))
        return len(message)

    def sendmsg(self, buffers: list[bytes], ancdata: object, flags: int, *address: object) -> int:
        if self.refuse_segments is not None:
            raise OSError(self.refuse_segments, os.strerror(self.refuse_segments))
        assert ancdata == [(socket.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", len(buffers[0])))]
        if any(b.startswith(b"x") for b in buffers):
            raise BlockingIOError
        self.calls.append(len(buffers))
        self.sent += [(b, address[0] if address else None) for b in buffers]
        return sum(map(len, buffers))


ADDRESSES = [None, ("127.0.0.1", 9)]


@pytest.mark.parametrize("address", ADDRESSES)
def test_send_many_counts_each_failed_send_and_keeps_going(
    address: tuple[str, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "UDP_OFFLOAD", False)
    sock = FlakySocket()
    transport = UdpTransport(sock, address)  # type: ignore[arg-type]
    messages = [b"a", b"x1", b"b", b"x2", b"c"]
    assert transport.send_many(messages) == 3
    assert sock.sent == [(b"a", address), (b"b", address), (b"c", address)]
    assert [transport.send(m) for m in messages] == [True, False, True, False, True]


@pytest.mark.parametrize("address", ADDRESSES)
def test_runs_of_equal_size_go_out_segmented_and_a_failed_run_is_lost_whole(
    address: tuple[str, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "gso_available", lambda: True)
    sock = FlakySocket()
    transport = UdpTransport(sock, address)  # type: ignore[arg-type]
    assert transport.segments
    size = 1412
    per_call = udp.GSO_MAX_BYTES // size
    big = [bytes([i]) * size for i in range(per_call + 3)]
    lost = [b"y" * 10, b"x" * 10, b"z" * 10]  # one refused message loses its run
    messages = [*big, b"s" * 5, *lost, *big[:2]]
    assert transport.send_many(messages) == len(big) + 1 + 2
    assert sock.calls == [per_call, 3, 1, 2]
    assert [m for m, _ in sock.sent] == [*big, b"s" * 5, *big[:2]]
    assert {a for _, a in sock.sent} == {address}
    assert transport.segments  # a full buffer is loss, not a reason to stop segmenting


def test_a_path_that_refuses_segments_falls_back_to_one_send_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "gso_available", lambda: True)
    sock = FlakySocket(refuse_segments=errno.EIO)
    transport = UdpTransport(sock, ("127.0.0.1", 9))  # type: ignore[arg-type]
    messages = [b"m" * 100] * 5
    with capture_logs() as logs:
        assert transport.send_many(messages) == 5
        assert transport.send_many(messages) == 5
    assert sock.calls == [1] * 10
    assert not transport.segments
    assert [e["event"] for e in logs] == ["udp_gso_refused"]  # said once, not per batch


@pytest.mark.parametrize("offload", [True, False])
def test_segmented_sends_are_read_back_as_the_datagrams_sent(
    offload: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if offload and not udp.gso_available():
        pytest.skip("the kernel has no UDP_SEGMENT")
    monkeypatch.setattr(udp, "UDP_OFFLOAD", offload)
    with udp.new_udp_socket(socket.AF_INET) as sink, udp.new_udp_socket(socket.AF_INET) as out:
        sink.bind(("127.0.0.1", 0))
        out.bind(("127.0.0.1", 0))
        read = udp.datagram_reader(sink)
        transport = UdpTransport(out, sink.getsockname())
        assert transport.segments == offload
        messages = [os.urandom(1412) for _ in range(100)] + [os.urandom(300) for _ in range(3)]
        assert transport.send_many(messages) == len(messages)
        transport.send(b"last")
        sink.settimeout(2)
        got: list[bytes] = []
        reads = 0
        while len(got) <= len(messages):
            datagrams, address = read()
            assert address == out.getsockname()
            got += datagrams
            reads += 1
        assert got == [*messages, b"last"]
        if offload:  # runs came in fewer reads than datagrams (how few is the kernel's call)
            assert reads < len(got)
        else:
            assert reads == len(got)


@pytest.mark.anyio
async def test_data_from_another_address_or_for_no_session_is_dropped_and_counted(
    tmp_path: Path,
) -> None:
    generated = generate_network(tmp_path, 2, [Edge(0, 1, "udp")], extra_toml=FAST)
    nodes = [Node(g.config, load_identity_file(g.config.identity_file)) for g in generated]
    async with running(nodes):
        with anyio.fail_after(3):
            await nodes[0].wait_priced({nodes[1].fingerprint})
            await nodes[1].wait_priced({nodes[0].fingerprint})
        runner = nodes[0].links[nodes[1].fingerprint][0]
        peer = nodes[1].links[nodes[0].fingerprint][0]
        target = nodes[1].listening["from_node0_udp"]
        genuine = runner.link.encrypt_onion(b"\x01" * 32, b"p" * 100)
        unknown = DATA_HEADER.pack(4, (peer.link.local_index + 1) % 2**32, 0) + bytes(40)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.sendto(genuine, target)  # a session's frame, from the wrong address
            spoofer.sendto(unknown, target)
        await anyio.sleep(0.2)
        drops = nodes[1].drop_counts()
        assert drops["wrong_address"] == 1
        assert drops["unknown_session"] == 1
        assert peer.packets_received == 0
        runner.send(genuine)  # the same frame from the right address still gets in
        with anyio.fail_after(2):
            while peer.packets_received == 0:
                await anyio.sleep(0.01)
        assert nodes[1].drop_counts()["no_route"] == 1


@pytest.mark.anyio
async def test_a_link_failing_on_its_share_of_a_batch_leaves_the_others_share(
    tmp_path: Path,
) -> None:
    generated = generate_network(
        tmp_path, 3, [Edge(0, 1, "udp"), Edge(2, 1, "udp")], extra_toml=FAST
    )
    a, hub, c = [Node(g.config, load_identity_file(g.config.identity_file)) for g in generated]
    async with running([a, hub, c]):
        with anyio.fail_after(3):
            for node, other in ((a, hub), (hub, a), (c, hub), (hub, c)):
                await node.wait_priced({other.fingerprint})
        broken, healthy = hub.links[a.fingerprint][0], hub.links[c.fingerprint][0]

        class BuggyLink(Link):  # a Link has no __dict__: its class is swapped instead
            __slots__ = ()

            def receive_datagrams(self, *args: object, **kwargs: object) -> list[bytes]:
                raise AssertionError("a bug")

        broken.link.__class__ = BuggyLink
        # Both sent before the hub's loop runs again: they reach it in one batch.
        for sender in (a, c):
            runner = sender.links[hub.fingerprint][0]
            runner.send(runner.link.encrypt_onion(b"\x01" * 32, b"p" * 100))
        with anyio.fail_after(2):
            while healthy.packets_received == 0 or not broken.closed.is_set():
                await anyio.sleep(0.01)
        assert hub.drop_counts()["no_route"] == 1  # c's frame went on through the relay loop
        assert broken.statistics().drops["internal_error"] == 1
        assert hub.links[c.fingerprint] == [healthy]


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    return receiver, sender


@pytest.mark.anyio
async def test_a_readable_socket_calls_back_until_told_to_stop() -> None:
    receiver, sender = _socket_pair()
    got: list[bytes] = []
    with receiver, sender:

        def read() -> bool:
            while True:
                try:
                    got.append(receiver.recv(100))
                except BlockingIOError:
                    return got[-1] != b"stop"

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(udp.call_when_readable, receiver, read)
                for message in (b"one", b"two", b"stop"):
                    await anyio.sleep(0)
                    sender.send(message)
        assert got == [b"one", b"two", b"stop"]


@pytest.mark.anyio
async def test_what_the_callback_raises_is_raised_and_cancelling_lets_the_socket_go() -> None:
    receiver, sender = _socket_pair()
    with receiver, sender:

        def bug() -> bool:
            raise KeyError("a bug")

        sender.send(b"x")
        with anyio.fail_after(5), pytest.raises(KeyError):
            await udp.call_when_readable(receiver, bug)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(udp.call_when_readable, receiver, lambda: True)
                await anyio.sleep(0)
                tg.cancel_scope.cancel()
        # Unregistered either way: the same socket can be waited on again.
        with anyio.fail_after(5):
            await anyio.wait_readable(receiver)


def test_reading_runs_counts_failed_reads_in_the_batch_and_stops_if_the_socket_is_gone() -> None:
    results: list[object] = [
        ([b"a", b"b"], ("127.0.0.1", 7000, 0, 0)),  # an IPv6-style address: host and port kept
        OSError(errno.ENOBUFS, "no buffer space"),
        ([b"c"], ("127.0.0.1", 7001)),
        BlockingIOError(),
    ]

    def read() -> tuple[list[bytes], tuple[object, ...]]:
        result = results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    drops: Counter[str] = Counter()
    runs = udp.read_runs(read, 64, drops, "udp_error")
    assert runs == [(("127.0.0.1", 7000), [b"a", b"b"]), (("127.0.0.1", 7001), [b"c"])]
    assert drops == {"udp_error": 1}

    # Failing reads end the batch at its limit like datagrams do: no endless loop.
    def failing() -> tuple[list[bytes], tuple[object, ...]]:
        raise OSError(errno.ENOBUFS, "no buffer space")

    assert udp.read_runs(failing, 5, drops, "udp_error") == []
    assert drops["udp_error"] == 6

    def gone() -> tuple[list[bytes], tuple[object, ...]]:
        raise OSError(errno.EBADF, "bad file descriptor")

    with pytest.raises(OSError):
        udp.read_runs(gone, 5, drops, "udp_error")
