"""Local dock sockets on in-process nodes over loopback: an application's request goes out
through its node's app socket, an echo application answers through the reply block, and the
reply comes back to the asking application alone."""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest

from earendil_py.core.neighbor import Neighbor
from earendil_py.core.relay import MAX_ANONYMOUS_DATA
from earendil_py.runtime import apps as apps_module
from earendil_py.runtime.apps import (
    ANONYMOUS,
    DESTINATION,
    FROM_ANONYMOUS,
    FROM_DESTINATION,
    HELLO,
    NO_REPLY,
    REPLY,
    SEND,
)
from earendil_py.runtime.control import status
from earendil_py.runtime.node import Node
from tests.helpers import LINE, converged, make_nodes, running

ECHO_DOCK = 7
CLIENT_DOCK = 1


def apps_toml(dock: int, hops: int) -> str:
    return f'[[apps]]\nlisten = "127.0.0.1:0"\ndock = {dock}\nhops = {hops}\n'


def app_address(node: Node, dock: int) -> tuple[str, int]:
    return node.apps.sockets[dock].address


async def udp_app() -> anyio.abc.UDPSocket:
    return await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1")


async def serve_echo(
    node: Node, seen: list[bytes], *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """An echo application on `node`'s echo dock: answers every anonymous datagram."""
    address = app_address(node, ECHO_DOCK)
    async with await udp_app() as sock:
        await sock.sendto(bytes([HELLO]), *address)
        while node.apps.sockets[ECHO_DOCK].receiver is None:
            await anyio.sleep(0.01)
        task_status.started()
        async for data, _ in sock:
            seen.append(data)
            if data[0] == FROM_ANONYMOUS:
                endpoint = data[1 : ANONYMOUS.size]
                await sock.sendto(
                    ANONYMOUS.pack(REPLY, endpoint) + data[ANONYMOUS.size :], *address
                )


async def ask(
    sock: anyio.abc.UDPSocket, node: Node, to: Node, payloads: list[bytes]
) -> list[bytes]:
    """Send each payload to `to`'s echo dock through `node`'s app socket; the replies."""
    address = app_address(node, CLIENT_DOCK)
    replies: list[bytes] = []
    head = DESTINATION.pack(SEND, to.fingerprint, ECHO_DOCK)
    for payload in payloads:
        await sock.sendto(head + payload, *address)
        data, _ = await sock.receive()
        assert data.startswith(DESTINATION.pack(FROM_DESTINATION, to.fingerprint, ECHO_DOCK))
        replies.append(data[DESTINATION.size :])
    return replies


def link(a: Node, b: Node):  # type: ignore[no-untyped-def]
    return a.links[b.fingerprint][0]


def debts(a: Node, b: Node) -> tuple[int, int]:
    """(a owes b, b owes a), by a's books."""
    account = neighbor(a, b).account
    return account.debt_out_umel, account.debt_in_umel


def neighbor(a: Node, b: Node) -> Neighbor:
    found = a.accounts.get(b.fingerprint)
    assert found is not None
    return found


@pytest.mark.anyio
async def test_request_and_reply_through_three_peelers_each_way(tmp_path: Path) -> None:
    nodes = make_nodes(
        tmp_path,
        5,
        LINE,
        extra_toml="[accounting]\npush_debt_secs = 0.5\ncheckpoint_secs = 0.5\n",
        node_toml={0: apps_toml(CLIENT_DOCK, 4), 4: apps_toml(ECHO_DOCK, 4)},
    )
    a, e = nodes[0], nodes[4]
    seen: list[bytes] = []
    payloads = [b"ping %d" % i for i in range(40)]
    async with running(nodes) as tg:
        with anyio.fail_after(10):
            await converged(nodes, LINE)
        await tg.start(serve_echo, e, seen)
        with anyio.fail_after(20):
            async with await udp_app() as client:
                assert await ask(client, a, e, payloads) == payloads
        # Three relays and the destination peeled every packet, both ways: A sent the requests
        # and a few packets of reply blocks alone, E the replies and nothing else.
        assert e.relay.originated == len(payloads)
        assert len(payloads) <= a.relay.originated <= len(payloads) + 8
        assert sum(n.relay.peeled for n in nodes) == 4 * (a.relay.originated + len(payloads))
        # The replies crossed E -> D -> C -> B -> A, counted and charged on every link.
        for sender, receiver in zip(nodes[:0:-1], nodes[-2::-1], strict=True):
            out, into = link(sender, receiver), link(receiver, sender)
            assert out.packets_sent >= len(payloads)
            assert out.packets_sent == into.packets_received
            # A claim adopted while packets were in flight leaves them to the next claim.
            with anyio.fail_after(5):
                while debts(sender, receiver) != debts(receiver, sender)[::-1]:
                    await anyio.sleep(0.05)
            assert debts(sender, receiver)[0] > 0
        # E's application saw anonymous endpoints only: never A's fingerprint.
        assert {data[0] for data in seen} == {FROM_ANONYMOUS}
        assert len({data[1 : ANONYMOUS.size] for data in seen}) == 1
        assert not any(a.fingerprint in data for data in seen)
        # Every request but those sent while E held enough carried a reply block; E holds a
        # bounded stock and A as many openers.
        assert 1 <= e.apps.held.statistics().blocks <= 16
        assert a.apps.sent.statistics().used == len(payloads)
        assert a.apps.drops == {} and e.apps.drops == {}
        # What the operator sees of it in the status.
        shown = status(e)["apps"]
        assert shown["sockets"][str(ECHO_DOCK)]["receiver"].startswith("127.0.0.1:")
        assert shown["reply_blocks_held"] == e.apps.held.statistics().blocks
        assert status(a)["apps"]["sockets"][str(CLIENT_DOCK)]["clients"] == 1


@pytest.mark.anyio
async def test_what_cannot_be_sent_or_delivered_is_counted(tmp_path: Path) -> None:
    nodes = make_nodes(
        tmp_path, 3, LINE[:2], node_toml={0: apps_toml(CLIENT_DOCK, 2), 2: apps_toml(ECHO_DOCK, 2)}
    )
    a, c = nodes[0], nodes[2]
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, LINE[:2])
        async with await udp_app() as client:
            address = app_address(a, CLIENT_DOCK)
            unknown = DESTINATION.pack(SEND, bytes(range(32)), ECHO_DOCK)
            await client.sendto(unknown + b"to nowhere", *address)
            too_big = DESTINATION.pack(SEND, c.fingerprint, ECHO_DOCK)
            await client.sendto(too_big + bytes(MAX_ANONYMOUS_DATA + 1), *address)
            # An answer for an endpoint we hold no block for waits for one to come.
            await client.sendto(ANONYMOUS.pack(REPLY, bytes(16)) + b"no block yet", *address)
            await client.sendto(b"\x09garbage", *address)
            # Nobody said HELLO on C's echo dock: the datagram arrives and is dropped there.
            await client.sendto(too_big + b"anyone?", *address)
            with anyio.fail_after(5):
                while c.apps.drops["no_app"] < 1:
                    await anyio.sleep(0.01)
        assert a.apps.drop_counts() == {"no_route": 1, "app_too_big": 1, "app_bad_header": 1}
        assert a.apps.waiting.statistics().answers == 1
        assert c.relay.delivered == 1
        # The dropped counts are in the node's status too.
        assert a.drop_counts()["no_route"] == 1


@pytest.mark.anyio
async def test_a_datagram_from_the_control_api_reaches_the_app_with_no_return_address(
    tmp_path: Path,
) -> None:
    nodes = make_nodes(tmp_path, 3, LINE[:2], node_toml={2: apps_toml(ECHO_DOCK, 2)})
    a, c = nodes[0], nodes[2]
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, LINE[:2])
        async with await udp_app() as app:
            await app.sendto(bytes([HELLO]), *app_address(c, ECHO_DOCK))
            with anyio.fail_after(5):
                while c.apps.sockets[ECHO_DOCK].receiver is None:
                    await anyio.sleep(0.01)
                a.send_datagram(c.fingerprint, ECHO_DOCK, b"from a script", hops=2)
                data, _ = await app.receive()
        assert data == bytes([NO_REPLY]) + b"from a script"


@pytest.mark.anyio
async def test_each_application_address_is_its_own_endpoint(tmp_path: Path) -> None:
    nodes = make_nodes(
        tmp_path, 3, LINE[:2], node_toml={0: apps_toml(CLIENT_DOCK, 2), 2: apps_toml(ECHO_DOCK, 2)}
    )
    a, c = nodes[0], nodes[2]
    seen: list[bytes] = []
    async with running(nodes) as tg:
        with anyio.fail_after(10):
            await converged(nodes, LINE[:2])
        await tg.start(serve_echo, c, seen)
        with anyio.fail_after(10):
            async with await udp_app() as one, await udp_app() as two:
                assert await ask(one, a, c, [b"one"]) == [b"one"]
                assert await ask(two, a, c, [b"two"]) == [b"two"]
                assert await ask(one, a, c, [b"one again"]) == [b"one again"]
    endpoints = [data[1 : ANONYMOUS.size] for data in seen]
    assert endpoints[0] == endpoints[2] != endpoints[1]
    assert struct.calcsize(">B16s") == ANONYMOUS.size


@pytest.mark.anyio
async def test_a_burst_faster_than_its_reply_blocks_is_answered_in_full(tmp_path: Path) -> None:
    nodes = make_nodes(
        tmp_path, 5, LINE, node_toml={0: apps_toml(CLIENT_DOCK, 3), 4: apps_toml(ECHO_DOCK, 3)}
    )
    a, e = nodes[0], nodes[4]
    seen: list[bytes] = []
    payloads = {b"burst %d" % i for i in range(40)}
    async with running(nodes) as tg:
        with anyio.fail_after(10):
            await converged(nodes, LINE)
        await tg.start(serve_echo, e, seen)
        with anyio.fail_after(20):
            async with await udp_app() as client:
                head = DESTINATION.pack(SEND, e.fingerprint, ECHO_DOCK)
                for payload in payloads:  # one batch: more than a conversation's blocks
                    await client.sendto(head + payload, *app_address(a, CLIENT_DOCK))
                got = set()
                while len(got) < len(payloads):
                    data, _ = await client.receive()
                    got.add(data[DESTINATION.size :])
        assert got == payloads
        # Answers waited for blocks, each reply asked for more, and no bound was hit.
        assert a.apps.drop_counts() == {} and e.apps.drop_counts() == {}
        assert a.apps.sent.statistics().evicted == e.apps.held.statistics().evicted == 0


def docs_example() -> str:
    """The Python example of docs/apps.md."""
    page = (Path(__file__).parents[2] / "docs" / "apps.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    return code


@pytest.mark.anyio
async def test_the_example_in_the_docs_serves_and_asks(tmp_path: Path) -> None:
    nodes = make_nodes(
        tmp_path, 3, LINE[:2], node_toml={0: apps_toml(CLIENT_DOCK, 2), 2: apps_toml(ECHO_DOCK, 2)}
    )
    a, c = nodes[0], nodes[2]

    def program(node: Node, dock: int, call: str) -> list[str]:
        host, port = app_address(node, dock)
        code = docs_example().replace('("127.0.0.1", 9700)', f'("{host}", {port})')
        return [sys.executable, "-c", f"{code}\n{call}"]

    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, LINE[:2])
        service = await anyio.open_process(program(c, ECHO_DOCK, "serve()"))
        try:
            with anyio.fail_after(20):
                while c.apps.sockets[ECHO_DOCK].receiver is None:
                    await anyio.sleep(0.01)
                ask = f"print(ask({c.fingerprint.hex()!r}, {ECHO_DOCK}, b'hello').decode())"
                asked = await anyio.run_process(program(a, CLIENT_DOCK, ask))
        finally:
            service.terminate()
            await service.wait()
            await service.aclose()
    assert asked.stdout == b"HELLO\n"


@pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="owners come from Linux's /proc")
@pytest.mark.parametrize(
    ("bind", "sender"), [("127.0.0.1", None), ("::1", None), ("::", "127.0.0.1")]
)
def test_the_owner_of_a_local_udp_socket_is_found(bind: str, sender: str | None) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((bind, 0))
        port = sock.getsockname()[1]
        assert apps_module.socket_owner((sender or bind, port)) == os.getuid()
    assert apps_module.socket_owner((sender or bind, port)) is None  # closed: nobody's


@pytest.mark.anyio
async def test_another_users_application_can_neither_send_nor_take_a_dock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = make_nodes(
        tmp_path, 3, LINE[:2], node_toml={0: apps_toml(CLIENT_DOCK, 2), 2: apps_toml(ECHO_DOCK, 2)}
    )
    a, c = nodes[0], nodes[2]
    monkeypatch.setattr(apps_module, "socket_owner", lambda address: os.getuid() + 1)
    async with running(nodes):
        with anyio.fail_after(10):
            await converged(nodes, LINE[:2])
        async with await udp_app() as intruder:
            await intruder.sendto(bytes([HELLO]), *app_address(a, CLIENT_DOCK))
            head = DESTINATION.pack(SEND, c.fingerprint, ECHO_DOCK)
            await intruder.sendto(head + b"on your bill", *app_address(a, CLIENT_DOCK))
            with anyio.fail_after(5):
                while a.apps.drop_counts()["app_other_user"] < 2:
                    await anyio.sleep(0.01)
        assert a.apps.sockets[CLIENT_DOCK].receiver is None
        assert a.relay.originated == 0
        assert status(a)["drops"]["app_other_user"] == 2
