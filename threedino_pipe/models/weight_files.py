"""Backbone and head weights on disk: the released 3DINO-ViT layout, plain state dicts, our own files.

Layouts read by :func:`load_backbone_state` / :func:`load_backbone`:

- released: ``{"teacher": {...}}`` with ``backbone.*`` keys, blocks in 4 chunks
  ``backbone.blocks.{i // (depth / 4)}.{i}.*``, heads ``dino_head.*`` / ``ibot_head.*``;
- unchunked: ``blocks.{i}.*``, with or without the ``backbone.`` prefix, bare or wrapped in
  ``teacher`` / ``model`` / ``state_dict`` / ``module`` (DDP ``module.`` and compile
  ``_orig_mod.`` prefixes are dropped);
- ours (:func:`save_backbone`): ``{"format": "threedino_pipe.backbone", "format_version": 1,
  "dims": {...}, "preset": ..., "meta": {...}, "backbone": state_dict}``.

Every file is read with ``torch.load(..., weights_only=True)`` after a CRC32 check of the zip
members; anything unreadable, incomplete or mismatched is a :class:`UserError` naming the file and
the keys, never a model left with random weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from threedino_pipe.models.heads import RELEASED_TO_PARAM, DINOHead, head_state_released
from threedino_pipe.models.presets import build_backbone, default_num_heads, preset_dims, preset_for
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.checkpoints import read_checkpoint
from threedino_pipe.runtime.errors import UserError

FORMAT = "threedino_pipe.backbone"
FORMAT_VERSION = 1
RELEASED_CHUNKS = 4
HEAD_NAMES = ("dino_head", "ibot_head")
_WRAPPERS = ("teacher", "model", "state_dict", "module")
_WRAPPER_SEGMENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_FIX_SOURCE = ("pass a 3DINO-ViT teacher checkpoint, a threedino-pipe backbone.pt, "
               "or a state dict of the same 3D ViT")


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"{shown}, ... (+{len(items) - n} more)" if len(items) > n else shown


def _flatten(obj: dict, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a nested dict under dotted names; non-tensor leaves are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, name + "."))
    return out


def _clean_name(name: str) -> str:
    return ".".join(seg for seg in name.split(".") if seg not in _WRAPPER_SEGMENTS)


def _tensor_dict(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict, str]:
    """The flat tensor dict of a checkpoint, its metadata, and a layout hint."""
    if not isinstance(obj, dict):
        raise UserError(f"holds a {type(obj).__name__}, not a dict of weights", file=path, fix=_FIX_SOURCE)
    if obj.get("format") == FORMAT:
        if obj.get("format_version") != FORMAT_VERSION:
            raise UserError(f"threedino-pipe backbone format_version {obj.get('format_version')} is not "
                            f"the supported version {FORMAT_VERSION}", file=path,
                            fix="use the threedino-pipe version that wrote it, or re-export the run")
        state = obj.get("backbone")
        if not isinstance(state, dict):
            raise UserError("threedino-pipe backbone file has no 'backbone' state dict", file=path, fix=_FIX_SOURCE)
        meta = {"dims": obj.get("dims") or {}, "preset": obj.get("preset"), "meta": obj.get("meta") or {}}
        return {f"backbone.{k}": v for k, v in _flatten(state).items()}, meta, "threedino_pipe"
    meta = obj.get("threedino_pipe") if isinstance(obj.get("threedino_pipe"), dict) else {}
    for wrapper in _WRAPPERS:
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    flat: dict[str, Tensor] = {}
    for name, value in _flatten(obj).items():
        name = _clean_name(name)
        if name in flat:
            raise UserError(f"holds the key {name} twice (after removing wrapper prefixes)", file=path,
                            fix=_FIX_SOURCE)
        flat[name] = value
    return flat, meta, "state_dict"


# ----- backbone --------------------------------------------------------------------------------
def _backbone_part(flat: dict[str, Tensor], path: Path, top_keys: list[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Backbone tensors without prefix (chunk indices removed) and the ignored key groups."""
    if any(k.startswith("backbone.") for k in flat):
        state = {k.removeprefix("backbone."): v for k, v in flat.items() if k.startswith("backbone.")}
        ignored = sorted({k.split(".")[0] for k in flat if not k.startswith("backbone.")})
    else:
        state = {k: v for k, v in flat.items() if not k.startswith(tuple(f"{h}." for h in HEAD_NAMES))}
        ignored = sorted({k.split(".")[0] for k in flat if k not in state})
    if "patch_embed.proj.weight" not in state:
        raise UserError("holds no 3D ViT backbone weights (no patch_embed.proj.weight, with or without a "
                        f"'backbone.' prefix); top-level keys: {_few(top_keys)}", file=path, fix=_FIX_SOURCE)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _CHUNKED.match(key)
        new = f"blocks.{match.group(2)}.{match.group(3)}" if match else key
        if new in out:
            raise UserError(f"holds block weights {new} twice (chunked and unchunked)", file=path, fix=_FIX_SOURCE)
        out[new] = value
    return out, ignored


def _infer_dims(state: dict[str, Tensor], meta: dict, num_heads: int | None, path: Path) -> tuple[dict, str]:
    """Architecture dims from tensor shapes (+ heads from argument, file metadata or the preset rule)."""
    weight = state["patch_embed.proj.weight"]
    if weight.ndim != 5 or not (weight.shape[2] == weight.shape[3] == weight.shape[4]):
        raise UserError(f"patch_embed.proj.weight has shape {list(weight.shape)}, not a cubic Conv3d kernel "
                        "[dim, channels, p, p, p]", file=path, fix=_FIX_SOURCE)
    embed_dim, in_chans, patch = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if not blocks:
        raise UserError("holds no transformer blocks (no blocks.* keys)", file=path, fix=_FIX_SOURCE)
    depth = blocks[-1] + 1
    fc1 = state.get(f"blocks.{blocks[0]}.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None and fc1.ndim == 2 else 4.0
    pos = state.get("pos_embed")
    pos_grid = 6
    if pos is not None:
        n = round(max(pos.shape[1] - 1, 0) ** (1 / 3)) if pos.ndim == 3 else -1
        if pos.ndim != 3 or n ** 3 != pos.shape[1] - 1:
            raise UserError(f"pos_embed has shape {list(pos.shape)}, not [1, n^3 + 1, dim] for a cubic grid",
                            file=path, fix=_FIX_SOURCE)
        pos_grid = n
    file_dims = meta.get("dims") or {}
    if num_heads is not None:
        heads, source = int(num_heads), "argument"
    elif file_dims.get("num_heads"):
        heads, source = int(file_dims["num_heads"]), "file metadata"
    else:
        heads, source = default_num_heads(embed_dim), "preset rule"
    if embed_dim % heads:
        raise UserError(f"embed_dim {embed_dim} is not divisible by {heads} heads (from {source})", file=path,
                        fix="pass the right num_heads")
    dims = {"embed_dim": embed_dim, "depth": depth, "num_heads": heads, "patch_size": patch,
            "in_chans": in_chans, "mlp_ratio": mlp_ratio, "pos_grid": pos_grid,
            "layerscale": any(k.endswith(".ls1.gamma") for k in state)}
    return dims, source


def _check_expect(dims: dict, expect: str | dict | None, path: Path) -> None:
    if expect is None:
        return
    wanted = preset_dims(expect) if isinstance(expect, str) else dict(expect)
    wrong = [f"{k} {dims.get(k)} (expected {v})" for k, v in wanted.items() if k in dims and dims[k] != v]
    if wrong:
        raise UserError(f"backbone does not have the expected size: {', '.join(wrong)}", file=path,
                        fix="pass a checkpoint of the expected size, or the matching --preset")


def _match_state(model: torch.nn.Module, state: dict[str, Tensor], path: Path, what: str, note: str = "",
                 fix: str = "the file is incomplete or of another architecture; " + _FIX_SOURCE) -> None:
    """Strict key and shape comparison; a :class:`UserError` listing the differences (``fix``: what to do)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
                  if k in state and state[k].shape != expected[k].shape]
    parts = [f"{label} ({len(keys)}): {_few(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches file vs model",
                                                                            mismatched)) if keys]
    if parts:
        raise UserError(f"{what} weights do not match the architecture inferred from the file{note}; "
                        + "; ".join(parts),
                        file=path, fix=fix)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{what} weights hold NaN or Inf values in {len(bad)} tensors: {_few(bad)}", file=path,
                        fix="use a checkpoint saved before training diverged")


def load_backbone_state(path: str | Path, *, num_heads: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """Backbone state dict (our parameter names) and its inferred dims.

    Heads cannot be read from tensor shapes: ``num_heads`` if given, else the file's metadata
    (our files and exports record it), else the preset with that width (96 -> 3, 384 -> 6,
    768 -> 12, 1024 -> 16), else ``embed_dim // 64``. ``dims`` also carries ``layout`` and
    ``num_heads_source``.
    """
    path = Path(path)
    obj = read_checkpoint(path, fix=_FIX_SOURCE)
    flat, meta, layout = _tensor_dict(obj, path)
    state, ignored = _backbone_part(flat, path, list(obj) if isinstance(obj, dict) else [])
    dims, source = _infer_dims(state, meta, num_heads, path)
    if layout != "threedino_pipe":
        layout = "released (4 chunks)" if any(_CHUNKED.match(k) for k in _backbone_keys(flat)) else "unchunked"
    preset = meta.get("preset") or preset_for(dims["embed_dim"], dims["depth"], dims["num_heads"])
    info = {**dims, "layout": layout, "num_heads_source": source, "ignored": ignored, "preset": preset,
            "meta": meta.get("meta", {})}
    return state, info


def _backbone_keys(flat: dict[str, Tensor]) -> list[str]:
    prefixed = [k.removeprefix("backbone.") for k in flat if k.startswith("backbone.")]
    return prefixed or list(flat)


def load_backbone(path: str | Path, *, expect: str | dict | None = None, num_heads: int | None = None,
                  drop_path_rate: float = 0.0) -> tuple[VisionTransformer3D, dict]:
    """Build a :class:`VisionTransformer3D` from a checkpoint and load it strictly (eval mode).

    Args:
        expect: a preset name or a dict of dims (e.g. ``{"embed_dim": 1024}``) the file must match.
        num_heads: attention heads, when the file does not record them (see :func:`load_backbone_state`).
        drop_path_rate: stochastic depth for further training (does not change the weights).
    Returns:
        the model and an info dict: dims, ``layout``, ``preset`` (or None), ``num_heads_source``,
        ``ignored`` (key groups not part of the backbone, e.g. the heads), ``path``.
    """
    path = Path(path)
    state, info = load_backbone_state(path, num_heads=num_heads)
    _check_expect(info, expect, path)
    dims = {k: info[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "mlp_ratio",
                                 "pos_grid", "layerscale")}
    model = build_backbone(dims, drop_path_rate=drop_path_rate)
    _match_state(model, state, path, "backbone", " (key names without the 'backbone.' prefix and block chunk index)")
    model.load_state_dict(state, strict=True)
    return model.eval(), {**info, "path": str(path)}


def _plain(value: Any) -> bool:
    """True for a value made of dicts with string keys, lists, tuples, strings, numbers, booleans and None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _json_able(meta: dict | None, what: str) -> dict:
    meta = dict(meta or {})
    if not _plain(meta):
        raise ValueError(f"{what} must be JSON-able (dicts with string keys, lists, strings, numbers, None): {meta!r}")
    return meta


def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def save_backbone(backbone: VisionTransformer3D, path: str | Path, *, preset: str | None = None,
                  meta: dict | None = None) -> None:
    """Write our backbone file atomically: ``{"format", "format_version", "dims", "preset", "meta",
    "backbone"}``; ``meta`` must be JSON-able (run name, iteration, options...)."""
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "dims": backbone.dims, "preset": preset,
           "meta": _json_able(meta, "meta"), "backbone": _cpu_state(backbone)}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----- released layout -------------------------------------------------------------------------
def released_state(backbone: VisionTransformer3D, heads: dict[str, DINOHead] | None = None) -> dict[str, Tensor]:
    """The ``teacher`` dict of the released layout: chunked ``backbone.*`` keys, heads with
    ``last_layer.weight_g/_v`` names. Needs a depth divisible by 4 (``ValueError`` otherwise)."""
    if backbone.depth % RELEASED_CHUNKS:
        raise ValueError(f"depth {backbone.depth} is not divisible by {RELEASED_CHUNKS}")
    per_chunk = backbone.depth // RELEASED_CHUNKS
    teacher: dict[str, Tensor] = {}
    for key, value in _cpu_state(backbone).items():
        match = _BLOCK.match(key)
        if match:
            i = int(match.group(1))
            key = f"blocks.{i // per_chunk}.{i}." + key[match.end():]
        teacher[f"backbone.{key}"] = value
    for name, head in (heads or {}).items():
        for key, value in head_state_released(head).items():
            teacher[f"{name}.{key}"] = value.detach().to("cpu").clone()
    return teacher


def export_3dino(backbone: VisionTransformer3D, heads: dict[str, DINOHead] | None, path: str | Path,
                 *, meta: dict | None = None) -> None:
    """Write weights in the released 3DINO-ViT layout ``{"teacher": ...}`` (atomically).

    A top-level ``threedino_pipe`` entry records the dims (heads included) as JSON-able metadata;
    loaders of the released layout read only ``teacher``.
    """
    path = Path(path)
    if backbone.depth % RELEASED_CHUNKS:
        raise UserError(f"cannot export a depth-{backbone.depth} backbone in the 3DINO layout: it stores blocks "
                        f"in {RELEASED_CHUNKS} chunks, so the depth must be a multiple of {RELEASED_CHUNKS}",
                        file=path, fix="export it in our own format (backbone.pt) instead; every preset "
                        "has a depth divisible by 4")
    extra = {"format": "3dino-released", "dims": backbone.dims,
             "heads": {name: head.dims for name, head in (heads or {}).items()}, "meta": _json_able(meta, "meta")}
    obj = {"teacher": released_state(backbone, heads), "threedino_pipe": extra}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----- heads -----------------------------------------------------------------------------------
def _head_dims(state: dict[str, Tensor], name: str, path: Path) -> dict:
    linears = sorted(int(m.group(1)) for k in state if (m := re.match(r"^mlp\.(\d+)\.weight$", k)))
    last = state.get("last_layer.weight_v", state.get("last_layer.parametrizations.weight.original1"))
    if not linears or last is None or last.ndim != 2:
        raise UserError(f"{name} weights lack mlp.*.weight or last_layer.weight_v", file=path, fix=_FIX_SOURCE)
    first, final = state[f"mlp.{linears[0]}.weight"], state[f"mlp.{linears[-1]}.weight"]
    return {"in_dim": int(first.shape[1]), "out_dim": int(last.shape[0]),
            "hidden_dim": int(first.shape[0]) if len(linears) > 1 else 2048,
            "bottleneck_dim": int(final.shape[0]), "nlayers": len(linears)}


def load_heads(path: str | Path) -> dict[str, DINOHead]:
    """The ``dino_head`` / ``ibot_head`` of a checkpoint, shapes inferred, loaded strictly (eval mode).

    Released ``last_layer.weight_g/_v`` and parametrization names are both accepted.
    """
    path = Path(path)
    obj = read_checkpoint(path, fix=_FIX_SOURCE)
    flat, _, _ = _tensor_dict(obj, path)
    heads: dict[str, DINOHead] = {}
    for name in HEAD_NAMES:
        state = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(f"{name}.")}
        if not state:
            continue
        head = DINOHead(**_head_dims(state, name, path))
        renamed = {RELEASED_TO_PARAM.get(k, k): v for k, v in state.items()}
        _match_state(head, renamed, path, name)
        head.load_state_dict(renamed, strict=True)
        heads[name] = head.eval()
    if not heads:
        raise UserError(f"holds no projection heads ({' or '.join(HEAD_NAMES)}.* keys)", file=path,
                        fix="pass a teacher checkpoint that includes the heads")
    return heads
