"""Frozen-backbone features of whole cases, shared by ``finetune --head probe`` and ``3dino embed``.

Views (a case is a preprocessed ``C x X x Y x Z`` array, cross-slice axis last):

- the **centre view**: the whole volume resized (trilinear, align_corners=False) to the patch
  size ``(px, py, pz)``; validation, prediction and ``embed`` use only this view;
- an **augmented view** (training cases of the probe): a random box drawn with the 3D
  RandomResizedCrop rule of :mod:`threedino_pipe.training_data.crops` (in-plane area 60-100 % of the
  plane, aspect 0.9-1.11; cross-slice length 70-100 %), resized to the patch size, then
  flipped along the first index axis (left-right in axial scans) with probability 0.5.

Each training case gets the centre view plus ``num_augmentations`` augmented views, drawn from
a generator seeded by ``(seed, crc32(case_id))``, so the views do not depend on the order in
which cases are processed or on a resume.

Features of a view are :func:`threedino_pipe.models.classification.frozen_tokens`: CLS tokens of
the last 4 blocks ``[L, C, dim]`` and the last block's mean patch token ``[C, dim]`` (channels
through the single-channel backbone separately). :class:`FeatureCache` keeps them per case in
``features.pt`` (tensors and plain containers only: loads with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threedino_pipe.models.classification import FrozenFeatures
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.checkpoints import save_checkpoint
from threedino_pipe.training_data.crops import RandomResizedCrop3D

logger = logging.getLogger(__name__)

VIEW_INPLANE_SCALE = (0.6, 1.0)
VIEW_CROSSSLICE_SCALE = (0.7, 1.0)
FLIP_AXIS = 0
FLIP_PROBABILITY = 0.5
CACHE_KIND = "probe_features"
CACHE_SCHEMA_VERSION = 2  # 2: per-case features under "features" (was "cases")
CACHE_SAVE_SECONDS = 120.0


def resize_volume(volume: Any, size: Sequence[int]) -> Tensor:
    """``C x X x Y x Z`` (numpy, torch or blosc2 slice) -> float32 ``C x size`` (trilinear, align_corners=False)."""
    tensor = torch.as_tensor(np.ascontiguousarray(volume) if not isinstance(volume, Tensor) else volume)
    tensor = tensor.to(torch.float32)
    size = tuple(int(s) for s in size)
    if tuple(tensor.shape[1:]) == size:
        return tensor.contiguous()
    return F.interpolate(tensor.unsqueeze(0), size=size, mode="trilinear", align_corners=False).squeeze(0)


def centre_view(volume: Any, patch_size: Sequence[int]) -> Tensor:
    """The whole volume ``C x X x Y x Z`` resized to ``C x patch_size`` (the view predict and embed use)."""
    return resize_volume(volume, patch_size)


def random_view(volume: Any, patch_size: Sequence[int], rng: np.random.Generator) -> Tensor:
    """An augmented view: random box (RandomResizedCrop3D rule), resized, random flip of axis i."""
    cropper = RandomResizedCrop3D(size=max(int(s) for s in patch_size), inplane_scale=VIEW_INPLANE_SCALE,
                                  crossslice_scale=VIEW_CROSSSLICE_SCALE)
    (x0, x1), (y0, y1), (z0, z1) = cropper.draw(tuple(volume.shape[1:]), rng)
    view = resize_volume(volume[:, x0:x1, y0:y1, z0:z1], patch_size)
    if rng.random() < FLIP_PROBABILITY:
        view = torch.flip(view, dims=(1 + FLIP_AXIS,))
    return view


def view_rng(seed: int, case_id: str) -> np.random.Generator:
    """The generator of a case's augmented views: seeded by ``(seed, crc32(case_id))``."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def case_views(volume: Any, patch_size: Sequence[int], num_augmentations: int,
               rng: np.random.Generator | None = None) -> Tensor:
    """``[1 + num_augmentations, C, *patch_size]``: the centre view, then the augmented views."""
    views = [centre_view(volume, patch_size)]
    for _ in range(num_augmentations):
        views.append(random_view(volume, patch_size, rng))
    return torch.stack(views)


@torch.no_grad()
def extract(extractor: FrozenFeatures, views: Tensor, device: torch.device, batch_size: int = 4
            ) -> dict[str, Tensor]:
    """Features of ``views [V, C, X, Y, Z]``: ``{"cls": [V, L, C, dim], "patch_mean": [V, C, dim]}``
    (float32, CPU), computed in batches of ``batch_size`` views on ``device``."""
    cls, means = [], []
    for start in range(0, views.shape[0], max(1, batch_size)):
        batch = views[start:start + batch_size].to(device)
        c, m = extractor(batch)
        cls.append(c.float().cpu())
        means.append(m.float().cpu())
    return {"cls": torch.cat(cls), "patch_mean": torch.cat(means)}


class FeatureCache:
    """Per-case features in a weights_only-loadable file, reused while its ``meta`` matches.

    File layout: ``{"kind": "probe_features", "schema_version": 2, "meta": {...JSON-able...},
    "features": {case_id: {"cls": [V, L, C, dim], "patch_mean": [V, C, dim]}}}``; view 0 is the
    centre view. A file whose ``meta`` differs (another backbone, patch size, seed...) is ignored
    and overwritten.
    """

    def __init__(self, path: str | Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = dict(meta)
        self.cases: dict[str, dict[str, Tensor]] = {}
        self.reused = 0
        if self.path.is_file():
            try:
                stored = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or foreign file: recompute
                logger.warning("ignoring unreadable feature cache %s (%s)", self.path, type(exc).__name__)
                stored = None
            if (isinstance(stored, dict) and stored.get("kind") == CACHE_KIND
                    and stored.get("schema_version") == CACHE_SCHEMA_VERSION and stored.get("meta") == self.meta):
                self.cases = dict(stored["features"])
                self.reused = len(self.cases)

    def has(self, case_id: str, num_views: int) -> bool:
        entry = self.cases.get(case_id)
        return entry is not None and entry["cls"].shape[0] >= num_views

    def save(self) -> None:
        save_checkpoint({"kind": CACHE_KIND, "schema_version": CACHE_SCHEMA_VERSION, "meta": self.meta,
                         "features": self.cases}, self.path)


def extract_cases(extractor: FrozenFeatures, cases: Sequence[tuple[str, int]], load: Callable[[str], Any],
                  patch_size: Sequence[int], cache: FeatureCache, *, seed: int, device: torch.device,
                  batch_size: int = 4, description: str = "features") -> dict[str, dict[str, Tensor]]:
    """Features of every ``(case_id, num_views)`` (1 = centre view only), computed once and cached.

    Args:
        extractor: the frozen backbone.
        cases: case ids with the number of views each needs (centre + augmentations).
        load: ``case_id -> C x X x Y x Z`` array.
        patch_size: the view size (voxels, preprocessed-array order).
        cache: the feature cache; finished cases are saved at least every 2 minutes and at the end.
        seed: seeds the augmented views (with the case id).

    Returns:
        ``{case_id: {"cls": [V, L, C, dim], "patch_mean": [V, C, dim]}}`` with exactly the asked views.
    """
    todo = [(c, n) for c, n in cases if not cache.has(c, n)]
    last_save = time.monotonic()
    for case_id, num_views in progress.track(todo, description, total=len(todo)):
        views = case_views(load(case_id), patch_size, num_views - 1, view_rng(seed, case_id))
        cache.cases[case_id] = extract(extractor, views, device, batch_size)
        if time.monotonic() - last_save > CACHE_SAVE_SECONDS:
            cache.save()
            last_save = time.monotonic()
    if todo:
        cache.save()
    return {c: {k: v[:n] for k, v in cache.cases[c].items()} for c, n in cases}
