"""Peer text shown on a terminal: nothing in it can drive the terminal or reorder the line."""

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from earendil_py.core.text import printable

DANGEROUS = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
        ("a\x00b", "a\\x00b"),
        ("line\nfake line\r", "line\\x0afake line\\x0d"),
        ("\x7f\x9b", "\\x7f\\x9b"),
        (
            "pay 10\u202e01 \u2066x\u2069 \u200e\u200f\u061c",
            "pay 10\\u202e01 \\u2066x\\u2069 \\u200e\\u200f\\u061c",
        ),
        ("\u2028\ufeff\U000e0041", "\\u2028\\ufeff\\U000e0041"),
        ("\ud800", "\\ud800"),
        ("héllo, 世界 👋 tab-free", "héllo, 世界 👋 tab-free"),
        ("C:\\path\\x1b", "C:\\path\\x1b"),
    ],
)
def test_examples(text: str, shown: str) -> None:
    assert printable(text) == shown


@given(st.text(alphabet=st.characters(exclude_categories=())))  # surrogates too
def test_no_control_format_or_separator_character_survives(text: str) -> None:
    shown = printable(text)
    assert not [c for c in shown if unicodedata.category(c) in DANGEROUS]
    shown.encode("utf-8")  # no lone surrogate left to break the output stream
    assert printable(shown) == shown


@given(st.text(alphabet=st.characters(exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))))
def test_other_text_is_kept_as_it_is(text: str) -> None:
    assert printable(text) == text
