"""A cheap frozen-feature probe: how well a backbone's patch tokens separate the labels of 16^3 patches.

Used during pretraining (``3dino pretrain`` probes its teacher every ``--probe-every``
iterations when a pooled dataset is labelled) and by the pretraining benchmark (pretrained vs
random initialisation). Protocol:

1. Cases: the labelled dataset's ``finetune`` arrays (``C x X x Y x Z``, normalised, with their
   ``_seg`` label maps); the probe trains on up to ``max_train`` cases of fold 0's training list
   and scores on up to ``max_val`` cases of fold 0's validation list. The held-out test cases are
   never used. Each case is centre-cropped to at most ``max_size`` voxels per axis, then padded
   to a multiple of 16 with -1.
2. Features: the backbone's last-layer (normed) patch tokens, one per 16^3 patch; a case with
   several channels runs each channel through the single-channel backbone and averages.
3. Labels: each patch's most frequent label value; patches made mostly of padding are left out.
4. Probe: standardised features, class-balanced logistic regression (scikit-learn), balanced
   accuracy on the validation patches.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from threedino_pipe.artifacts import Splits
from threedino_pipe.preprocessing.arrays import open_array
from threedino_pipe.runtime.precision import autocast

PATCH = 16
PAD_VALUE = -1.0
PAD_LABEL = -1


@dataclass
class ProbeCases:
    """Cropped arrays of the probe: ``images`` ``[C, X, Y, Z]`` float32 and ``labels`` ``[X, Y, Z]`` int64."""

    train_images: list[np.ndarray]
    train_labels: list[np.ndarray]
    val_images: list[np.ndarray]
    val_labels: list[np.ndarray]
    dataset: str


def _crop_pad(image: np.ndarray, seg: np.ndarray, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop to ``max_size`` per axis, then pad to multiples of 16 (image -1, labels ``PAD_LABEL``)."""
    starts = [max(0, (s - max_size) // 2) for s in seg.shape]
    box = tuple(slice(a, a + min(s, max_size)) for a, s in zip(starts, seg.shape, strict=True))
    image, seg = image[(slice(None), *box)], seg[box]
    pad = [(0, math.ceil(s / PATCH) * PATCH - s) for s in seg.shape]
    image = np.pad(image, [(0, 0), *pad], constant_values=PAD_VALUE)
    seg = np.pad(seg, pad, constant_values=PAD_LABEL)
    return image.astype(np.float32), seg.astype(np.int64)


def load_cases(folder: Path, ids: list[str], max_size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cropped, padded images and labels of ``ids`` in a preprocessed configuration folder (``[], []`` if one
    has no label array)."""
    images, labels = [], []
    for case in ids:
        seg_path = folder / f"{case}_seg.b2nd"
        if not seg_path.is_file():
            return [], []
        image, seg = _crop_pad(open_array(folder / f"{case}.b2nd")[:], open_array(seg_path)[0], max_size)
        images.append(image)
        labels.append(seg)
    return images, labels


def load_probe_cases(preprocessed: Path, *, max_train: int = 8, max_val: int = 4, max_size: int = 128,
                     configuration: str = "finetune") -> ProbeCases | None:
    """The probe's cases of a preprocessed labelled dataset: fold 0's training and validation cases
    (None when it has no labelled arrays or splits)."""
    folder = Path(preprocessed) / configuration
    if not Splits.in_folder(preprocessed).is_file() or not folder.is_dir():
        return None
    fold = Splits.of_dataset(Path(preprocessed), Path(preprocessed).name).folds[0]
    train = load_cases(folder, sorted(fold.train)[:max_train], max_size)
    val = load_cases(folder, sorted(fold.val)[:max_val], max_size)
    if not train[0] or not val[0]:
        return None
    return ProbeCases(*train, *val, dataset=Path(preprocessed).name)


def patch_labels(seg: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` labels (multiples of 16) -> ``[N]`` majority label per 16^3 patch, W-major order.

    A patch whose majority is padding gets ``PAD_LABEL``.
    """
    gx, gy, gz = (s // PATCH for s in seg.shape)
    blocks = seg.reshape(gx, PATCH, gy, PATCH, gz, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(gx * gy * gz, -1)
    shifted = blocks - PAD_LABEL  # 0 = padding, so bincount works
    return np.array([np.bincount(row).argmax() for row in shifted]) + PAD_LABEL


@torch.no_grad()
def patch_features(backbone: nn.Module, image: np.ndarray, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """``[C, X, Y, Z]`` -> ``[N, D]`` last-layer patch tokens (mean over channels), float32."""
    was_training = backbone.training
    backbone.eval()
    x = torch.from_numpy(image).to(device)[:, None]  # channels as a batch of single-channel volumes
    with autocast(precision, device):
        tokens = backbone.forward_features(x)["patch"]
    backbone.train(was_training)
    return tokens.float().mean(0).cpu().numpy()


def fit_probe(backbone: nn.Module, images: list[np.ndarray], labels: list[np.ndarray], device: torch.device,
              precision: str = "fp32", regularisation: float = 0.1) -> Callable[[np.ndarray], np.ndarray] | None:
    """Fit the logistic-regression probe on the patches of ``images``; returns ``[N, D]`` features -> labels
    (None when the patches hold fewer than two classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([patch_features(backbone, im, device, precision) for im in images])
    y = np.concatenate([patch_labels(s) for s in labels])
    keep = y != PAD_LABEL
    x, y = x[keep], y[keep]
    if len(np.unique(y)) < 2:
        return None
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=1000).fit(scaler.transform(x), y)
    return lambda features: model.predict(scaler.transform(features))


def case_predictions(backbone: nn.Module, predict: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray],
                     labels: list[np.ndarray], device: torch.device, precision: str = "fp32"
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per case, ``(true, predicted)`` labels of its non-padding patches."""
    out = []
    for image, seg in zip(images, labels, strict=True):
        y = patch_labels(seg)
        keep = y != PAD_LABEL
        out.append((y[keep], predict(patch_features(backbone, image, device, precision)[keep])))
    return out


def balanced_accuracy(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Balanced accuracy over the patches of all ``(true, predicted)`` pairs (``nan`` with fewer than 2 classes)."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.concatenate([t for t, _ in pairs])
    if len(np.unique(y)) < 2:
        return math.nan
    with warnings.catch_warnings():  # a class predicted but absent from these cases is no news here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, np.concatenate([p for _, p in pairs])))


def probe_score(backbone: nn.Module, cases: ProbeCases, device: torch.device, precision: str = "fp32",
                regularisation: float = 0.1) -> dict[str, float]:
    """Balanced accuracy of the patch probe fitted on ``cases``' training cases, on its validation cases
    (``nan`` when a split lacks two classes)."""
    predict = fit_probe(backbone, cases.train_images, cases.train_labels, device, precision, regularisation)
    if predict is None:
        return {"balanced_accuracy": math.nan}
    pairs = case_predictions(backbone, predict, cases.val_images, cases.val_labels, device, precision)
    return {"balanced_accuracy": balanced_accuracy(pairs)}


def shifted_grids(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each case on the 8 patch grids shifted by 0 or 8 voxels along each axis (8x the patches, correlated)."""
    out_images, out_labels = [], []
    for image, seg in zip(images, labels, strict=True):
        for front in itertools.product((0, PATCH // 2), repeat=3):
            pads = [(f, (-(s + f)) % PATCH) for s, f in zip(seg.shape, front, strict=True)]
            out_images.append(np.pad(image, [(0, 0), *pads], constant_values=PAD_VALUE))
            out_labels.append(np.pad(seg, pads, constant_values=PAD_LABEL))
    return out_images, out_labels


def cross_validated_probe(backbone: nn.Module, preprocessed: Path, device: torch.device, *, shifted: bool = True,
                          configuration: str = "finetune") -> float:
    """Patch-probe balanced accuracy averaged over a dataset's cross-validation folds (fit on a fold's
    training cases, scored on its validation cases; test cases never used); with ``shifted`` every case
    on the 8 shifted grids. Less noisy than fold 0 alone on small datasets (docs/benchmarks.md)."""
    folder, scores = Path(preprocessed) / configuration, []
    for fold in Splits.of_dataset(Path(preprocessed), Path(preprocessed).name).folds:
        train = load_cases(folder, sorted(fold.train))
        val = load_cases(folder, sorted(fold.val))
        if shifted:
            train, val = shifted_grids(*train), shifted_grids(*val)
        predict = fit_probe(backbone, *train, device) if train[0] and val[0] else None
        if predict is not None:
            scores.append(balanced_accuracy(case_predictions(backbone, predict, *val, device)))
    scores = [v for v in scores if not math.isnan(v)]
    return float(np.mean(scores)) if scores else math.nan
