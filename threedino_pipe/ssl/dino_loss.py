"""Image-level DINO loss: teacher CLS distributions of the global crops vs student CLS of all crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from threedino_pipe.ssl.sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student prototype distributions (eq. 1 of the 3DINO paper).

    Crops are stacked crop-major: row ``c * B + b`` holds crop ``c`` of image ``b``. Every student
    crop is compared with every teacher global crop of the same image except itself:
    student global ``s`` vs teacher global ``t != s`` (``n_g * (n_g - 1)`` pairs) and every student
    local crop vs every teacher global crop (``n_l * n_g`` pairs). Each pair's cross-entropy
    ``-sum_k P_t[k] * log_softmax(z_s / student_temp)[k]`` is averaged over the B images; the pair
    means are summed and divided by the number of pairs (2 x 1 + 8 x 2 = 18 with 2 global and 8
    local crops), as docs/method.md states.

    Args:
        out_dim: number of prototypes K (checked against the inputs).
        student_temp: student temperature (0.1).
        n_sinkhorn_iterations: Sinkhorn-Knopp rounds for :meth:`teacher_probabilities` (3).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, n_sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.n_sinkhorn_iterations = n_sinkhorn_iterations

    @torch.no_grad()
    def teacher_probabilities(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sinkhorn-centred teacher probabilities: ``[n_g * B, K]`` logits -> ``[n_g * B, K]`` float32."""
        self._check(teacher_logits, "teacher_logits")
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.n_sinkhorn_iterations)

    def terms(self, student_global: torch.Tensor, student_local: torch.Tensor | None,
              teacher_probs: torch.Tensor, n_global_crops: int = 2) -> dict[str, torch.Tensor]:
        """The two parts of the loss, each already divided by the total number of pairs.

        Args:
            student_global: ``[n_g * B, K]`` student logits of the (masked) global crops.
            student_local: ``[n_l * B, K]`` student logits of the local crops, or None (n_l = 0).
            teacher_probs: ``[n_g * B, K]`` teacher probabilities (:meth:`teacher_probabilities`),
                in the same crop order as ``student_global`` (no swapping needed).
            n_global_crops: n_g (2).

        Returns:
            ``{"dino_global": scalar, "dino_local": scalar}``; their sum is the DINO loss.
        """
        self._check(student_global, "student_global")
        self._check(teacher_probs, "teacher_probs")
        if student_global.shape != teacher_probs.shape:
            raise ValueError(f"student_global {tuple(student_global.shape)} and teacher_probs "
                             f"{tuple(teacher_probs.shape)} differ")
        if student_global.shape[0] % n_global_crops:
            raise ValueError(f"{student_global.shape[0]} global rows are not {n_global_crops} crops x B images")
        batch = student_global.shape[0] // n_global_crops
        teacher = teacher_probs.float().reshape(n_global_crops, batch, self.out_dim)
        teacher_sum = teacher.sum(dim=0)  # [B, K]: all teacher crops of each image
        n_local = 0
        if student_local is not None and student_local.shape[0]:
            self._check(student_local, "student_local")
            if batch == 0 or student_local.shape[0] % batch:
                raise ValueError(f"{student_local.shape[0]} local rows are not a multiple of B = {batch}")
            n_local = student_local.shape[0] // batch
        n_pairs = n_global_crops * (n_global_crops - 1) + n_local * n_global_crops
        if n_pairs == 0 or batch == 0:
            raise ValueError("the DINO loss needs B >= 1 and at least one student/teacher pair")

        log_p = self._log_softmax(student_global).reshape(n_global_crops, batch, self.out_dim)
        # teacher crops other than the student's own crop: all of them minus the same view
        global_ce = -((teacher_sum.unsqueeze(0) - teacher) * log_p).sum() / batch
        if n_local:
            log_p_local = self._log_softmax(student_local).reshape(n_local, batch, self.out_dim)
            local_ce = -(teacher_sum.unsqueeze(0) * log_p_local).sum() / batch
        else:
            local_ce = global_ce.new_zeros(())
        return {"dino_global": global_ce / n_pairs, "dino_local": local_ce / n_pairs}

    def forward(self, student_global: torch.Tensor, student_local: torch.Tensor | None,
                teacher_probs: torch.Tensor, n_global_crops: int = 2) -> torch.Tensor:
        """The DINO loss (scalar); arguments as in :meth:`terms`."""
        parts = self.terms(student_global, student_local, teacher_probs, n_global_crops)
        return parts["dino_global"] + parts["dino_local"]

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.float() / self.student_temp, dim=-1)

    def _check(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.ndim != 2 or tensor.shape[1] != self.out_dim:
            raise ValueError(f"{name} must be [N, {self.out_dim}], got {tuple(tensor.shape)}")
