"""Classification metrics (scikit-learn): one-vs-rest AUC per class and macro, F1, accuracy.

Inputs: ``y_true`` (n,) class indices 0..K-1, ``y_pred`` (n,) predicted class indices,
``probs`` (n, K) per-class probabilities (rows need not sum to 1).
"""

from __future__ import annotations

import numpy as np

# scikit-learn is imported inside the functions: it takes seconds to import and segmentation
# evaluation never needs it.


def auc_per_class(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC of each class; NaN for a class that is absent or the only one present."""
    from sklearn.metrics import roc_auc_score

    out = []
    for c in range(probs.shape[1]):
        positive = np.asarray(y_true) == c
        out.append(float(roc_auc_score(positive, probs[:, c])) if 0 < positive.sum() < positive.size
                   else float("nan"))
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[float]:
    """F1 of each class (0 where a class is neither true nor predicted: sklearn ``zero_division=0``)."""
    from sklearn.metrics import f1_score

    return [float(v) for v in f1_score(y_true, y_pred, labels=list(range(num_classes)), average=None,
                                       zero_division=0)]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray,
                           class_names: list[str]) -> dict[str, dict[str, float]]:
    """Every metric on one set of cases: ``{metric: {class name | "macro" | "all": value}}``.

    Metrics: ``accuracy`` (key ``all``), ``f1`` (per class and ``macro`` = sklearn's macro F1
    over all declared classes), ``auc`` (one-vs-rest per class and ``macro`` = mean of the
    defined per-class AUCs).
    """
    from sklearn.metrics import accuracy_score, f1_score

    k = len(class_names)
    auc = auc_per_class(y_true, probs)
    f1 = f1_per_class(y_true, y_pred, k)
    return {
        "accuracy": {"all": float(accuracy_score(y_true, y_pred))},
        "f1": {**dict(zip(class_names, f1, strict=True)),
               "macro": float(f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0))},
        "auc": {**dict(zip(class_names, auc, strict=True)), "macro": _nanmean(auc)},
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K confusion matrix: rows = reference class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def fast_metrics(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray,
                 class_names: list[str]) -> dict[str, dict[str, float]]:
    """The same values as :func:`classification_metrics`, computed with numpy for bootstrap loops.

    Accuracy and F1 come from the confusion counts, AUC from the Mann-Whitney rank sum (average
    ranks for ties), which equals scikit-learn's trapezoidal ROC AUC; tests check the equality.
    """
    from scipy.stats import rankdata

    k = len(class_names)
    counts = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(counts).astype(np.float64)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    auc = []
    for c in range(k):
        positive = y_true == c
        n_pos = int(positive.sum())
        n_neg = positive.size - n_pos
        if n_pos == 0 or n_neg == 0:
            auc.append(float("nan"))
            continue
        ranks = rankdata(probs[:, c])
        auc.append(float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
    return {
        "accuracy": {"all": float(tp.sum() / max(1, y_true.size))},
        "f1": {**dict(zip(class_names, f1.tolist(), strict=True)), "macro": float(f1.mean())},
        "auc": {**dict(zip(class_names, auc, strict=True)), "macro": _nanmean(auc)},
    }
