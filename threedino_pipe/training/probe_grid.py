"""The linear-probe grid trained at once on cached features (docs/method.md, "Downstream: classification").

Every grid point ``(lr, layers, avgpool)`` is a Linear layer on a sub-vector of one full feature
vector per view, ``[cls(block d-4), ..., cls(block d-1), patch_mean(last block)]``, each block
``C * dim`` wide (:func:`threedino_pipe.models.classification.probe_input` with all cached layers
and ``avgpool``). ``layers = n`` uses the last n CLS blocks, ``avgpool`` the last block. So all
G grid points are one weight tensor ``[F, G, K]`` whose unused blocks are masked to zero, trained
by two matrix products per step: the whole grid costs about one run.

Optimiser: SGD with momentum 0.9, no weight decay, per-point learning rate times the cosine
factor ``0.5 * (1 + cos(pi * t / T))`` (torch's ``SGD`` + ``CosineAnnealingLR(T, eta_min=0)``
stepped per iteration, exactly). Initialisation: weights N(0, 0.01), biases 0 (DINOv2's linear
evaluation). The loss of each point is the batch-mean cross-entropy; the points' losses are
summed, which leaves every point its own gradient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LEARNING_RATES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
LAYER_CHOICES = (1, 4)
AVGPOOL_CHOICES = (False, True)
MOMENTUM = 0.9
INIT_STD = 0.01


@dataclass(frozen=True)
class GridPoint:
    """One probe configuration: learning rate, number of last blocks' CLS tokens, mean patch token or not."""

    lr: float
    layers: int
    avgpool: bool

    def to_dict(self) -> dict:
        return asdict(self)


def grid_points(num_layers: int, learning_rates: tuple[float, ...] = LEARNING_RATES) -> list[GridPoint]:
    """The grid: ``layers`` in {1, 4} (clipped to ``num_layers`` cached blocks, duplicates dropped) x
    avgpool in {False, True} x learning rates, in that nesting order (lr fastest)."""
    layer_choices = sorted({min(n, num_layers) for n in LAYER_CHOICES})
    return [GridPoint(float(lr), n, a) for n in layer_choices for a in AVGPOOL_CHOICES for lr in learning_rates]


def feature_mask(points: list[GridPoint], num_layers: int, block_width: int) -> Tensor:
    """``[G, (num_layers + 1) * block_width]`` float mask: 1 on the blocks each point uses."""
    mask = torch.zeros(len(points), num_layers + 1, block_width)
    for g, point in enumerate(points):
        mask[g, num_layers - point.layers:num_layers] = 1.0
        if point.avgpool:
            mask[g, num_layers] = 1.0
    return mask.flatten(1)


def cosine_factor(iteration: int, total: int) -> float:
    """Learning-rate factor at 0-based ``iteration`` of ``total``: ``0.5 * (1 + cos(pi * t / T))``."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, total)))


def batch_indices(iteration: int, batch_size: int, num_samples: int, seed: int) -> Tensor:
    """Sample indices of 0-based ``iteration``: consecutive slices of per-epoch permutations.

    The stream is a function of ``(seed, epoch)`` only, so a resumed run draws the same batches.
    A batch larger than the sample count takes the whole (permuted) set.
    """
    batch_size = min(batch_size, num_samples)
    start = iteration * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


class ProbeGrid:
    """G linear layers on masked sub-vectors of ``F``-wide features, trained together.

    Gradients are computed in closed form (softmax minus one-hot), so a step is two matrix
    products ``[N, F] x [F, G*K]`` whatever G is.

    Attributes:
        weight: ``[F, G, K]`` (zero outside each point's mask), bias ``[G, K]``.
        momentum_weight, momentum_bias: SGD momentum buffers of the same shapes.
    """

    def __init__(self, points: list[GridPoint], num_layers: int, block_width: int, num_classes: int, *,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.points = list(points)
        self.num_layers, self.block_width, self.num_classes = num_layers, block_width, num_classes
        mask = feature_mask(self.points, num_layers, block_width)                  # [G, F]
        self.mask = mask.t().contiguous()[:, :, None].expand(-1, -1, num_classes).contiguous().to(device)
        gen = torch.Generator().manual_seed(int(seed))
        weight = torch.randn(len(points), mask.shape[1], num_classes, generator=gen) * INIT_STD
        self.weight = weight.permute(1, 0, 2).contiguous().to(device) * self.mask  # [F, G, K]
        self.bias = torch.zeros(len(points), num_classes, device=device)
        self.momentum_weight = torch.zeros_like(self.weight)
        self.momentum_bias = torch.zeros_like(self.bias)
        self.lrs = torch.tensor([p.lr for p in self.points], device=device)

    def logits(self, x: Tensor) -> Tensor:
        """``x [N, F]`` -> ``[N, G, K]``."""
        g, k = self.bias.shape
        return (x @ self.weight.reshape(-1, g * k)).reshape(-1, g, k) + self.bias

    def losses(self, x: Tensor, y: Tensor) -> Tensor:
        """Batch-mean cross-entropy of every point, ``[G]``."""
        log_p = torch.log_softmax(self.logits(x), dim=-1)
        return -log_p.gather(2, y.view(-1, 1, 1).expand(-1, log_p.shape[1], 1)).squeeze(2).mean(0)

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor, lr_factor: float) -> Tensor:
        """One SGD-momentum step of every point on the batch ``x [N, F]``, ``y [N]``; returns the losses ``[G]``."""
        n = x.shape[0]
        g, k = self.bias.shape
        log_p = torch.log_softmax(self.logits(x), dim=-1)                            # [N, G, K]
        target = F.one_hot(y, k).to(log_p.dtype)[:, None, :]                          # [N, 1, K]
        losses = -(log_p * target).sum(2).mean(0)
        d_logits = (log_p.exp() - target) / n                                         # d(mean CE)/d logits
        grad_weight = (x.t() @ d_logits.reshape(n, g * k)).reshape(self.weight.shape) * self.mask
        grad_bias = d_logits.sum(0)
        lr = self.lrs * lr_factor
        self.momentum_weight.mul_(MOMENTUM).add_(grad_weight)
        self.momentum_bias.mul_(MOMENTUM).add_(grad_bias)
        self.weight.sub_(lr.view(1, -1, 1) * self.momentum_weight)
        self.bias.sub_(lr.view(-1, 1) * self.momentum_bias)
        return losses

    @torch.no_grad()
    def probabilities(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Softmax probabilities ``[G, N, K]`` of ``x [N, F]`` (in chunks of rows)."""
        return torch.cat([torch.softmax(self.logits(x[i:i + chunk]), dim=-1) for i in range(0, x.shape[0], chunk)],
                         dim=0).transpose(0, 1)

    def linear(self, g: int) -> tuple[Tensor, Tensor]:
        """Point ``g`` as ``nn.Linear`` parameters on its own probe input: ``weight [K, d]``, ``bias [K]``."""
        used = self.mask[:, g, 0].bool()
        return self.weight[used, g].t().contiguous().cpu(), self.bias[g].clone().cpu()

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight.cpu(), "bias": self.bias.cpu(), "momentum_weight": self.momentum_weight.cpu(),
                "momentum_bias": self.momentum_bias.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("weight", "bias", "momentum_weight", "momentum_bias"):
            target = getattr(self, name)
            if state[name].shape != target.shape:
                raise ValueError(f"{name} has shape {list(state[name].shape)}, expected {list(target.shape)}")
            target.copy_(state[name])
