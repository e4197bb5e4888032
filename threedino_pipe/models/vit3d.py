"""3D Vision Transformer backbone (DINOv2-style ViT over 16^3-voxel patches).

Input volumes are ``B x C x W x H x D`` in voxel index order (i, j, k): the two in-plane axes
first, the cross-slice axis last, as the preprocessed arrays are stored. Patch tokens are
flattened W-major (W slowest, D fastest) over the patch grid ``(W/p, H/p, D/p)``.

Parameter names follow the released 3DINO-ViT layout once the ``backbone.`` prefix and the
block chunk index are removed (see :mod:`threedino_pipe.models.weight_files`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Grid = tuple[int, int, int]

# Position embeddings are interpolated with scale factors (g + offset) / n (the reference rule).
POS_INTERP_OFFSET = 0.1


def _stored_grid(num_patch_tokens: int) -> int:
    """Side n of the cubic grid holding ``num_patch_tokens = n^3`` stored positions."""
    n = round(num_patch_tokens ** (1.0 / 3.0))
    if n ** 3 != num_patch_tokens:
        raise ValueError(f"position embedding holds {num_patch_tokens} patch positions, not a cube n^3")
    return n


def interpolate_pos_embed(pos_embed: Tensor, grid: Sequence[int]) -> Tensor:
    """Position embedding for a patch grid ``grid = (gw, gh, gd)``.

    Args:
        pos_embed: ``[1, n^3 + 1, D]``, CLS position first, then a cubic n^3 grid (W-major).
    Returns:
        ``[1, gw*gh*gd + 1, D]``: ``pos_embed`` itself when ``grid == (n, n, n)``, else the
        grid interpolated trilinearly (align_corners False) with scale factors ``(g + 0.1) / n``
        per axis, computed in float32 and returned in ``pos_embed``'s dtype.
    """
    grid = tuple(int(g) for g in grid)
    n = _stored_grid(pos_embed.shape[1] - 1)
    if grid == (n, n, n):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    cube = patch_pos.float().reshape(1, n, n, n, dim).permute(0, 4, 1, 2, 3)
    scale = tuple((g + POS_INTERP_OFFSET) / n for g in grid)
    out = F.interpolate(cube, scale_factor=scale, mode="trilinear", align_corners=False)
    if tuple(out.shape[-3:]) != grid:  # pragma: no cover - guards the floor() in interpolate
        raise RuntimeError(f"position embedding interpolated to {tuple(out.shape[-3:])}, expected {grid}")
    out = out.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, out], dim=1)


def resize_stored_pos_embed(pos_embed: Tensor, new_grid: int) -> Tensor:
    """Resample a stored cubic position embedding ``[1, n^3+1, D]`` to ``[1, new_grid^3+1, D]``.

    Used by adapt-highres (6^3 -> 7^3); same rule as :func:`interpolate_pos_embed`.
    """
    return interpolate_pos_embed(pos_embed, (new_grid,) * 3).detach().clone()


class PatchEmbed3D(nn.Module):
    """Non-overlapping ``p^3`` patches -> tokens: ``[B, C, W, H, D] -> [B, N, dim]`` (W-major)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` rows are q|k|v, each head-major."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def cls_weights(self, x: Tensor) -> Tensor:
        """Softmax weights of the CLS query (token 0) on ``x [B, 1 + N, dim]`` over the patch tokens,
        ``[B, heads, N]``, divided by their mean over the N patches.

        Row 0 of the softmax attention matrix, without computing its other ``N`` rows.
        """
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        query = qkv[:, :1, 0].transpose(1, 2)  # [B, heads, 1, d_head]
        keys = qkv[:, :, 1].transpose(1, 2)  # [B, heads, 1 + N, d_head]
        weights = torch.softmax((query @ keys.transpose(-2, -1)) * (d // self.num_heads) ** -0.5, dim=-1)[:, :, 0, 1:]
        return weights / weights.mean(dim=-1, keepdim=True)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (initialised to ``init``)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1 x))`` then ``x + ls2(mlp(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                 layerscale_init: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self._attn_branch(x), self.drop_path_rate, self.training)
        return x + drop_path(self._mlp_branch(x), self.drop_path_rate, self.training)


class VisionTransformer3D(nn.Module):
    """3D ViT over ``patch_size^3`` patches with a CLS token, mask token and learned position embedding.

    The ``vit3d`` backbone family (:mod:`threedino_pipe.models.backbones`), with every capability.

    Args:
        embed_dim, depth, num_heads: width, number of blocks, attention heads.
        patch_size: patch side in voxels (16 for the released weights).
        in_chans: input channels (1 for the released weights).
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic-depth rate, the same in every block (training only).
        layerscale_init: LayerScale initial value; ``None`` builds blocks without LayerScale.
        pos_grid: side n of the stored cubic position-embedding grid (6 for 96^3 crops).
    """

    family = "vit3d"

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, in_chans: int = 1,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, layerscale_init: float | None = 1e-5,
                 pos_grid: int = 6) -> None:
        super().__init__()
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.in_chans, self.mlp_ratio = patch_size, in_chans, mlp_ratio
        self.layerscale = layerscale_init is not None
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid ** 3 + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path_rate, layerscale_init) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # ----- configuration -----------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Voxels per axis of the cube it was pretrained on (``pos_grid * patch_size``)."""
        return self.pos_grid * self.patch_size

    @property
    def pos_grid(self) -> int:
        """Side of the stored cubic position-embedding grid."""
        return _stored_grid(self.pos_embed.shape[1] - 1)

    @property
    def dims(self) -> dict:
        """JSON-able architecture description (enough to rebuild the module)."""
        return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                "patch_size": self.patch_size, "in_chans": self.in_chans, "mlp_ratio": self.mlp_ratio,
                "layerscale": self.layerscale, "pos_grid": self.pos_grid}

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory while training)."""
        self.grad_checkpointing = enabled

    def interpolate_pos_embed_to(self, grid: int) -> None:
        """Replace the stored position embedding by its resampling to a ``grid^3`` cube (in place)."""
        self.pos_embed = nn.Parameter(resize_stored_pos_embed(self.pos_embed.data, grid))

    def patch_grid(self, spatial: Sequence[int]) -> Grid:
        """Patch grid ``(W/p, H/p, D/p)`` of a ``W x H x D`` input; each side must be a multiple of p."""
        p = self.patch_size
        if len(spatial) != 3 or any(s % p or s <= 0 for s in spatial):
            raise ValueError(f"input spatial shape {tuple(spatial)} is not three positive multiples of {p}")
        return tuple(s // p for s in spatial)

    # ----- forward -----------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """``[B, C, W, H, D]`` -> ``[B, 1 + N, dim]``: CLS + patch embeddings (masked ones replaced
        by the mask token) + position embedding."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input [B, {self.in_chans}, W, H, D], got {tuple(x.shape)}")
        grid = self.patch_grid(x.shape[2:])
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens + interpolate_pos_embed(self.pos_embed, grid).to(tokens.dtype)

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Run the backbone.

        Args:
            x: ``[B, C, W, H, D]``, each spatial side a multiple of ``patch_size``.
            masks: optional ``[B, N]`` bool, True where a patch embedding is replaced by the mask token.
        Returns:
            ``cls`` ``[B, dim]`` and ``patch`` ``[B, N, dim]`` after the final norm, ``prenorm``
            ``[B, 1 + N, dim]`` before it, and ``masks`` as given.
        """
        h = self.prepare_tokens(x, masks)
        for block in self.blocks:
            h = self._run_block(block, h)
        normed = self.norm(h)
        return {"cls": normed[:, 0], "patch": normed[:, 1:], "prenorm": h, "masks": masks}

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 4, *, norm: bool = True,
                                return_cls: bool = False, reshape: bool = False) -> list:
        """Patch tokens after chosen blocks.

        Args:
            n: an int for the last ``n`` blocks, or a list of block indices (0-based).
            norm: apply the final LayerNorm to each output.
            return_cls: return ``(patch, cls)`` pairs instead of patch tensors.
            reshape: patch tokens as ``[B, dim, gw, gh, gd]`` instead of ``[B, N, dim]``.
        Returns:
            One entry per requested block, in block order.
        """
        wanted = list(range(self.depth - n, self.depth)) if isinstance(n, int) else [int(i) for i in n]
        if not wanted or any(i < 0 or i >= self.depth for i in wanted):
            raise ValueError(f"layer indices {wanted} outside 0..{self.depth - 1}")
        grid = self.patch_grid(x.shape[2:])
        h = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            h = self._run_block(block, h)
            if i in wanted:
                outputs.append(self.norm(h) if norm else h)
        result = []
        for out in outputs:
            patch, cls = out[:, 1:], out[:, 0]
            if reshape:
                patch = patch.transpose(1, 2).reshape(out.shape[0], -1, *grid)
            result.append((patch, cls) if return_cls else patch)
        return result

    @torch.no_grad()
    def last_layer_maps(self, x: Tensor, on_block: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
        """Patch tokens ``[N, dim]`` (after the final norm) and CLS attention ``[heads, N]`` (``Attention.cls_weights``)
        of the last block for one volume ``x [1, C, W, H, D]`` (results: float32 on the CPU); ``on_block`` is
        called after each block."""
        self.eval()
        h = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            h = block(h)
            if on_block:
                on_block()
        last = self.blocks[-1]
        attention = last.attn.cls_weights(last.norm1(h))
        h = last(h)
        if on_block:
            on_block()
        return self.norm(h)[0, 1:].float().cpu(), attention[0].float().cpu()

    def forward(self, x: Tensor) -> Tensor:
        """CLS token after the final norm, ``[B, dim]``."""
        return self.forward_features(x)["cls"]


def layer_id(name: str, depth: int) -> int:
    """Layer index of a backbone parameter for layer-wise lr decay: tokens, position embedding
    and patch embedding 0, block i -> i + 1, final norm -> depth + 1 (``backbone.`` prefix allowed)."""
    name = name.removeprefix("backbone.")
    if name.startswith(("cls_token", "pos_embed", "mask_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1
