"""The quickstart's own decisions that need no Ray (its whole run: tests/train/test_train.py)."""

from __future__ import annotations

from echo_ray.config.overrides import load_config
from echo_ray.quickstart import evaluation_config


def _evaluation(*overrides: str):
    return evaluation_config(load_config("tiny", list(overrides), None)).evaluate


def test_the_student_is_compared_to_its_teacher_by_default():
    assert _evaluation().compare_to == "teacher"


def test_the_callers_comparison_is_kept():
    assert _evaluation("evaluate.compare_to=ar").compare_to == "ar"


def test_no_comparison_without_bootstrap_instead_of_a_config_error_after_training():
    # a comparison needs resamples: asking for one here would fail only at the evaluation
    evaluate = _evaluation("evaluate.bootstrap_samples=0")
    assert evaluate.compare_to is None and evaluate.bootstrap_samples == 0
