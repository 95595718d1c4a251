import pytest

from earendil_py.core.errors import RemoteProtocolError
from earendil_py.core.identity import (
    FINGERPRINT_SIZE,
    Identity,
    IdentityDescriptor,
    fingerprint_of,
    parse_fingerprint,
    verify,
)
from tests.helpers import seeded_rng


def test_identity_round_trips_and_fingerprint_is_keyed_blake3() -> None:
    identity = Identity.generate(seeded_rng(1))
    again = Identity.from_bytes(identity.to_bytes())
    assert again.fingerprint == identity.fingerprint
    assert len(identity.fingerprint) == FINGERPRINT_SIZE
    assert identity.fingerprint == fingerprint_of(identity.identity_public)
    # Keyed: not the plain BLAKE3 of the public key.
    import blake3

    assert identity.fingerprint != blake3.blake3(identity.identity_public).digest()
    assert "signing_seed" not in repr(identity)


def test_descriptor_verifies_and_tampering_is_rejected() -> None:
    identity = Identity.generate(seeded_rng(2))
    descriptor = identity.descriptor(timestamp=1_800_000_000)
    descriptor.verify()
    assert descriptor.fingerprint == identity.fingerprint
    other = Identity.generate(seeded_rng(3))
    swapped = IdentityDescriptor(
        descriptor.identity_public, other.onion_public, descriptor.timestamp, descriptor.signature
    )
    with pytest.raises(RemoteProtocolError):
        swapped.verify()
    later = IdentityDescriptor(
        descriptor.identity_public, descriptor.onion_public, 1_800_000_001, descriptor.signature
    )
    with pytest.raises(RemoteProtocolError):
        later.verify()


def test_signatures_are_domain_separated() -> None:
    identity = Identity.generate(seeded_rng(4))
    signature = identity.sign(b"domain a", b"message")
    verify(identity.identity_public, b"domain a", b"message", signature)
    with pytest.raises(RemoteProtocolError):
        verify(identity.identity_public, b"domain b", b"message", signature)
    # Moving bytes between domain and message must not produce the same signed bytes.
    with pytest.raises(RemoteProtocolError):
        verify(identity.identity_public, b"domain ", b"amessage", signature)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("ab" * 31, "64 hex digits"), ("zz" * 32, "hex digits only")],
)
def test_parse_fingerprint_rejects_bad_text(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_fingerprint(text)


def test_bad_identity_bytes_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected 65 bytes"):
        Identity.from_bytes(b"\x01" * 10)
    with pytest.raises(ValueError, match="version"):
        Identity.from_bytes(b"\x09" + b"\x00" * 64)
