"""Label-free signals that tell whether self-supervised pretraining learns (docs/pretrain.md).

- ``target_entropy``: mean per-sample entropy of the centred teacher targets divided by log K;
  1 = every target is uniform over the K prototypes (nothing is distilled), 0 = one-hot targets.
- ``prototypes_used``: distinct argmax prototypes of the teacher targets over a window of recent
  iterations, divided by K; ``1/K`` means every input maps to one prototype (collapse).
- ``effective_rank`` (RankMe, Garrido et al. 2023): ``exp`` of the entropy of the normalised
  singular values of an embedding matrix; between 1 (all rows on a line) and min(rows, dims).
- ``spread``: mean over feature dimensions of the standard deviation across inputs; near 0 when
  the network ignores its input.
- ``agreement``: fraction of crops whose student argmax equals the teacher target's argmax.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor


@torch.no_grad()
def target_entropy(probs: Tensor) -> float:
    """Mean entropy of the rows of ``probs`` ``[N, K]`` (each summing to 1) divided by ``log K``."""
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [N, K] with K >= 2, got {tuple(probs.shape)}")
    p = probs.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return float(entropy / math.log(p.shape[1]))


@torch.no_grad()
def effective_rank(embeddings: Tensor) -> float:
    """RankMe of ``embeddings`` ``[N, D]``: ``exp(-sum_i s_i log s_i)`` with ``s = sigma / ||sigma||_1``."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got {tuple(embeddings.shape)}")
    sigma = torch.linalg.svdvals(embeddings.float())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    s = sigma / total + 1e-12
    return float(torch.exp(-(s * s.log()).sum()))


@torch.no_grad()
def spread(embeddings: Tensor) -> float:
    """Mean over dimensions of the standard deviation across the rows of ``embeddings`` ``[N, D]`` (0 for N < 2)."""
    if embeddings.shape[0] < 2:
        return 0.0
    return float(embeddings.float().std(dim=0).mean())


@torch.no_grad()
def agreement(student_logits: Tensor, teacher_probs: Tensor) -> float:
    """Fraction of rows where the student's argmax prototype equals the teacher target's (same crops, ``[N, K]``)."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_probs.shape)}")
    return float((student_logits.argmax(-1) == teacher_probs.argmax(-1)).float().mean())


class PrototypeUsage:
    """Distinct teacher-target argmax prototypes over the last ``window`` iterations.

    ``update`` takes one iteration's targets ``[N, K]`` (all ranks' rows when gathered);
    ``fraction`` = distinct prototypes / K. The window is part of a training checkpoint
    (:meth:`state_dict`), so a resumed run logs what an uninterrupted one would.
    """

    def __init__(self, num_prototypes: int, window: int = 50) -> None:
        self.num_prototypes, self.window = int(num_prototypes), int(window)
        self.recent: deque[list[int]] = deque(maxlen=self.window)

    @torch.no_grad()
    def update(self, targets: Tensor) -> float:
        """Add an iteration's targets; returns :meth:`fraction`."""
        self.recent.append(targets.argmax(-1).flatten().tolist())
        return self.fraction()

    def count(self) -> int:
        return len({p for row in self.recent for p in row})

    def fraction(self) -> float:
        return self.count() / self.num_prototypes

    def state_dict(self) -> dict:
        return {"num_prototypes": self.num_prototypes, "window": self.window, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.num_prototypes, self.window = int(state["num_prototypes"]), int(state["window"])
        self.recent = deque((list(r) for r in state["recent"]), maxlen=self.window)


def _gathered(tensor: Tensor) -> Tensor:
    """``tensor`` of every rank concatenated along dim 0 (itself without torch.distributed; equal sizes)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class LearningSignals:
    """Every signal of one SSL step, with the windows that span steps (docs/pretrain.md, "Is it learning?").

    Args:
        num_prototypes: K of the DINO head.
        window: iterations of the prototype-usage window (50).
        rank_rows: teacher CLS tokens kept for their effective rank (the last 512 over recent steps).
        max_patch_rows: patch tokens (of this step) subsampled for their effective rank.
    """

    UNIFORM = 0.99      # target entropy above this ...
    STILL = 0.01        # ... with the teacher's CLS spread below this, or its effective rank below 2: no learning
    COLLAPSED = 0.02    # target entropy below this, or at most 2 prototypes in use: collapse

    def __init__(self, num_prototypes: int, window: int = 50, rank_rows: int = 512, max_patch_rows: int = 2048):
        self.usage = PrototypeUsage(num_prototypes, window)
        self.rank_rows, self.max_patch_rows = rank_rows, max_patch_rows
        self.cls_rows: Tensor | None = None
        self.warned: set[str] = set()

    @torch.no_grad()
    def update(self, student: dict[str, Tensor], teacher: dict[str, Tensor], dino_probs: Tensor,
               ibot_probs: Tensor) -> dict[str, float]:
        """Signals of this step: ``student`` / ``teacher`` outputs as :class:`SSLNetwork` returns them."""
        cls = teacher["cls"].float()
        rows = cls if self.cls_rows is None else torch.cat([self.cls_rows.to(cls.device), cls])
        self.cls_rows = rows[-self.rank_rows:].detach().cpu()
        patch = teacher["patch"].float().flatten(0, 1)
        if patch.shape[0] > self.max_patch_rows:
            patch = patch[torch.linspace(0, patch.shape[0] - 1, self.max_patch_rows).long()]
        return {
            "target_entropy": target_entropy(dino_probs),
            "ibot_entropy": target_entropy(ibot_probs) if ibot_probs.shape[0] else math.nan,
            "prototypes_used": self.usage.update(_gathered(dino_probs)),
            "cls_rank": effective_rank(self.cls_rows),
            "patch_rank": effective_rank(patch),
            "teacher_cls_std": spread(cls),
            "cls_std": spread(student["cls"]),
            "agreement": agreement(student["dino_global"], dino_probs),
        }

    def warning(self, row: dict[str, float], iteration: int, iters: int, after: int = 50) -> str | None:
        """A warning (once per kind) when the signals show no learning or a collapse after the warm-up."""
        if iteration < min(max(after, iters // 5), iters):
            return None
        used = round(row["prototypes_used"] * self.usage.num_prototypes)
        still = row["teacher_cls_std"] < self.STILL or row["cls_rank"] < 2
        if row["target_entropy"] > self.UNIFORM and still and "uniform" not in self.warned:
            self.warned.add("uniform")
            return (f"iteration {iteration}: the teacher ignores its input (CLS spread {row['teacher_cls_std']:.2g}, "
                    f"effective rank {row['cls_rank']:.1f}) and its targets are uniform (entropy "
                    f"{row['target_entropy']:.4f} of the maximum): nothing is distilled. Use the self-configured "
                    "recipe (--recipe auto) or a longer run; see docs/pretrain.md")
        if (row["target_entropy"] < self.COLLAPSED or used <= 2) and "collapse" not in self.warned:
            self.warned.add("collapse")
            return (f"iteration {iteration}: representation collapse suspected ({used} prototype(s) in use over the "
                    f"last {self.usage.window} iterations, target entropy {row['target_entropy']:.3f}); "
                    "see docs/pretrain.md")
        return None

    def state_dict(self) -> dict:
        return {"usage": self.usage.state_dict(), "cls_rows": self.cls_rows, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.usage.load_state_dict(state["usage"])
        self.cls_rows, self.warned = state["cls_rows"], set(state["warned"])
