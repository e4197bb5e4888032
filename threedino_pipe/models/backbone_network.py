"""What finetune, predict and the validation ask of a segmentation network built around a ``backbone``.

:class:`BackboneNetwork` is mixed into :class:`~threedino_pipe.models.segmentation.SegmentationNetwork`
(a 3D ViT + head) and :class:`~threedino_pipe.models.swin_unetr.SwinUNETRNetwork` (MONAI's SwinUNETR):
freezing the backbone, the training mode, the parameters to optimise and the input check. The
class it is mixed into sets ``backbone`` (a module with ``patch_grid``) and ``in_channels``.
"""

from __future__ import annotations

from torch import Tensor, nn


class BackboneNetwork:
    """Backbone freezing and input checks; mix in before ``nn.Module`` (or a module class)."""

    frozen: bool = False
    in_channels: int

    def unused_backbone_parameters(self) -> set[str]:
        """Backbone parameters the network never uses; they stay frozen (none by default)."""
        return set()

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (``requires_grad=False``, eval mode) or unfreeze the backbone's parameters."""
        self.frozen = bool(frozen)
        unused = self.unused_backbone_parameters()
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not self.frozen and name not in unused)
        self.backbone.train(self.training and not self.frozen)

    def train(self, mode: bool = True) -> BackboneNetwork:
        super().train(mode)
        self.backbone.train(mode and not self.frozen)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise: the head's, plus the backbone's when it is not frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, X, Y, Z]`` with sides multiples of the
        backbone's ``patch_size`` (16 voxels for the 3D ViT, 32 for the Swin encoder)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, X, Y, Z], got {tuple(x.shape)}")
        self.backbone.patch_grid(x.shape[2:])
