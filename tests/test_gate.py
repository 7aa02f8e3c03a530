"""The accuracy gate: floor checks and the exact paired comparison with production."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.blessing.gate import check_floor, compare_with_production, mcnemar_p_worse
from tasks.params import GateParams

GATE = GateParams(min_accuracy=0.8, min_class_recall=0.5, max_regression=0.01, confidence=0.95)


def test_floor_collects_every_failure() -> None:
    check = check_floor(0.7, {"cat": 0.9, "dog": 0.4, "eel": 0.2}, GATE)
    assert not check.passed
    assert len(check.failures) == 3
    assert "accuracy 0.7000 < gate.min_accuracy 0.8000" in check.failures[0]
    assert any("'dog'" in f for f in check.failures) and any("'eel'" in f for f in check.failures)


def test_floor_passes_at_the_boundary_and_recall_floor_zero_is_off() -> None:
    assert check_floor(0.8, {"cat": 0.5}, GATE).passed
    off = GateParams(min_accuracy=0.0, min_class_recall=0.0, max_regression=0.0, confidence=0.95)
    assert check_floor(0.0, {"cat": 0.0}, off).passed


def test_mcnemar_matches_the_binomial_tail_by_hand() -> None:
    assert mcnemar_p_worse(5, 0) == pytest.approx(1 / 32)
    # n = 10 discordant, 8 regressions: P(X >= 8) = (C(10,8) + C(10,9) + C(10,10)) / 2^10
    assert mcnemar_p_worse(8, 2) == pytest.approx(56 / 1024)
    assert mcnemar_p_worse(0, 7) == 1.0
    assert mcnemar_p_worse(0, 0) == 1.0


def test_mcnemar_is_exact_without_overflow_on_large_splits() -> None:
    p = mcnemar_p_worse(5200, 4800)  # 10k discordant images: 2**10000 overflows a float
    assert 0.0 < p < 1e-4 and math.isfinite(p)


def _pair(n: int, improvements: int, regressions: int, both_right: int) -> tuple[np.ndarray, np.ndarray]:
    cand = np.zeros(n, dtype=bool)
    prod = np.zeros(n, dtype=bool)
    cand[:improvements] = True
    prod[improvements : improvements + regressions] = True
    shared = slice(improvements + regressions, improvements + regressions + both_right)
    cand[shared] = prod[shared] = True
    return cand, prod


def test_better_candidate_passes() -> None:
    result = compare_with_production(*_pair(1000, 30, 5, 900), GATE)
    assert result.passed and result.improvements == 30 and result.regressions == 5
    assert result.difference == pytest.approx(0.025)


def test_significant_regression_beyond_the_margin_is_rejected() -> None:
    result = compare_with_production(*_pair(1000, 2, 40, 900), GATE)
    assert not result.passed
    assert result.p_value < 0.05 and result.difference == pytest.approx(-0.038)
    assert "worse than production" in result.reason


def test_regression_within_max_regression_passes_even_if_significant() -> None:
    result = compare_with_production(*_pair(1000, 0, 10, 900), GATE)  # loses exactly 0.01
    assert result.p_value < 0.05
    assert result.passed and "<= gate.max_regression" in result.reason


def test_large_but_noisy_regression_passes_and_says_why() -> None:
    result = compare_with_production(*_pair(20, 1, 3, 10), GATE)  # -0.10 on 20 images: p = 0.3125
    assert result.p_value == pytest.approx(5 / 16)
    assert result.passed and "within noise" in result.reason


def test_comparison_refuses_unpaired_arrays() -> None:
    with pytest.raises(ValueError, match="equal"):
        compare_with_production(np.ones(3, bool), np.ones(4, bool), GATE)
