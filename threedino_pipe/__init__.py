"""threedino-pipe: self-configuring 3D self-supervised ViT pretraining (3DINO) and finetuning."""

__version__ = "0.1.0"
