"""Backbone presets (DINOv2 sizes plus a CPU-sized ``tiny``) and a builder.

``tiny`` is 96/4/3: the reference model's size, small enough for CPU tests and the demo, with a
depth divisible by 4 so it can be exported in the released 4-chunk layout.
"""

from __future__ import annotations

from torch import nn

from threedino_pipe.models.vit3d import VisionTransformer3D

PRESETS: dict[str, dict] = {
    "tiny": {"embed_dim": 96, "depth": 4, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}

_BUILD_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "mlp_ratio", "drop_path_rate",
               "layerscale_init", "pos_grid")


def preset_dims(preset: str) -> dict:
    """A copy of the preset's ``embed_dim``, ``depth``, ``num_heads``; unknown names raise ``ValueError``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset])


def preset_for(embed_dim: int, depth: int | None = None, num_heads: int | None = None) -> str | None:
    """Name of the preset with this width (and depth and heads, when given), or ``None``."""
    for name, dims in PRESETS.items():
        if dims["embed_dim"] == embed_dim and depth in (None, dims["depth"]) and num_heads in (None, dims["num_heads"]):
            return name
    return None


def default_num_heads(embed_dim: int) -> int:
    """Heads for a width when no file or caller says: the preset's count for a preset width,
    else ``embed_dim // 64`` (DINOv2's 64-wide heads), at least 1."""
    name = preset_for(embed_dim)
    return PRESETS[name]["num_heads"] if name else max(embed_dim // 64, 1)


def build_backbone(preset: str | dict | None = None, **overrides) -> VisionTransformer3D:
    """Build a :class:`VisionTransformer3D` from a preset name or a dims dict, with keyword overrides.

    Dims dicts may carry ``layerscale: bool`` (as :attr:`VisionTransformer3D.dims` writes it).
    """
    dims = preset_dims(preset) if isinstance(preset, str) else dict(preset or {})
    dims.update(overrides)
    if "layerscale" in dims:
        if not dims.pop("layerscale"):
            dims["layerscale_init"] = None
    unknown = set(dims) - set(_BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown backbone options: {sorted(unknown)}")
    missing = {"embed_dim", "depth", "num_heads"} - set(dims)
    if missing:
        raise ValueError(f"backbone dims lack {sorted(missing)}")
    return VisionTransformer3D(**dims)


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
