"""Links driven in memory: handshake, identity proof, data frames, replay window, timers."""

from __future__ import annotations

import random

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.identity import Identity
from earendil_py.core.link import (
    CLOSE,
    DATA_HEADER,
    HS_FINAL,
    HS_INIT,
    HS_RESP,
    MAX_MESSAGE_SIZE,
    PING,
    PROOF,
    REPLAY_WINDOW,
    U32,
    ControlReceived,
    Endpoint,
    Link,
    LinkClosed,
    LinkEstablished,
    LinkState,
    LinkTimers,
    StreamDecoder,
    derive_cookie_keys,
    frame_for_stream,
    message_type,
    onion_frame,
)
from tests.helpers import seeded_rng

SECRET = "a-route-cookie-of-some-length"
TIMERS = LinkTimers(handshake_rto=0.1, handshake_attempts=5, keepalive_interval=1.0, dead_after=4.0)
ADDR = ("127.0.0.1", 40000)
ALICE = Identity.generate(seeded_rng(1))
BOB = Identity.generate(seeded_rng(2))
MALLORY = Identity.generate(seeded_rng(3))


class Pair:
    """An initiator Link talking to an Endpoint-owned responder through a lossy wire."""

    def __init__(
        self,
        *,
        secret_a: str = SECRET,
        secret_b: str = SECRET,
        expected: bytes = BOB.fingerprint,
        responder_identity: Identity = BOB,
        seed: int = 7,
    ) -> None:
        rng = seeded_rng(seed)
        self.now = 0.0
        self.endpoint = Endpoint(
            identity=responder_identity,
            static_private=rng(32),
            secret=secret_b,
            rng=rng,
            timers=TIMERS,
        )
        self.a = Link(
            initiator=True,
            identity=ALICE,
            static_private=rng(32),
            secret=secret_a,
            local_index=1,
            now=self.now,
            rng=rng,
            expected_fingerprint=expected,
            timers=TIMERS,
        )
        self.b: Link | None = None
        self.drop: set[int] = set()  # message types to lose on the wire
        self.sent_to_b: list[bytes] = []
        self.sent_to_a: list[bytes] = []
        self.onions_at_a: list[tuple[bytes, bytes]] = []
        self.onions_at_b: list[tuple[bytes, bytes]] = []

    def deliver_to_b(self, message: bytes) -> None:
        link = self.endpoint.route(message, ADDR, self.now)
        if link is None:
            return
        self.b = link
        result = link.receive_datagram(message, self.now)
        if result is not None:
            self.onions_at_b.append(result)

    def deliver_to_a(self, message: bytes) -> None:
        result = self.a.receive_datagram(message, self.now)
        if result is not None:
            self.onions_at_a.append(result)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for message in self.a.datagrams_to_send():
                self.sent_to_b.append(message)
                moved = True
                if message_type(message) not in self.drop:
                    self.deliver_to_b(message)
            if self.b is not None:
                for message in self.b.datagrams_to_send():
                    self.sent_to_a.append(message)
                    moved = True
                    if message_type(message) not in self.drop:
                        self.deliver_to_a(message)
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        """Move the clock in small ticks, firing timers and pumping as a shell would."""
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.05, 6)
            for link in (self.a, self.b):
                if link is not None and (t := link.get_timer()) is not None and self.now >= t:
                    link.handle_timer(self.now)
            self.pump()


def events(link: Link) -> list[object]:
    out = []
    while (event := link.next_event()) is not None:
        out.append(event)
    return out


def established() -> Pair:
    pair = Pair()
    pair.pump()
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.b is not None and pair.b.state is LinkState.ESTABLISHED
    return pair


def test_handshake_establishes_both_sides_with_proven_fingerprints() -> None:
    pair = Pair()
    pair.pump()
    assert events(pair.a) == [LinkEstablished(BOB.fingerprint)]
    assert pair.b is not None
    assert events(pair.b) == [LinkEstablished(ALICE.fingerprint)]
    kinds = [message_type(m) for m in pair.sent_to_b]
    assert kinds[:2] == [HS_INIT, HS_FINAL]


def test_onion_and_control_frames_flow_both_ways() -> None:
    pair = established()
    assert pair.b is not None
    peeler, packet = b"\x11" * 32, bytes(range(256)) * 5
    pair.deliver_to_b(pair.a.encrypt_onion(peeler, packet))
    pair.deliver_to_a(pair.b.encrypt_onion(peeler, packet[::-1]))
    assert pair.onions_at_b == [(peeler, packet)]
    assert pair.onions_at_a == [(peeler, packet[::-1])]
    events(pair.b)
    pair.a.send_control(b"hello")
    pair.pump()
    assert events(pair.b) == [ControlReceived(b"hello")]


def stream_pair() -> tuple[Link, Link]:
    """Alice dialling Bob over a TCP-like stream (`reliable`): nothing exchanged yet."""
    rng = seeded_rng(11)
    common = {"secret": SECRET, "now": 0.0, "rng": rng, "reliable": True, "timers": TIMERS}
    a = Link(
        initiator=True,
        identity=ALICE,
        static_private=rng(32),
        local_index=1,
        expected_fingerprint=BOB.fingerprint,
        **common,
    )
    b = Link(initiator=False, identity=BOB, static_private=rng(32), local_index=2, **common)
    return a, b


def test_stream_framing_byte_by_byte() -> None:
    """Two links over a TCP-like byte stream, fed one byte at a time in both directions."""
    a, b = stream_pair()
    decoders = {id(a): StreamDecoder(), id(b): StreamDecoder()}
    for _ in range(6):
        for sender, receiver in ((a, b), (b, a)):
            stream = b"".join(frame_for_stream(m) for m in sender.datagrams_to_send())
            decoder = decoders[id(receiver)]
            for i in range(len(stream)):
                decoder.receive_bytes(stream[i : i + 1])
                while (message := decoder.next_message()) is not None:
                    assert receiver.receive_datagram(message, 0.0) is None
    assert a.state is b.state is LinkState.ESTABLISHED
    assert a.peer_fingerprint == BOB.fingerprint and b.peer_fingerprint == ALICE.fingerprint
    assert a.get_timer() == TIMERS.keepalive_interval  # no retransmission timer on a stream


def test_stream_decoder_rejects_oversized_and_empty_frames() -> None:
    decoder = StreamDecoder()
    decoder.receive_bytes((MAX_MESSAGE_SIZE + 1).to_bytes(2, "big"))
    with pytest.raises(RemoteProtocolError, match="bytes"):
        decoder.next_message()
    decoder = StreamDecoder()
    decoder.receive_bytes(b"\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_wrong_cookie_gets_no_reply_at_all() -> None:
    pair = Pair(secret_a="a-different-cookie-entirely")
    pair.advance(2.0)
    assert pair.b is None
    assert pair.endpoint.sessions == {}
    assert pair.sent_to_a == []
    assert pair.endpoint.statistics().drops["bad_mac1"] >= 2  # the initial send + retransmits


def test_wrong_fingerprint_is_refused_by_the_dialer() -> None:
    pair = Pair(expected=MALLORY.fingerprint)
    pair.pump()
    assert events(pair.a) == [LinkClosed("wrong_fingerprint")]
    assert pair.a.peer_fingerprint == BOB.fingerprint
    assert pair.a.state is LinkState.CLOSED
    assert pair.b is not None and pair.b.state is LinkState.CLOSED  # told by a CLOSE frame


def test_forged_identity_proof_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(expected=BOB.fingerprint, responder_identity=MALLORY)

    def forged_proof(self: Link) -> bytes:
        # Claim Bob's public key but sign with Mallory's key.
        return BOB.identity_public + MALLORY.sign(b"anything", self._noise.handshake_hash)

    monkeypatch.setattr(Link, "_proof", forged_proof)
    pair.pump()
    assert events(pair.a) == [LinkClosed("bad_identity_proof")]
    assert pair.a.statistics().drops["bad_signature"] == 1


def test_lost_handshake_messages_are_retransmitted() -> None:
    for lost in (HS_INIT, HS_RESP, HS_FINAL):
        pair = Pair()
        pair.drop = {lost}
        pair.pump()
        assert pair.a.state is not LinkState.ESTABLISHED
        pair.drop = set()
        pair.advance(1.0)
        assert pair.a.state is LinkState.ESTABLISHED, lost
        assert pair.b is not None and pair.b.state is LinkState.ESTABLISHED, lost


def test_lost_responder_proof_is_resent() -> None:
    pair = Pair()
    pair.deliver_to_b(pair.a.datagrams_to_send()[0])  # HS_INIT
    assert pair.b is not None
    pair.deliver_to_a(pair.b.datagrams_to_send()[0])  # HS_RESP
    for message in pair.a.datagrams_to_send():  # HS_FINAL + Alice's PROOF
        pair.deliver_to_b(message)
    assert pair.b.state is LinkState.ESTABLISHED
    assert [message_type(m) for m in pair.b.datagrams_to_send()] == [4]  # Bob's PROOF: lost
    assert pair.a.state is LinkState.PROVING
    pair.advance(0.5)  # Alice retransmits HS_FINAL; Bob answers with his proof again
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.b.statistics().drops["handshake_duplicate"] >= 1


def test_lost_initiator_proof_is_asked_for_again() -> None:
    pair = Pair()
    pair.deliver_to_b(pair.a.datagrams_to_send()[0])  # HS_INIT
    assert pair.b is not None
    pair.deliver_to_a(pair.b.datagrams_to_send()[0])  # HS_RESP
    final, _alices_proof = pair.a.datagrams_to_send()  # Alice's PROOF is lost
    pair.deliver_to_b(final)
    for message in pair.b.datagrams_to_send():  # Bob's PROOF
        pair.deliver_to_a(message)
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.b.state is LinkState.PROVING  # half open: Alice thinks the link is up
    pair.a.send_control(b"hello")  # Bob drops it, but resends his proof to say so
    pair.pump()
    assert pair.b.state is LinkState.ESTABLISHED
    assert pair.a.statistics().drops["proof_duplicate"] == 1
    assert pair.b.statistics().drops["not_established"] == 1
    pair.a.send_control(b"again")
    pair.pump()
    assert [e for e in events(pair.b) if isinstance(e, ControlReceived)] == [
        ControlReceived(b"again")
    ]
    assert not pair.a.datagrams_to_send() and not pair.b.datagrams_to_send()  # no ping-pong


def with_mac1(message: bytes) -> bytes:
    """`message` with a valid cookie MAC: what anyone holding the route cookie can send."""
    return message + blake3.blake3(message, key=derive_cookie_keys(SECRET)[1]).digest(16)


# Noise bodies that fail to read: empty, short, a low-order ephemeral key, garbage ciphertext.
BAD_NOISE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x01" * 31, id="short"),
    pytest.param(bytes(32), id="low_order_key"),
    pytest.param(bytes(32) + b"\x02" * 80, id="low_order_key_long"),
    pytest.param(b"\x09" * 96, id="garbage"),
]


@pytest.mark.parametrize("noise", BAD_NOISE[:3])
def test_a_forged_hs_init_leaves_a_stream_responder_unchanged(noise: bytes) -> None:
    """On TCP one responder takes whatever the connection brings: a forged HS_INIT ahead of
    the genuine one must not spoil it."""
    a, b = stream_pair()
    b.receive_datagram(with_mac1(bytes([HS_INIT]) + U32.pack(99) + noise), 0.0)
    assert sum(b.statistics().drops.values()) == 1
    assert b.state is LinkState.HANDSHAKING
    assert b.remote_index is None and not b.datagrams_to_send()
    for _ in range(4):
        for message in a.datagrams_to_send():
            b.receive_datagram(message, 0.0)
        for message in b.datagrams_to_send():
            a.receive_datagram(message, 0.0)
    assert a.state is b.state is LinkState.ESTABLISHED


@pytest.mark.parametrize("noise", BAD_NOISE[:3])
def test_a_datagram_session_whose_hs_init_does_not_read_ends_at_once(noise: bytes) -> None:
    """On UDP a session exists for one HS_INIT's bytes: if they do not read it is closed at
    once, so forged HS_INITs hold none of their source's handshake slots, and the genuine
    HS_INIT opens its own session."""
    pair = Pair()
    forged = with_mac1(bytes([HS_INIT]) + U32.pack(99) + noise)
    session = pair.endpoint.route(forged, ADDR, pair.now)
    assert session is not None
    session.receive_datagram(forged, pair.now)
    assert session.state is LinkState.CLOSED and not session.datagrams_to_send()
    assert events(session) == [LinkClosed("handshake_failed")]
    pair.endpoint.remove(session)  # as the shell does once the session's task ends
    assert pair.endpoint.sessions == {}
    pair.pump()
    assert pair.a.state is LinkState.ESTABLISHED


@pytest.mark.parametrize("noise", BAD_NOISE)
def test_a_forged_hs_resp_leaves_the_initiator_unchanged(noise: bytes) -> None:
    pair = Pair()
    pair.deliver_to_b(pair.a.datagrams_to_send()[0])
    assert pair.b is not None
    response = pair.b.datagrams_to_send()[0]
    pair.deliver_to_a(with_mac1(response[:9] + noise))  # the genuine indexes, a bad body
    assert sum(pair.a.statistics().drops.values()) == 1
    assert pair.a.remote_index is None and not pair.a.datagrams_to_send()
    pair.deliver_to_a(response)
    pair.pump()
    assert pair.a.state is pair.b.state is LinkState.ESTABLISHED


@pytest.mark.parametrize("noise", BAD_NOISE)
def test_a_forged_hs_final_leaves_the_responder_unchanged(noise: bytes) -> None:
    pair = Pair()
    pair.deliver_to_b(pair.a.datagrams_to_send()[0])
    assert pair.b is not None
    pair.deliver_to_a(pair.b.datagrams_to_send()[0])
    final, proof = pair.a.datagrams_to_send()
    pair.deliver_to_b(with_mac1(final[:5] + noise))
    assert sum(pair.b.statistics().drops.values()) == 1
    assert pair.b.state is LinkState.HANDSHAKING and not pair.b.datagrams_to_send()
    pair.deliver_to_b(final)
    pair.deliver_to_b(proof)
    pair.pump()
    assert pair.a.state is pair.b.state is LinkState.ESTABLISHED


def test_handshake_gives_up_after_its_attempts() -> None:
    pair = Pair()
    pair.drop = {HS_INIT}
    pair.advance(10.0)
    assert events(pair.a) == [LinkClosed("handshake_timeout")]
    assert sum(message_type(m) == HS_INIT for m in pair.sent_to_b) == TIMERS.handshake_attempts


def test_replayed_reordered_and_stale_frames() -> None:
    pair = established()
    b = pair.b
    assert b is not None
    frames = [pair.a.encrypt_onion(b"\x22" * 32, bytes([i]) * 100) for i in range(10)]
    for i in (3, 1, 2, 0, 9, 4, 5, 6, 8, 7):  # reordered: all accepted
        pair.deliver_to_b(frames[i])
    assert sorted(p[1][0] for p in pair.onions_at_b) == list(range(10))
    for frame in frames[:4]:  # duplicates: dropped
        pair.deliver_to_b(frame)
    assert len(pair.onions_at_b) == 10
    assert b.statistics().drops["replay"] == 4
    for _ in range(REPLAY_WINDOW):
        pair.a.encrypt_onion(b"\x22" * 32, b"x")  # frames lost on the wire
    late = frames[:1]
    fresh = pair.a.encrypt_onion(b"\x22" * 32, b"y")
    pair.deliver_to_b(fresh)
    pair.deliver_to_b(late[0])
    assert b.statistics().drops["too_old"] == 1
    assert b.state is LinkState.ESTABLISHED


def test_tampered_data_frame_is_dropped_without_advancing_the_window() -> None:
    pair = established()
    b = pair.b
    assert b is not None
    frame = bytearray(pair.a.encrypt_onion(b"\x33" * 32, b"z" * 64))
    frame[-1] ^= 1
    pair.deliver_to_b(bytes(frame))
    assert b.statistics().drops["decrypt"] == 1
    frame[-1] ^= 1
    pair.deliver_to_b(bytes(frame))  # the genuine frame with the same counter still gets in
    assert len(pair.onions_at_b) == 1


def test_keepalive_measures_rtt_and_detects_a_dead_peer() -> None:
    pair = established()
    pair.advance(3.0)
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.a.statistics().rtt is not None
    events(pair.a)
    pair.drop = {4}  # the peer goes silent: every DATA message is lost
    pair.advance(TIMERS.dead_after + 0.5)
    assert events(pair.a) == [LinkClosed("keepalive_timeout")]


def test_the_handshake_times_a_round_trip_each_way_and_a_resent_message_none() -> None:
    pair = Pair()
    (init,) = pair.a.datagrams_to_send()
    pair.now = 0.25
    pair.deliver_to_b(init)
    assert pair.b is not None
    (resp,) = pair.b.datagrams_to_send()
    pair.now = 0.35
    pair.deliver_to_a(resp)  # HS_INIT left at 0 and was answered at 0.35
    assert pair.a.statistics().rtt == pytest.approx(0.35)
    final = pair.a.datagrams_to_send()
    pair.now = 0.75
    for message in final:
        pair.deliver_to_b(message)  # HS_RESP left at 0.25, answered at 0.75
    assert pair.b.statistics().rtt == pytest.approx(0.5)

    resent = Pair()
    resent.drop = {HS_RESP}
    resent.advance(0.1)  # HS_INIT is retransmitted, so its answer could be to either copy
    resent.drop = set()
    resent.advance(0.5)
    assert resent.a.state is LinkState.ESTABLISHED
    assert resent.a.statistics().rtt is None
    assert resent.b is not None and resent.b.statistics().rtt is None  # it resent HS_RESP


def test_neighbours_that_hear_from_each_other_do_not_both_ping() -> None:
    pair = established()
    assert pair.b is not None
    peeler, packet = b"\x11" * 32, bytes(range(256)) * 5
    pings = 0
    for _ in range(int(5 * TIMERS.keepalive_interval / 0.05)):
        # Traffic both ways: each side hears the other all the time, so neither pings.
        pair.deliver_to_b(pair.a.encrypt_onion(peeler, packet))
        pair.deliver_to_a(pair.b.encrypt_onion(peeler, packet))
        before = len(pair.sent_to_a) + len(pair.sent_to_b)
        pair.advance(0.05)
        pings += len(pair.sent_to_a) + len(pair.sent_to_b) - before
    assert pings == 0
    assert pair.a.state is LinkState.ESTABLISHED and pair.b.state is LinkState.ESTABLISHED


def test_on_an_idle_link_only_the_dialler_pings() -> None:
    pair = established()
    assert pair.b is not None
    pings_before = pair.a._ping_seq
    sent_before = len(pair.sent_to_a), len(pair.sent_to_b)
    pair.advance(10 * TIMERS.keepalive_interval)
    assert pair.a.state is LinkState.ESTABLISHED and pair.b.state is LinkState.ESTABLISHED
    assert pair.a._ping_seq - pings_before == 10  # one PING an interval
    assert pair.b._ping_seq == 0  # the PINGs keep the answering side quiet
    # One PING and one PONG an interval between them, nothing else.
    assert len(pair.sent_to_b) - sent_before[1] == 10
    assert len(pair.sent_to_a) - sent_before[0] == 10


def test_traffic_toward_the_dialler_alone_keeps_the_link_up() -> None:
    # The dialler hears onions, so it does not PING; the side that sends them hears nothing
    # and PINGs after twice the interval, before its dead_after runs out.
    pair = established()
    assert pair.b is not None
    for _ in range(int(2 * TIMERS.dead_after / 0.05)):
        pair.deliver_to_a(pair.b.encrypt_onion(b"\x11" * 32, b"packet"))
        pair.advance(0.05)
    assert pair.a.state is LinkState.ESTABLISHED and pair.b.state is LinkState.ESTABLISHED
    assert pair.b._ping_seq > 0


def test_the_answer_to_a_ping_does_not_move_the_next_one() -> None:
    # The side that PINGs keeps its period when the PONG comes a round trip later: were its
    # deadline moved by the round trip, its node would wake once more per interval only to
    # find it later. Anything else from the peer still puts the next PING an interval off.
    pair = established()
    assert pair.b is not None
    due = pair.a.get_timer()
    assert due is not None
    pair.now = due
    pair.a.handle_timer(pair.now)
    (ping,) = pair.a.datagrams_to_send()
    assert pair.a.get_timer() == due + TIMERS.keepalive_interval
    pair.now += 0.2
    pair.deliver_to_b(ping)
    (pong,) = pair.b.datagrams_to_send()
    pair.now += 0.2
    pair.deliver_to_a(pong)
    assert pair.a.get_timer() == due + TIMERS.keepalive_interval
    assert pair.b.get_timer() == due + 0.2 + 2 * TIMERS.keepalive_interval  # a PINGs first
    pair.deliver_to_a(pair.b.encrypt_onion(b"\x11" * 32, b"packet"))
    assert pair.a.get_timer() == pair.now + TIMERS.keepalive_interval


def test_an_idle_link_lets_its_ciphers_go_and_still_carries_frames_both_ways() -> None:
    pair = established()
    assert pair.b is not None
    pair.advance(3 * TIMERS.keepalive_interval)  # keepalives only
    assert pair.a.state is LinkState.ESTABLISHED and pair.b.state is LinkState.ESTABLISHED
    # Idle: the OpenSSL contexts (about 5 KB a link) are made for each frame, not kept.
    for link in (pair.a, pair.b):
        assert link._send_aead is None and link._recv_aead is None
        assert link._send is not None and link._send._aead is None
    peeler, packet = b"\x11" * 32, bytes(range(256)) * 5
    pair.deliver_to_b(pair.a.encrypt_onion(peeler, packet))
    pair.deliver_to_a(pair.b.encrypt_onion(peeler, packet[::-1]))
    assert pair.onions_at_b == [(peeler, packet)]
    assert pair.onions_at_a == [(peeler, packet[::-1])]


def test_a_busy_link_keeps_its_ciphers() -> None:
    pair = established()
    assert pair.b is not None
    peeler, packet = b"\x11" * 32, bytes(range(256)) * 5
    for _ in range(int(3 * TIMERS.keepalive_interval / 0.05)):
        for _ in range(4):
            pair.deliver_to_b(pair.a.encrypt_onion(peeler, packet))
        pair.advance(0.05)
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.a._send_aead is not None and pair.b._recv_aead is not None


def test_close_tells_the_peer() -> None:
    pair = established()
    assert pair.b is not None
    events(pair.b)
    pair.a.close("shutdown", pair.now)
    pair.pump()
    assert events(pair.b) == [LinkClosed("shutdown", by_peer=True)]


def test_endpoint_demultiplexes_sessions_by_index_and_address() -> None:
    rng = seeded_rng(5)
    endpoint = Endpoint(identity=BOB, static_private=rng(32), secret=SECRET, rng=rng)
    dialers = [
        Link(
            initiator=True,
            identity=ALICE,
            static_private=rng(32),
            secret=SECRET,
            local_index=i,
            now=0.0,
            rng=rng,
            expected_fingerprint=BOB.fingerprint,
        )
        for i in range(3)
    ]
    addresses = [("127.0.0.1", 5000 + i) for i in range(3)]
    for _ in range(4):
        for dialer, address in zip(dialers, addresses, strict=True):
            for message in dialer.datagrams_to_send():
                link = endpoint.route(message, address, 0.0)
                if link is not None:
                    link.receive_datagram(message, 0.0)
                    for reply in link.datagrams_to_send():
                        dialer.receive_datagram(reply, 0.0)
    assert all(d.state is LinkState.ESTABLISHED for d in dialers)
    assert len(endpoint.sessions) == 3
    # A session's messages from another address are refused.
    frame = dialers[0].encrypt_onion(b"\x44" * 32, b"p")
    assert endpoint.route(frame, addresses[1], 0.0) is None
    assert endpoint.statistics().drops["wrong_address"] == 1


def test_an_hs_init_replayed_from_another_address_cannot_claim_the_dialers_session() -> None:
    """Someone on the path copies the dialer's HS_INIT and sends it first from elsewhere: the
    copy gets a session of its own (which it cannot complete), the dialer keeps its own."""
    pair = Pair()
    (hs_init,) = pair.a.datagrams_to_send()
    copy = pair.endpoint.route(hs_init, ("127.0.0.1", 6666), pair.now)
    assert copy is not None
    copy.receive_datagram(hs_init, pair.now)
    copy.datagrams_to_send()  # its HS_RESP goes to the copier, who has no use for it
    pair.deliver_to_b(hs_init)
    assert pair.b is not None and pair.b is not copy
    pair.deliver_to_b(hs_init)  # a retransmission from the dialer reaches its own session
    pair.pump()
    assert pair.a.state is LinkState.ESTABLISHED
    assert pair.b.state is LinkState.ESTABLISHED
    assert copy.state is LinkState.HANDSHAKING
    assert len(pair.endpoint.sessions) == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([0, HS_INIT, HS_RESP, HS_FINAL, 4, PROOF]))
def test_garbage_never_raises(data: bytes, first: int) -> None:
    pair = established()
    assert pair.b is not None
    message = bytes([first]) + data if first else data
    pair.deliver_to_b(message)
    pair.deliver_to_a(message)
    assert pair.a.state is LinkState.ESTABLISHED
    fresh = Pair(seed=random.Random(len(data)).randrange(1000))
    fresh.deliver_to_b(message)
    fresh.deliver_to_a(message)


def test_data_header_layout_is_documented_size() -> None:
    assert DATA_HEADER.size == 13


def test_link_closes_for_rekey_before_the_nonce_could_wrap() -> None:
    from earendil_py.core.link import REKEY_AFTER_FRAMES

    pair = established()
    assert pair.a._send is not None
    pair.a._send.set_nonce(REKEY_AFTER_FRAMES)
    events(pair.a)
    pair.advance(1.5)
    assert events(pair.a) == [LinkClosed("rekey")]


def test_a_huge_counter_jump_costs_no_memory() -> None:
    pair = established()
    assert pair.a._send is not None
    pair.a._send.set_nonce(2**59)
    pair.deliver_to_b(pair.a.encrypt_onion(b"\x55" * 32, b"far"))
    assert pair.onions_at_b == [(b"\x55" * 32, b"far")]


def test_a_batch_is_encrypted_exactly_as_frame_by_frame() -> None:
    batched, single = established(), established()  # same seed: same keys and counters
    onions = [(bytes([i]) * 32, bytes([i]) * (50 + i)) for i in range(5)]
    frames = batched.a.encrypt_onions([onion_frame(*onion) for onion in onions])
    assert frames == [single.a.encrypt_onion(*onion) for onion in onions]
    for frame in reversed(frames):
        batched.deliver_to_b(frame)
    assert batched.onions_at_b == onions[::-1]


def test_a_batch_stops_at_the_send_limit_like_single_frames() -> None:
    from earendil_py.core.link import REJECT_AFTER_FRAMES

    pair = established()
    assert pair.a._send is not None
    pair.a._send.set_nonce(REJECT_AFTER_FRAMES - 2)
    with pytest.raises(LocalProtocolError):
        pair.a.encrypt_onions([onion_frame(b"\x66" * 32, b"p")] * 3)
    assert pair.a._send.nonce == REJECT_AFTER_FRAMES  # the two frames it could encrypt
    with pytest.raises(LocalProtocolError):
        pair.a.encrypt_onion(b"\x66" * 32, b"p")


def test_a_data_frame_with_the_reserved_nonce_is_dropped_before_decryption() -> None:
    pair = established()
    assert pair.b is not None
    # Noise reserves nonce 2^64-1 (spec 5.1); a header can still carry it.
    header = DATA_HEADER.pack(4, pair.b.local_index, 2**64 - 1)
    pair.deliver_to_b(header + bytes(40))
    assert pair.b.statistics().drops["nonce_exhausted"] == 1
    pair.deliver_to_b(pair.a.encrypt_onion(b"\x77" * 32, b"next"))
    assert pair.onions_at_b == [(b"\x77" * 32, b"next")]


def test_a_run_of_messages_is_taken_as_one_by_one() -> None:
    batched, single = established(), established()  # same seed: the same keys
    good = [batched.a.encrypt_onion(bytes([i]) * 32, b"onion %d" % i) for i in range(3)]
    ping = batched.a._encrypt(PING, (7).to_bytes(8, "big"))
    tampered = good[1][:-1] + bytes([good[1][-1] ^ 1])
    run = [good[0], good[0], tampered, good[1], ping, b"\x09garbage", good[2], b"x" * 20_000]
    before = batched.b.statistics()
    before_in = (before.frames_in, before.bytes_in)
    frames = batched.b.receive_datagrams(run, 1.0)
    assert frames == [onion_frame(bytes([i]) * 32, b"onion %d" % i) for i in range(3)]
    one_by_one = [single.b.receive_datagram(message, 1.0) for message in run]
    assert [o for o in one_by_one if o is not None] == [(f[1:33], f[33:]) for f in frames]
    stats, expected = batched.b.statistics(), single.b.statistics()
    assert stats.drops == expected.drops
    assert stats.drops == {"replay": 1, "decrypt": 1, "malformed": 1, "too_large": 1}
    assert (stats.frames_in, stats.bytes_in) == (expected.frames_in, expected.bytes_in)
    assert (stats.frames_in, stats.bytes_in) == (
        before_in[0] + 4,
        before_in[1] + sum(map(len, run)),
    )
    assert batched.b.datagrams_to_send() == single.b.datagrams_to_send() != []  # the PONG


def test_messages_after_a_close_in_the_same_run_are_dropped() -> None:
    pair = established()
    first, second = (pair.a.encrypt_onion(b"\x01" * 32, b"x") for _ in range(2))
    close = pair.a._encrypt(CLOSE, b"bye")
    assert pair.b.receive_datagrams([first, close, second], 1.0) == [
        onion_frame(b"\x01" * 32, b"x")
    ]
    assert pair.b.state is LinkState.CLOSED
    assert pair.b.statistics().drops["link_closed"] == 1
