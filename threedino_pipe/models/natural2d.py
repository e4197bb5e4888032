"""The ``hf2d`` backbone family: a natural-image 2D ViT from a local Hugging Face folder, run slice by slice.

A folder written by ``save_pretrained`` of transformers' ``Dinov2Model`` (``model_type`` ``dinov2``)
or ``DINOv3ViTModel`` (``dinov3_vit``) is read from the local path only (``local_files_only=True``;
nothing is ever downloaded). ``transformers`` is imported inside the functions of this module, never
when threedino_pipe is imported (``pip install threedino-pipe[natural]``).

How a volume goes through it (docs/finetune.md, "A natural-image 2D backbone"):

- input ``[B, 1, X, Y, Z]`` (single channel; multi-channel data runs once per channel and the heads
  mix the channels, as for the 3D ViT); slices are taken along the last axis ``Z``, the
  cross-slice axis of the plans (the transpose puts the axis of the coarsest spacing last), so each
  slice is an in-plane ``X x Y`` image;
- intensities: the preprocessed volumes are normalised (z-scores or a [-1, 1] range), so a value
  ``v`` maps to the pixel value ``clamp((v + 3) / 6, 0, 1)`` (-3 .. +3 onto an 8-bit image's 0 .. 1),
  repeated to the 3 RGB channels and normalised with the model's own mean and std (its
  ``preprocessor_config.json`` when the folder has one, else ImageNet's);
- each slice is resized (bilinear) to ``(X' p, Y' p)`` with ``X' = max(1, round(X / p))`` for the
  model's patch size ``p`` (no resize when ``p`` divides the sides);
- the per-slice patch tokens are stacked into the token grid ``(X', Y', Z)``: one token per patch
  of a slice and per slice, ``N = X' Y' Z`` tokens in W-major order (Z fastest), the order
  :func:`threedino_pipe.models.decoders.tokens_to_volume` reads. The CLS token of a volume is the
  mean of its slices' CLS tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threedino_pipe.runtime.errors import UserError

FAMILY = "hf2d"
# model_type of the config -> (transformers' config class, model class, the method name we record)
MODEL_TYPES = {"dinov2": ("Dinov2Config", "Dinov2Model", "dinov2"),
               "dinov3_vit": ("DINOv3ViTConfig", "DINOv3ViTModel", "dinov3")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_RANGE = 3.0  # normalised intensities -3 .. +3 map to pixel values 0 .. 1
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INSTALL_FIX = "pip install threedino-pipe[natural]"


def _transformers(file: str | Path | None = None):
    """The transformers module, imported now; a missing one is a UserError with the install fix."""
    try:
        import transformers
    except ImportError:
        raise UserError("a Hugging Face backbone needs the transformers package, which is not installed",
                        file=file, fix=INSTALL_FIX) from None
    return transformers


def _classes(model_type: str, file: str | Path | None = None) -> tuple[type, type, str]:
    if model_type not in MODEL_TYPES:
        raise UserError(f"the Hugging Face model type {model_type!r} is not one threedino-pipe runs slice by slice "
                        f"({', '.join(MODEL_TYPES)})", file=file,
                        fix="pass a folder saved from transformers' Dinov2Model or DINOv3ViTModel")
    config_name, model_name, method = MODEL_TYPES[model_type]
    module = _transformers(file)
    return getattr(module, config_name), getattr(module, model_name), method


class SliceBackbone(nn.Module):
    """A Hugging Face 2D ViT applied to every ``Z`` slice of ``[B, 1, X, Y, Z]``; the ``hf2d`` family.

    Attributes:
        model: the transformers model (``Dinov2Model`` or ``DINOv3ViTModel``).
        patch_size: the model's 2D patch side in pixels (in-plane voxels per token before resizing).
        pixel_mean, pixel_std: the RGB normalisation (buffers, ``[1, 3, 1, 1]``).
    """

    family = FAMILY
    in_chans = 1

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.model_type = str(config.model_type)
        self.embed_dim, self.depth = int(config.hidden_size), int(config.num_hidden_layers)
        self.patch_size = int(config.patch_size)
        self.num_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.register_buffer("pixel_mean", torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([float(v) for v in std]).view(1, 3, 1, 1), persistent=False)

    @property
    def dims(self) -> dict:
        """JSON-able: the model's whole config (rebuilds it without the original folder) and its normalisation."""
        return {"hf_config": self.model.config.to_dict(), "pixel_mean": self.pixel_mean.flatten().tolist(),
                "pixel_std": self.pixel_std.flatten().tolist()}

    @property
    def input_size(self) -> int:
        """The image side the model was pretrained on (its config's ``image_size``), in pixels."""
        return int(self.model.config.image_size)

    def patch_grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Token grid ``(X', Y', Z)`` of an ``X x Y x Z`` input: ``X' = max(1, round(X / p))``, one layer per slice."""
        if len(spatial) != 3 or any(int(s) <= 0 for s in spatial):
            raise ValueError(f"input spatial shape {tuple(spatial)} is not three positive sides")
        x, y, z = (int(s) for s in spatial)
        return max(1, round(x / self.patch_size)), max(1, round(y / self.patch_size)), z

    def slice_images(self, x: Tensor) -> Tensor:
        """``[B, 1, X, Y, Z]`` -> normalised RGB slices ``[B*Z, 3, X' p, Y' p]`` (batch index ``b * Z + z``)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input [B, 1, X, Y, Z], got {tuple(x.shape)}")
        gx, gy, _ = self.patch_grid(x.shape[2:])
        b, _, sx, sy, sz = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * sz, 1, sx, sy)
        size = (gx * self.patch_size, gy * self.patch_size)
        if size != (sx, sy):
            slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False)
        pixels = ((slices + PIXEL_RANGE) / (2 * PIXEL_RANGE)).clamp(0.0, 1.0).expand(-1, 3, -1, -1)
        return (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)

    def _norm(self) -> nn.Module:
        return self.model.layernorm if hasattr(self.model, "layernorm") else self.model.norm

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 4, *, norm: bool = True,
                                return_cls: bool = False, reshape: bool = False) -> list:
        """Patch tokens ``[B, X' Y' Z, dim]`` after the last ``n`` (or the given 0-based) blocks, in block order.

        ``return_cls``: ``(patch, cls [B, dim])`` pairs, ``cls`` the mean over the slices' CLS tokens;
        ``reshape``: patch tokens as ``[B, dim, X', Y', Z]``.
        """
        wanted = list(range(self.depth - n, self.depth)) if isinstance(n, int) else [int(i) for i in n]
        if not wanted or any(i < 0 or i >= self.depth for i in wanted):
            raise ValueError(f"layer indices {wanted} outside 0..{self.depth - 1}")
        b, grid = x.shape[0], self.patch_grid(x.shape[2:])
        hidden = self.model(self.slice_images(x), output_hidden_states=True).hidden_states  # embeddings + blocks
        result = []
        for i in wanted:
            h = self._norm()(hidden[i + 1]) if norm else hidden[i + 1]       # [B*Z, prefix + X'Y', dim]
            patch = h[:, self.num_prefix:].reshape(b, grid[2], grid[0], grid[1], -1).permute(0, 2, 3, 1, 4)
            patch = patch.reshape(b, -1, h.shape[-1])                          # W-major, Z fastest
            if reshape:
                patch = patch.transpose(1, 2).reshape(b, -1, *grid)
            result.append((patch, h[:, 0].reshape(b, grid[2], -1).mean(dim=1)) if return_cls else patch)
        return result


def build_slice_backbone(dims: str | dict) -> SliceBackbone:
    """A randomly initialised :class:`SliceBackbone` from ``dims`` (:attr:`SliceBackbone.dims`; weights come
    from a checkpoint). A preset name is a ValueError: a Hugging Face model is described by its config."""
    if not isinstance(dims, dict) or not isinstance(dims.get("hf_config"), dict):
        raise ValueError(f"the {FAMILY} backbone is built from a Hugging Face config (dims with 'hf_config'), "
                         f"not {dims!r}")
    config = dict(dims["hf_config"])
    config_class, model_class, _ = _classes(str(config.get("model_type")))
    model = model_class(config_class.from_dict(config))
    return SliceBackbone(model.eval(), dims.get("pixel_mean", IMAGENET_MEAN),
                         dims.get("pixel_std", IMAGENET_STD)).eval()


def weights_file(folder: Path) -> Path:
    """The folder's weights file (``model.safetensors`` or ``pytorch_model.bin``); a UserError when it has none."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"the Hugging Face folder has a config.json but no weights file ({' or '.join(WEIGHT_FILES)}; "
                    "sharded weights are not read)", file=folder,
                    fix="save the model into the folder with `model.save_pretrained(folder)` "
                    "(safe_serialization, one file)")


def _normalisation(folder: Path) -> tuple[list[float], list[float], str]:
    """(mean, std, where from): the folder's preprocessor_config.json's image_mean/image_std, else ImageNet's."""
    if not (folder / "preprocessor_config.json").is_file():
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet (no preprocessor_config.json)"
    mixin = _transformers(folder).image_processing_base.ImageProcessingMixin
    try:
        settings, _ = mixin.get_image_processor_dict(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"preprocessor_config.json cannot be read ({str(exc).splitlines()[0][:200]})",
                        file=folder / "preprocessor_config.json",
                        fix="fix or delete the file (without it ImageNet's mean and std are used)") from None
    mean, std = settings.get("image_mean", IMAGENET_MEAN), settings.get("image_std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"preprocessor_config.json's image_mean {mean} / image_std {std} are not 3 values (std > 0)",
                        file=folder / "preprocessor_config.json", fix="write 3 values each, or delete the file")
    return [float(v) for v in mean], [float(v) for v in std], "preprocessor_config.json"


def _read_config(folder: Path):
    """The folder's config (transformers' AutoConfig, local files only); a UserError naming what is wrong."""
    auto_config = _transformers(folder).AutoConfig
    try:
        return auto_config.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"config.json is not a Hugging Face model config ({str(exc).splitlines()[0][:200]})",
                        file=folder / "config.json",
                        fix="pass a folder written by `save_pretrained` of transformers' Dinov2Model or "
                        "DINOv3ViTModel") from None


def load_slice_backbone(path: str | Path, *, expect: str | dict | None = None) -> tuple[SliceBackbone, dict]:
    """Load a local Hugging Face folder strictly (every weight used, none missing) as a :class:`SliceBackbone`.

    Returns:
        the backbone (eval mode) and an info dict: ``meta`` (``method``: ``dinov2`` or ``dinov3``),
        ``weights_file``, ``normalisation`` (where mean/std came from), ``layout`` ``huggingface``,
        ``preset`` None.

    Raises:
        UserError: no transformers, no or a broken config.json, another model type, no weights file,
            weights that do not match the config, or ``expect`` (``--preset``) given.
    """
    folder = Path(path)
    if expect is not None:
        raise UserError(f"--preset {expect} sizes a 3D ViT; a Hugging Face model has its own size", file=folder,
                        fix="leave --preset out with a Hugging Face backbone folder")
    if not (folder / "config.json").is_file():
        raise UserError("the folder has no config.json (not a Hugging Face model folder)", file=folder,
                        fix="pass a folder written by `save_pretrained` of Dinov2Model or DINOv3ViTModel")
    config = _read_config(folder)
    _, model_class, method = _classes(str(getattr(config, "model_type", "")), folder / "config.json")
    weights = weights_file(folder)
    try:
        model, report = model_class.from_pretrained(str(folder), config=config, local_files_only=True,
                                                    output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"the weights cannot be loaded ({str(exc).splitlines()[0][:200]})", file=weights,
                        fix="save the model again with `save_pretrained`") from None
    wrong = {k: v for k, v in report.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if wrong:
        listed = "; ".join(f"{k}: {', '.join(str(x) for x in list(v)[:5])}" for k, v in wrong.items())
        raise UserError(f"the weights do not match config.json ({listed})", file=weights,
                        fix="save the model and its config together with `save_pretrained`")
    mean, std, where = _normalisation(folder)
    backbone = SliceBackbone(model.float().eval(), mean, std).eval()
    return backbone, {"meta": {"method": method}, "weights_file": str(weights), "normalisation": where,
                      "layout": "huggingface", "preset": None}
