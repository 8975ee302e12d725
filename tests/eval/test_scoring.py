"""Scoring without Ray: speed figures from per-report rows."""

from __future__ import annotations

import pytest

from echo_ray.eval.scoring import speed_figures


def test_speed_figures_share_a_batch_between_its_reports():
    rows = [  # two batches: 2 reports in 100 ms, 1 report in 50 ms
        {"batch_id": "a", "batch_latency_ms": 100.0, "num_tokens": 10, "batch_forwards": 11,
         "batch_tokens_per_forward": 1.0},
        {"batch_id": "a", "batch_latency_ms": 100.0, "num_tokens": 6, "batch_forwards": 11,
         "batch_tokens_per_forward": 1.0},
        {"batch_id": "b", "batch_latency_ms": 50.0, "num_tokens": 14, "batch_forwards": 3,
         "batch_tokens_per_forward": 5.0},
    ]
    speed = speed_figures(rows)
    assert speed["tokens_per_s"] == pytest.approx(30 / 0.15)  # 30 tokens in 150 ms
    assert speed["ms_per_report"] == pytest.approx(50.0)  # 150 ms / 3 reports
    assert speed["forwards_per_report"] == pytest.approx((11 + 11 + 3) / 3)
    assert speed["tokens_per_forward"] == pytest.approx((1 + 1 + 5) / 3)
    assert speed["num_batches"] == 2
