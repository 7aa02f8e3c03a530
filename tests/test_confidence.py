"""tasks/blessing/confidence.py: the card's confidence profile, drift seen by the model, and ATC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tasks.blessing import confidence
from tasks.blessing.evidence import ConfidenceProfile

import shapes_classifier as sc


def _probabilities(top: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Rows whose top-1 is ``predicted`` with probability ``top``, the rest spread evenly."""
    out = np.tile(((1 - top) / (k - 1))[:, None], (1, k))
    out[np.arange(len(top)), predicted] = top
    return out


def test_the_atc_threshold_puts_the_accuracy_above_it() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 1000)
    correct = rng.uniform(0, 1, 1000) < conf  # confident answers are right more often
    t = confidence.atc_threshold(conf, correct)
    assert np.mean(conf > t) == pytest.approx(correct.mean(), abs=1e-9)
    assert np.mean(conf > confidence.atc_threshold(conf, np.ones(1000, bool))) == 1.0
    assert np.mean(conf > confidence.atc_threshold(conf, np.zeros(1000, bool))) == 0.0


def test_profile_records_quantiles_shares_accuracy_and_threshold() -> None:
    rng = np.random.default_rng(1)
    predicted = rng.integers(0, 3, 500)
    probabilities = _probabilities(rng.uniform(0.4, 1.0, 500), predicted, 3)
    correct = rng.uniform(0, 1, 500) < 0.8
    profile = confidence.confidence_profile(probabilities, correct, ["a", "b", "c"])
    assert profile.images == 500 and profile.accuracy == pytest.approx(correct.mean())
    assert len(profile.confidence_quantiles) == confidence.QUANTILES + 1
    assert profile.confidence_quantiles[0] == pytest.approx(probabilities.max(axis=1).min())
    assert profile.predicted_share == pytest.approx({n: float(np.mean(predicted == i)) for i, n in enumerate("abc")})
    assert ConfidenceProfile.from_json(profile.to_json()) == profile


def test_the_ks_distance_from_quantiles_matches_the_full_sample() -> None:
    rng = np.random.default_rng(2)
    reference = rng.beta(8, 2, 5000)
    profile = ConfidenceProfile(5000, 0.9, 0.5, np.quantile(reference, np.linspace(0, 1, 201)).tolist(), {"a": 1.0})
    for new in (rng.beta(8, 2, 800), rng.beta(5, 2, 800)):
        exact = stats.ks_2samp(new, reference)
        shift = confidence.confidence_shift(new, profile)
        assert shift.distance == pytest.approx(exact.statistic, abs=1.5 / confidence.QUANTILES)
        assert (shift.p_value < 0.01) == (exact.pvalue < 0.01)
    assert confidence.confidence_shift(rng.beta(5, 2, 800), profile).distance > 0.2


def test_predicted_class_shift_is_total_variation_with_a_chi_square_test() -> None:
    profile = ConfidenceProfile(1000, 0.9, 0.5, [0.5, 1.0], {"a": 0.5, "b": 0.3, "c": 0.2})
    same = confidence.prediction_shift(["a"] * 50 + ["b"] * 30 + ["c"] * 20, profile)
    assert same.distance == pytest.approx(0.0) and same.p_value > 0.9
    moved = confidence.prediction_shift(["a"] * 20 + ["b"] * 30 + ["c"] * 20 + ["new"] * 30, profile)
    assert moved.distance == pytest.approx(0.5 * (0.3 + 0.0 + 0.0 + 0.3)) and moved.p_value < 1e-6


def test_view_estimates_overall_and_per_predicted_class_beside_the_truth() -> None:
    profile = ConfidenceProfile(100, 0.75, 0.6, np.linspace(0.4, 1.0, 201).tolist(), {"a": 0.5, "b": 0.5})
    top = np.array([0.9, 0.9, 0.5, 0.7, 0.55, 0.95])
    probabilities = _probabilities(top, np.array([0, 0, 0, 1, 1, 1]), 2)
    view = confidence.view(probabilities, ["a", "b"], profile, 4, [f"test/{i}.png" for i in range(6)],
                           ["a", "b", "b", "b", "b", "a"])
    d = view.drift
    assert (d.production_version, d.scored) == (4, 6)
    assert d.estimated_accuracy == pytest.approx(4 / 6) and d.measured_accuracy == pytest.approx(3 / 6)
    per_class = {c.class_name: c for c in d.per_class}
    assert (per_class["a"].predicted, per_class["a"].estimated_accuracy) == (3, pytest.approx(2 / 3))
    assert per_class["a"].measured_accuracy == pytest.approx(1 / 3)
    assert per_class["b"].estimated_accuracy == pytest.approx(2 / 3) and per_class["b"].measured_accuracy == 2 / 3
    assert view.scored["above_atc_threshold"].tolist() == [1, 1, 0, 1, 0, 1]


def test_sampled_rows_are_evenly_spread_and_capped() -> None:
    assert confidence.sample_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    rows = confidence.sample_rows(1000, 10)
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 999 and np.all(np.diff(rows) >= 100)


ATC_TOLERANCE = 0.05  # |ATC estimate - measured accuracy| on 400 held-out images (measured: <= 0.025)


@pytest.mark.integration
def test_atc_estimates_accuracy_on_unchanged_and_shifted_data(single_thread_torch) -> None:
    """A CNN really trained on the shapes: ATC learnt on one labelled split, tested on others."""
    images, labels = sc.shapes(100, seed=0)
    probabilities = sc.probabilities(images)
    profile = confidence.confidence_profile(probabilities, probabilities.argmax(axis=1) == labels, sc.CLASSES)
    assert 0.85 < profile.accuracy < 0.99  # a model that makes mistakes

    def estimate_and_truth(pixels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
        p = sc.probabilities(pixels)
        return float(np.mean(p.max(axis=1) > profile.atc_threshold)), float(np.mean(p.argmax(axis=1) == truth))

    for seed in (3, 4):
        images, labels = sc.shapes(100, seed=seed)
        estimate, measured = estimate_and_truth(images, labels)
        assert abs(estimate - measured) <= ATC_TOLERANCE, ("unchanged", seed, estimate, measured)
        estimate, measured = estimate_and_truth(sc.blurred(images), labels)
        assert measured < profile.accuracy - 0.08, "the blur must really cost accuracy"
        assert abs(estimate - measured) <= ATC_TOLERANCE, ("blurred", seed, estimate, measured)


@pytest.mark.integration
def test_where_heavy_noise_fools_atc_the_confidence_test_sees_the_drift(single_thread_torch) -> None:
    images, labels = sc.shapes(100, seed=0)
    probabilities = sc.probabilities(images)
    profile = confidence.confidence_profile(probabilities, probabilities.argmax(axis=1) == labels, sc.CLASSES)
    shifted, truth = sc.shapes(100, seed=3)
    p = sc.probabilities(sc.noisy(shifted, 0.2))
    top, _predicted = confidence.top1(p)
    assert np.mean(p.argmax(axis=1) == truth) < 0.5 < np.mean(top > profile.atc_threshold)  # overconfident
    shift = confidence.confidence_shift(top, profile)
    assert shift.distance > 0.1 and shift.p_value < 0.01
