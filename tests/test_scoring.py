"""tasks/blessing/scoring.py: classification metrics checked against a hand-computed confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.blessing.scoring import MAX_BATCH, classification_metrics, scoring_batch


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 0])
    m = classification_metrics(labels, predicted, ["a", "b", "c"])
    assert m.accuracy == pytest.approx(3 / 6)
    assert m.confusion_matrix == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    a, b, c = (m.per_class[k] for k in "abc")
    assert (a.precision, a.recall, a.support) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert a.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (b.precision, b.recall) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (c.precision, c.recall, c.f1) == (0.0, 0.0, 0.0)  # never predicted: no division by zero
    assert m.macro_f1 == pytest.approx((a.f1 + b.f1 + 0.0) / 3)


def test_scoring_batches_shrink_with_the_image_so_memory_does_not_grow_with_it() -> None:
    assert scoring_batch((3, 32, 32)) == MAX_BATCH  # CIFAR-sized: the full batch
    assert scoring_batch((3, 224, 224)) == 32
    assert scoring_batch((3, 448, 448)) == 8  # 4x the pixels, a quarter of the images
    assert scoring_batch((1, 8192, 8192)) == 1  # never zero
