"""Text from peers, made safe to show on a terminal.

A neighbour chooses its chat messages, rejection reasons and CLOSE reasons, and any node in
the overlay chooses the datagrams it sends us. Printed raw, such text can drive the terminal
that shows it: `ESC[2J` clears the screen, `ESC]0;...BEL` retitles the window, a carriage
return or newline forges a line that looks like ours, and bidi overrides such as U+202E
reorder what follows so that a fingerprint or an amount reads differently from what it is.
"""

from __future__ import annotations

import unicodedata

# Cc: C0 controls, DEL and C1 controls. Cf: format characters, among them every bidi control
# (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069) and zero-width ones. Zl/Zp: U+2028/U+2029,
# which some terminals and viewers treat as line breaks. Cs: lone surrogates, which cannot
# even be encoded for output. Unassigned code points (Cn) are left alone: they may be letters
# in a newer Unicode than this Python knows.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: str) -> str:
    """`text` with every control, format (bidi included), line/paragraph separator and
    surrogate character replaced by a visible escape (`\\x1b`, `\\u202e`, `\\U000e0001`).

    Everything else, ordinary non-ASCII letters included, is kept as it is. Backslashes are not
    doubled: the result is for people to read, not to parse back.
    """
    if text.isprintable():  # the common case; str.isprintable is false for every char escaped
        return text
    return "".join(
        _escape(char) if unicodedata.category(char) in _ESCAPED_CATEGORIES else char
        for char in text
    )


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
