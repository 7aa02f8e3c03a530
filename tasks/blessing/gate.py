"""The accuracy gate: an absolute floor, and a paired comparison with production.

The floor (`check_floor`) is what `evaluate` applies to every candidate. At promotion the
candidate and the production model are scored on the same test images; `compare_with_production`
rejects the candidate only when it is worse by more than ``gate.max_regression`` AND an exact
one-sided McNemar test says the loss is not noise at ``gate.confidence``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tasks.fs.records import Record
from tasks.params import GateParams


@dataclass(frozen=True)
class FloorCheck(Record):
    passed: bool
    accuracy: float
    min_accuracy: float
    min_class_recall: float
    failures: tuple[str, ...]


def check_floor(accuracy: float, recall_by_class: Mapping[str, float], gate: GateParams) -> FloorCheck:
    """Every floor the candidate misses, collected (not just the first)."""
    failures: list[str] = []
    if accuracy < gate.min_accuracy:
        failures.append(f"accuracy {accuracy:.4f} < gate.min_accuracy {gate.min_accuracy:.4f}")
    if gate.min_class_recall > 0:
        for name, recall in recall_by_class.items():
            if recall < gate.min_class_recall:
                failures.append(
                    f"recall of class {name!r} {recall:.4f} < gate.min_class_recall {gate.min_class_recall:.4f}"
                )
    return FloorCheck(not failures, accuracy, gate.min_accuracy, gate.min_class_recall, tuple(failures))


def mcnemar_p_worse(regressions: int, improvements: int) -> float:
    """Exact one-sided McNemar p-value that the candidate is worse than production.

    Only discordant images count: ``regressions`` production got right and the candidate wrong,
    ``improvements`` the reverse. Under "equally good" each discordant image is a fair coin, so
    p = P(X >= regressions) for X ~ Binomial(regressions + improvements, 1/2).
    """
    if regressions < 0 or improvements < 0:
        raise ValueError("counts must be non-negative")
    n = regressions + improvements
    if n == 0:
        return 1.0
    term = math.comb(n, regressions)
    tail = term
    for k in range(regressions, n):  # C(n, k+1) = C(n, k) (n-k) / (k+1), exactly, in integers
        term = term * (n - k) // (k + 1)
        tail += term
    return tail / 2**n  # exact big-integer division, correctly rounded


@dataclass(frozen=True)
class PairedComparison(Record):
    n_images: int
    candidate_accuracy: float
    production_accuracy: float
    difference: float  # candidate - production
    improvements: int  # candidate right, production wrong
    regressions: int  # candidate wrong, production right
    p_value: float  # exact one-sided McNemar, "candidate is worse"
    max_regression: float
    confidence: float
    passed: bool
    reason: str


def compare_with_production(
    candidate_correct: np.ndarray, production_correct: np.ndarray, gate: GateParams
) -> PairedComparison:
    """Paired comparison on the same images (boolean arrays: was each image classified right)."""
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    production_correct = np.asarray(production_correct, dtype=bool)
    if candidate_correct.shape != production_correct.shape or candidate_correct.ndim != 1:
        raise ValueError(
            "paired comparison needs two equal 1-D arrays,"
            f" got {candidate_correct.shape} and {production_correct.shape}"
        )
    n = int(candidate_correct.size)
    if n == 0:
        raise ValueError("paired comparison needs at least one test image")
    improvements = int(np.sum(candidate_correct & ~production_correct))
    regressions = int(np.sum(~candidate_correct & production_correct))
    cand_acc = float(candidate_correct.mean())
    prod_acc = float(production_correct.mean())
    difference = cand_acc - prod_acc
    p_value = mcnemar_p_worse(regressions, improvements)
    alpha = 1.0 - gate.confidence
    loss = -difference
    significant = p_value < alpha
    # Rounding guard: a loss equal to max_regression on paper must not fail by a float ulp.
    beyond_margin = loss > gate.max_regression + 1e-12
    passed = not (beyond_margin and significant)
    if passed and difference >= 0:
        reason = f"candidate is not worse: {cand_acc:.4f} vs production {prod_acc:.4f} ({difference:+.4f})"
    elif passed and not beyond_margin:
        reason = f"candidate loses {loss:.4f} <= gate.max_regression {gate.max_regression:.4f}"
    elif passed:
        reason = (
            f"candidate loses {loss:.4f} > gate.max_regression {gate.max_regression:.4f}, but within noise:"
            f" McNemar p={p_value:.4g} >= {alpha:.4g} (confidence {gate.confidence})"
        )
    else:
        reason = (
            f"candidate is worse than production: {cand_acc:.4f} vs {prod_acc:.4f} ({difference:+.4f});"
            f" loss > gate.max_regression {gate.max_regression:.4f} and McNemar p={p_value:.4g} < {alpha:.4g}"
            f" ({regressions} images regressed, {improvements} improved)"
        )
    return PairedComparison(
        n_images=n,
        candidate_accuracy=cand_acc,
        production_accuracy=prod_acc,
        difference=difference,
        improvements=improvements,
        regressions=regressions,
        p_value=p_value,
        max_regression=gate.max_regression,
        confidence=gate.confidence,
        passed=passed,
        reason=reason,
    )
