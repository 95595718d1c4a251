"""The Noise handshake: public test vectors byte for byte, then the failure contract."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError
from earendil_py.core.noise import (
    MAX_MESSAGE_SIZE,
    MAX_NONCE,
    PROTOCOL_XX,
    PROTOCOL_XXPSK3,
    CipherState,
    HandshakeState,
    x25519_public,
)
from tests.helpers import seeded_rng

VECTORS_FILE = "noise_xx_25519_chachapoly_blake2b.json"
PROLOGUE = b"earendil_py link v1"


@functools.cache
def _vectors() -> dict[str, dict[str, Any]]:
    # Fail, never skip: without the vectors nothing here proves interoperability.
    candidates = []
    if shared := os.environ.get("EARENDIL_SHARED"):
        candidates.append(Path(shared) / "vectors" / VECTORS_FILE)
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "vectors" / VECTORS_FILE)
    for path in candidates:
        if path.is_file():
            entries = json.loads(path.read_text())["vectors"]
            return {entry["protocol_name"]: entry for entry in entries}
    pytest.fail(f"Noise test vectors not found (set EARENDIL_SHARED); looked at {candidates}")


def _psk_of(vector: dict[str, Any], side: str) -> bytes | None:
    psks = vector.get(f"{side}_psks", [])
    assert len(psks) <= 1
    return bytes.fromhex(psks[0]) if psks else None


def _from_vector(vector: dict[str, Any], side: str) -> HandshakeState:
    return HandshakeState(
        side == "init",
        bytes.fromhex(vector[f"{side}_prologue"]),
        bytes.fromhex(vector[f"{side}_static"]),
        psk=_psk_of(vector, side),
        ephemeral_private=bytes.fromhex(vector[f"{side}_ephemeral"]),
    )


@pytest.mark.parametrize("protocol", [PROTOCOL_XX, PROTOCOL_XXPSK3])
def test_vectors_reproduced_byte_for_byte(protocol: bytes) -> None:
    vector = _vectors()[protocol.decode()]
    initiator, responder = _from_vector(vector, "init"), _from_vector(vector, "resp")
    messages = vector["messages"]
    assert len(messages) > 3

    for i, message in enumerate(messages[:3]):
        payload, ciphertext = bytes.fromhex(message["payload"]), message["ciphertext"]
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        assert writer.write_message(payload).hex() == ciphertext
        assert reader.read_message(bytes.fromhex(ciphertext)) == payload

    assert initiator.is_complete and responder.is_complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]
    assert initiator.remote_static == x25519_public(bytes.fromhex(vector["resp_static"]))
    assert responder.remote_static == x25519_public(bytes.fromhex(vector["init_static"]))

    # Cacophony's vectors keep strict alternation after the handshake: message 4 (index 3)
    # goes responder -> initiator, then initiator -> responder, and so on.
    initiator_send, initiator_recv = initiator.split()
    responder_send, responder_recv = responder.split()
    for i, message in enumerate(messages[3:], start=3):
        payload, ciphertext = bytes.fromhex(message["payload"]), message["ciphertext"]
        send, recv = (
            (initiator_send, responder_recv) if i % 2 == 0 else (responder_send, initiator_recv)
        )
        assert send.encrypt_with_ad(b"", payload).hex() == ciphertext
        assert recv.decrypt_with_ad(b"", bytes.fromhex(ciphertext)) == payload


def _pair(
    psk_initiator: bytes | None, psk_responder: bytes | None, seed: int = 0
) -> tuple[HandshakeState, HandshakeState]:
    rng = seeded_rng(seed)
    initiator = HandshakeState(True, PROLOGUE, rng(32), psk=psk_initiator, rng=rng)
    responder = HandshakeState(False, PROLOGUE, rng(32), psk=psk_responder, rng=rng)
    return initiator, responder


PSK = bytes(range(32))
Tamper = Callable[[int, bytes], bytes]


def _run(
    initiator: HandshakeState, responder: HandshakeState, tamper: Tamper | None = None
) -> list[bytes]:
    """Run all three messages; returns the payloads as read."""
    received = []
    for i in range(3):
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        message = writer.write_message(b"payload %d" % i)
        if tamper is not None:
            message = tamper(i, message)
        received.append(reader.read_message(message))
    return received


@pytest.mark.parametrize("psk", [None, PSK])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_keys_complete_and_agree(psk: bytes | None, seed: int) -> None:
    initiator, responder = _pair(psk, psk, seed)
    assert _run(initiator, responder) == [b"payload 0", b"payload 1", b"payload 2"]

    assert initiator.remote_static == responder.static_public
    assert responder.remote_static == initiator.static_public
    assert initiator.handshake_hash == responder.handshake_hash
    initiator_send, initiator_recv = initiator.split()
    responder_send, responder_recv = responder.split()
    for i in range(4):
        assert responder_recv.decrypt_with_ad(b"", initiator_send.encrypt_with_ad(b"", b"%d" % i))
        assert initiator_recv.decrypt_with_ad(b"", responder_send.encrypt_with_ad(b"", b"x"))
    with pytest.raises(LocalProtocolError):
        initiator.split()


def test_fresh_ephemerals_give_fresh_handshakes() -> None:
    first, _ = _pair(PSK, PSK, seed=1)
    second = HandshakeState(True, PROLOGUE, seeded_rng(1)(32), psk=PSK, rng=seeded_rng(99))
    assert first.static_public == second.static_public
    assert first.write_message(b"") != second.write_message(b"")


@pytest.mark.parametrize(
    ("psk_initiator", "psk_responder"),
    [(PSK, bytes(32)), (None, PSK), (PSK, None)],
)
def test_psk_mismatch_is_caught_by_a_reader(
    psk_initiator: bytes | None, psk_responder: bytes | None
) -> None:
    initiator, responder = _pair(psk_initiator, psk_responder)
    with pytest.raises(RemoteProtocolError):
        _run(initiator, responder)
    assert not responder.is_complete


def test_wrong_psk_fails_at_the_responder_reading_message_three() -> None:
    initiator, responder = _pair(PSK, bytes(32))
    responder.read_message(initiator.write_message(b""))
    initiator.read_message(responder.write_message(b""))
    with pytest.raises(RemoteProtocolError) as caught:
        responder.read_message(initiator.write_message(b""))
    assert caught.value.reason == "handshake_decrypt"


def _mutations(message: bytes) -> list[bytes]:
    flips = [
        message[:i] + bytes([message[i] ^ mask]) + message[i + 1 :]
        for i in range(len(message))
        for mask in (0x01, 0x80)  # 0x80 also hits the X25519 bit that the DH itself ignores
    ]
    return [*flips, message[:-1], message + b"\x00"]


def _replacing(index: int, replacement: bytes) -> Tamper:
    return lambda i, message: replacement if i == index else message


@pytest.mark.parametrize("psk", [None, PSK])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_any_tampered_handshake_message_is_rejected(psk: bytes | None, index: int) -> None:
    # Without a psk, message 1 is unauthenticated, so its tampering is caught one read later
    # (by the initiator, through the handshake hash); it must be caught before completion.
    clean: list[bytes] = []

    def record(_: int, message: bytes) -> bytes:
        clean.append(message)
        return message

    _run(*_pair(psk, psk), tamper=record)
    for mutated in _mutations(clean[index]):
        with pytest.raises(RemoteProtocolError):
            _run(*_pair(psk, psk), tamper=_replacing(index, mutated))


def test_low_order_ephemeral_is_refused_when_read() -> None:
    for psk in (None, PSK):
        initiator, responder = _pair(psk, psk)
        genuine = initiator.write_message(b"")
        with pytest.raises(RemoteProtocolError) as caught:
            responder.read_message(bytes(32) + genuine[32:])
        assert caught.value.reason == "handshake_bad_key"
        assert responder.read_message(genuine) == b""


def test_size_limits() -> None:
    initiator, responder = _pair(PSK, PSK)
    with pytest.raises(RemoteProtocolError) as caught:
        responder.read_message(b"\x00" * (MAX_MESSAGE_SIZE + 1))
    assert caught.value.reason == "handshake_malformed"
    with pytest.raises(RemoteProtocolError) as caught:
        responder.read_message(b"\x00" * 31)
    assert caught.value.reason == "handshake_malformed"
    with pytest.raises(LocalProtocolError):
        initiator.write_message(b"\x00" * (MAX_MESSAGE_SIZE - 32 - 16 + 1))
    # Neither failure moved either side: the handshake still completes.
    message = initiator.write_message(b"\x00" * (MAX_MESSAGE_SIZE - 32 - 16))
    assert len(message) == MAX_MESSAGE_SIZE
    responder.read_message(message)
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    assert responder.is_complete


def test_calls_out_of_turn_are_local_errors() -> None:
    initiator, responder = _pair(PSK, PSK)
    with pytest.raises(LocalProtocolError):
        initiator.read_message(b"\x00" * 64)
    with pytest.raises(LocalProtocolError):
        responder.write_message(b"")
    with pytest.raises(LocalProtocolError):
        initiator.split()
    with pytest.raises(LocalProtocolError):
        _ = initiator.handshake_hash
    message = initiator.write_message(b"")
    with pytest.raises(LocalProtocolError):
        initiator.write_message(b"")
    responder.read_message(message)
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    for side in (initiator, responder):
        assert side.is_complete and not side.is_my_turn
        with pytest.raises(LocalProtocolError):
            side.write_message(b"")
        with pytest.raises(LocalProtocolError):
            side.read_message(b"\x00" * 64)


def test_bad_constructor_arguments_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeState(True, b"", bytes(31), psk=None, rng=seeded_rng(0))
    with pytest.raises(LocalProtocolError):
        HandshakeState(True, b"", bytes(32), psk=bytes(16), rng=seeded_rng(0))
    with pytest.raises(LocalProtocolError):
        HandshakeState(True, b"", bytes(32), psk=None)
    with pytest.raises(LocalProtocolError):
        HandshakeState(True, b"", bytes(32), psk=None, rng=lambda n: bytes(n - 1))


def _corruptions(genuine: bytes) -> st.SearchStrategy[bytes]:
    flips = st.tuples(st.integers(0, len(genuine) - 1), st.integers(1, 255)).map(
        lambda t: genuine[: t[0]] + bytes([genuine[t[0]] ^ t[1]]) + genuine[t[0] + 1 :]
    )
    cuts = st.integers(0, len(genuine) - 1).map(lambda n: genuine[:n])
    extensions = st.binary(min_size=1, max_size=32).map(lambda tail: genuine + tail)
    return st.one_of(st.binary(max_size=256), flips, cuts, extensions)


@given(step=st.integers(0, 2), with_psk=st.booleans(), data=st.data())
def test_arbitrary_bytes_raise_only_remote_errors_and_change_nothing(
    step: int, with_psk: bool, data: st.DataObject
) -> None:
    psk = PSK if with_psk else None
    initiator, responder = _pair(psk, psk)
    for i in range(step):
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        reader.read_message(writer.write_message(b"hi"))
    writer, reader = (initiator, responder) if step % 2 == 0 else (responder, initiator)
    genuine = writer.write_message(b"hi")

    try:
        reader.read_message(data.draw(_corruptions(genuine), label="message"))
    except RemoteProtocolError:
        # A failed read left the reader as it was: the genuine message still completes it.
        assert reader.read_message(genuine) == b"hi"
        if step < 2:
            _run_from(step + 1, initiator, responder)
        assert initiator.handshake_hash == responder.handshake_hash


def _run_from(start: int, initiator: HandshakeState, responder: HandshakeState) -> None:
    for i in range(start, 3):
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        reader.read_message(writer.write_message(b""))


def _cipher_pair() -> tuple[CipherState, CipherState]:
    initiator, responder = _pair(None, None)
    _run(initiator, responder)
    send, _ = initiator.split()
    _, recv = responder.split()
    return send, recv


def test_transport_forgery_is_remote_error_and_does_not_advance_the_counter() -> None:
    send, recv = _cipher_pair()
    ciphertext = send.encrypt_with_ad(b"", b"data")
    for bad in (ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), ciphertext[:15], b""):
        with pytest.raises(RemoteProtocolError) as caught:
            recv.decrypt_with_ad(b"", bad)
        assert caught.value.reason == "decrypt"
    assert recv.nonce == 0
    assert recv.decrypt_with_ad(b"", ciphertext) == b"data"
    assert recv.nonce == 1


def test_nonce_two_to_the_64_minus_one_is_reserved() -> None:
    send, recv = _cipher_pair()
    send.set_nonce(MAX_NONCE - 1)
    recv.set_nonce(MAX_NONCE - 1)
    assert recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"last")) == b"last"
    assert send.nonce == MAX_NONCE
    with pytest.raises(LocalProtocolError):
        send.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(RemoteProtocolError) as caught:
        recv.decrypt_with_ad(b"", b"\x00" * 32)
    assert caught.value.reason == "nonce_exhausted"
    with pytest.raises(LocalProtocolError):
        send.set_nonce(MAX_NONCE + 1)


def test_rekey_follows_the_spec_and_keeps_the_counter() -> None:
    key = bytes(range(32))
    cipher = CipherState(key)
    cipher.set_nonce(7)
    cipher.rekey()
    # Spec 4.2: REKEY(k) = ENCRYPT(k, 2^64-1, empty ad, 32 zero bytes)[:32].
    nonce = b"\x00" * 4 + MAX_NONCE.to_bytes(8, "little")
    expected_key = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(32), b"", nonce, key)[:32]
    expected = CipherState(expected_key)
    expected.set_nonce(7)
    assert cipher.nonce == 7
    assert cipher.encrypt_with_ad(b"", b"x") == expected.encrypt_with_ad(b"", b"x")

    send, recv = _cipher_pair()
    stale = send.copy()
    send.rekey()
    recv.rekey()
    ciphertext = send.encrypt_with_ad(b"ad", b"after rekey")
    assert ciphertext != stale.encrypt_with_ad(b"ad", b"after rekey")
    assert recv.decrypt_with_ad(b"ad", ciphertext) == b"after rekey"
    with pytest.raises(LocalProtocolError):
        CipherState().rekey()


def test_repr_never_shows_keys() -> None:
    key = bytes(range(32))
    assert key.hex() not in repr(CipherState(key))
    assert "has_key=True" in repr(CipherState(key))
