"""Production's confidence: its profile on its own test split at promotion, and new data against it.

At promotion, the candidate's ONNX probabilities on the test split give the card a
:class:`ConfidenceProfile`: quantiles of the top-1 confidence, the predicted-class shares, the
accuracy, and the ATC threshold (average thresholded confidence, Garg et al. 2022, "Leveraging
unlabeled data to predict out-of-distribution performance"). validate then scores new data with
production and compares: the confidences by a Kolmogorov-Smirnov test, the predicted classes by
total variation with a chi-square test, and production's accuracy is estimated without labels as
the share of confidences above the threshold, overall and per predicted class. No old data is needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.blessing.evidence import ConfidenceProfile
from tasks.data.reports import ClassEstimate, ModelDrift

log = logging.getLogger(__name__)

QUANTILES = 200  # intervals of the confidence quantiles in the card: the KS distance is exact to 1/200


def top1(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top-1 confidence and the predicted class index of each row."""
    predicted = probabilities.argmax(axis=1)
    return probabilities[np.arange(len(probabilities)), predicted].astype(np.float64), predicted


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The t at which the share of confidences above t equals the accuracy (ATC with the max-confidence score)."""
    ranked = np.sort(confidence)
    wrong = round((1.0 - float(correct.mean())) * len(ranked))  # as many below t as were wrong
    if wrong == 0:
        return float(np.nextafter(ranked[0], -np.inf))
    if wrong == len(ranked):
        return float(ranked[-1])
    return float((ranked[wrong - 1] + ranked[wrong]) / 2)  # midway: ties at either side stay on their side


def confidence_profile(probabilities: np.ndarray, correct: np.ndarray, classes: list[str]) -> ConfidenceProfile:
    """The card's profile of a model's probabilities on its labelled test split (``correct`` per image)."""
    confidence, predicted = top1(probabilities)
    shares = np.bincount(predicted, minlength=len(classes)) / len(predicted)
    return ConfidenceProfile(
        images=len(confidence),
        accuracy=float(correct.mean()),
        atc_threshold=atc_threshold(confidence, correct),
        confidence_quantiles=np.quantile(confidence, np.linspace(0.0, 1.0, QUANTILES + 1)).tolist(),
        predicted_share={name: float(share) for name, share in zip(classes, shares, strict=True)},
    )


@dataclass(frozen=True)
class TwoSample:
    distance: float
    p_value: float  # of no change between the two samples


def confidence_shift(confidence: np.ndarray, profile: ConfidenceProfile) -> TwoSample:
    """KS distance between new confidences and the card's quantiles, and its asymptotic p-value."""
    from scipy import stats

    reference = np.asarray(profile.confidence_quantiles)
    distance = float(stats.ks_2samp(confidence, reference).statistic)
    n, m = len(confidence), profile.images
    return TwoSample(distance, float(stats.kstwobign.sf(distance * np.sqrt(n * m / (n + m)))))


def prediction_shift(predicted: list[str], profile: ConfidenceProfile) -> TwoSample:
    """Total variation between new and recorded predicted-class shares, and a chi-square p-value."""
    from scipy import stats

    names = sorted(set(profile.predicted_share) | set(predicted))
    new = pd.Series(predicted).value_counts().reindex(names, fill_value=0).to_numpy(dtype=np.float64)
    old = np.array([profile.predicted_share.get(name, 0.0) for name in names]) * profile.images
    distance = 0.5 * float(np.abs(new / new.sum() - old / old.sum()).sum())
    seen = (new + old) > 0
    if seen.sum() < 2:  # one class predicted in both: nothing to test
        return TwoSample(distance, 1.0)
    return TwoSample(distance, float(stats.chi2_contingency(np.stack([new[seen], old[seen]])).pvalue))


@dataclass(frozen=True)
class ProductionView:
    """Production's view of the new data: the record, the two tests, and one row per scored image."""

    drift: ModelDrift
    profile: ConfidenceProfile  # production's, from its card
    confidence: TwoSample
    predictions: TwoSample
    scored: pd.DataFrame  # path, predicted_class, confidence, above_atc_threshold (0/1), correct (0/1)


def view(
    probabilities: np.ndarray,
    model_classes: list[str],
    profile: ConfidenceProfile,
    version: int,
    paths: list[str],
    actual: list[str],
) -> ProductionView:
    """Compare production's ``probabilities`` on new images (``paths``, true classes ``actual``) with its profile."""
    confidence, index = top1(probabilities)
    predicted = np.asarray(model_classes, dtype=object)[index]
    above = confidence > profile.atc_threshold
    correct = predicted == np.asarray(actual, dtype=object)
    scored = pd.DataFrame({
        "path": paths,
        "predicted_class": predicted,
        "confidence": confidence,
        "above_atc_threshold": above.astype(np.float64),
        "correct": correct.astype(np.float64),
    })
    per_class = [
        ClassEstimate(str(name), len(group), float(group["above_atc_threshold"].mean()),
                      float(group["correct"].mean()))
        for name, group in scored.groupby("predicted_class", sort=True)
    ]
    shift, predictions = confidence_shift(confidence, profile), prediction_shift(predicted.tolist(), profile)
    drift = ModelDrift(
        production_version=version,
        scored=len(scored),
        confidence_ks=round(shift.distance, 6),
        prediction_tv=round(predictions.distance, 6),
        estimated_accuracy=round(float(above.mean()), 6),
        measured_accuracy=round(float(correct.mean()), 6),
        per_class=per_class,
    )
    return ProductionView(drift, profile, shift, predictions, scored)


def sample_rows(n: int, limit: int) -> np.ndarray:
    """At most ``limit`` of ``n`` rows, evenly spaced: deterministic, and every part of the split is seen."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def score(model: Path, images: np.ndarray, batch: int) -> np.ndarray:
    """Production's probabilities on ``images``, ``batch`` at a time (onnxruntime; CUDA when it really works)."""
    from tasks.blessing.onnx_session import open_session

    session = open_session(model, "auto")
    start = time.perf_counter()
    probabilities = session.probabilities(images, batch)
    seconds = time.perf_counter() - start
    log.info("production scored %d new images on %s in %.1f s (%.0f images/s, batch %d)",
             len(images), session.active, seconds, len(images) / max(seconds, 1e-9), batch)
    return probabilities
