"""Multi-channel inputs for a single-channel backbone (docs/method.md, "Multi-channel inputs").

The backbone runs once per input channel: the channels are folded into the batch
(``[B, C, W, H, D] -> [B*C, 1, W, H, D]``, batch index ``b * C + c``), and the per-channel patch
features are concatenated per patch and mapped back to the backbone width by
``Linear(C*dim -> dim)`` + GELU. With one channel the mixing is the identity and holds no
parameters, so official single-channel weights and heads work unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


def fold_channels(x: Tensor) -> Tensor:
    """``[B, C, W, H, D] -> [B*C, 1, W, H, D]`` (channel-minor batch order)."""
    b, c = x.shape[:2]
    return x.reshape(b * c, 1, *x.shape[2:])


def average_channels(tokens: Tensor, num_channels: int) -> Tensor:
    """``[B*C, ...] -> [B, ...]``: the mean over the folded channels."""
    if num_channels == 1:
        return tokens
    return tokens.reshape(-1, num_channels, *tokens.shape[1:]).mean(dim=1)


def repeat_channels(tokens: Tensor, num_channels: int) -> Tensor:
    """``[B, ...] -> [B*C, ...]``: each sample copied to its ``C`` folded channels."""
    if num_channels == 1:
        return tokens
    return tokens.repeat_interleave(num_channels, dim=0)


class ChannelMixing(nn.Module):
    """Per-patch channel mixing ``[B*C, N, dim] -> [B, N, dim]``.

    ``C > 1``: concatenate the C channels' features of each patch (channel-major), then
    ``Linear(C*dim, dim)`` and GELU. ``C == 1``: identity, no parameters.
    """

    def __init__(self, num_channels: int, dim: int) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels, self.dim = num_channels, dim
        if num_channels > 1:
            self.proj = nn.Linear(num_channels * dim, dim)
            self.act = nn.GELU()

    def forward(self, tokens: Tensor) -> Tensor:
        if self.num_channels == 1:
            return tokens
        bc, n, d = tokens.shape
        c = self.num_channels
        if bc % c or d != self.dim:
            raise ValueError(f"expected [B*{c}, N, {self.dim}] tokens, got {tuple(tokens.shape)}")
        stacked = tokens.reshape(bc // c, c, n, d).permute(0, 2, 1, 3).reshape(bc // c, n, c * d)
        return self.act(self.proj(stacked))
