"""Node identity: an Ed25519 signing key, an X25519 onion key, and the descriptor binding them.

The fingerprint is a BLAKE3 keyed hash of the Ed25519 public key. Keying the hash with a fixed
project constant separates our fingerprints from any other use of plain BLAKE3 over the same
32 bytes. Signatures are always domain-separated (`sign(domain, message)`) so a signature made
for one purpose can never be replayed as another.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import blake3
import msgspec
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from earendil_py.core.errors import LocalProtocolError, RemoteProtocolError

FINGERPRINT_KEY = b"earendil_py identity fingerprint"
assert len(FINGERPRINT_KEY) == 32
FINGERPRINT_SIZE = 32
KEY_SIZE = 32
SIGNATURE_SIZE = 64
SHORT_HEX = 8

Rng = Callable[[int], bytes]

# The serialized identity file: a version tag then both 32-byte secrets.
IDENTITY_FILE_VERSION = 1

# Field types of wire structs: every value a peer sends is bounded at its type, so whatever
# decodes can be used without a local error further in (a u64 `struct.pack`, msgpack
# re-encoding a signed part, an int64 in storage). msgspec checks `Meta` at decode only.
MAX_UINT = 2**63 - 1
Uint = Annotated[int, msgspec.Meta(ge=0, le=MAX_UINT)]  # counts, sequence numbers, µMEL
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=MAX_UINT)]  # signed µMEL (a balance)
Timestamp = Uint  # unix seconds
Fingerprint = Annotated[
    bytes, msgspec.Meta(min_length=FINGERPRINT_SIZE, max_length=FINGERPRINT_SIZE)
]
PublicKey = Annotated[bytes, msgspec.Meta(min_length=KEY_SIZE, max_length=KEY_SIZE)]
Signature = Annotated[bytes, msgspec.Meta(min_length=SIGNATURE_SIZE, max_length=SIGNATURE_SIZE)]


def fingerprint_of(identity_public: bytes) -> bytes:
    """The 32-byte fingerprint of an Ed25519 public key."""
    if len(identity_public) != KEY_SIZE:
        raise LocalProtocolError("identity public key must be 32 bytes")
    return blake3.blake3(identity_public, key=FINGERPRINT_KEY).digest()


def short_hex(fingerprint: bytes) -> str:
    """The short form used in logs."""
    return fingerprint[: SHORT_HEX // 2].hex()


def parse_fingerprint(text: str) -> bytes:
    """Parse a 64-hex-digit fingerprint; raises ValueError with a reason otherwise."""
    if len(text) != FINGERPRINT_SIZE * 2:
        raise ValueError(f"a fingerprint is {FINGERPRINT_SIZE * 2} hex digits, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a fingerprint is hex digits only (0-9, a-f)") from None


def _signed_bytes(domain: bytes, message: bytes) -> bytes:
    # Length-prefixing the domain makes (domain, message) pairs encode injectively.
    return struct.pack(">B", len(domain)) + domain + message


def verify(identity_public: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Check a domain-separated signature; raises RemoteProtocolError("bad_signature")."""
    if len(identity_public) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError("malformed key or signature", "bad_signature")
    try:
        VerifyKey(identity_public).verify(_signed_bytes(domain, message), signature)
    except (BadSignatureError, ValueError):
        raise RemoteProtocolError("signature does not verify", "bad_signature") from None


class IdentityDescriptor(msgspec.Struct, frozen=True, array_like=True):
    """Binds an onion key to an identity at a time; what other nodes learn about us."""

    identity_public: PublicKey
    onion_public: PublicKey
    timestamp: Timestamp  # when signed
    signature: Signature

    DOMAIN = b"earendil_py identity descriptor v1"

    @staticmethod
    def signed_part(identity_public: bytes, onion_public: bytes, timestamp: int) -> bytes:
        return identity_public + onion_public + struct.pack(">Q", timestamp)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint_of(self.identity_public)

    def verify(self) -> None:
        """Raises RemoteProtocolError unless the signature and key sizes are valid."""
        if len(self.onion_public) != KEY_SIZE or not 0 <= self.timestamp < 2**64:
            raise RemoteProtocolError("malformed identity descriptor", "bad_descriptor")
        verify(
            self.identity_public,
            self.DOMAIN,
            self.signed_part(self.identity_public, self.onion_public, self.timestamp),
            self.signature,
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """Our secret keys. Never logged, never sent. The derived keys are computed once: every
    signature and every fingerprint check would otherwise re-derive them (~25 us each)."""

    signing_seed: bytes
    onion_secret: bytes
    _signing_key: SigningKey = field(init=False, repr=False, compare=False)
    identity_public: bytes = field(init=False, repr=False, compare=False)
    onion_public: bytes = field(init=False, repr=False, compare=False)
    fingerprint: bytes = field(init=False, repr=False, compare=False)

    @classmethod
    def generate(cls, rng: Rng) -> Identity:
        return cls(signing_seed=rng(KEY_SIZE), onion_secret=rng(KEY_SIZE))

    def __post_init__(self) -> None:
        if len(self.signing_seed) != KEY_SIZE or len(self.onion_secret) != KEY_SIZE:
            raise LocalProtocolError("identity secrets must be 32 bytes each")
        signing_key = SigningKey(self.signing_seed)
        identity_public = bytes(signing_key.verify_key)
        object.__setattr__(self, "_signing_key", signing_key)
        object.__setattr__(self, "identity_public", identity_public)
        object.__setattr__(self, "onion_public", crypto_scalarmult_base(self.onion_secret))
        object.__setattr__(self, "fingerprint", fingerprint_of(identity_public))

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"Identity(fingerprint={self.fingerprint.hex()})"

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self._signing_key.sign(_signed_bytes(domain, message)).signature

    def descriptor(self, timestamp: int) -> IdentityDescriptor:
        identity_public, onion_public = self.identity_public, self.onion_public
        signed = IdentityDescriptor.signed_part(identity_public, onion_public, timestamp)
        return IdentityDescriptor(
            identity_public=identity_public,
            onion_public=onion_public,
            timestamp=timestamp,
            signature=self.sign(IdentityDescriptor.DOMAIN, signed),
        )

    def to_bytes(self) -> bytes:
        return bytes([IDENTITY_FILE_VERSION]) + self.signing_seed + self.onion_secret

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        """Raises ValueError naming what is wrong with the serialized identity."""
        if len(data) != 1 + 2 * KEY_SIZE:
            raise ValueError(f"expected {1 + 2 * KEY_SIZE} bytes, found {len(data)}")
        if data[0] != IDENTITY_FILE_VERSION:
            raise ValueError(f"unknown identity file version {data[0]}")
        return cls(signing_seed=data[1 : 1 + KEY_SIZE], onion_secret=data[1 + KEY_SIZE :])
