"""The per-neighbour ledger as a hash chain: entry encoding, hashing and verification.

Every neighbour has its own chain of entries numbered 1, 2, 3, ... Each entry commits to the
previous entry's hash (the first one to `GENESIS`), so the newest hash (the *head*) commits to
the whole history of that link: changing, inserting, deleting or reordering any entry changes
every hash after it. The head is what a settlement attestation pins and what the neighbour
co-signs; this module only builds and checks chains, the store keeps them on disk.

The body of an entry is hashed separately (`body_hash`) and the entry hash covers only that
digest. This is what makes pruning possible: an old body can be dropped (`Entry.body is None`)
and the chain still verifies, because nothing downstream needs the body bytes themselves.

Encoding of the hashed fields (all integers big-endian), keyed BLAKE3 under `ENTRY_HASH_KEY`:

    prev_hash (32) | neighbor (32) | seq (8) | recorded_at (8) | body_hash (32)
    | len(kind) (1) | kind (ASCII)

Every field has a fixed width except `kind`, which is last and length-prefixed, so two different
entries can never encode to the same bytes. `recorded_at` (unix seconds, advisory: it is the
caller's clock and is never used for ordering) is hashed too: it costs nothing and means a
timestamp in the ledger cannot be edited after the fact either. The body digest uses a different
key (`BODY_HASH_KEY`), so a body can never be confused with an encoded entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import blake3

from earendil_py.core.errors import EarendilError, LocalProtocolError
from earendil_py.core.identity import FINGERPRINT_SIZE, short_hex

HASH_SIZE = 32
GENESIS = bytes(HASH_SIZE)  # the "previous hash" of entry 1, and the head of an empty chain

# Keyed BLAKE3 with fixed project keys separates these digests from each other and from any
# other use of BLAKE3 over the same bytes (the same habit as identity.FINGERPRINT_KEY).
ENTRY_HASH_KEY = b"earendil_py ledger entry hash v1"
BODY_HASH_KEY = b"earendil_py ledger entry body v1"
assert len(ENTRY_HASH_KEY) == len(BODY_HASH_KEY) == 32

# SQLite integers are signed 64-bit; keeping seq and timestamps below 2**63 means they round-trip.
MAX_INT = 2**63 - 1
KIND_MAX_LEN = 64
_KIND_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz")
_KIND_REST = _KIND_FIRST | frozenset("0123456789_")


class LedgerCorrupt(EarendilError):
    """A stored ledger does not verify: a bug, a bad disk, or someone edited the file.

    `neighbor` and `seq` locate the first entry that is wrong (`seq` is the position in the
    chain where the problem shows up); `reason` is a short snake_case label such as
    `seq_gap`, `prev_hash_mismatch`, `body_mismatch` or `hash_mismatch`.
    """

    def __init__(
        self, message: str, *, neighbor: bytes | None = None, seq: int | None = None, reason: str
    ) -> None:
        super().__init__(message)
        self.neighbor = neighbor
        self.seq = seq
        self.reason = reason


def body_hash(body: bytes) -> bytes:
    """The digest an entry keeps of its body, so the body itself can be pruned later."""
    return blake3.blake3(body, key=BODY_HASH_KEY).digest()


def entry_hash(
    prev_hash: bytes,
    neighbor: bytes,
    seq: int,
    kind: str,
    body_hash: bytes,
    *,
    recorded_at: int,
) -> bytes:
    """The hash of one entry, over the encoding described in the module docstring.

    Raises LocalProtocolError if a field is out of range (see `build_entry`).
    """
    problem = _field_problem(
        neighbor=neighbor,
        seq=seq,
        kind=kind,
        body_digest=body_hash,
        prev_hash=prev_hash,
        recorded_at=recorded_at,
    )
    if problem is not None:
        raise LocalProtocolError(f"cannot hash ledger entry: {problem}")
    encoded_kind = kind.encode("ascii")
    return blake3.blake3(
        prev_hash
        + neighbor
        + seq.to_bytes(8, "big")
        + recorded_at.to_bytes(8, "big")
        + body_hash
        + len(encoded_kind).to_bytes(1, "big")
        + encoded_kind,
        key=ENTRY_HASH_KEY,
    ).digest()


def is_valid_kind(kind: str) -> bool:
    """Kinds are short snake_case ASCII labels (`debt_checkpoint`, `settlement_completed`)."""
    return (
        0 < len(kind) <= KIND_MAX_LEN
        and kind[0] in _KIND_FIRST
        and all(char in _KIND_REST for char in kind)
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry. `body is None` once pruned; `body_hash` and `hash` always stay."""

    neighbor: bytes  # the neighbour's 32-byte fingerprint
    seq: int  # 1, 2, 3, ... within this neighbour's chain
    kind: str
    body: bytes | None
    body_hash: bytes
    prev_hash: bytes
    hash: bytes
    recorded_at: int  # unix seconds from the caller's clock; hashed, but never used for order

    def pruned(self) -> Entry:
        """This entry without its body, as the store keeps it after `prune`."""
        return replace(self, body=None)


def build_entry(
    *,
    neighbor: bytes,
    seq: int,
    kind: str,
    body: bytes,
    prev_hash: bytes,
    recorded_at: int,
) -> Entry:
    """The entry that follows a head `(seq - 1, prev_hash)`.

    Raises LocalProtocolError if a field is out of range: the neighbour is not a 32-byte
    fingerprint, `seq` is not in 1..2**63-1, `kind` is not a snake_case label of at most
    64 characters, or `recorded_at` is not in 0..2**63-1.
    """
    digest = body_hash(body)
    return Entry(
        neighbor=neighbor,
        seq=seq,
        kind=kind,
        body=body,
        body_hash=digest,
        prev_hash=prev_hash,
        hash=entry_hash(prev_hash, neighbor, seq, kind, digest, recorded_at=recorded_at),
        recorded_at=recorded_at,
    )


def verify_chain(entries: Iterable[Entry], *, start: tuple[int, bytes] = (0, GENESIS)) -> bytes:
    """Check one neighbour's entries, in seq order, and return the head hash.

    `start` is the `(seq, hash)` the first entry must follow: `(0, GENESIS)` for a whole chain,
    or a trusted head to check only a suffix. An empty iterable returns `start`'s hash.
    Pruned entries (`body is None`) are accepted: their `body_hash` still takes part in the hash.

    Raises LedgerCorrupt at the first entry that is wrong, naming the neighbour (short hex),
    the seq the chain expected there, and what is wrong.
    """
    expected_seq, head = start
    neighbor: bytes | None = None
    for entry in entries:
        expected_seq += 1
        if neighbor is None:
            neighbor = entry.neighbor
        problem = _entry_problem(entry, neighbor, expected_seq, head)
        if problem is not None:
            reason, what = problem
            raise LedgerCorrupt(
                f"neighbour {_short(neighbor)} seq {expected_seq}: {what}",
                neighbor=neighbor,
                seq=expected_seq,
                reason=reason,
            )
        head = entry.hash
    return head


def _entry_problem(
    entry: Entry, neighbor: bytes, expected_seq: int, head: bytes
) -> tuple[str, str] | None:
    """(reason, description) of the first thing wrong with `entry` at this place in its
    chain, or None."""
    if entry.neighbor != neighbor:
        return "wrong_neighbor", f"entry belongs to neighbour {_short(entry.neighbor)}"
    if entry.seq != expected_seq:
        return "seq_gap", f"seq gap: the next entry has seq {entry.seq}"
    problem = _field_problem(
        neighbor=entry.neighbor,
        seq=entry.seq,
        kind=entry.kind,
        body_digest=entry.body_hash,
        prev_hash=entry.prev_hash,
        recorded_at=entry.recorded_at,
        digest=entry.hash,
    )
    if problem is not None:
        return "malformed", f"malformed entry: {problem}"
    if entry.prev_hash != head:
        return "prev_hash_mismatch", "prev_hash mismatch: it does not link to the entry before it"
    if entry.body is not None and body_hash(entry.body) != entry.body_hash:
        return "body_mismatch", "body does not match body_hash"
    computed = entry_hash(
        entry.prev_hash,
        entry.neighbor,
        entry.seq,
        entry.kind,
        entry.body_hash,
        recorded_at=entry.recorded_at,
    )
    if computed != entry.hash:
        return "hash_mismatch", "hash mismatch: the entry's fields do not hash to its stored hash"
    return None


def _short(neighbor: bytes) -> str:
    return short_hex(neighbor) if neighbor else "(empty)"


def _field_problem(
    *,
    neighbor: bytes,
    seq: int,
    kind: str,
    body_digest: bytes,
    prev_hash: bytes,
    recorded_at: int,
    digest: bytes | None = None,
) -> str | None:
    # Checked before hashing so that the encoding stays injective (fixed widths really are
    # fixed) and so that garbage read from disk becomes LedgerCorrupt, not a crash.
    if len(neighbor) != FINGERPRINT_SIZE:
        return f"neighbour is {len(neighbor)} bytes, not a {FINGERPRINT_SIZE}-byte fingerprint"
    if not 1 <= seq <= MAX_INT:
        return f"seq {seq} is out of range"
    if not is_valid_kind(kind):
        return f"kind {kind!r} is not a snake_case label of at most {KIND_MAX_LEN} characters"
    if not 0 <= recorded_at <= MAX_INT:
        return f"recorded_at {recorded_at} is out of range"
    for name, value in (("body_hash", body_digest), ("prev_hash", prev_hash), ("hash", digest)):
        if value is not None and len(value) != HASH_SIZE:
            return f"{name} is {len(value)} bytes, not {HASH_SIZE}"
    return None
