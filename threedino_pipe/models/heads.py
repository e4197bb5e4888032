"""DINO / iBOT projection head: MLP -> L2 normalisation -> weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

# Old ``torch.nn.utils.weight_norm`` names (the released files) <-> parametrization names.
RELEASED_TO_PARAM = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                     "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}
PARAM_TO_RELEASED = {v: k for k, v in RELEASED_TO_PARAM.items()}


class DINOHead(nn.Module):
    """Projection head ``[..., in_dim] -> [..., out_dim]`` (logits over ``out_dim`` prototypes).

    ``mlp``: Linear, GELU, (Linear, GELU) x (nlayers - 2), Linear to ``bottleneck_dim``
    (a single Linear when ``nlayers == 1``); the bottleneck output is L2-normalised, then
    ``last_layer`` = weight-normalised Linear without bias, its norms ``g`` initialised to 1.
    Loads both the released ``last_layer.weight_g/_v`` names and the parametrization names.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.bottleneck_dim, self.nlayers = bottleneck_dim, nlayers
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.register_load_state_dict_pre_hook(_rename_released_keys)

    @property
    def dims(self) -> dict:
        """JSON-able shape description (enough to rebuild the head)."""
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim,
                "bottleneck_dim": self.bottleneck_dim, "nlayers": self.nlayers}

    def embed(self, x: Tensor) -> Tensor:
        """``[..., in_dim]`` -> the L2-normalised bottleneck ``[..., bottleneck_dim]``."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def prototypes(self, z: Tensor) -> Tensor:
        """Normalised bottleneck ``[..., bottleneck_dim]`` -> logits ``[..., out_dim]`` (cosines to the prototypes)."""
        return self.last_layer(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(self.embed(x))


def _rename_released_keys(module, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: accept ``last_layer.weight_g/_v`` as the parametrization's tensors."""
    for old, new in RELEASED_TO_PARAM.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def head_state_released(head: DINOHead) -> dict[str, Tensor]:
    """The head's state dict with the released names (``last_layer.weight_g`` / ``weight_v``)."""
    return {PARAM_TO_RELEASED.get(k, k): v for k, v in head.state_dict().items()}
