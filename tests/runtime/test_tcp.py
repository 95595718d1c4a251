"""runtime/tcp.py: TCP sockets for links, on loopback."""

from __future__ import annotations

import socket
import struct

import anyio
import pytest

from earendil_py.core.link import StreamDecoder
from earendil_py.runtime.tcp import TCP_QUEUE_BYTES, TcpTransport, accept_tcp, connect_tcp

pytestmark = pytest.mark.anyio

MESSAGE = 1_000


def numbered(number: int) -> bytes:
    return struct.pack("!I", number) + bytes(MESSAGE - 4)


async def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.setblocking(False)
        port = listening.getsockname()[1]
        async with anyio.create_task_group() as tg:
            accepted: list[socket.socket] = []

            async def accept() -> None:
                accepted.append((await accept_tcp(listening))[0])

            tg.start_soon(accept)
            dialled = await connect_tcp("127.0.0.1", port)
    return dialled, accepted[0]


async def test_a_peer_that_does_not_read_costs_at_most_the_queue_and_gets_whole_messages() -> None:
    dialled, accepted = await connected_pair()
    with dialled, accepted:
        transport = TcpTransport(dialled)
        sent = 0
        # The peer reads nothing: the kernel's buffers fill, then the transport's queue.
        while (taken := transport.send_many([numbered(sent + i) for i in range(8)])) == 8:
            sent += 8
        sent += taken
        assert transport.send(numbered(sent)) is False  # full: dropped, not queued
        assert transport._waiting_bytes <= TCP_QUEUE_BYTES
        assert sent * (MESSAGE + 2) > TCP_QUEUE_BYTES  # it did fill

        # Once the peer reads, every message taken arrives, whole and in order.
        decoder, received = StreamDecoder(), []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(transport.run)
                while len(received) < sent:
                    await anyio.wait_readable(accepted)
                    decoder.receive_bytes(accepted.recv(65_536))
                    while (message := decoder.next_message()) is not None:
                        received.append(message)
                transport.close()  # run returns: nothing waits
        assert received == [numbered(i) for i in range(sent)]
        assert transport.send(numbered(0)) is False  # closed


async def test_a_reset_connection_fails_the_transport_and_its_sends() -> None:
    dialled, accepted = await connected_pair()
    with dialled:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()  # RST
        transport = TcpTransport(dialled)
        with anyio.fail_after(5):
            while transport.send(numbered(0)):
                await anyio.sleep(0.01)
            with pytest.raises(OSError):
                await transport.run()
        assert transport.send_many([numbered(1), numbered(2)]) == 0


async def test_connecting_where_nothing_listens_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with anyio.fail_after(5), pytest.raises(ConnectionRefusedError):
        await connect_tcp("127.0.0.1", port)
