"""Centring: how the teacher's outputs become the targets the student learns (docs/method.md).

Without centring the teacher's softmax collapses onto one prototype; centring spreads the
targets. Three ways, chosen per run (``--centering``):

- ``sinkhorn``: Sinkhorn-Knopp over the current batch (DINOv2 and 3DINO at batch 512). Its
  equipartition constraint spreads each of the B teacher rows over at least K/B prototypes, so at
  a batch of a few volumes the targets are near uniform and nothing is distilled.
- ``sinkhorn_queue``: Sinkhorn-Knopp over the current rows and a queue of the teacher's recent
  bottleneck embeddings, as SwAV does for small batches (Caron et al. 2020, queue of 3,840 at
  batch 256). The queued embeddings are scored with the teacher's current prototypes at every
  step; only the current rows are returned.
- ``softmax``: DINO v1's centring: ``softmax((logits - c) / T)`` with ``c`` an exponential
  moving average (momentum 0.9) of the teacher's mean logits over all ranks.

Every mode keeps its state (queue, centre) in the training checkpoint, so a resumed run is
bitwise the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from threedino_pipe.ssl.sinkhorn import sinkhorn_knopp

MODES = ("sinkhorn", "sinkhorn_queue", "softmax")


def _all_reduce_mean(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


class TeacherCentring:
    """Teacher bottleneck embeddings -> target probabilities for one head (DINO or iBOT).

    Args:
        mode: one of :data:`MODES`.
        queue_size: embeddings kept per rank for ``sinkhorn_queue`` (> 0 there).
        center_momentum: EMA momentum of the ``softmax`` centre.
        n_iterations: Sinkhorn-Knopp rounds (3).
    """

    def __init__(self, mode: str = "sinkhorn", *, queue_size: int = 0, center_momentum: float = 0.9,
                 n_iterations: int = 3) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown centring {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "sinkhorn_queue" and queue_size < 1:
            raise ValueError("sinkhorn_queue needs queue_size >= 1")
        self.mode, self.queue_size = mode, int(queue_size)
        self.center_momentum, self.n_iterations = float(center_momentum), int(n_iterations)
        self.queue: Tensor | None = None   # [<= queue_size, d] float32, oldest first
        self.center: Tensor | None = None  # [1, K] float32

    @torch.no_grad()
    def targets(self, embeddings: Tensor, prototypes: Callable[[Tensor], Tensor], temperature: float) -> Tensor:
        """``[N, d]`` normalised teacher embeddings -> ``[N, K]`` float32 target probabilities.

        ``prototypes`` maps embeddings to logits (the teacher head's last layer); the queue and the
        centre are updated after the targets are computed.
        """
        logits = prototypes(embeddings).float()
        self._to(logits.device)
        if self.mode == "softmax":
            probs = torch.softmax((logits if self.center is None else logits - self.center) / temperature, dim=-1)
            self._update_center(logits)
            return probs
        if self.mode == "sinkhorn_queue" and self.queue is not None and self.queue.shape[0]:
            old = prototypes(self.queue.to(embeddings.dtype)).float()
            probs = sinkhorn_knopp(torch.cat([old, logits]), temperature, self.n_iterations)[old.shape[0]:]
        else:
            probs = sinkhorn_knopp(logits, temperature, self.n_iterations)
        if self.mode == "sinkhorn_queue":
            fresh = embeddings.detach().float()
            self.queue = fresh if self.queue is None else torch.cat([self.queue, fresh])
            self.queue = self.queue[-self.queue_size:].clone()
        return probs

    def _to(self, device: torch.device) -> None:
        """Keep the state on the teacher's device (a checkpoint loads it on the CPU)."""
        if self.queue is not None and self.queue.device != device:
            self.queue = self.queue.to(device)
        if self.center is not None and self.center.device != device:
            self.center = self.center.to(device)

    def _update_center(self, logits: Tensor) -> None:
        mean = _all_reduce_mean(logits.mean(dim=0, keepdim=True) if logits.shape[0] else
                                torch.zeros(1, logits.shape[1], device=logits.device))
        self.center = mean if self.center is None else \
            self.center * self.center_momentum + mean * (1.0 - self.center_momentum)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "queue": self.queue, "center": self.center}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint centring {state.get('mode')!r} differs from {self.mode!r}")
        self.queue, self.center = state.get("queue"), state.get("center")
