"""Sinkhorn-Knopp centering of the teacher's outputs (DINOv2 / SwAV style), DDP-aware."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` in place over every rank when torch.distributed runs; returns it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignment of samples to prototypes.

    Computes ``Q = exp(teacher_logits / teacher_temp)`` (seen as K prototypes x B samples), scales it to
    total mass 1, then ``n_iterations`` times: every prototype row to mass ``1 / K``, then every sample
    column to mass ``1 / B``; finally multiplies by B so that each sample's probabilities sum to 1.
    After the last step the guarantee is exact for the samples (each output row sums to 1); the
    prototype masses are only approximately uniform (each near ``B / K``), improving with iterations.

    Under ``torch.distributed`` the total mass, the per-prototype masses and the sample count B are
    summed over all ranks (``all_reduce``), so B counts the global batch and the result on each rank
    equals the rows of a single-process run on the concatenated batch. Every rank must call this,
    also a rank with zero samples (B_local = 0 is allowed).

    The logits are shifted by their global maximum before ``exp`` (the algorithm is invariant to a
    global scale of Q; this only prevents overflow) and computed in float32.

    Args:
        teacher_logits: ``[B_local, K]`` teacher head outputs (any float dtype).
        teacher_temp: teacher temperature (> 0), e.g. 0.04 -> 0.07.
        n_iterations: alternating normalisation rounds (3 in DINOv2 and 3DINO).

    Returns:
        ``[B_local, K]`` float32 probabilities, each row summing to 1.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    logits = teacher_logits.detach().float()
    n_local, n_prototypes = logits.shape
    tiny = torch.finfo(torch.float32).tiny

    peak = logits.max() if n_local else logits.new_tensor(float("-inf"))
    peak = _all_reduce(peak.reshape(1).clone(), dist.ReduceOp.MAX if _distributed() else None)
    q = torch.exp((logits - peak) / teacher_temp).t()  # [K, B_local]
    n_samples = _all_reduce(logits.new_tensor([float(n_local)]))  # global B

    q /= _all_reduce(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iterations):
        row_mass = _all_reduce(q.sum(dim=1, keepdim=True))  # [K, 1] over the global batch
        q /= row_mass.clamp_min(tiny)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # per sample: local
        q /= n_samples
    q *= n_samples
    return q.t().contiguous()
