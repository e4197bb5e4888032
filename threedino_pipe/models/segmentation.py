"""Segmentation networks: a 3D ViT backbone plus one of the heads ``adapter``, ``unetr``, ``linear``; or
MONAI's SwinUNETR (``swinunetr``, :mod:`threedino_pipe.models.swin_unetr`) on a Swin encoder.

Build with :func:`build_segmentation_model`; ``net.model_args()`` returns the builder's keyword
arguments (JSON-able, head options resolved), so ``build_segmentation_model(**net.model_args())``
rebuilds the same architecture (weights come from a checkpoint, never from the backbone file).

Input ``[B, in_channels, X, Y, Z]`` (cross-slice axis last), each spatial side a multiple of the
backbone's patch size (16); output logits ``[B, num_outputs, X, Y, Z]``. A single-channel
backbone runs once per input channel (channels folded into the batch); the heads mix the
channels back (:mod:`threedino_pipe.models.channel_mixing`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threedino_pipe.models.adapter3d import AdapterSegmentationHead
from threedino_pipe.models.backbone_network import BackboneNetwork
from threedino_pipe.models.backbones import DEFAULT_FAMILY, Backbone, get_family
from threedino_pipe.models.channel_mixing import fold_channels
from threedino_pipe.models.decoders import LinearDecoder, UNETRDecoder
from threedino_pipe.models.swin_unetr import SwinUNETRNetwork
from threedino_pipe.runtime.errors import UserError

HEADS = ("adapter", "unetr", "linear")  # the heads on the patch tokens of a ViT's blocks
# the backbone capability a head needs beyond multi-scale patch features (models/backbones.py)
HEAD_NEEDS = {"adapter": "token_blocks", "unetr": "cubic_patches"}
# heads that take one backbone family only; that family feeds no other head
HEAD_FAMILY = {"swinunetr": "swin"}
SEGMENTATION_HEADS = (*HEADS, *HEAD_FAMILY)
# heads whose backbone is always trained with them (--unfreeze changes nothing)
END_TO_END_HEADS = ("swinunetr",)

# Finetuning defaults per head (docs/method.md, "Downstream: segmentation"): AdamW lr and batch size.
HEAD_TRAINING_DEFAULTS: dict[str, dict] = {
    "adapter": {"lr": 1e-4, "batch_size": 8},
    "unetr": {"lr": 1e-4, "batch_size": 8},
    "linear": {"lr": 1e-3, "batch_size": 16},
    "swinunetr": {"lr": 1e-4, "batch_size": 8},  # Tang et al.'s finetuning lr (AdamW 1e-4)
}


def head_family_problem(head: str, family: str) -> str | None:
    """Why ``head`` cannot be built on a ``family`` backbone (None: it can)."""
    wanted = HEAD_FAMILY.get(head)
    if wanted is not None and family != wanted:
        return f"--head {head} needs a {wanted} backbone (MONAI's SwinUNETR encoder), not a {family} one"
    if wanted is None and family in HEAD_FAMILY.values():
        return (f"--head {head} reads the patch tokens of a ViT's blocks; a {family} backbone feeds only --head "
                f"{', '.join(h for h, f in HEAD_FAMILY.items() if f == family)}")
    return None


def check_head_family(head: str, family: str, *, file: str | None = None) -> None:
    """A :class:`UserError` naming the backbone ``file`` when ``head`` cannot be built on its ``family``."""
    problem = head_family_problem(head, family)
    if problem is not None:
        others = [h for h in SEGMENTATION_HEADS if head_family_problem(h, family) is None]
        raise UserError(problem, file=file,
                        fix=f"pass --head {' or '.join(others)} for this backbone, or another --backbone for "
                        f"--head {head} (docs/finetune.md, 'Backbone kinds')")


class SegmentationNetwork(BackboneNetwork, nn.Module):
    """Backbone + head. ``forward(x [B, in_channels, X, Y, Z]) -> logits [B, num_outputs, X, Y, Z]``.

    Frozen backbone (default): its parameters have ``requires_grad=False`` and stay in eval mode;
    the layer-tapping heads (``linear``, ``unetr``) run it without autograd, while the adapter
    runs it with autograd so gradients flow through every block to the injectors.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, head_name: str, in_channels: int,
                 num_outputs: int, *, freeze_backbone: bool = True, backbone_spec: str | dict | None = None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.head_name, self.in_channels, self.num_outputs = head_name, in_channels, num_outputs
        self.fold = backbone.in_chans == 1 and in_channels > 1
        self._backbone_spec = backbone_spec if backbone_spec is not None else backbone.dims
        self.frozen = False
        self.set_backbone_frozen(freeze_backbone)

    # ----- configuration -----------------------------------------------------------------
    def model_args(self) -> dict:
        """Keyword arguments of :func:`build_segmentation_model` that rebuild this architecture."""
        spec = self._backbone_spec
        return {"head": self.head_name, "backbone_dims": dict(spec) if isinstance(spec, dict) else spec,
                "backbone_family": self.backbone.family, "in_channels": self.in_channels,
                "num_outputs": self.num_outputs, "freeze_backbone": self.frozen, **self.head.options}

    def unused_backbone_parameters(self) -> set[str]:
        """Backbone parameters this network never uses (the mask token, ``model.embeddings.mask_token`` in a
        Hugging Face backbone; the final norm for the
        adapter, which takes pre-norm tokens); they stay frozen so every trainable parameter gets
        a gradient (DDP needs no ``find_unused_parameters``)."""
        masks = {name for name, _ in self.backbone.named_parameters() if name.rsplit(".", 1)[-1] == "mask_token"}
        return masks | ({"norm.weight", "norm.bias"} if self.head_name == "adapter" else set())

    # ----- forward (freezing, train(), trainable_parameters() and check_input(): BackboneNetwork) ---------
    def backbone_input(self, x: Tensor) -> Tensor:
        """The backbone's input: channels folded into the batch for a single-channel backbone."""
        return fold_channels(x) if self.fold else x

    def tapped_features(self, x: Tensor, layers: list[int]) -> list[Tensor]:
        """Patch tokens ``[B*C, N, dim]`` (final norm applied) after the given 0-based blocks."""
        track = torch.is_grad_enabled() and not self.frozen
        with torch.set_grad_enabled(track):
            return self.backbone.get_intermediate_layers(self.backbone_input(x), layers, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.head_name == "adapter":
            return self.head(self.backbone, self.backbone_input(x), x)
        features = self.tapped_features(x, self.head.layers)
        if self.head_name == "unetr":
            return self.head(features, x)
        return self.head(features, x.shape[2:], grid=self.backbone.patch_grid(x.shape[2:]))


def _build_head(head: str, backbone: Backbone, in_channels: int, num_outputs: int,
                options: dict) -> nn.Module:
    channels = in_channels if backbone.in_chans == 1 else 1
    if head == "linear":  # a backbone shallower than 4 blocks (a small 2D model) taps all of them
        options.setdefault("num_layers", min(4, backbone.depth))
        return LinearDecoder(backbone.embed_dim, backbone.depth, channels, num_outputs,
                             patch_size=backbone.patch_size, **options)
    if head == "unetr":
        return UNETRDecoder(backbone.embed_dim, backbone.depth, channels, num_outputs, image_channels=in_channels,
                            patch_size=backbone.patch_size, **options)
    return AdapterSegmentationHead(backbone.embed_dim, backbone.depth, in_channels, channels, num_outputs, **options)


def build_segmentation_model(head: str, backbone_dims: str | dict, in_channels: int, num_outputs: int, *,
                             freeze_backbone: bool = True, backbone_family: str = DEFAULT_FAMILY,
                             **head_options) -> SegmentationNetwork | SwinUNETRNetwork:
    """Build a segmentation network with a randomly initialised backbone.

    Args:
        head: ``adapter``, ``unetr``, ``linear`` (3D ViT families) or ``swinunetr`` (MONAI's SwinUNETR, family
            ``swin``; the encoder takes ``in_channels`` itself).
        backbone_dims: a preset name or the backbone's ``dims`` (its family's ``build`` arguments).
        backbone_family: the backbone family (:mod:`threedino_pipe.models.backbones`; model.json files
            written before families existed leave it out: ``vit3d``).
        in_channels: input image channels C; a 1-channel backbone runs once per channel.
        num_outputs: output channels K (classes incl. background, or regions).
        freeze_backbone: backbone parameters get ``requires_grad=False``.
        head_options: head-specific options (see the head classes), recorded by ``model_args()``.
    """
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(SEGMENTATION_HEADS)}")
    if in_channels < 1 or num_outputs < 1:
        raise ValueError(f"in_channels ({in_channels}) and num_outputs ({num_outputs}) must be >= 1")
    family = get_family(backbone_family)
    if problem := head_family_problem(head, family.name):
        raise ValueError(problem)
    if head == "swinunetr":
        return SwinUNETRNetwork(backbone_dims, in_channels, num_outputs, freeze_backbone=freeze_backbone,
                                **head_options)
    if head in HEAD_NEEDS and HEAD_NEEDS[head] not in family.capabilities:
        raise ValueError(f"the {head} head needs a backbone with {HEAD_NEEDS[head]!r}, which {family.name} lacks")
    backbone = family.build(backbone_dims)
    if backbone.in_chans not in (1, in_channels):
        raise ValueError(f"a backbone with {backbone.in_chans} input channels cannot take {in_channels} channels")
    module = _build_head(head, backbone, in_channels, num_outputs, dict(head_options))
    spec = backbone.dims if isinstance(backbone_dims, str) else {**backbone.dims, **backbone_dims}
    return SegmentationNetwork(backbone, module, head, in_channels, num_outputs,
                               freeze_backbone=freeze_backbone, backbone_spec=spec)
