"""Multi-crop views of one volume: 2 (or 1) augmented global crops and ``n_local`` augmented local crops."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.utils import MAX_SEED, convert_to_tensor

from threedino_pipe.training_data.augment_params import INTENSITY_PROB
from threedino_pipe.training_data.augmentations import (
    geometric_transform,
    global_transform_1,
    global_transform_2,
    local_transform,
)
from threedino_pipe.training_data.crops import (
    DEFAULT_RATIO,
    GLOBAL_CROSSSLICE_SCALE,
    GLOBAL_INPLANE_SCALE,
    LOCAL_CROSSSLICE_SCALE,
    LOCAL_INPLANE_SCALE,
    RandomResizedCrop3D,
)


def _share_random_state(transform: Any, state: np.random.RandomState) -> None:
    """Make ``transform`` and every random transform nested in it draw from ``state``."""
    if isinstance(transform, Randomizable):
        Randomizable.set_random_state(transform, state=state)
    for child in getattr(transform, "transforms", ()):
        _share_random_state(child, state)


class MultiCropper:
    """Turns one ``C x X x Y x Z`` volume (cross-slice axis last) into DINO's multi-crop views.

    Every random draw (boxes, augmentation seeds) comes from the numpy Generator passed to
    :meth:`__call__`, so a view set is a pure function of the volume and the generator's state.

    Args:
        global_size, local_size: output cube edge (voxels) of the global and local crops.
        n_local: local crops per volume.
        global_inplane_scale, global_crossslice_scale, local_inplane_scale, local_crossslice_scale:
            :class:`RandomResizedCrop3D` scale ranges (in-plane: AREA fraction; cross-slice: LENGTH fraction).
        ratio: in-plane aspect ratio range.
        augment: apply the MONAI pipelines of :mod:`threedino_pipe.training_data.augmentations`
            (False: crops only, e.g. for throughput measurements of the reading alone).
        n_global: global crops per volume: 2 (3DINO) or 1 (SimMIM).
        geometric_only: augment the crops with flips and 90-degree rotations only (SimMIM's
            reconstruction target is the crop itself; no intensity, blur or noise transforms).
        intensity_prob: probability of the intensity step (gamma, noise or histogram shift; the method: 0.8).
    """

    def __init__(self, global_size: int = 96, local_size: int = 48, n_local: int = 8, *,
                 global_inplane_scale: tuple[float, float] = GLOBAL_INPLANE_SCALE,
                 global_crossslice_scale: tuple[float, float] = GLOBAL_CROSSSLICE_SCALE,
                 local_inplane_scale: tuple[float, float] = LOCAL_INPLANE_SCALE,
                 local_crossslice_scale: tuple[float, float] = LOCAL_CROSSSLICE_SCALE,
                 ratio: tuple[float, float] = DEFAULT_RATIO, augment: bool = True, n_global: int = 2,
                 geometric_only: bool = False, intensity_prob: float = INTENSITY_PROB) -> None:
        if n_local < 0 or n_global not in (1, 2):
            raise ValueError(f"need n_local >= 0 and n_global 1 or 2, got {n_local} and {n_global}")
        self.global_size, self.local_size, self.n_local, self.n_global = global_size, local_size, n_local, n_global
        self.global_crop = RandomResizedCrop3D(global_size, tuple(global_inplane_scale),
                                               tuple(global_crossslice_scale), tuple(ratio))
        self.local_crop = RandomResizedCrop3D(local_size, tuple(local_inplane_scale),
                                              tuple(local_crossslice_scale), tuple(ratio))
        self.augment = augment
        pipelines = ((geometric_transform(), geometric_transform(), geometric_transform()) if geometric_only else
                     (global_transform_1(intensity_prob), global_transform_2(intensity_prob),
                      local_transform(intensity_prob)))
        self.transforms: tuple[Compose, Compose, Compose] | None = pipelines if augment else None
        # One RandomState shared by every random transform, reseeded per crop: as deterministic as
        # Compose.set_random_state(seed=...), which builds a new RandomState for each of about 12
        # transforms per crop (about 12 % of the pipeline's time).
        self._state = np.random.RandomState(0)
        for transform in self.transforms or ():
            _share_random_state(transform, self._state)

    def _apply(self, transform: Compose | None, crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if transform is None:
            return crop
        self._state.seed(int(rng.integers(MAX_SEED)))
        with warnings.catch_warnings():
            # a crop of pure background is constant: MONAI then skips the histogram shift, and says so
            warnings.filterwarnings("ignore", message="The image's intensity is a single value")
            out = convert_to_tensor(transform(crop), track_meta=False)
        return out.to(torch.float32).contiguous()

    def __call__(self, volume: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Views of ``volume`` (``C x X x Y x Z`` tensor, numpy or blosc2 array; only the boxes are read).

        Returns:
            {"global": float32 ``[n_global, C, g, g, g]`` (crop 1 then crop 2),
             "local": float32 ``[n_local, C, l, l, l]``}.
        """
        t1, t2, tl = self.transforms if self.transforms is not None else (None, None, None)
        globals_ = [self._apply(t, self.global_crop(volume, rng), rng) for t in (t1, t2)[:self.n_global]]
        locals_ = [self._apply(tl, self.local_crop(volume, rng), rng) for _ in range(self.n_local)]
        channels = int(volume.shape[0])
        local = (torch.stack(locals_) if locals_ else
                 torch.zeros((0, channels, self.local_size, self.local_size, self.local_size)))
        return {"global": torch.stack(globals_), "local": local}
