"""threedino-pipe: self-configuring 3D self-supervised ViT pretraining (3DINO) and finetuning."""

from threedino_pipe.runtime import lean_monai

lean_monai.install()  # before any module imports MONAI: it then skips libraries we never use (6-8 s per command)

__version__ = "0.1.0"
