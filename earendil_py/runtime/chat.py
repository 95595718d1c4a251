"""Chat with each neighbour: short text messages over GlobalRpc, kept in the ledger.

A message travels as the `chat` RPC {id, text} on the link, which already authenticates the
neighbour, so a message needs no signature of its own. Both sides keep it in the ledger of that
neighbour (kind `chat`), so it survives a restart and sits in the hash chain with everything
else. The sender writes its message before sending it and the outcome after (kind
`chat_status`): a message whose outcome a crash cut off shows as "unknown" after a restart.
The receiver writes before it answers, so "delivered" means on the neighbour's disk.

A neighbour's history is read from the ledger the first time it is asked for, then kept in
memory (the newest HISTORY messages). A neighbour may send at most RATE_LIMIT messages per
RATE_WINDOW_SECS; more are refused with an error it sees, and counted.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
import msgspec
import structlog

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError, convert_remote
from earendil_py.core.identity import short_hex
from earendil_py.core.neighbor import REFUSED
from earendil_py.core.rpc import INVALID_PARAMS
from earendil_py.runtime.rpc import GlobalRpc, RpcError, RpcTimeout
from earendil_py.runtime.store import AsyncLedger

log = structlog.get_logger("earendil_py.chat")

MAX_TEXT_CHARS = 2000
HISTORY = 500  # messages per neighbour kept in memory
RATE_LIMIT = 30  # messages a neighbour may send per window
RATE_WINDOW_SECS = 60.0
SEND_TIMEOUT_SECS = 10.0
ID_SIZE = 16
# A message id on the wire is its bytes in lower-case hex, as `send` writes it. Only that one
# spelling is accepted, so one message cannot be stored again under "ABCD..." or "ab cd...".
MessageId = Annotated[str, msgspec.Meta(pattern=rf"^[0-9a-f]{{{2 * ID_SIZE}}}\Z")]

Direction = Literal["in", "out"]
Status = Literal["pending", "delivered", "failed", "unknown"]


class ChatMessage(msgspec.Struct, frozen=True):
    """A `chat` ledger entry's body."""

    id: bytes
    direction: Direction
    text: str
    at: int  # unix seconds on our clock: when we sent it, or received it


class ChatStatus(msgspec.Struct, frozen=True):
    """A `chat_status` ledger entry's body: how sending message `id` ended."""

    id: bytes
    delivered: bool
    reason: str = ""


class ChatParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The `chat` RPC's params."""

    id: MessageId
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]


def unix_now() -> int:
    return int(time.time())


class Chat:
    """The node's chat with its neighbours, over `rpc`; `linked(fingerprint)` says whether a
    link to a neighbour is up. `start(ledger)` before it serves."""

    def __init__(self, rpc: GlobalRpc, linked: Callable[[bytes], bool]) -> None:
        self.rpc = rpc
        self.linked = linked
        self.ledger: AsyncLedger | None = None
        self.refused: Counter[str] = Counter()
        self.unread: Counter[bytes] = Counter()  # messages in since the operator last read
        self._histories: dict[bytes, deque[dict[str, Any]]] = {}
        self._received_at: dict[bytes, deque[float]] = {}
        rpc.register("chat", self._on_chat)

    def start(self, ledger: AsyncLedger) -> None:
        self.ledger = ledger

    async def history(self, neighbor: bytes) -> list[dict[str, Any]]:
        """`neighbor`'s messages, oldest first (the newest HISTORY of them)."""
        return [dict(m) for m in await self._history(neighbor)]

    async def send(self, neighbor: bytes, text: str) -> dict[str, Any]:
        """Send `text` to `neighbor` and return the message with how it ended. Raises
        LocalProtocolError for text we would not send, or with no link to the neighbour."""
        text = check_text(text)
        if not self.linked(neighbor):
            raise LocalProtocolError("no link to this neighbour")
        history = await self._history(neighbor)
        message = ChatMessage(os.urandom(ID_SIZE), "out", text, unix_now())
        await self._ledger().append(neighbor, "chat", msgspec.msgpack.encode(message), message.at)
        shown = _shown(message, "pending")
        history.append(shown)
        try:
            with anyio.fail_after(SEND_TIMEOUT_SECS):
                await self.rpc.call(neighbor, "chat", {"id": message.id.hex(), "text": text})
        except (RpcError, RpcTimeout, TimeoutError, LocalProtocolError) as exc:
            status = ChatStatus(message.id, delivered=False, reason=_reason(exc))
        else:
            status = ChatStatus(message.id, delivered=True)
        await self._ledger().append(
            neighbor, "chat_status", msgspec.msgpack.encode(status), unix_now()
        )
        _apply(shown, status)
        log.info("chat_sent", neighbor=short_hex(neighbor), delivered=status.delivered)
        return dict(shown)

    async def _on_chat(self, neighbor: bytes, params: Any) -> Any:
        try:
            request = convert_remote(params, ChatParams, "chat params", "invalid")
            message_id = bytes.fromhex(request.id)
            text = check_text(request.text)
        except (RemoteProtocolError, ValueError, LocalProtocolError) as exc:
            self.refused["invalid"] += 1
            raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
        if not self._admit(neighbor):
            self.refused["rate_limited"] += 1
            raise RpcError(REFUSED, "too many chat messages, try again later", "rate_limited")
        history = await self._history(neighbor)
        if any(m["id"] == request.id for m in history):
            return {"ok": True}  # already kept: a re-sent message is shown once
        message = ChatMessage(message_id, "in", text, unix_now())
        await self._ledger().append(neighbor, "chat", msgspec.msgpack.encode(message), message.at)
        history.append(_shown(message, "delivered"))
        self.unread[neighbor] += 1
        log.info("chat_received", neighbor=short_hex(neighbor))
        return {"ok": True}

    def mark_read(self, neighbor: bytes) -> None:
        """The operator has seen `neighbor`'s messages (the dashboard showed them)."""
        self.unread.pop(neighbor, None)

    def _admit(self, neighbor: bytes) -> bool:
        """Whether `neighbor` is under its rate limit; counts this message if so."""
        now = anyio.current_time()
        times = self._received_at.setdefault(neighbor, deque())
        while times and now - times[0] >= RATE_WINDOW_SECS:
            times.popleft()
        if len(times) >= RATE_LIMIT:
            return False
        times.append(now)
        return True

    async def _history(self, neighbor: bytes) -> deque[dict[str, Any]]:
        history = self._histories.get(neighbor)
        if history is None:
            entries = await self._ledger().entries(neighbor, kinds=("chat", "chat_status"))
            history = deque(maxlen=HISTORY)
            sent: dict[bytes, dict[str, Any]] = {}
            for entry in entries:
                if entry.body is None:
                    continue
                if entry.kind == "chat":
                    message = msgspec.msgpack.decode(entry.body, type=ChatMessage)
                    shown = _shown(
                        message, "unknown" if message.direction == "out" else "delivered"
                    )
                    history.append(shown)
                    sent[message.id] = shown
                else:
                    outcome = msgspec.msgpack.decode(entry.body, type=ChatStatus)
                    if outcome.id in sent:
                        _apply(sent[outcome.id], outcome)
            # Another task may have loaded it meanwhile; the first one's stays.
            history = self._histories.setdefault(neighbor, history)
        return history

    def _ledger(self) -> AsyncLedger:
        assert self.ledger is not None, "Chat.start() gives it the ledger"
        return self.ledger


def check_text(text: str) -> str:
    """`text` as a chat message, or LocalProtocolError if it is empty or too long."""
    if not text.strip():
        raise LocalProtocolError("a chat message needs some text")
    if len(text) > MAX_TEXT_CHARS:
        raise LocalProtocolError(f"a chat message has at most {MAX_TEXT_CHARS} characters")
    return text


def _shown(message: ChatMessage, status: Status) -> dict[str, Any]:
    return {
        "id": message.id.hex(),
        "direction": message.direction,
        "text": message.text,
        "sent_at": message.at,
        "status": status,
        "reason": "",
    }


def _apply(shown: dict[str, Any], status: ChatStatus) -> None:
    shown["status"] = "delivered" if status.delivered else "failed"
    shown["reason"] = status.reason


def _reason(exc: Exception) -> str:
    if isinstance(exc, RpcError):
        return exc.message
    if isinstance(exc, TimeoutError | RpcTimeout):
        return "no answer from the neighbour"
    return str(exc)
