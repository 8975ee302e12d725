"""The learning-rate schedule (no Ray)."""

from __future__ import annotations

import pytest

from echo_ray.train.objectives import lr_lambda


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lam = [lr_lambda(s, warmup=4, total=20, floor=0.1) for s in range(21)]
    assert lam[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lam[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lam[4:], lam[5:], strict=False))
    assert lam[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lam[20] == pytest.approx(0.1)
