"""``--head swinunetr``: MONAI's SwinUNETR, its encoder a :class:`~threedino_pipe.models.swin.SwinEncoder`.

The whole network is MONAI's (``monai.networks.nets.SwinUNETR``: its forward, convolutional
encoders and decoders); only ``swinViT`` is our :class:`SwinEncoder`, MONAI's encoder with the same
parameter names that also satisfies the backbone protocol, so a checkpoint's ``model`` state dict is
the one MONAI's SwinUNETR itself has (``swinViT.*``, ``encoder1.*``, ..., ``out.*``). It offers what
finetune, predict and the validation ask of a segmentation network (``model_args``, ``backbone``;
freezing, ``trainable_parameters`` and ``check_input`` from
:class:`~threedino_pipe.models.backbone_network.BackboneNetwork`). Input ``[B, in_channels, X, Y, Z]``, each side a
multiple of 32 voxels; output logits ``[B, num_outputs, X, Y, Z]``. The encoder takes every input
channel itself (``in_channels`` of its dims is the data's).
"""

from __future__ import annotations

from monai.networks.nets import SwinUNETR

from threedino_pipe.models.backbone_network import BackboneNetwork
from threedino_pipe.models.swin import FAMILY, SwinEncoder, swin_dims

HEAD = "swinunetr"
SWINUNETR_ARGS = ("feature_size", "depths", "num_heads", "patch_size", "window_size")  # from the encoder's dims


class SwinUNETRNetwork(BackboneNetwork, SwinUNETR):
    """MONAI's SwinUNETR trained end to end (by default); ``backbone`` is its Swin encoder (``swinViT``)."""

    head_name = HEAD

    def __init__(self, backbone_dims: str | dict, in_channels: int, num_outputs: int, *,
                 freeze_backbone: bool = False) -> None:
        dims = swin_dims(backbone_dims, in_channels)
        super().__init__(in_channels=in_channels, out_channels=num_outputs, **{k: dims[k] for k in SWINUNETR_ARGS})
        self.swinViT = SwinEncoder(**dims)  # MONAI's encoder, same names, plus the backbone protocol
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.frozen = False
        self.set_backbone_frozen(freeze_backbone)

    @property
    def backbone(self) -> SwinEncoder:
        return self.swinViT

    def model_args(self) -> dict:
        """Keyword arguments of ``build_segmentation_model`` that rebuild this architecture."""
        return {"head": HEAD, "backbone_dims": self.swinViT.dims, "backbone_family": FAMILY,
                "in_channels": self.in_channels, "num_outputs": self.num_outputs, "freeze_backbone": self.frozen}

