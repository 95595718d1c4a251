"""Chat between neighbours: over real links, kept in the ledger, bounded against a flood."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from earendil_py.core.errors import LocalProtocolError
from earendil_py.core.neighbor import REFUSED
from earendil_py.core.rpc import INVALID_PARAMS
from earendil_py.netgen import Edge
from earendil_py.runtime import chat
from earendil_py.runtime.node import Node
from earendil_py.runtime.rpc import RpcError
from tests.helpers import cli_beside_nodes, make_nodes, node_from, running
from tests.runtime.test_control import config_path

PAIR = [Edge(0, 1, "udp")]


async def linked(nodes: list[Node]) -> None:
    with anyio.fail_after(5):
        await nodes[0].wait_neighbors({nodes[1].fingerprint})
        await nodes[1].wait_neighbors({nodes[0].fingerprint})


def texts(history: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [(m["direction"], m["text"], m["status"]) for m in history]


@pytest.mark.anyio
async def test_messages_both_ways_are_delivered_and_survive_a_restart(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes
    async with running(nodes):
        await linked(nodes)
        sent = await a.chat.send(b.fingerprint, "hello, neighbour")
        assert (sent["direction"], sent["status"]) == ("out", "delivered")
        await b.chat.send(a.fingerprint, "héllo ✓ back")
        expected_a = [("out", "hello, neighbour", "delivered"), ("in", "héllo ✓ back", "delivered")]
        assert texts(await a.chat.history(b.fingerprint)) == expected_a
        assert texts(await b.chat.history(a.fingerprint)) == [
            ("in", "hello, neighbour", "delivered"),
            ("out", "héllo ✓ back", "delivered"),
        ]
        before = await a.chat.history(b.fingerprint)
    again = [node_from(node.config) for node in nodes]  # the same ledgers, read anew
    async with running(again):
        assert await again[0].chat.history(b.fingerprint) == before
        assert texts(await again[1].chat.history(a.fingerprint))[0][1] == "hello, neighbour"


@pytest.mark.anyio
async def test_text_we_would_not_send_is_refused_before_anything_is_kept(tmp_path: Path) -> None:
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes
    async with running(nodes):
        await linked(nodes)
        for text in ["", "   \n", "x" * (chat.MAX_TEXT_CHARS + 1)]:
            with pytest.raises(LocalProtocolError):
                await a.chat.send(b.fingerprint, text)
        stranger = bytes(32)
        with pytest.raises(LocalProtocolError, match="no link"):
            await a.chat.send(stranger, "anyone there?")
        assert await a.chat.history(b.fingerprint) == []
        assert await b.chat.history(a.fingerprint) == []


@pytest.mark.anyio
async def test_bad_params_and_a_flood_from_a_neighbour_are_refused_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "RATE_LIMIT", 3)
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes
    async with running(nodes):
        await linked(nodes)
        for params in [
            {"id": "00" * 16},  # no text
            {"id": "zz", "text": "hi"},
            {"id": "00" * 8, "text": "hi"},  # a short id
            {"id": "00" * 16, "text": ""},
            {"id": "00" * 16, "text": "hi", "extra": 1},
            ["00" * 16, "hi"],
        ]:
            with pytest.raises(RpcError) as bad:
                await a.rpc.call(b.fingerprint, "chat", params)
            assert bad.value.code == INVALID_PARAMS
        assert b.chat.refused["invalid"] == 6
        for n in range(3):
            await a.rpc.call(b.fingerprint, "chat", {"id": f"{n:032x}", "text": f"m{n}"})
        with pytest.raises(RpcError) as flood:
            await a.rpc.call(b.fingerprint, "chat", {"id": "ff" * 16, "text": "one too many"})
        assert (flood.value.code, flood.value.data) == (REFUSED, "rate_limited")
        assert b.chat.refused["rate_limited"] == 1
        assert [m["text"] for m in await b.chat.history(a.fingerprint)] == ["m0", "m1", "m2"]
        # A message sent again with the same id (a retry after the RPC cache forgot it) is
        # kept once (the rate limit is checked first, so raise it to let the retry in).
        monkeypatch.setattr(chat, "RATE_LIMIT", 10)
        await a.rpc.call(b.fingerprint, "chat", {"id": f"{0:032x}", "text": "m0"})
        assert len(await b.chat.history(a.fingerprint)) == 3


@pytest.mark.anyio
async def test_a_message_nobody_answers_is_kept_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "SEND_TIMEOUT_SECS", 0.5)
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes

    async def never_answers(neighbor: bytes, params: object) -> object:
        await anyio.sleep_forever()

    b.rpc._handlers["chat"] = never_answers  # a neighbour that takes messages in and hangs
    async with running(nodes):
        await linked(nodes)
        sent = await a.chat.send(b.fingerprint, "are you there?")
        assert (sent["status"], sent["reason"]) == ("failed", "no answer from the neighbour")
        assert texts(await a.chat.history(b.fingerprint)) == [("out", "are you there?", "failed")]
    again = node_from(a.config)
    async with running([again]):
        assert texts(await again.chat.history(b.fingerprint)) == [
            ("out", "are you there?", "failed")
        ]


@pytest.mark.anyio
async def test_chat_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes
    async with running(nodes):
        await linked(nodes)
        code, out, err = await cli_beside_nodes(
            capsys, "chat", "--config", config_path(a), "--neighbor", b.fingerprint.hex(),
            "--send", "from the command line",
        )  # fmt: skip
        assert (code, err) == (0, "")
        assert out.rstrip().endswith("-> from the command line")
        code, out, _ = await cli_beside_nodes(
            capsys, "chat", "--config", config_path(b), "--neighbor", a.fingerprint.hex()
        )
        assert code == 0
        assert out.rstrip().endswith("<- from the command line")
        code, _, err = await cli_beside_nodes(
            capsys, "chat", "--config", config_path(a), "--neighbor", "00" * 32, "--send", "hi"
        )
        assert code != 0
        assert "no account with this neighbour" in err


@pytest.mark.anyio
async def test_a_message_id_has_one_spelling_so_a_resent_message_is_kept_once(
    tmp_path: Path,
) -> None:
    nodes = make_nodes(tmp_path, 2, PAIR)
    a, b = nodes
    message_id = "ab" * chat.ID_SIZE
    async with running(nodes):
        await linked(nodes)
        await a.rpc.call(b.fingerprint, "chat", {"id": message_id, "text": "once"})
        for spelling in [
            message_id.upper(),
            "Ab" * chat.ID_SIZE,
            " " + message_id,
            message_id + "\n",
            " ".join(["ab"] * chat.ID_SIZE),
        ]:
            with pytest.raises(RpcError) as bad:
                await a.rpc.call(b.fingerprint, "chat", {"id": spelling, "text": "once"})
            assert bad.value.code == INVALID_PARAMS
        await a.rpc.call(b.fingerprint, "chat", {"id": message_id, "text": "once"})
        assert texts(await b.chat.history(a.fingerprint)) == [("in", "once", "delivered")]
        assert b.chat.refused["invalid"] == 5
    again = node_from(b.config)  # what the ledger kept
    async with running([again]):
        assert texts(await again.chat.history(a.fingerprint)) == [("in", "once", "delivered")]
