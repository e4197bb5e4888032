"""Backbone families: what finetune, predict, embed and visualize ask of a backbone, one entry per family.

A family is one backbone architecture: ``vit3d`` (the 3D ViT of 3DINO), ``swin`` (MONAI's Swin
encoder of SwinUNETR, :mod:`threedino_pipe.models.swin`; none of the optional capabilities) and
``hf2d`` (a natural-image 2D ViT from a local Hugging Face folder applied slice by slice,
:mod:`threedino_pipe.models.natural2d`). Each family gives

- ``build(dims)``: a randomly initialised backbone from a preset name or a dims dict (what
  ``model.json``'s ``model_args.backbone_dims`` holds);
- ``load(path, expect=...)``: a weights file, loaded strictly (every key used, every shape equal),
  and an info dict (dims, ``preset``, layout, ...);
- ``capabilities``: what it can be asked for beyond :class:`Backbone` (:data:`CAPABILITIES`); a
  command that needs one it lacks stops with a :class:`~threedino_pipe.runtime.errors.UserError`
  (:meth:`BackboneFamily.require`).

Every backbone module satisfies :class:`Backbone`: its ``family`` and ``dims`` (recorded in
``model.json``), sizes, the patch grid of an input, and multi-scale patch features of chosen blocks
for the decoders and the probe (``get_intermediate_layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from threedino_pipe.models.natural2d import build_slice_backbone, load_slice_backbone
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.swin import build_swin, load_swin
from threedino_pipe.models.weight_files import load_backbone
from threedino_pipe.runtime.errors import UserError

DEFAULT_FAMILY = "vit3d"
# what a family may or may not offer, and what lacking it rules out
CAPABILITIES = {
    "cls_token": "global (CLS) token: no CLS features for the probe or `3dino embed`",
    "cls_attention": "attention of a global token over the patches: no CLS attention map in `3dino visualize`",
    "token_blocks": "token sequence through indexed blocks: no ViT-Adapter head (`--head adapter`)",
    "cubic_patches": "grid of cubic 16-voxel patches: no UNETR head (`--head unetr`, four 2x upsamplings)",
}


@runtime_checkable
class Backbone(Protocol):
    """What every backbone module offers, whatever its family.

    Inputs are ``[B, in_chans, X, Y, Z]`` with every side a multiple of ``patch_size`` voxels.
    """

    family: str
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int

    @property
    def dims(self) -> dict:
        """JSON-able arguments of the family's ``build`` that rebuild this architecture."""

    @property
    def input_size(self) -> int:
        """Voxels per axis of the cube it was pretrained on (embed's view of a bare backbone)."""

    def patch_grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid of a ``X x Y x Z`` input."""

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 4, *, norm: bool = True,
                                return_cls: bool = False, reshape: bool = False) -> list:
        """Patch tokens ``[B, N, dim]`` after the last ``n`` (or the given) blocks: the decoders' features."""


@dataclass(frozen=True)
class BackboneFamily:
    """One family: its name (``model.json``'s ``backbone.family``), builder, loader and capabilities."""

    name: str
    build: Callable[[str | dict], nn.Module]
    load: Callable[..., tuple[nn.Module, dict]]
    capabilities: frozenset[str]

    def require(self, capability: str, purpose: str, *, file: str | Path | None = None) -> None:
        """Stop with a UserError when this family lacks ``capability``; ``purpose`` says what needed it."""
        if capability not in self.capabilities:
            raise UserError(f"{purpose}: the {self.name} backbone has no {CAPABILITIES[capability]}", file=file,
                            fix=f"use a backbone whose family offers it ({', '.join(_offering(capability))})")


def _offering(capability: str) -> list[str]:
    return sorted(name for name, family in FAMILIES.items() if capability in family.capabilities)


FAMILIES: dict[str, BackboneFamily] = {
    "vit3d": BackboneFamily("vit3d", build_backbone, load_backbone, frozenset(CAPABILITIES)),
    "swin": BackboneFamily("swin", build_swin, load_swin, frozenset()),
    # a natural-image 2D ViT (Hugging Face folder) slice by slice: its token grid is (X/p, Y/p, Z), not cubic
    "hf2d": BackboneFamily("hf2d", build_slice_backbone, load_slice_backbone, frozenset({"cls_token"})),
}


def get_family(name: str | None, *, file: str | Path | None = None) -> BackboneFamily:
    """The family ``name`` (None: the default, ``vit3d``); an unknown name is a UserError naming ``file``."""
    name = name or DEFAULT_FAMILY
    if name not in FAMILIES:
        raise UserError(f"backbone family {name!r} is not one this threedino-pipe knows ({', '.join(FAMILIES)})",
                        file=file, fix="update threedino-pipe to a version that has this backbone family")
    return FAMILIES[name]


def family_of(backbone: nn.Module) -> BackboneFamily:
    """The family of a built backbone module (its ``family`` attribute)."""
    return get_family(getattr(backbone, "family", DEFAULT_FAMILY))
