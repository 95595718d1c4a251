"""Fixtures for the hostile suite: see harness.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hostile.harness import Pair


@pytest.fixture(scope="module")
def module_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """The module's target and honest neighbour, made with the module's `PAIR` options if it
    has them; their ledgers are checked at the end."""
    options = getattr(request.module, "PAIR", {})
    pair = Pair(tmp_path_factory.mktemp("hostile"), **options).start()
    try:
        yield pair
    finally:
        if pair.t is not None and pair.t.process.poll() is None:
            pair.check_ledgers()
        pair.stop()


@pytest.fixture
def pair(module_pair: Pair) -> Pair:
    """The module's pair, running: a fresh network if an earlier test left one dead."""
    module_pair.ensure_running()
    return module_pair
