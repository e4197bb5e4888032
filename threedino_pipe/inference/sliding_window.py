"""Sliding-window prediction over a whole preprocessed case (validation in finetune, and predict).

Wraps MONAI's :func:`monai.inferers.sliding_window_inference`: windows of the model's patch size
(preprocessed-array order), ``overlap`` between neighbours (0.5 for validation by default, 0.75 at
test time as in the paper), Gaussian blending (sigma 0.125 of the window). A volume smaller than
the window is padded with -1, the bottom of the normalisation range (the same value training
patches are padded with), and the padding is cropped from the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from threedino_pipe.inference.blended_rows import SIGMA_SCALE
from threedino_pipe.runtime.precision import autocast

PAD_VALUE = -1.0


@torch.no_grad()
def predict_logits(network: nn.Module, image: Tensor | np.ndarray, patch_size: Sequence[int], *,
                   overlap: float = 0.5, batch_size: int = 1, device: torch.device | str = "cpu",
                   precision: str = "fp32", progress: bool = False) -> Tensor:
    """Logits of ``network`` over a whole case.

    Args:
        network: maps ``[B, C, *patch_size]`` to logits ``[B, K, *patch_size]`` (set to eval mode by the caller).
        image: ``[C, X, Y, Z]`` (float32, normalised) on any device, or a numpy array.
        patch_size: window size in voxels (X, Y, Z order).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per forward pass.
        device: where the network runs; the blended output is accumulated on the CPU.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast of the network's forward.
    Returns:
        float32 logits ``[K, X, Y, Z]`` on the CPU.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).float()
    if x.ndim != 4:
        raise ValueError(f"expected an image [C, X, Y, Z], got shape {tuple(x.shape)}")
    device = torch.device(device)

    def predictor(window: Tensor) -> Tensor:
        with autocast(precision, device):
            return network(window.to(device)).float()

    out = sliding_window_inference(x[None], roi_size=tuple(int(p) for p in patch_size), sw_batch_size=batch_size,
                                   predictor=predictor, overlap=overlap, mode="gaussian", sigma_scale=SIGMA_SCALE,
                                   padding_mode="constant", cval=PAD_VALUE, sw_device=device, device="cpu",
                                   progress=progress)
    return torch.as_tensor(out)[0].float()


def logits_to_labels(logits: Tensor, output: str, values: Sequence[int]) -> Tensor:
    """Label map ``[X, Y, Z]`` (int16) from logits ``[K, X, Y, Z]``.

    Args:
        output: ``softmax``: voxel label = ``values[argmax]`` (``values`` = the declared label values,
            sorted, background 0 first). ``sigmoid`` (region labels): start from background and, region by
            region, write ``values[r]`` (``regions_class_order``) where the region's probability exceeds 0.5
            (later regions overwrite earlier ones, nnU-Net's rule).
        values: the label value of each output channel.
    """
    if len(values) != logits.shape[0]:
        raise ValueError(f"{len(values)} label values for {logits.shape[0]} output channels")
    lookup = torch.as_tensor([int(v) for v in values], dtype=torch.int16)
    if output == "softmax":
        return lookup[logits.argmax(0)]
    if output != "sigmoid":
        raise ValueError(f"unknown output {output!r}")
    labels = torch.zeros(logits.shape[1:], dtype=torch.int16)
    for channel, value in enumerate(lookup.tolist()):
        labels[logits[channel] > 0] = value  # sigmoid(x) > 0.5  <=>  x > 0
    return labels
