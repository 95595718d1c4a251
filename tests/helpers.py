"""Helpers shared by core and runtime tests."""

from __future__ import annotations

import random
from collections.abc import Callable


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom."""
    return random.Random(seed).randbytes
