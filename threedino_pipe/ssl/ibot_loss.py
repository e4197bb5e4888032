"""Patch-level iBOT loss: student predictions at masked patches vs the teacher's unmasked view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from threedino_pipe.ssl.sinkhorn import sinkhorn_knopp


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """``[N_crops, n_patches]`` bool -> ``[M]`` float32: ``1 / (masked patches of its crop)`` per masked patch.

    The masked patches are enumerated as ``masks.flatten().nonzero()`` (crop-major, then patch order).
    """
    per_crop = masks.sum(dim=-1).clamp(min=1).float()
    return (1.0 / per_crop).unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy (eq. 2 of the 3DINO paper), normalised as docs/method.md states.

    With ``CE_m = -sum_k P_t[m, k] * log_softmax(z_s[m] / student_temp)[k]`` for masked patch m of crop
    c(m), and ``n_c`` the number of masked patches of crop c, the loss is exactly::

        loss = scale * (1 / N_crops) * sum_c [ (1 / n_c) * sum_{m in crop c} CE_m ]

    i.e. averaged over the masked patches of each crop, then over the ``N_crops = masks.shape[0]``
    global crops of the batch (on this rank), and multiplied by ``scale = 1 / n_global_crops`` (= 1/2).
    A crop with zero masked patches contributes 0 to the sum but still counts in ``N_crops`` (as
    in DINOv2, where half of the global crops are unmasked); a batch without any masked patch
    gives 0 (connected to the graph, so backward still works).

    Note: DINOv2 multiplies the same quantity by ``2 * 1/2 = 1``; the 3DINO reference code
    (docs/method.md) has the 1/2 factor, which is the default here (``n_global_crops=2``).

    Args:
        out_dim: number of prototypes K of the iBOT head.
        student_temp: student temperature (0.1).
        n_global_crops: the loss is scaled by ``1 / n_global_crops``.
        n_sinkhorn_iterations: Sinkhorn-Knopp rounds for :meth:`teacher_probabilities` (3).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, n_global_crops: int = 2,
                 n_sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.scale = 1.0 / n_global_crops
        self.n_sinkhorn_iterations = n_sinkhorn_iterations

    @torch.no_grad()
    def teacher_probabilities(self, teacher_masked_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sinkhorn-centred over the masked tokens of the (global) batch: ``[M, K]`` -> ``[M, K]`` float32."""
        self._check(teacher_masked_logits, "teacher_masked_logits")
        return sinkhorn_knopp(teacher_masked_logits, teacher_temp, self.n_sinkhorn_iterations)

    def forward(self, student_masked_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """The iBOT loss (scalar).

        Args:
            student_masked_logits: ``[M, K]`` student iBOT-head outputs at the masked patches, in
                ``masks.flatten().nonzero()`` order.
            teacher_probs: ``[M, K]`` teacher probabilities at the same patches.
            masks: ``[N_crops, n_patches]`` bool, the global crops' masks (crop-major).
            weights: ``[M]`` per masked patch ``1 / n_c`` (:func:`masked_patch_weights`); computed
                from ``masks`` when None.
        """
        self._check(student_masked_logits, "student_masked_logits")
        if teacher_probs.shape != student_masked_logits.shape:
            raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)} and student_masked_logits "
                             f"{tuple(student_masked_logits.shape)} differ")
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a [N_crops, n_patches] bool tensor, got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        n_masked = int(masks.sum())
        if n_masked != student_masked_logits.shape[0]:
            raise ValueError(f"masks select {n_masked} patches but {student_masked_logits.shape[0]} rows were given")
        if n_masked == 0:
            return student_masked_logits.float().sum() * 0.0
        if weights is None:
            weights = masked_patch_weights(masks)
        log_p = F.log_softmax(student_masked_logits.float() / self.student_temp, dim=-1)
        ce = -(teacher_probs.float() * log_p).sum(dim=-1)  # [M]
        return self.scale * (ce * weights.to(ce)).sum() / masks.shape[0]

    def _check(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.ndim != 2 or tensor.shape[1] != self.out_dim:
            raise ValueError(f"{name} must be [M, {self.out_dim}], got {tuple(tensor.shape)}")
