"""The ``swin`` backbone family: MONAI's Swin transformer encoder, the encoder of SwinUNETR (Tang et al.).

- :class:`SwinEncoder`: MONAI's ``SwinTransformer`` (``monai.networks.nets.swin_unetr``) as a
  :class:`~threedino_pipe.models.backbones.Backbone`; its parameter names are those of
  ``SwinUNETR(...).swinViT``. ``dims`` are SwinUNETR's arguments ``feature_size``, ``depths``,
  ``num_heads``, ``in_channels``, ``patch_size``, ``window_size`` (MONAI's defaults where not given).
  An input side must be a multiple of ``patch_size * 2**4`` voxels (32 with MONAI's 2-voxel patches):
  four patch mergings follow the patch embedding.
- :func:`build_swin`: random initialisation from a preset name (``feature_size`` by
  :data:`PRESET_FEATURE_SIZE`) or dims.
- :func:`load_swin`: a weights file in Tang et al.'s layout, strictly. The layout (shared with
  ``3dino pretrain --method tang --arch swin``)::

      {"state_dict": {"module." + key: tensor for key, tensor in swin_vit.state_dict().items()},
       "threedino_pipe": {"family": "swin", "method": "tang", "dims": {...}, ...}}   # optional key

  Tang et al.'s released ``model_swinvit.pt`` has no ``threedino_pipe`` key and names the MLP layers
  ``mlp.fc1`` / ``mlp.fc2`` (MONAI's ``SwinUNETR.load_from`` reads them so); they are read as MONAI's
  ``mlp.linear1`` / ``mlp.linear2``. Without recorded dims, they come from the tensor shapes.
- :func:`repeat_channels`: a 1-channel encoder's state for a C-channel input (multi-channel data).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor

from threedino_pipe.models.weight_files import _few, _match_state
from threedino_pipe.runtime.checkpoints import read_checkpoint
from threedino_pipe.runtime.errors import UserError

FAMILY = "swin"
METHOD = "tang"  # Swin weights come from Tang et al.'s recipe: their release or `3dino pretrain --method tang`
STAGES = 4
# MONAI SwinUNETR's defaults (Tang et al.'s released encoder has them, with feature_size 48)
SWIN_DEFAULTS: dict[str, Any] = {"feature_size": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24],
                                 "in_channels": 1, "patch_size": 2, "window_size": 7}
# feature_size per preset (docs/finetune.md): Tang et al.'s 48; 12 (the smallest MONAI allows) for tiny
PRESET_FEATURE_SIZE = {"tiny": 12, "small": 48, "base": 48, "large": 48}
PRETRAINED_CUBE = 96  # Tang et al. pretrained on 96^3 crops
_PREFIX = "module."
_RELEASED_NAMES = {".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}
_BLOCK = re.compile(r"^layers(\d)\.0\.blocks\.(\d+)\.")
FIX_SOURCE = ("pass Tang et al.'s model_swinvit.pt, the backbone.pt of a `3dino pretrain --method tang --arch swin` "
              "run, or {'state_dict': {'module.' + k: v}} of MONAI's SwinUNETR(...).swinViT.state_dict()")


class SwinEncoder(SwinTransformer):
    """MONAI's Swin encoder as a backbone. ``forward(x [B, C, X, Y, Z], normalize)`` -> the 5 stage outputs
    ``[B, feature_size * 2**i, X / (p * 2**i), ...]`` for i = 0..4 (p: ``dims["patch_size"]``)."""

    family = FAMILY

    def __init__(self, feature_size: int, depths: Sequence[int], num_heads: Sequence[int], in_channels: int,
                 patch_size: int, window_size: int | Sequence[int], drop_path_rate: float = 0.0) -> None:
        if len(depths) != STAGES or len(num_heads) != STAGES:
            raise ValueError(f"SwinUNETR has {STAGES} stages: depths {depths} and num_heads {num_heads}")
        window = [int(w) for w in window_size] if isinstance(window_size, list | tuple) else [int(window_size)] * 3
        super().__init__(in_chans=in_channels, embed_dim=feature_size, window_size=tuple(window),
                         patch_size=(patch_size,) * 3, depths=tuple(depths), num_heads=tuple(num_heads),
                         drop_path_rate=drop_path_rate)
        self._dims = {"feature_size": int(feature_size), "depths": [int(d) for d in depths],
                      "num_heads": [int(h) for h in num_heads], "in_channels": int(in_channels),
                      "patch_size": int(patch_size), "window_size": window[0] if len(set(window)) == 1 else window}
        self.in_chans, self.depth = int(in_channels), int(sum(depths))
        self.patch_size = int(patch_size) * 2 ** STAGES  # the Backbone protocol's: sides must be multiples of it

    @property
    def dims(self) -> dict:
        return dict(self._dims)

    @property
    def input_size(self) -> int:
        return PRETRAINED_CUBE

    def patch_grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """The deepest stage's grid of a ``X x Y x Z`` input; ``ValueError`` unless each side is a multiple of 32."""
        if len(spatial) != 3 or any(int(s) % self.patch_size or int(s) < 1 for s in spatial):
            raise ValueError(f"a Swin encoder needs every side a multiple of {self.patch_size} voxels, got "
                             f"{tuple(spatial)}")
        return tuple(int(s) // self.patch_size for s in spatial)

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 4, *, norm: bool = True,
                                return_cls: bool = False, reshape: bool = False) -> list:
        """Stage outputs (of 0..4; the last ``n`` or the given ones): ``[B, N_i, C_i]`` tokens of each stage's own
        grid and width, or ``[B, C_i, x, y, z]`` maps with ``reshape``. There is no CLS token."""
        if return_cls:
            raise ValueError("a Swin encoder has no CLS token")
        self.patch_grid(x.shape[2:])
        stages = self(x, normalize=norm)
        chosen = range(len(stages) - n, len(stages)) if isinstance(n, int) else n
        return [stages[i] if reshape else stages[i].flatten(2).transpose(1, 2) for i in chosen]


def swin_dims(dims: str | dict, in_channels: int | None = None) -> dict:
    """Full dims from a preset name or partial dims (MONAI's defaults fill the rest); ``in_channels`` overrides."""
    if isinstance(dims, str):
        if dims not in PRESET_FEATURE_SIZE:
            raise ValueError(f"unknown preset {dims!r}; choose one of {', '.join(PRESET_FEATURE_SIZE)}")
        dims = {"feature_size": PRESET_FEATURE_SIZE[dims]}
    unknown = sorted(set(dims) - set(SWIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown Swin dims {unknown}; known: {', '.join(SWIN_DEFAULTS)}")
    full = {**SWIN_DEFAULTS, **dims}
    if in_channels is not None:
        full["in_channels"] = int(in_channels)
    if full["feature_size"] % 12:
        raise ValueError(f"feature_size {full['feature_size']} is not a multiple of 12 (MONAI's SwinUNETR needs it)")
    return full


def build_swin(dims: str | dict) -> SwinEncoder:
    """A randomly initialised Swin encoder from a preset name or dims (see :func:`swin_dims`)."""
    return SwinEncoder(**swin_dims(dims))


# ----- files -----------------------------------------------------------------------------------
def swin_state_dict(obj: Any) -> dict | None:
    """The Swin state dict of a loaded file in Tang et al.'s layout (keys with ``module.``), or None when the
    object is not one (e.g. a 3D ViT file)."""
    if not isinstance(obj, dict):
        return None
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not any(_BLOCK.match(str(k).removeprefix(_PREFIX)) for k in state):
        return None
    return state


def is_swin_file(path: str | Path) -> bool:
    """True when ``path`` reads as a Swin weights file (cheaply: memory-mapped, no CRC check); False for any
    other or unreadable file (its own loader then says what is wrong)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, unreadable, ...: not recognisably Swin
        return False
    return swin_state_dict(obj) is not None


def _encoder_state(state: dict, path: Path) -> dict[str, Tensor]:
    """Our parameter names: ``module.`` removed, released ``mlp.fc1/fc2`` read as ``mlp.linear1/linear2``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise UserError(f"state_dict entry {key} is a {type(value).__name__}, not a tensor", file=path,
                            fix=FIX_SOURCE)
        name = str(key).removeprefix(_PREFIX)
        for old, new in _RELEASED_NAMES.items():
            name = name.replace(old, new)
        if name in out:
            raise UserError(f"holds {name} twice (released fc1/fc2 and MONAI linear1/linear2 names)", file=path,
                            fix=FIX_SOURCE)
        out[name] = value
    return out


def _shape_dims(state: dict[str, Tensor], path: Path) -> dict:
    """Dims from tensor shapes: patch embedding ``[F, C, p, p, p]``, blocks per stage, heads and window from
    the relative position bias tables ``[(2w-1)^3, heads]``."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 5:
        raise UserError("holds no Swin patch embedding (module.patch_embed.proj.weight [F, C, p, p, p])",
                        file=path, fix=FIX_SOURCE)
    depths, heads, window = [], [], SWIN_DEFAULTS["window_size"]
    for stage in range(1, STAGES + 1):
        blocks = sorted({int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == str(stage)})
        table = state.get(f"layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        depths.append(blocks[-1] + 1 if blocks else SWIN_DEFAULTS["depths"][stage - 1])
        heads.append(int(table.shape[1]) if table is not None and table.ndim == 2 else SWIN_DEFAULTS["num_heads"][
            stage - 1])
        if stage == 1 and table is not None:
            window = (round(table.shape[0] ** (1 / 3)) + 1) // 2
    return {"feature_size": int(weight.shape[0]), "depths": depths, "num_heads": heads,
            "in_channels": int(weight.shape[1]), "patch_size": int(weight.shape[2]), "window_size": int(window)}


def _check_expect(dims: dict, expect: str | dict | None, path: Path) -> None:
    if expect is None:
        return
    wanted = {"feature_size": PRESET_FEATURE_SIZE.get(expect)} if isinstance(expect, str) else dict(expect)
    wrong = [f"{k} {dims[k]} (expected {v})" for k, v in wanted.items() if k in dims and k != "in_channels"
             and dims[k] != v]
    if wrong:
        raise UserError(f"the Swin encoder does not have the expected size: {', '.join(wrong)}", file=path,
                        fix="pass a file of the expected size, or the matching --preset (tiny: feature_size 12; "
                        "small, base, large: 48), or leave --preset out")


def load_swin(path: str | Path, *, expect: str | dict | None = None) -> tuple[SwinEncoder, dict]:
    """A :class:`SwinEncoder` from a file in Tang et al.'s layout, loaded strictly (eval mode).

    Every key of the file is used, every key of the encoder filled, every shape equal, else a
    :class:`UserError` naming the file and the first missing / unexpected / mismatched keys. Dims: the
    file's ``threedino_pipe.dims`` when recorded, else from the shapes. ``expect``: a preset (its
    ``feature_size``) or dims the file must have. Returns the encoder and an info dict: ``dims``,
    ``layout``, ``preset`` (None), ``meta`` (the file's ``threedino_pipe`` entry, ``method`` ``tang``
    when it records none), ``path``.
    """
    path = Path(path)
    obj = read_checkpoint(path, fix=FIX_SOURCE)
    state = swin_state_dict(obj)
    if state is None:
        keys = list(obj) if isinstance(obj, dict) else []
        raise UserError("is not a Swin encoder file: no 'state_dict' with module.layers1.0.blocks.* keys (top-level "
                        f"keys: {_few([str(k) for k in keys])})", file=path, fix=FIX_SOURCE)
    meta = obj.get("threedino_pipe") if isinstance(obj.get("threedino_pipe"), dict) else {}
    encoder_state = _encoder_state(state, path)
    recorded = meta.get("dims") if isinstance(meta.get("dims"), dict) else None
    try:
        dims = swin_dims(recorded) if recorded else swin_dims(_shape_dims(encoder_state, path))
    except ValueError as exc:
        raise UserError(f"its Swin dims cannot be built ({exc})", file=path, fix=FIX_SOURCE) from None
    _check_expect(dims, expect, path)
    model = SwinEncoder(**dims)
    where = "recorded in the file" if recorded else "read from the tensor shapes"
    _match_state(model, encoder_state, path, "Swin encoder",
                 f" (dims {where}; key names without 'module.')", fix="the file is incomplete or of another "
                 "architecture; " + FIX_SOURCE)
    model.load_state_dict(encoder_state, strict=True)
    layout = "threedino_pipe (Tang et al.'s layout)" if meta else "Tang et al.'s model_swinvit.pt layout"
    info = {"dims": dims, "layout": layout, "preset": None, "meta": {**meta, "method": meta.get("method") or METHOD},
            "path": str(path)}
    return model.eval(), info


def repeat_channels(state: dict[str, Tensor], in_channels: int) -> dict[str, Tensor]:
    """A 1-channel encoder's state for ``in_channels`` input channels: the patch embedding's kernel
    ``[F, 1, p, p, p]`` repeated over the channels and divided by their number (an input with the same
    image in every channel gives the pretrained response); a state with other channels is returned as is."""
    weight = state["patch_embed.proj.weight"]
    if weight.shape[1] != 1 or in_channels == 1:
        return state
    return {**state, "patch_embed.proj.weight": weight.repeat(1, in_channels, 1, 1, 1) / in_channels}
