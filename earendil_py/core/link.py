"""An authenticated, encrypted link between two neighbours, as a sans-IO state machine.

One `Link` is one session with one neighbour. It is driven by the shell exactly as aioquic
drives a QUIC connection: feed it datagrams (`receive_datagram`), the clock (`handle_timer`),
and collect what it wants sent (`datagrams_to_send`) and what happened (`next_event`). The same
state machine runs over UDP (one message per datagram, which may be lost, reordered or
duplicated) and TCP (the shell adds a length prefix; `reliable=True` turns off retransmission).

Wire messages (all integers big-endian except where Noise says otherwise):

    HS_INIT   1 | sender_index u32 | noise message 1            | mac1 (16)
    HS_RESP   2 | sender_index u32 | receiver_index u32 | noise 2 | mac1 (16)
    HS_FINAL  3 | receiver_index u32 | noise message 3          | mac1 (16)
    DATA      4 | receiver_index u32 | counter u64 | AEAD(frame) (16-byte tag)

The handshake is Noise XXpsk3_25519_ChaChaPoly_BLAKE2b with the psk derived from the route's
secret cookie. mac1 (as in WireGuard) is a keyed BLAKE3 over the message, keyed by the cookie:
it is checked before any Diffie-Hellman or state allocation, so a prober without the cookie
costs us one hash and gets no reply at all. Once Noise completes, each side sends a PROOF frame:
its Ed25519 public key and a signature over the Noise handshake hash, which binds the identity
to this very session (it cannot be replayed into another one). The dialer also checks the
proven fingerprint against the one configured in its out_route.

DATA frames carry an explicit 64-bit counter used as the AEAD nonce, so frames can be
decrypted in any order; a sliding window (RFC 6479 style) drops duplicates and frames too old
to judge. The header is authenticated as associated data. Frame kinds inside DATA:

    ONION     1 | next_peeler (32) | onion packet   (the hot path: relays need no onion crypto)
    CONTROL   2 | opaque bytes (msgspec-encoded by the layer above)
    PING      3 | seq u64         PONG  4 | seq u64   (keepalive and RTT)
    PROOF     5 | identity public key (32) | signature (64)
    CLOSE     6 | utf-8 reason
"""

from __future__ import annotations

import enum
import functools
import hmac
import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Identity, fingerprint_of, verify
from earendil_py.core.noise import MAX_NONCE, NONCE, CipherState, HandshakeState

Rng = Callable[[int], bytes]

PROLOGUE = b"earendil_py link v1"
PROOF_DOMAIN = b"earendil_py link identity proof v1"

HS_INIT, HS_RESP, HS_FINAL, DATA = 1, 2, 3, 4
ONION, CONTROL, PING, PONG, PROOF, CLOSE = 1, 2, 3, 4, 5, 6

MAC_SIZE = 16
TAG_SIZE = 16
FINGERPRINT_SIZE = 32
DATA_HEADER = struct.Struct(">BIQ")  # type, receiver_index, counter
DATA_OVERHEAD = DATA_HEADER.size + 1 + TAG_SIZE  # header, frame kind, AEAD tag
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
_ONION_KIND = bytes([ONION])

# No message is larger: an onion frame is ~1.4 KB and control messages are kept small. On TCP
# a larger announced length closes the connection; on UDP such a datagram is dropped.
MAX_MESSAGE_SIZE = 16_384
REPLAY_WINDOW = 2048  # frames; UDP reordering deeper than this is treated as loss
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
# Re-handshake long before the 64-bit nonce could wrap: a timer closes the link ("rekey") once
# this many frames were sent and the dialer re-dials with fresh keys. Sending stops hard at
# REJECT_AFTER_FRAMES, which no link reaches between two timer checks.
REKEY_AFTER_FRAMES = 2**60
REJECT_AFTER_FRAMES = 2**60 + 2**40


@dataclass(frozen=True, slots=True)
class LinkTimers:
    """Timing policy in seconds. Tests shrink these; defaults suit the open internet."""

    handshake_rto: float = 0.5  # first handshake retransmission; doubles each time
    handshake_attempts: int = 6  # initial send plus retransmissions, then give up
    keepalive_interval: float = 5.0  # the responder's: twice this (see Link)
    dead_after: float = 20.0  # no authenticated frame for this long: the link is dead


@functools.lru_cache(maxsize=64)  # a few routes: their links share the keys' bytes
def derive_cookie_keys(secret: str) -> tuple[bytes, bytes]:
    """(psk, mac1 key) for a route cookie. Domain-separated so neither reveals the other."""
    raw = secret.encode()
    psk = blake3.blake3(raw, derive_key_context="earendil_py 2026-11 link psk v1").digest()
    mac = blake3.blake3(raw, derive_key_context="earendil_py 2026-11 link mac1 v1").digest()
    return psk, mac


def _mac1(mac_key: bytes, message: bytes | memoryview) -> bytes:
    return blake3.blake3(message, key=mac_key).digest(length=MAC_SIZE)


def check_mac1(mac_key: bytes, message: bytes) -> bool:
    """True if a handshake message carries a valid cookie MAC (constant-time comparison)."""
    if len(message) < 1 + MAC_SIZE:
        return False
    body = memoryview(message)[:-MAC_SIZE]
    return hmac.compare_digest(_mac1(mac_key, body), message[-MAC_SIZE:])


def onion_frame(next_peeler: bytes, packet: bytes) -> bytes:
    """The plaintext of a DATA message that carries an onion packet: the ONION kind byte,
    the 32-byte fingerprint of the packet's next peeler, the packet."""
    return b"".join((_ONION_KIND, next_peeler, packet))


def message_type(message: bytes) -> int:
    return message[0] if message else 0


def receiver_index(message: bytes) -> int | None:
    """The session index a message is addressed to, or None for HS_INIT/garbage."""
    kind = message_type(message)
    if kind == DATA and len(message) >= DATA_HEADER.size + TAG_SIZE:
        return int(U32.unpack_from(message, 1)[0])
    if kind == HS_FINAL and len(message) >= 5:
        return int(U32.unpack_from(message, 1)[0])
    if kind == HS_RESP and len(message) >= 9:
        return int(U32.unpack_from(message, 5)[0])
    return None


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkEstablished:
    peer_fingerprint: bytes


@dataclass(frozen=True, slots=True)
class ControlReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class LinkClosed:
    reason: str  # snake_case: handshake_timeout, keepalive_timeout, wrong_fingerprint, ...
    by_peer: bool = False


LinkEvent = LinkEstablished | ControlReceived | LinkClosed


class LinkState(enum.Enum):
    HANDSHAKING = "handshaking"
    PROVING = "proving"  # Noise done, waiting for the peer's identity proof
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class LinkStatistics:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    rtt: float | None = None  # smoothed round-trip time in seconds (RFC 6298 SRTT)


class Link:
    """One session with one neighbour. See the module docstring for the wire format.

    `receive_datagram` never raises for bad input: garbage is dropped and counted in
    `statistics().drops`. Methods raise LocalProtocolError when misused (e.g. sending on a
    link that is not established).

    A node holds one per neighbour, most of them idle, so an idle link keeps little and does
    little. It has slots and no Noise state once the handshake is done. It sends a keepalive
    PING only after a keepalive interval in which it heard nothing from its peer but the
    answer to its last PING, so two idle neighbours exchange one PING and PONG per interval
    between them, not one each, and a link with traffic both ways sends none. The side that
    dialled PINGs (as WireGuard's persistent keepalive, it is the side a NAT would forget);
    the side that answered waits twice the interval, so it PINGs only when the dialler has
    gone quiet (traffic flowing toward the dialler alone, or a dialler that is gone), and a
    node with many neighbours that dialled it wakes once per interval and neighbour, for
    their PING, not also for its own timer. The side that PINGs keeps a period of its own
    (its deadline does not move by the round trip when the answer comes, which would wake
    the node once more per interval only to find it later).
    And it holds its AEADs (OpenSSL keeps ~2.4 KB of cipher contexts per AEAD object, more
    than the rest of the link) only while it carries onions: relaying them keeps them
    (`encrypt_onions`, a received batch with onions), a PING sent or received lets them go
    (`CipherState.forget_aead`), and other frames on an idle link use an AEAD made for the
    call (~1.5 us).
    """

    __slots__ = (
        "_attempts",
        "_events",
        "_expected",
        "_flight",
        "_handshake_hash",
        "_identity",
        "_last_heard",
        "_last_received",
        "_mac_key",
        "_next_ping",
        "_noise",
        "_outbox",
        "_peer_messages_seen",
        "_ping_sent_at",
        "_ping_seq",
        "_proof_body",
        "_recv",
        "_recv_aead",
        "_reliable",
        "_retransmit_at",
        "_rng",
        "_rto",
        "_send",
        "_send_aead",
        "_stats",
        "_timers",
        "_window_bits",
        "_window_top",
        "initiator",
        "local_index",
        "peer_fingerprint",
        "peer_identity_public",
        "remote_index",
        "state",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        identity: Identity,
        static_private: bytes,
        secret: str,
        local_index: int,
        now: float,
        rng: Rng,
        expected_fingerprint: bytes | None = None,
        reliable: bool = False,
        timers: LinkTimers | None = None,
    ) -> None:
        if initiator and expected_fingerprint is None:
            raise LocalProtocolError("a dialer must know whom it dials")
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index: int | None = None
        self.peer_fingerprint: bytes | None = None
        self.peer_identity_public: bytes | None = None
        self.state = LinkState.HANDSHAKING
        self._identity = identity
        self._expected = expected_fingerprint
        self._reliable = reliable
        self._timers = timers or LinkTimers()
        self._rng = rng
        psk, self._mac_key = derive_cookie_keys(secret)
        # Dropped once Noise is done; what the identity proofs need is kept from it.
        self._noise: HandshakeState | None = HandshakeState(
            initiator=initiator,
            prologue=PROLOGUE,
            static_private=static_private,
            psk=psk,
            rng=rng,
        )
        # Transport ciphers after the handshake; the Noise nonce is the frame counter.
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        # Their AEADs, called directly on the hot path: DATA frames carry explicit nonces.
        # None while the link carries no onions (see the class docstring).
        self._send_aead: ChaCha20Poly1305 | None = None
        self._recv_aead: ChaCha20Poly1305 | None = None
        self._handshake_hash = b""
        self._proof_body = b""
        # Anti-replay (RFC 6479's bitmap): bit i of _window_bits records whether counter
        # _window_top - i was seen. Only a frame that decrypted moves it, so forgeries cannot.
        self._window_top = -1
        self._window_bits = 0
        self._stats = LinkStatistics()
        self._outbox: list[bytes] = []
        self._events: list[LinkEvent] = []  # a deque would cost ~700 bytes more per link
        # Retransmission: the last flight we sent and when to resend it.
        self._flight: tuple[bytes, ...] = ()
        self._rto = self._timers.handshake_rto
        self._attempts = 0
        self._retransmit_at: float | None = None
        self._last_received = now
        # When a frame other than the answer to our newest PING came: the keepalive's clock.
        self._last_heard = now
        self._next_ping = now + self._timers.keepalive_interval
        self._peer_messages_seen = 0  # bit k: a handshake message of kind k came
        self._ping_seq = 0
        # When the message being timed for the RTT left: the newest PING, or during the
        # handshake our first message (answered by the peer's next one), so the RTT is known
        # from link-up even on a link too busy ever to PING. A resent message is not timed
        # (Karn's rule: its answer could be to either copy).
        self._ping_sent_at: float | None = None
        if initiator:
            self._send_flight((self._handshake_message(HS_INIT, None),), now)
            self._ping_sent_at = now

    # --- public API ---------------------------------------------------------------------

    def statistics(self) -> LinkStatistics:
        return self._stats

    @property
    def wants_service(self) -> bool:
        """Whether `datagrams_to_send` or `next_event` has anything (cheap, for hot paths)."""
        return bool(self._outbox or self._events)

    def datagrams_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        self._stats.frames_out += len(out)
        self._stats.bytes_out += sum(map(len, out))
        return out

    def next_event(self) -> LinkEvent | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        if self.state is LinkState.CLOSED:
            return None
        deadlines = [self._last_received + self._timers.dead_after]
        if self._retransmit_at is not None:
            deadlines.append(self._retransmit_at)
        if self.state is LinkState.ESTABLISHED:
            deadlines.append(self._ping_due())
        return min(deadlines)

    def handle_timer(self, now: float) -> None:
        if self.state is LinkState.CLOSED:
            return
        if self._send is not None and self._send.nonce >= REKEY_AFTER_FRAMES:
            self._close("rekey", now, notify=True)
            return
        if now >= self._last_received + self._timers.dead_after:
            reason = "keepalive_timeout" if self._send else "handshake_timeout"
            self._close(reason, now, notify=False)
            return
        if self._retransmit_at is not None and now >= self._retransmit_at:
            if self._attempts >= self._timers.handshake_attempts:
                self._close("handshake_timeout", now, notify=False)
                return
            self._outbox.extend(self._flight)
            self._ping_sent_at = None
            self._arm_retransmit(now)
        if self.state is LinkState.ESTABLISHED and now >= self._ping_due():
            self._forget_aeads()  # quiet for an interval: no onions to keep them for
            self._ping_seq += 1
            self._ping_sent_at = now
            self._queue_frame(PING, U64.pack(self._ping_seq))
            self._next_ping = now + self._timers.keepalive_interval

    def close(self, reason: str, now: float) -> None:
        """Close locally, telling the peer (best effort) so it need not wait for a timeout."""
        if self.state is not LinkState.CLOSED:
            self._close(reason, now, notify=True)

    def encrypt_onion(self, next_peeler: bytes, packet: bytes) -> bytes:
        """One DATA message carrying an onion packet for `next_peeler`."""
        return self.encrypt_onions([onion_frame(next_peeler, packet)])[0]

    def encrypt_onions(self, frames: list[bytes]) -> list[bytes]:
        """One DATA message for each onion frame (`onion_frame`'s layout), in order: the relay
        loop's hot path, which forwards the frames `receive_datagrams` returned as they are."""
        return self._encrypt_frames(frames, keep=True)

    def _encrypt_frames(self, frames: list[bytes], *, keep: bool) -> list[bytes]:
        """`encrypt_onions` for frames of any kind. `keep`: the AEAD is kept after (onions)."""
        cipher, aead, remote_index = self._send, self._send_aead, self.remote_index
        if cipher is None or remote_index is None:
            raise LocalProtocolError("link has no transport keys yet")
        if aead is None:
            aead = cipher.transport_aead()
            if keep:
                self._send_aead = aead
        first = cipher.nonce
        # As many frames as the counter allows, then the error that frame-by-frame encryption
        # would raise at the first one past it.
        count = max(0, min(len(frames), REJECT_AFTER_FRAMES - first))
        pack_header, pack_nonce, seal = DATA_HEADER.pack, NONCE.pack, aead.encrypt
        out: list[bytes] = []
        append = out.append
        for counter, frame in enumerate(frames[:count], first):
            header = pack_header(DATA, remote_index, counter)
            append(header + seal(pack_nonce(counter), frame, header))
        cipher.set_nonce(first + count)
        if self._send_aead is None:
            cipher.forget_aead()  # made for this call only
        if count < len(frames):
            raise LocalProtocolError("send counter exhausted: the link must be re-established")
        return out

    def send_control(self, payload: bytes) -> None:
        """Queue a CONTROL frame (collected with `datagrams_to_send`)."""
        self._queue_frame(CONTROL, payload)

    def receive_datagram(self, data: bytes, now: float) -> tuple[bytes, bytes] | None:
        """`receive_datagrams` for one message: (next_peeler, onion packet) for an ONION
        frame, else None."""
        for frame in self.receive_datagrams([data], now):
            return frame[1 : 1 + FINGERPRINT_SIZE], frame[1 + FINGERPRINT_SIZE :]
        return None

    def receive_datagrams(self, datagrams: Iterable[bytes], now: float) -> list[bytes]:
        """Process messages for this session, in order. Returns the ONION frames among them
        (`onion_frame`'s layout), the only kind the relay loop handles itself; everything else
        is handled here and surfaces as events or replies. Bad input is dropped and counted.
        """
        # The hot path, once per relayed frame: DATA opened with the Noise transport cipher's
        # AEAD called directly, each frame's counter as its nonce (spec 5.1 SetNonce). The
        # anti-replay window (RFC 6479's bitmap: bit i records whether counter top - i was
        # seen; only a frame that decrypted moves it, so forgeries cannot) and the statistics
        # live in locals until the end. Anything else takes `_receive`.
        frames: list[bytes] = []
        drops = self._stats.drops
        top, bits = self._window_top, self._window_bits
        aead, established = self._transport_state()
        local_index = self.local_index
        unpack, pack_nonce = DATA_HEADER.unpack_from, NONCE.pack
        header_size = DATA_HEADER.size
        size = opened = answers = 0
        for data in datagrams:
            length = len(data)
            size += length
            if length > MAX_MESSAGE_SIZE:
                drops["too_large"] += 1
                continue
            if aead is None or length < DATA_OVERHEAD or data[0] != DATA:
                try:
                    self._receive(data, now)
                except RemoteProtocolError as exc:
                    drops[exc.reason] += 1
                aead, established = self._transport_state()
                continue
            _, index, counter = unpack(data)
            if index != local_index:
                drops["wrong_session"] += 1
                continue
            if counter <= top:
                offset = top - counter
                if offset >= REPLAY_WINDOW:
                    drops["too_old"] += 1
                    continue
                if (bits >> offset) & 1:
                    drops["replay"] += 1
                    continue
            if counter >= MAX_NONCE:
                drops["nonce_exhausted"] += 1
                continue
            try:
                frame = aead.decrypt(pack_nonce(counter), data[header_size:], data[:header_size])
            except InvalidTag:
                drops["decrypt"] += 1
                continue
            if counter > top:
                shift = counter - top
                # A jump past the whole window forgets it; never shift by an unbounded amount.
                bits = ((bits << shift if shift < REPLAY_WINDOW else 0) | 1) & _WINDOW_MASK
                top = counter
            else:
                bits |= 1 << (top - counter)
            opened += 1
            if frame[0] == ONION and established and length > DATA_OVERHEAD + FINGERPRINT_SIZE:
                frames.append(frame)
                continue
            try:
                answers += self._receive_frame(frame, now)
            except RemoteProtocolError as exc:
                drops[exc.reason] += 1
            aead, established = self._transport_state()  # a PROOF or a CLOSE changes it
        self._window_top, self._window_bits = top, bits
        if self._recv_aead is None and self._recv is not None:
            if frames:  # carrying onions: keep it
                self._recv_aead = self._recv.transport_aead()
            else:
                self._recv.forget_aead()  # made for this batch only
        self._stats.bytes_in += size
        if opened:
            self._stats.frames_in += opened
            self._last_received = now
            if opened > answers:
                self._last_heard = now
        return frames

    # --- internals ----------------------------------------------------------------------

    def _receive(self, data: bytes, now: float) -> None:
        """A message the hot path of `receive_datagrams` does not take."""
        if self.state is LinkState.CLOSED:
            raise RemoteProtocolError("link closed", "link_closed")
        kind = message_type(data)
        if kind == DATA:
            if self._recv is None:
                raise RemoteProtocolError("data before handshake", "not_established")
            raise RemoteProtocolError("short data message", "malformed")
        if kind in (HS_INIT, HS_RESP, HS_FINAL):
            if not check_mac1(self._mac_key, data):
                raise RemoteProtocolError("bad cookie mac", "bad_mac1")
            self._receive_handshake(kind, data, now)
            return
        raise RemoteProtocolError("unknown message type", "malformed")

    def _handshake_message(self, kind: int, receiver: int | None) -> bytes:
        header = bytes([kind])
        if kind != HS_FINAL:
            header += U32.pack(self.local_index)
        if receiver is not None:
            header += U32.pack(receiver)
        assert self._noise is not None, "no handshake message after Noise is done"
        message = header + self._noise.write_message(b"")
        return message + _mac1(self._mac_key, message)

    def _receive_handshake(self, kind: int, data: bytes, now: float) -> None:
        body = data[:-MAC_SIZE]
        if self._peer_messages_seen >> kind & 1:
            # The peer retransmitted: our reply to this message was lost, so resend it. Once
            # established, what the peer can lack is our proof (see `_receive_proof`).
            self._stats.drops["handshake_duplicate"] += 1
            if not self._reliable:
                if self.state is LinkState.ESTABLISHED:
                    self._outbox.append(self._encrypt(PROOF, self._proof_body))
                self._outbox.extend(self._flight)
                self._ping_sent_at = None
            return
        if kind != self._expected_handshake_kind():
            raise RemoteProtocolError("unexpected handshake message", "handshake_unexpected")
        # Nothing changes before `read_message` succeeds (it leaves the Noise state unchanged
        # when it fails), so a forged or corrupted message cannot spoil a handshake that the
        # genuine one would still complete.
        assert self._noise is not None  # kept until Noise is done, when no kind is expected
        if kind == HS_INIT:
            try:
                if len(body) < 5:
                    raise RemoteProtocolError("short handshake", "handshake_malformed")
                self._noise.read_message(body[5:])
            except RemoteProtocolError:
                if not self._reliable:
                    # A datagram session exists for one HS_INIT's bytes (`Endpoint`): if they
                    # do not read, nothing ever will, so it ends now rather than hold its
                    # source's handshake slot until the deadline.
                    self._close("handshake_failed", now, notify=False)
                raise
            self.remote_index = int(U32.unpack_from(body, 1)[0])
            self._send_flight((self._handshake_message(HS_RESP, self.remote_index),), now)
            self._ping_sent_at = now
        elif kind == HS_RESP:
            if len(body) < 9 or U32.unpack_from(body, 5)[0] != self.local_index:
                raise RemoteProtocolError("handshake for another session", "handshake_malformed")
            self._noise.read_message(body[9:])
            self.remote_index = int(U32.unpack_from(body, 1)[0])
            self._rtt_sample(now)
            final = self._handshake_message(HS_FINAL, self.remote_index)
            self._start_transport()
            self._send_flight((final, self._encrypt(PROOF, self._proof_body)), now)
        else:
            self._noise.read_message(body[5:])
            self._rtt_sample(now)
            self._start_transport()
            # The responder's proof is its reply; it is resent if HS_FINAL arrives again.
            self._send_flight((self._encrypt(PROOF, self._proof_body),), now)
        self._peer_messages_seen |= 1 << kind
        self._last_received = self._last_heard = now

    def _expected_handshake_kind(self) -> int:
        if self._send:
            return 0  # Noise is complete: no further handshake message is valid
        if self.initiator:
            return HS_RESP
        return HS_FINAL if self.remote_index is not None else HS_INIT

    def _start_transport(self) -> None:
        assert self._noise is not None
        self._send, self._recv = self._noise.split()
        self._send_aead = self._send.transport_aead()
        self._recv_aead = self._recv.transport_aead()
        self._handshake_hash = self._noise.handshake_hash
        self._proof_body = self._proof()
        self._noise = None  # its keys and hash state are not needed any more
        self.state = LinkState.PROVING

    def _proof(self) -> bytes:
        """Our identity proof: the public key and a signature over the handshake hash."""
        assert self._noise is not None
        signature = self._identity.sign(PROOF_DOMAIN, self._noise.handshake_hash)
        return self._identity.identity_public + signature

    def _ping_due(self) -> float:
        """When to send a PING: a keepalive interval after the last one, and after the last
        frame heard from the peer but the answer to it (its frames, PINGs included, show it
        alive already)."""
        quiet = self._timers.keepalive_interval * (1 if self.initiator else 2)
        return max(self._next_ping, self._last_heard + quiet)

    def _forget_aeads(self) -> None:
        send, recv = self._send, self._recv
        assert send is not None and recv is not None  # established
        send.forget_aead()
        recv.forget_aead()
        self._send_aead = self._recv_aead = None

    def _send_flight(self, messages: tuple[bytes, ...], now: float) -> None:
        self._flight = messages
        self._outbox.extend(messages)
        self._attempts = 0
        self._rto = self._timers.handshake_rto
        self._arm_retransmit(now)

    def _arm_retransmit(self, now: float) -> None:
        # Only the initiator retransmits on a timer; the responder answers duplicates.
        self._attempts += 1
        if self._reliable or not self.initiator:
            self._retransmit_at = None
            return
        self._retransmit_at = now + self._rto
        self._rto *= 2

    def _encrypt(self, kind: int, body: bytes) -> bytes:
        return self._seal(bytes([kind]) + body)

    def _seal(self, frame: bytes) -> bytes:
        """One DATA message carrying `frame` (its kind byte first)."""
        return self._encrypt_frames([frame], keep=False)[0]

    def _queue_frame(self, kind: int, body: bytes) -> None:
        if self.state is not LinkState.ESTABLISHED:
            raise LocalProtocolError(f"cannot send on a link that is {self.state.value}")
        self._outbox.append(self._encrypt(kind, body))

    def _transport_state(self) -> tuple[ChaCha20Poly1305 | None, bool]:
        """The AEAD that opens DATA (None while DATA cannot be taken), and whether the link
        is established."""
        if self.state is LinkState.CLOSED:
            return None, False
        aead = self._recv_aead
        if aead is None and self._recv is not None:  # made for this batch (see the caller)
            aead = self._recv.transport_aead()
        return aead, self.state is LinkState.ESTABLISHED

    def _receive_frame(self, frame: bytes, now: float) -> bool:
        """A decrypted frame that is not an onion for an established link. True if it was
        the answer to our newest PING."""
        kind = frame[0]
        body = frame[1:]
        if kind == ONION and self.state is LinkState.ESTABLISHED:
            raise RemoteProtocolError("short onion frame", "malformed")
        if kind == PROOF:
            self._receive_proof(body, now)
        elif self.state is not LinkState.ESTABLISHED:
            if not self.initiator:
                # The initiator is established (it sends more than proofs), so it has our
                # proof but its own was lost: resending ours asks it for its proof again.
                self._outbox.append(self._encrypt(PROOF, self._proof_body))
            raise RemoteProtocolError("frame before identity proof", "not_established")
        elif kind == CONTROL:
            self._events.append(ControlReceived(body))
        elif kind == PING and len(body) == U64.size:
            self._forget_aeads()  # the peer heard nothing from us for an interval
            self._queue_frame(PONG, body)
        elif kind == PONG and len(body) == U64.size:
            return self._receive_pong(int(U64.unpack(body)[0]), now)
        elif kind == CLOSE:
            self.state = LinkState.CLOSED
            reason = body.decode("utf-8", "replace")[:64]
            self._events.append(LinkClosed(reason or "peer_closed", by_peer=True))
        else:
            raise RemoteProtocolError("unknown frame kind", "malformed")
        return False

    def _receive_proof(self, body: bytes, now: float) -> None:
        if self.state is LinkState.ESTABLISHED:
            self._stats.drops["proof_duplicate"] += 1
            if self.initiator:  # the responder lacks our proof (see _receive_data)
                self._outbox.append(self._encrypt(PROOF, self._proof_body))
            return
        if len(body) != 32 + 64:
            raise RemoteProtocolError("malformed identity proof", "bad_proof")
        identity_public, signature = body[:32], body[32:]
        try:
            verify(identity_public, PROOF_DOMAIN, self._handshake_hash, signature)
        except RemoteProtocolError:
            self._close("bad_identity_proof", now, notify=False)
            raise
        fingerprint = fingerprint_of(identity_public)
        if self._expected is not None and fingerprint != self._expected:
            self.peer_fingerprint = fingerprint
            self._close("wrong_fingerprint", now, notify=True)
            return
        self.peer_fingerprint = fingerprint
        self.peer_identity_public = identity_public
        self.state = LinkState.ESTABLISHED
        # Nothing of the handshake is kept for the link's life but our proof: a duplicate
        # handshake message from a peer that lacks it gets it sealed anew, not the flight.
        self._flight = ()
        self._handshake_hash = b""
        self._retransmit_at = None
        self._next_ping = now + self._timers.keepalive_interval
        self._events.append(LinkEstablished(fingerprint))

    def _receive_pong(self, seq: int, now: float) -> bool:
        if seq != self._ping_seq:
            return False
        self._rtt_sample(now)
        return True

    def _rtt_sample(self, now: float) -> None:
        if self._ping_sent_at is None:
            return
        sample, self._ping_sent_at = now - self._ping_sent_at, None
        rtt = self._stats.rtt
        self._stats.rtt = sample if rtt is None else rtt + (sample - rtt) / 8

    def _close(self, reason: str, now: float, *, notify: bool) -> None:
        if notify and self._send is not None and self.remote_index is not None:
            self._outbox.append(self._encrypt(CLOSE, reason.encode()))
        self.state = LinkState.CLOSED
        self._retransmit_at = None
        self._events.append(LinkClosed(reason))


Address = tuple[str, int]

MAX_SESSIONS = 1024  # sessions on one listening UDP socket
# Sessions still handshaking (not yet proven) opened from one source (`source_key`): a cookie
# holder, or anyone replaying a captured HS_INIT within its lifetime, cannot take them all.
MAX_HANDSHAKING_PER_SOURCE = 16


def source_key(host: str) -> str:
    """Whom a source address belongs to, for per-source bounds: an IPv4 address, or the /64
    of an IPv6 address (the smallest block a site is given, so one host may own all of it).
    An IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass(slots=True)
class EndpointStatistics:
    sessions: int = 0
    drops: Counter[str] = field(default_factory=Counter)


class Endpoint:
    """Demultiplexes one listening UDP socket into responder sessions.

    A message is routed by its receiver index, and a session only accepts messages from the
    address that opened it (no roaming: a spoofed source cannot steer replies elsewhere).
    A new session is created only for an HS_INIT whose cookie MAC verifies; anything else
    that matches no session is dropped silently and counted, so probers learn nothing.
    A retransmitted HS_INIT (same bytes, same address) goes to the session it already opened;
    the same bytes from another address open a session of their own, so a copy replayed by
    someone on the path cannot claim the dialer's session (it cannot finish the handshake).

    Sessions are bounded: at most `max_sessions` in all, and at most
    `max_handshaking_per_source` not yet established from one source (`source_key`); an
    HS_INIT beyond either is dropped and counted (`too_many_sessions`, `too_many_handshakes`).
    """

    def __init__(
        self,
        *,
        identity: Identity,
        static_private: bytes,
        secret: str,
        rng: Rng,
        timers: LinkTimers | None = None,
        max_sessions: int = MAX_SESSIONS,
        max_handshaking_per_source: int = MAX_HANDSHAKING_PER_SOURCE,
    ) -> None:
        self._identity = identity
        self._static_private = static_private
        self._secret = secret
        self._mac_key = derive_cookie_keys(secret)[1]
        self._rng = rng
        self._timers = timers
        self._max_sessions = max_sessions
        self._max_handshaking_per_source = max_handshaking_per_source
        self.sessions: dict[int, tuple[Link, Address]] = {}
        # (digest of a pending HS_INIT, the address it came from) -> session index
        self._inits: dict[tuple[bytes, Address], int] = {}
        self._init_of: dict[int, tuple[bytes, Address]] = {}  # the reverse
        self._by_source: dict[str, set[int]] = {}  # source_key -> its sessions' indices
        self._stats = EndpointStatistics()

    def statistics(self) -> EndpointStatistics:
        self._stats.sessions = len(self.sessions)
        return self._stats

    def route(self, data: bytes, address: Address, now: float) -> Link | None:
        """The session `data` belongs to, opening one for a valid HS_INIT; None means drop.

        The caller then feeds `data` to the returned link's `receive_datagram`.
        """
        index = receiver_index(data)
        if index is not None:
            session = self.sessions.get(index)
            if session is None:
                self._stats.drops["unknown_session"] += 1
                return None
            if session[1] != address:
                self._stats.drops["wrong_address"] += 1
                return None
            return session[0]
        if message_type(data) != HS_INIT or not check_mac1(self._mac_key, data):
            self._stats.drops["bad_mac1" if message_type(data) == HS_INIT else "malformed"] += 1
            return None
        init = (blake3.blake3(data).digest(length=16), address)
        if (existing := self._inits.get(init)) is not None:
            return self.sessions[existing][0]
        if len(self.sessions) >= self._max_sessions:
            self._stats.drops["too_many_sessions"] += 1
            return None
        source = source_key(address[0])
        if self._handshaking(source) >= self._max_handshaking_per_source:
            self._stats.drops["too_many_handshakes"] += 1
            return None
        link = Link(
            initiator=False,
            identity=self._identity,
            static_private=self._static_private,
            secret=self._secret,
            local_index=self._new_index(),
            now=now,
            rng=self._rng,
            timers=self._timers,
        )
        self.sessions[link.local_index] = (link, address)
        self._inits[init] = link.local_index
        self._init_of[link.local_index] = init
        self._by_source.setdefault(source, set()).add(link.local_index)
        return link

    def remove(self, link: Link) -> None:
        """Forget a closed session."""
        session = self.sessions.pop(link.local_index, None)
        if session is None:
            return
        del self._inits[self._init_of.pop(link.local_index)]
        source = source_key(session[1][0])
        indices = self._by_source[source]
        indices.discard(link.local_index)
        if not indices:
            del self._by_source[source]

    def _handshaking(self, source: str) -> int:
        """How many of the sessions opened from `source` are not established yet."""
        sessions = self.sessions
        return sum(
            1
            for index in self._by_source.get(source, ())
            if sessions[index][0].state in (LinkState.HANDSHAKING, LinkState.PROVING)
        )

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "big")
            if index not in self.sessions:
                return index


LENGTH_PREFIX = struct.Struct(">H")


def frame_for_stream(message: bytes) -> bytes:
    """Length-prefix one link message for a byte stream (TCP)."""
    if len(message) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError("link message too large for a stream frame")
    return LENGTH_PREFIX.pack(len(message)) + message


class StreamDecoder:
    """Splits a byte stream (TCP) back into link messages, whatever the chunking.

    An empty or over-MAX_MESSAGE_SIZE length raises RemoteProtocolError("bad_frame"), which
    closes the connection: the stream cannot be resynchronised, and buffering an attacker's
    announced length is how memory gets exhausted.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_bytes(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < LENGTH_PREFIX.size:
            return None
        (size,) = LENGTH_PREFIX.unpack_from(buffer)
        if not 0 < size <= MAX_MESSAGE_SIZE:
            raise RemoteProtocolError(f"stream frame of {size} bytes", "bad_frame")
        end = LENGTH_PREFIX.size + size
        if len(buffer) < end:
            return None
        message = bytes(buffer[LENGTH_PREFIX.size : end])
        del buffer[:end]
        return message
