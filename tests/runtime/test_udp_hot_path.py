"""The UDP relay loop's fast paths count exactly what the general path counts."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest

from earendil_py.core.link import DATA_HEADER
from earendil_py.netgen import Edge, generate_network
from earendil_py.runtime.keyfile import load_identity_file
from earendil_py.runtime.node import Node, UdpTransport
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
    """Refuses every message that starts with b"x", as a full buffer would."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def send(self, message: bytes) -> int:
        return self.sendto(message, None)

    def sendto(self, message: bytes, address: object) -> int:
        if message.startswith(b"x"):
            raise BlockingIOError
        self.sent.append((message, address))
        return len(message)


@pytest.mark.parametrize("address", [None, ("127.0.0.1", 9)])
def test_send_many_counts_each_failed_send_and_keeps_going(
    address: tuple[str, int] | None,
) -> None:
    sock = FlakySocket()
    transport = UdpTransport(sock, address)  # type: ignore[arg-type]
    messages = [b"a", b"x1", b"b", b"x2", b"c"]
    assert transport.send_many(messages) == 3
    assert sock.sent == [(b"a", address), (b"b", address), (b"c", address)]
    assert [transport.send(m) for m in messages] == [True, False, True, False, True]


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
