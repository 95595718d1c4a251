"""The state machine's tables are written once in the code, and the docs show the same ones."""

from __future__ import annotations

import re
from pathlib import Path

import earendil_py.core.neighbor as neighbor_module
from earendil_py.core.settlement import TRANSITIONS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _neighbor_table_in_code() -> list[str]:
    doc = neighbor_module.__doc__
    assert doc is not None
    start = doc.index("    input ")
    end = doc.index("\nPure:")
    return [line.removeprefix("    ").rstrip() for line in doc[start:end].strip("\n").splitlines()]


def _neighbor_table_in_docs() -> list[str]:
    text = (DOCS / "accounting.md").read_text()
    blocks = re.findall(r"```\n(input .*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/accounting.md has one table of a Neighbor's inputs"
    return [line.rstrip() for line in blocks[0].strip("\n").splitlines()]


def test_the_neighbor_table_in_the_docs_is_the_one_in_the_code() -> None:
    code = _neighbor_table_in_code()
    assert code[0].split() == ["input", "entries", "written", "calls", "made"]
    assert _neighbor_table_in_docs() == code


def test_the_settlement_transitions_in_the_docs_are_the_code_s() -> None:
    text = (DOCS / "settlement.md").read_text()
    rows = re.findall(r"^\| (proposer|responder) \| (\S+) \| (\S+) \| (\S+) \|$", text, re.M)
    in_code = [
        (role, "(new)" if before is None else str(before), str(step), str(after))
        for (role, before, step), after in TRANSITIONS.items()
    ]
    assert rows == in_code


def test_every_test_the_docs_cite_exists() -> None:
    """docs/ cite tests as `dir/test_file.py::test_name` (the threat model's "shown by"
    column above all): each must name a test function that exists."""
    tests = DOCS.parent / "tests"
    cited = {
        (doc.name, tests / path.removeprefix("tests/"), name)
        for doc in DOCS.glob("*.md")
        for path, name in re.findall(r"`([\w/]+\.py)::(test_\w+)", doc.read_text())
    }
    assert len(cited) >= 60  # the threat model alone cites more
    missing = [
        (doc, str(file), name)
        for doc, file, name in sorted(cited)
        if not file.is_file() or not re.search(rf"^(async )?def {name}\b", file.read_text(), re.M)
    ]
    assert missing == []
