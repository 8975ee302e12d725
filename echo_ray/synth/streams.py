"""Named random streams: every draw in the synthetic archive comes from `_rng(seed, name, ...)`.

A stream is named by the archive seed, what it draws and for whom (study index, view,
finding type), so a study's draws depend neither on other studies nor on the archive size or
the order of work. `_u` and `_pick` draw from one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def _int_key(key: object) -> int:
    if isinstance(key, int | np.integer) and key >= 0:
        return int(key)
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")


def _rng(*keys: object) -> np.random.Generator:
    """An independent generator per named stream, e.g. _rng(seed, "study", 7)."""
    return np.random.default_rng(np.random.SeedSequence([_int_key(k) for k in keys]))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _pick(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None):
    if p is not None:
        p = np.asarray(p, dtype=float)
        p = p / p.sum()
    return options[int(rng.choice(len(options), p=p))]
