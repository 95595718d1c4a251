"""The ledger hash chain: chains built by appending verify, and any edit to any entry is caught."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earendil_py.core.errors import EarendilError, LocalProtocolError
from earendil_py.core.identity import short_hex
from earendil_py.core.ledger import (
    GENESIS,
    Entry,
    LedgerCorrupt,
    body_hash,
    build_entry,
    entry_hash,
    verify_chain,
)

NEIGHBOR = bytes(range(0xA0, 0xC0))
OTHER = bytes(range(32))
KINDS = ["debt_checkpoint", "price", "settlement_completed"]

Item = tuple[str, bytes, int]  # kind, body, recorded_at


def make_chain(items: list[Item], neighbor: bytes = NEIGHBOR) -> list[Entry]:
    chain: list[Entry] = []
    for kind, body, recorded_at in items:
        seq, prev = (chain[-1].seq, chain[-1].hash) if chain else (0, GENESIS)
        chain.append(
            build_entry(
                neighbor=neighbor,
                seq=seq + 1,
                kind=kind,
                body=body,
                prev_hash=prev,
                recorded_at=recorded_at,
            )
        )
    return chain


def simple_chain(length: int = 5) -> list[Entry]:
    return make_chain([(KINDS[i % 3], b"body %d" % i, 1_700_000_000 + i) for i in range(length)])


items_strategy = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.binary(max_size=24),
        st.integers(min_value=0, max_value=2**63 - 1),
    ),
    min_size=1,
    max_size=6,
)


def test_empty_chain_has_genesis_head() -> None:
    assert verify_chain([]) == GENESIS == bytes(32)


@given(items=items_strategy)
@settings(max_examples=100, deadline=None)
def test_a_chain_built_by_appending_verifies(items: list[Item]) -> None:
    chain = make_chain(items)
    assert verify_chain(chain) == chain[-1].hash
    assert [e.seq for e in chain] == list(range(1, len(items) + 1))
    assert chain[0].prev_hash == GENESIS
    assert all(later.prev_hash == earlier.hash for earlier, later in pairwise(chain))
    assert len({e.hash for e in chain}) == len(chain)


def test_pruned_bodies_still_verify_and_suffixes_verify_from_a_trusted_head() -> None:
    chain = simple_chain(6)
    pruned = [e.pruned() if e.seq <= 4 else e for e in chain]
    assert [e.body is None for e in pruned] == [True] * 4 + [False] * 2
    assert verify_chain(pruned) == chain[-1].hash
    assert verify_chain(chain[3:], start=(3, chain[2].hash)) == chain[-1].hash
    with pytest.raises(LedgerCorrupt, match="seq gap"):
        verify_chain(chain[3:])


def _mutate_int(value: int, position: int, delta: int) -> int:
    raw = bytearray(value.to_bytes(8, "big"))
    raw[position % 8] ^= delta
    return int.from_bytes(raw, "big")


def _mutate_bytes(value: bytes, position: int, delta: int) -> bytes:
    raw = bytearray(value)
    raw[position % len(raw)] ^= delta
    return bytes(raw)


@given(
    items=items_strategy,
    pruned=st.lists(st.booleans(), min_size=6, max_size=6),
    data=st.data(),
)
@settings(max_examples=400, deadline=None)
def test_any_single_byte_change_to_any_field_is_detected(
    items: list[Item], pruned: list[bool], data: st.DataObject
) -> None:
    chain = [
        e.pruned() if p else e for e, p in zip(make_chain(items), pruned[: len(items)], strict=True)
    ]
    index = data.draw(st.integers(0, len(chain) - 1), label="entry")
    victim = chain[index]
    fields = ["neighbor", "seq", "kind", "body_hash", "prev_hash", "hash", "recorded_at"]
    if victim.body:
        fields.append("body")
    field = data.draw(st.sampled_from(fields), label="field")
    position = data.draw(st.integers(0, 63), label="byte")
    delta = data.draw(st.integers(1, 255), label="xor")
    value = getattr(victim, field)
    if isinstance(value, int):
        changed: Any = _mutate_int(value, position, delta)
    elif isinstance(value, str):
        at = position % len(value)  # an ASCII kind: one byte per character, kept ASCII
        changed = value[:at] + chr(ord(value[at]) ^ (delta & 0x7F or 1)) + value[at + 1 :]
    else:
        changed = _mutate_bytes(value, position, delta)
    assert changed != value
    chain[index] = replace(victim, **{field: changed})

    with pytest.raises(LedgerCorrupt) as caught:
        verify_chain(chain)
    assert caught.value.seq == victim.seq, str(caught.value)
    assert f"seq {victim.seq}:" in str(caught.value)


@pytest.mark.parametrize(
    ("tamper", "seq", "reason", "words"),
    [
        (lambda c: c[:2] + c[3:], 3, "seq_gap", "seq gap"),
        (lambda c: [c[0], c[2], c[1], *c[3:]], 2, "seq_gap", "seq gap"),
        (
            lambda c: [c[0], replace(c[2], seq=2), replace(c[1], seq=3), *c[3:]],
            2,
            "prev_hash_mismatch",
            "prev_hash mismatch",
        ),
        (
            lambda c: [*c[:3], replace(c[3], body=b"more money"), c[4]],
            4,
            "body_mismatch",
            "body does not match body_hash",
        ),
        (
            lambda c: [*c[:3], replace(c[3], kind="price_changed"), c[4]],
            4,
            "hash_mismatch",
            "hash mismatch",
        ),
        (lambda c: [*c[:4], replace(c[4], hash=bytes(32))], 5, "hash_mismatch", "hash mismatch"),
        (
            lambda c: [*c[:2], replace(c[2], neighbor=OTHER), *c[3:]],
            3,
            "wrong_neighbor",
            f"belongs to neighbour {short_hex(OTHER)}",
        ),
        (
            lambda c: [*c[:2], replace(c[2], kind="Not A Kind"), *c[3:]],
            3,
            "malformed",
            "is not a snake_case label",
        ),
    ],
)
def test_errors_name_the_neighbour_the_seq_and_the_problem(
    tamper: object, seq: int, reason: str, words: str
) -> None:
    assert callable(tamper)
    with pytest.raises(LedgerCorrupt) as caught:
        verify_chain(tamper(simple_chain()))
    message = str(caught.value)
    assert message.startswith(f"neighbour {short_hex(NEIGHBOR)} seq {seq}: ")
    assert words in message
    assert (caught.value.neighbor, caught.value.seq, caught.value.reason) == (NEIGHBOR, seq, reason)
    assert isinstance(caught.value, EarendilError)


def test_every_hashed_field_changes_the_hash() -> None:
    base = {
        "prev_hash": GENESIS,
        "neighbor": NEIGHBOR,
        "seq": 1,
        "kind": "price",
        "body_hash": body_hash(b""),
        "recorded_at": 0,
    }
    variants: list[dict[str, object]] = [
        {"prev_hash": b"\x01" * 32},
        {"neighbor": OTHER},
        {"seq": 2},
        {"kind": "pricd"},
        {"body_hash": body_hash(b"\x00")},
        {"recorded_at": 1},
    ]

    def digest(fields: dict[str, object]) -> bytes:
        args = {**base, **fields}
        return entry_hash(
            args["prev_hash"],  # type: ignore[arg-type]
            args["neighbor"],  # type: ignore[arg-type]
            args["seq"],  # type: ignore[arg-type]
            args["kind"],  # type: ignore[arg-type]
            args["body_hash"],  # type: ignore[arg-type]
            recorded_at=args["recorded_at"],  # type: ignore[arg-type]
        )

    digests = {digest({})} | {digest(v) for v in variants}
    assert len(digests) == 1 + len(variants)
    # Domain separation: neither digest is plain BLAKE3 of its input, nor equal to each other.
    assert body_hash(b"x") != blake3.blake3(b"x").digest()
    assert len(body_hash(b"x")) == 32


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("neighbor", b"\x01" * 31, "31 bytes"),
        ("seq", 0, "seq 0"),
        ("seq", 2**63, "out of range"),
        ("kind", "", "snake_case"),
        ("kind", "Price", "snake_case"),
        ("kind", "x" * 65, "snake_case"),
        ("kind", "pr\u00efce", "snake_case"),
        ("prev_hash", b"\x00" * 31, "prev_hash is 31 bytes"),
        ("recorded_at", -1, "recorded_at -1"),
    ],
)
def test_build_entry_refuses_out_of_range_fields(field: str, value: object, words: str) -> None:
    fields: dict[str, object] = {
        "neighbor": NEIGHBOR,
        "seq": 1,
        "kind": "price",
        "body": b"",
        "prev_hash": GENESIS,
        "recorded_at": 0,
    }
    fields[field] = value
    with pytest.raises(LocalProtocolError, match=words):
        build_entry(**fields)  # type: ignore[arg-type]
