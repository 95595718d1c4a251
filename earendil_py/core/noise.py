"""The Noise handshake for links, as a pure state machine (Noise Protocol Framework, rev. 34).

Implements exactly `Noise_XX_25519_ChaChaPoly_BLAKE2b` and its psk3 variant
`Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b`, the layers of spec section 5: `CipherState`,
`SymmetricState` and `HandshakeState`. There is no I/O here: the caller moves the bytes, and
the ephemeral key comes from an injected `rng` (or is given outright, as test vectors need).

Errors name the party at fault. Every way a peer's message can be wrong (short, oversized,
forged, a low-order public key) raises `RemoteProtocolError` with a `reason` for drop counters;
calling a method out of turn or with bad arguments raises `LocalProtocolError`.

A failed `read_message` leaves the handshake exactly as it was, so a forged or corrupted
datagram cannot kill a handshake that a genuine datagram would still complete (the same
reason WireGuard processes handshake messages statelessly until they authenticate).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError

Rng = Callable[[int], bytes]

PROTOCOL_XX = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"
PROTOCOL_XXPSK3 = b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"

DHLEN = 32  # spec 12.1
KEY_SIZE = 32
PSK_SIZE = 32  # spec 9.1
TAG_SIZE = 16
HASHLEN = 64  # spec 12.8 (BLAKE2b); BLOCKLEN = 128 is what hashlib.blake2b reports to hmac
MAX_MESSAGE_SIZE = 65535  # spec 3
# Spec 5.1: nonce 2^64-1 is reserved (REKEY uses it), so it is never used for a message.
MAX_NONCE = 2**64 - 1

# Spec 7.5, pattern XX; the psk3 modifier (spec 9.4) appends "psk" to the third message.
_XX_PATTERN: tuple[tuple[str, ...], ...] = (("e",), ("e", "ee", "s", "es"), ("s", "se"))
_XXPSK3_PATTERN: tuple[tuple[str, ...], ...] = (*_XX_PATTERN[:2], (*_XX_PATTERN[2], "psk"))
_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamping is done by libsodium)."""
    if len(private) != DHLEN:
        raise LocalProtocolError("an X25519 private key is 32 bytes")
    return crypto_scalarmult_base(private)


def _dh(private: bytes, public: bytes) -> bytes:
    # Spec 4.1 lets DH signal an error for invalid public keys. libsodium refuses low-order
    # points (an all-zero shared secret), which would let a peer force a known DH output.
    try:
        return crypto_scalarmult(private, public)
    except CryptoError:
        raise RemoteProtocolError("low-order X25519 public key", "handshake_bad_key") from None


# Spec 12.3: 32 bits of zeros followed by the little-endian 64-bit counter. Public so that a
# transport carrying explicit nonces (core.link) builds them in one call per frame.
NONCE = struct.Struct("<4xQ")


def _take(data: bytes, size: int) -> tuple[bytes, bytes]:
    if len(data) < size:
        raise RemoteProtocolError("handshake message too short", "handshake_malformed")
    return data[:size], data[size:]


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    # Spec 4.3: HKDF over HMAC-BLAKE2b with the chaining key as salt and no info string.
    temp_key = hmac.digest(chaining_key, ikm, hashlib.blake2b)
    out: list[bytes] = []
    previous = b""
    for i in range(1, outputs + 1):
        previous = hmac.digest(temp_key, previous + bytes([i]), hashlib.blake2b)
        out.append(previous)
    return out


class CipherState:
    """A key and a message counter (spec 5.1). Without a key, encryption is the identity.

    `decrypt_with_ad` raises `RemoteProtocolError` ("decrypt" for a forgery or short input,
    "nonce_exhausted" once the counter reaches the reserved value). `encrypt_with_ad` raises
    `LocalProtocolError` when the counter is exhausted: rekeying does not reset it, so the
    link must be re-handshaken long before that.
    """

    # The AEAD is `cryptography`'s ChaCha20Poly1305 (OpenSSL): its key schedule is set up once
    # per key and a call costs ~2 us per 1.4 KB frame against ~7 us through PyNaCl's
    # wrappers, which matters on the link hot path.
    __slots__ = ("_aead", "_key", "_nonce")

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise LocalProtocolError("a cipher key is 32 bytes")
        self._key = key
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self._nonce = 0

    def __repr__(self) -> str:
        # Never show the key: reprs end up in logs and tracebacks.
        return f"CipherState(has_key={self.has_key}, nonce={self._nonce})"

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @property
    def nonce(self) -> int:
        """The counter the next message will use."""
        return self._nonce

    def set_nonce(self, nonce: int) -> None:
        """Use `nonce` for the next message (spec 5.1), e.g. an explicit nonce from a frame."""
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("a nonce is an unsigned 64-bit integer")
        self._nonce = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._key is None:
            return plaintext
        if self._nonce >= MAX_NONCE:
            raise LocalProtocolError("nonce exhausted: re-handshake before 2^64-1 messages")
        ciphertext = self.transport_aead().encrypt(NONCE.pack(self._nonce), plaintext, ad)
        self._nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._key is None:
            return ciphertext
        if self._nonce >= MAX_NONCE:
            raise RemoteProtocolError("nonce exhausted", "nonce_exhausted")
        if len(ciphertext) < TAG_SIZE:
            raise RemoteProtocolError("ciphertext shorter than its tag", "decrypt")
        try:
            plaintext = self.transport_aead().decrypt(NONCE.pack(self._nonce), ciphertext, ad)
        except InvalidTag:
            raise RemoteProtocolError("authentication tag mismatch", "decrypt") from None
        # Spec 5.1: the counter only advances on success, so a forgery costs the peer nothing.
        self._nonce += 1
        return plaintext

    def transport_aead(self) -> ChaCha20Poly1305:
        """The AEAD under this key, for a transport that carries explicit nonces and calls
        it directly on its hot path (core.link): it then builds nonces with `NONCE`, refuses
        MAX_NONCE, and keeps `nonce` advanced for what it sends. `rekey` replaces the AEAD.
        Made again if `forget_aead` let it go. Raises LocalProtocolError without a key."""
        if self._aead is None:
            if self._key is None:
                raise LocalProtocolError("a transport AEAD needs a key")
            self._aead = ChaCha20Poly1305(self._key)
        return self._aead

    def forget_aead(self) -> None:
        """Let the AEAD go until it is next needed. OpenSSL holds ~2.4 KB of cipher contexts
        per AEAD object, more than the rest of an idle link; making one again costs ~1.5 us."""
        self._aead = None

    def rekey(self) -> None:
        """Replace the key by REKEY(k) (spec 4.2, 11.3); the counter is kept."""
        if self._key is None:
            raise LocalProtocolError("rekey needs a key")
        aead = self.transport_aead()
        self._key = aead.encrypt(NONCE.pack(MAX_NONCE), b"\x00" * KEY_SIZE, b"")[:KEY_SIZE]
        self._aead = ChaCha20Poly1305(self._key)

    def copy(self) -> CipherState:
        other = CipherState(self._key)
        other._nonce = self._nonce
        return other


class SymmetricState:
    """The chaining key and handshake hash (spec 5.2)."""

    __slots__ = ("_chaining_key", "_cipher", "_hash")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self._hash = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self._hash = _hash(protocol_name)
        self._chaining_key = self._hash
        self._cipher = CipherState()

    def __repr__(self) -> str:
        return f"SymmetricState(cipher={self._cipher!r})"

    @property
    def handshake_hash(self) -> bytes:
        return self._hash

    @property
    def has_key(self) -> bool:
        return self._cipher.has_key

    def mix_key(self, ikm: bytes) -> None:
        self._chaining_key, temp_key = _hkdf(self._chaining_key, ikm, 2)
        # Spec 5.2: HASHLEN is 64, so keys are truncated to the cipher's 32 bytes.
        self._cipher = CipherState(temp_key[:KEY_SIZE])

    def mix_hash(self, data: bytes) -> None:
        self._hash = _hash(self._hash + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self._chaining_key, temp_hash, temp_key = _hkdf(self._chaining_key, ikm, 3)
        self.mix_hash(temp_hash)
        self._cipher = CipherState(temp_key[:KEY_SIZE])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self._hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self._hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator-to-responder, responder-to-initiator) transport ciphers."""
        temp_k1, temp_k2 = _hkdf(self._chaining_key, b"", 2)
        return CipherState(temp_k1[:KEY_SIZE]), CipherState(temp_k2[:KEY_SIZE])

    def copy(self) -> SymmetricState:
        other = SymmetricState.__new__(SymmetricState)
        other._chaining_key = self._chaining_key
        other._hash = self._hash
        other._cipher = self._cipher.copy()
        return other


class HandshakeState:
    """One side of an XX (or XXpsk3, when `psk` is given) handshake (spec 5.3).

    The initiator writes messages 1 and 3 and reads message 2; the responder the reverse.
    `psk` has no default so that choosing plain XX (None) is always deliberate. The ephemeral
    key is `ephemeral_private` if given (test vectors), else `rng(32)`. Arguments of the wrong
    size raise `LocalProtocolError`.
    """

    def __init__(
        self,
        initiator: bool,
        prologue: bytes,
        static_private: bytes,
        *,
        psk: bytes | None,
        ephemeral_private: bytes | None = None,
        rng: Rng | None = None,
    ) -> None:
        if len(static_private) != DHLEN:
            raise LocalProtocolError("an X25519 private key is 32 bytes")
        if psk is not None and len(psk) != PSK_SIZE:
            raise LocalProtocolError("a psk is 32 bytes")
        if ephemeral_private is None:
            if rng is None:
                raise LocalProtocolError("give either ephemeral_private or rng")
            ephemeral_private = rng(DHLEN)
        if len(ephemeral_private) != DHLEN:
            raise LocalProtocolError("an X25519 private key is 32 bytes")

        self._initiator = initiator
        self._psk = psk
        self._pattern = _XX_PATTERN if psk is None else _XXPSK3_PATTERN
        self._s = static_private
        self._s_public = x25519_public(static_private)
        self._e = ephemeral_private
        self._e_public = x25519_public(ephemeral_private)
        self._rs: bytes | None = None
        dh_tokens = [token for tokens in self._pattern for token in tokens if token in _DH_TOKENS]
        self._dh_pairs = frozenset(self._dh_pair(token) for token in dh_tokens)
        self._shared: dict[tuple[str, str], bytes] = {}
        self._message_index = 0
        self._split_done = False
        self._symmetric = SymmetricState(PROTOCOL_XX if psk is None else PROTOCOL_XXPSK3)
        self._symmetric.mix_hash(prologue)

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return f"HandshakeState({role}, psk={self._psk is not None}, message={self._message_index})"

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def static_public(self) -> bytes:
        return self._s_public

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static X25519 public key, once its message carrying it has been read."""
        return self._rs

    @property
    def is_complete(self) -> bool:
        return self._message_index == len(self._pattern)

    @property
    def is_my_turn(self) -> bool:
        """Whether the next step is `write_message` (False also once complete)."""
        return not self.is_complete and (self._message_index % 2 == 0) == self._initiator

    @property
    def handshake_hash(self) -> bytes:
        """The final `h` (spec 11.2), for channel binding; raises LocalProtocolError before."""
        if not self.is_complete:
            raise LocalProtocolError("the handshake hash is only final once complete")
        return self._symmetric.handshake_hash

    def write_message(self, payload: bytes) -> bytes:
        """The next handshake message carrying `payload`.

        Raises LocalProtocolError out of turn or if the message would exceed 65535 bytes
        (the state is then unchanged). Never raises RemoteProtocolError: peer keys were
        checked when they were read.
        """
        if not self.is_my_turn:
            raise LocalProtocolError("write_message called when it is not our turn")
        sym = self._symmetric.copy()
        out = bytearray()
        for token in self._pattern[self._message_index]:
            match token:
                case "e":
                    out += self._e_public
                    sym.mix_hash(self._e_public)
                    if self._psk is not None:
                        # Spec 9.2: with a psk, "e" is also a key input, so no key derived
                        # from the psk is ever used without fresh ephemeral randomness.
                        sym.mix_key(self._e_public)
                case "s":
                    out += sym.encrypt_and_hash(self._s_public)
                case "psk":
                    assert self._psk is not None
                    sym.mix_key_and_hash(self._psk)
                case _:
                    sym.mix_key(self._shared[self._dh_pair(token)])
        out += sym.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_SIZE:
            raise LocalProtocolError("handshake message would exceed 65535 bytes")
        self._symmetric = sym
        self._message_index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its payload.

        Raises RemoteProtocolError (reason "handshake_malformed", "handshake_decrypt" or
        "handshake_bad_key") for any bad message, leaving the state untouched; raises
        LocalProtocolError when it is not the peer's turn.
        """
        if self.is_complete or self.is_my_turn:
            raise LocalProtocolError("read_message called when it is not the peer's turn")
        if len(message) > MAX_MESSAGE_SIZE:
            raise RemoteProtocolError("handshake message over 65535 bytes", "handshake_malformed")

        # Work on copies and commit only on success (see the module docstring).
        sym = self._symmetric.copy()
        shared = dict(self._shared)
        rs = self._rs
        rest = message
        for token in self._pattern[self._message_index]:
            match token:
                case "e":
                    re, rest = _take(rest, DHLEN)
                    sym.mix_hash(re)
                    if self._psk is not None:
                        sym.mix_key(re)
                    shared.update(self._agree("e", re))
                case "s":
                    encrypted_s, rest = _take(rest, DHLEN + TAG_SIZE if sym.has_key else DHLEN)
                    rs = self._decrypt(sym, encrypted_s)
                    shared.update(self._agree("s", rs))
                case "psk":
                    assert self._psk is not None
                    sym.mix_key_and_hash(self._psk)
                case _:
                    sym.mix_key(shared[self._dh_pair(token)])
        if sym.has_key and len(rest) < TAG_SIZE:
            raise RemoteProtocolError("handshake message too short", "handshake_malformed")
        payload = self._decrypt(sym, rest)

        self._symmetric, self._shared, self._rs = sym, shared, rs
        self._message_index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, recv) transport ciphers for this side (spec 5.2 Split).

        Raises LocalProtocolError before completion or on a second call: two copies of a
        cipher would reuse nonces.
        """
        if not self.is_complete:
            raise LocalProtocolError("split() before the handshake is complete")
        if self._split_done:
            raise LocalProtocolError("split() may only be called once")
        self._split_done = True
        initiator_to_responder, responder_to_initiator = self._symmetric.split()
        if self._initiator:
            return initiator_to_responder, responder_to_initiator
        return responder_to_initiator, initiator_to_responder

    def _dh_pair(self, token: str) -> tuple[str, str]:
        # Spec 7.1: in "es", "se", ... the first letter names the initiator's key and the
        # second the responder's; this returns (our key, their key).
        return (token[0], token[1]) if self._initiator else (token[1], token[0])

    def _agree(self, remote_letter: str, remote: bytes) -> dict[tuple[str, str], bytes]:
        # Every DH a peer key takes part in is computed as soon as the key is read, so a
        # low-order key is refused by read_message and write_message never sees a bad key.
        return {
            (local, remote_letter): _dh(self._e if local == "e" else self._s, remote)
            for local, their in self._dh_pairs
            if their == remote_letter
        }

    @staticmethod
    def _decrypt(sym: SymmetricState, ciphertext: bytes) -> bytes:
        try:
            return sym.decrypt_and_hash(ciphertext)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), "handshake_decrypt") from None
