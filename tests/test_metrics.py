"""Segmentation metrics against MONAI, NaN rules, regions; classification metrics against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from threedino_pipe.evaluation.classification_metrics import (
    auc_per_class,
    classification_metrics,
    confusion,
    fast_metrics,
)
from threedino_pipe.evaluation.segmentation_metrics import case_metrics, dice, hd95, hd95_near_empty

SPACING = (0.7, 1.3, 2.9)  # mm per axis i, j, k: anisotropic on every axis
SHAPE = (48, 40, 20)
# MONAI computes in float32; our distances are float64: agreement to 1e-4 mm (HD) and 1e-6 (Dice).
HD_TOL_MM = 1e-4
DICE_TOL = 1e-6


def _ellipsoid(center_mm, radii_mm) -> np.ndarray:
    grid = np.indices(SHAPE).astype(np.float64)
    return sum(((grid[a] * SPACING[a] - center_mm[a]) / radii_mm[a]) ** 2 for a in range(3)) <= 1.0


def _box(lo, hi) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def _shapes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    sphere = _ellipsoid((16, 25, 28), (9, 9, 9))
    shifted = _ellipsoid((19, 27, 31), (9, 9, 9))
    ellipsoid = _ellipsoid((17, 24, 26), (12, 8, 16))
    box = _box((5, 6, 3), (30, 25, 12))
    border_box = _box((0, 0, 0), (20, 10, 20))  # touches the array border
    two_parts = _box((30, 2, 2), (40, 10, 6)) | _ellipsoid((10, 10, 10), (5, 6, 9))
    return [("sphere vs shifted sphere", sphere, shifted), ("sphere vs ellipsoid", sphere, ellipsoid),
            ("box vs ellipsoid", box, ellipsoid), ("border box vs box", border_box, box),
            ("two parts vs sphere", two_parts, sphere), ("identical", box, box.copy())]


def _monai(metric, prediction: np.ndarray, reference: np.ndarray) -> float:
    as_tensor = lambda m: torch.from_numpy(m.astype(np.float32))[None, None]  # noqa: E731
    return float(metric(as_tensor(prediction), as_tensor(reference), **(
        {"spacing": SPACING} if isinstance(metric, HausdorffDistanceMetric) else {})).item())


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name,reference,prediction", _shapes(), ids=[s[0] for s in _shapes()])
def test_dice_and_hd95_agree_with_monai(name, reference, prediction):
    monai_dice = _monai(DiceMetric(include_background=True), prediction, reference)
    monai_hd95 = _monai(HausdorffDistanceMetric(include_background=True, percentile=95), prediction, reference)
    assert dice(reference, prediction) == pytest.approx(monai_dice, abs=DICE_TOL)
    assert hd95(reference, prediction, SPACING) == pytest.approx(monai_hd95, abs=HD_TOL_MM)


def test_hd95_uses_spacing_per_axis():
    """A box shifted by 2 slices along k (2.9 mm each) is 5.8 mm away on its shifted faces."""
    a = _box((10, 10, 4), (30, 30, 12))
    b = _box((10, 10, 6), (30, 30, 14))
    assert hd95(a, b, SPACING) == pytest.approx(2 * SPACING[2], abs=1e-9)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0, abs=1e-9)
    assert hd95(a, a, SPACING) == 0.0


def test_nan_rules():
    empty = np.zeros(SHAPE, bool)
    box = _box((2, 2, 2), (8, 8, 8))
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, SPACING))
    assert dice(box, empty) == 0.0 and math.isnan(hd95(box, empty, SPACING))
    assert dice(empty, box) == 0.0 and math.isnan(hd95(empty, box, SPACING))


def test_case_metrics_labels_and_regions():
    reference = np.zeros(SHAPE, np.uint8)
    reference[_box((5, 5, 2), (25, 25, 10))] = 1
    reference[_box((10, 10, 4), (20, 20, 8))] = 2
    prediction = reference.copy()
    prediction[_box((5, 5, 2), (25, 25, 3))] = 2  # one slab of label 1 predicted as 2
    rows = {r["label"]: r for r in case_metrics(reference, prediction, SPACING,
                                                {"outer": (1,), "inner": (2,), "tumour": (1, 2), "absent": (3,)})}
    assert rows["tumour"]["dice"] == 1.0 and rows["tumour"]["hd95_mm"] == 0.0  # the union is unchanged
    assert rows["tumour"]["label_values"] == "1+2"
    assert rows["outer"]["dice"] == pytest.approx(dice(reference == 1, prediction == 1))
    assert rows["inner"]["dice"] == pytest.approx(dice(reference == 2, prediction == 2))
    assert rows["inner"]["dice"] < 1.0
    assert math.isnan(rows["absent"]["dice"]) and math.isnan(rows["absent"]["hd95_mm"])
    n = int((reference == 1).sum())
    assert rows["outer"]["ref_voxels"] == n
    assert rows["outer"]["ref_volume_ml"] == pytest.approx(n * np.prod(SPACING) / 1000)


def _classification_data(seed: int = 3, n: int = 60, k: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = np.eye(k)[y] * 1.5 + rng.normal(0, 1, (n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # ties, as real model outputs rounded in a CSV have
    probs /= probs.sum(axis=1, keepdims=True)
    return y, probs.argmax(axis=1), probs


def test_classification_metrics_equal_sklearn():
    y, pred, probs = _classification_data()
    names = ["a", "b", "c"]
    metrics = classification_metrics(y, pred, probs, names)
    assert metrics["auc"]["macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for c, name in enumerate(names):
        assert metrics["auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    assert metrics["f1"]["macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert metrics["accuracy"]["all"] == pytest.approx(accuracy_score(y, pred))
    assert confusion(y, pred, 3).sum() == y.size and np.trace(confusion(y, pred, 3)) == int((y == pred).sum())


def test_binary_auc_equals_sklearn():
    y, _, probs = _classification_data(seed=5, k=2)
    assert auc_per_class(y, probs)[1] == pytest.approx(roc_auc_score(y, probs[:, 1]))


def test_fast_metrics_equal_sklearn_metrics():
    """The numpy formulas used inside the bootstrap give exactly the scikit-learn values."""
    for seed in range(5):
        y, pred, probs = _classification_data(seed=seed, n=25)
        slow = classification_metrics(y, pred, probs, ["a", "b", "c"])
        fast = fast_metrics(y, pred, probs, ["a", "b", "c"])
        for metric in slow:
            for key in slow[metric]:
                assert fast[metric][key] == pytest.approx(slow[metric][key], abs=1e-12, nan_ok=True)


def test_auc_undefined_for_absent_class_is_left_out_of_macro():
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.7, 0.2, 0.1],
                      [0.3, 0.6, 0.1]])
    metrics = classification_metrics(y, probs.argmax(axis=1), probs, ["a", "b", "c"])
    assert math.isnan(metrics["auc"]["c"])
    assert metrics["auc"]["macro"] == pytest.approx((metrics["auc"]["a"] + metrics["auc"]["b"]) / 2)


def test_near_empty_rule_under_10_voxels_or_under_10_percent_of_the_other():
    assert hd95_near_empty(1000, 99) and hd95_near_empty(99, 1000)  # under 10 % of the other
    assert not hd95_near_empty(1000, 100)
    assert hd95_near_empty(12, 9) and not hd95_near_empty(12, 10)  # under 10 voxels
    assert not hd95_near_empty(0, 5) and not hd95_near_empty(0, 0)  # an empty mask: HD95 is NaN, nothing to flag
    assert hd95_near_empty(np.array([1000, 50]), np.array([50, 50])).tolist() == [True, False]
