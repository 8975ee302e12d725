"""Small deterministic test images."""

from __future__ import annotations

import numpy as np


def ramp(rows: int = 48, columns: int = 64, bits: int = 12) -> np.ndarray:
    """A deterministic ramp over the `bits`-bit range, with a noisy top-left corner."""
    dtype = np.uint8 if bits <= 8 else np.uint16
    top = 2**bits - 1
    yy, xx = np.mgrid[0:rows, 0:columns]
    img = (yy * columns + xx) * top // (rows * columns - 1)
    rng = np.random.default_rng(bits)
    img[: rows // 4, : columns // 4] = rng.integers(0, top + 1, (rows // 4, columns // 4))
    return img.astype(dtype)
