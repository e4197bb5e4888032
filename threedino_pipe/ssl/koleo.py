"""KoLeo regulariser: spreads the student's CLS features by penalising close nearest neighbours."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator as a loss (Sablayrolles et al. 2019; DINOv2).

    ``x`` ``[N, D]`` is L2-normalised (``F.normalize`` eps 1e-8); for each row i its nearest other row
    j(i) is found (largest dot product = smallest distance on the sphere), and the loss is
    ``-mean_i log(||x_i - x_j(i) + eps||_2 + eps)`` with eps 1e-8 (``F.pairwise_distance``'s eps, as
    DINOv2's ``nn.PairwiseDistance(2, eps=1e-8)``). Computed in float32 outside autocast. With fewer
    than 2 rows there is no neighbour: the loss is 0 (connected to the graph).

    Args:
        eps: the epsilon above (1e-8).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features -> scalar loss."""
        if x.ndim != 2:
            raise ValueError(f"KoLeo expects [N, D] features, got {tuple(x.shape)}")
        if x.shape[0] < 2:
            return x.float().sum() * 0.0
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-2.0)  # below any cosine: never pick yourself
                nearest = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()


def koleo_per_chunk(cls_tokens: torch.Tensor, n_chunks: int = 2, loss: KoLeoLoss | None = None) -> torch.Tensor:
    """KoLeo summed over the global-crop chunks: ``[n_chunks * B, D]`` (crop-major) -> scalar.

    Each chunk holds one global crop of every image, so two crops of the same image are never
    neighbours; the trainer multiplies the result by the KoLeo weight (0.1). Under DDP this stays
    within a rank (no gathering), as in the reference.
    """
    if cls_tokens.shape[0] % n_chunks:
        raise ValueError(f"{cls_tokens.shape[0]} CLS rows do not split into {n_chunks} equal chunks")
    loss = loss if loss is not None else KoLeoLoss()
    return sum((loss(chunk) for chunk in cls_tokens.chunk(n_chunks)), cls_tokens.new_zeros((), dtype=torch.float32))
