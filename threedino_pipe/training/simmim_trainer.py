"""SimMIM pretraining of the 3D ViT (``3dino pretrain --method simmim``) on the shared TrainingLoop.

One iteration: draw this rank's share of a batch of single augmented crops (one per volume, the
global crop of the multi-crop loader, flips and 90-degree rotations only), draw each crop's patch
mask (seeded by the iteration, identical on every rank, each rank takes its rows), replace the
masked patch embeddings by the backbone's learnt mask token, predict every patch's voxels with a
linear head on the output patch tokens, L1 on the masked patches' voxels (:mod:`threedino_pipe.ssl.simmim`),
AdamW step with a cosine schedule and gradient clipping. No teacher, no EMA. Under torchrun the
network is wrapped in DDP.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.vit3d import VisionTransformer3D
from threedino_pipe.runtime.device import peak_memory_mb
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import autocast, make_scaler
from threedino_pipe.ssl import build_param_groups, clip_gradients, make_schedules, step_schedules
from threedino_pipe.ssl.simmim import masked_l1, patchify, random_token_masks
from threedino_pipe.training.feature_probe import probe_score
from threedino_pipe.training.loop import check_finite, optimizer_step
from threedino_pipe.training.run_options import PretrainRunOptions
from threedino_pipe.training.ssl_trainer import (
    first_probe_cases,
    restore_optimisation,
    run_pretraining,
    save_run_backbone,
)
from threedino_pipe.training_data.pretrain_loader import PretrainDataset, make_pretrain_loader

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "threedino_pipe.simmim_checkpoint"
METHOD = "simmim"
CURVES = ["loss", "masked_fraction", "probe_bacc", "lr", "crops_per_s"]
# SimMIM's ViT-B settings (Xie et al. 2022 and its released configuration: AdamW (0.9, 0.999), lr 1e-4 per 512
# images scaled linearly, weight decay 0.05, gradient clipping 5, LayerScale 0.1, drop path 0.1, mask ratio 0.6);
# the 10 % warm-up and cosine are ours: docs/method.md, "SimMIM: the MIM-ViT baseline"
MASK_RATIO = 0.6
PAPER_LR, PAPER_BATCH, MIN_PEAK_LR = 1e-4, 512, 1e-4
WEIGHT_DECAY, MIN_LR, WARMUP_FRACTION, CLIP_NORM = 0.05, 1e-6, 0.1, 5.0
LAYERSCALE_INIT, DROP_PATH = 0.1, 0.1


def simmim_peak_lr(total_batch: int) -> float:
    """SimMIM's linear rule ``1e-4 * total_batch / 512``, at least ``1e-4`` (small batches)."""
    return max(PAPER_LR * total_batch / PAPER_BATCH, MIN_PEAK_LR)


@dataclass
class SimMIMRunConfig(PretrainRunOptions):
    """Everything that defines a SimMIM run (recorded in run.json; ``VOLATILE`` fields may change on resume).

    Crop size in voxels; ``batch_size`` volumes per rank; ``peak_lr`` the learning rate after the warm-up.
    """

    peak_lr: float
    warmup_iters: int
    mask_ratio: float = MASK_RATIO
    seed: int = 0
    precision: str = "fp32"
    drop_path: float = DROP_PATH
    layerscale_init: float = LAYERSCALE_INIT
    weight_decay: float = WEIGHT_DECAY
    pos_grid: int = 6
    world_size: int = 1
    augment_device: str = "cpu-monai"
    method: str = METHOD
    init_from: str | None = None  # adapt-highres: ``<run>/<checkpoint>@<iteration>`` it continues

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SimMIMRunConfig:
        """The config a checkpoint or run.json recorded (fields this version does not know are dropped)."""
        return config_from_options(cls, options, METHOD, "SimMIM")


def config_from_options(cls: type, options: dict[str, Any], method: str, name: str) -> Any:
    """The ``cls`` dataclass a run of ``method`` recorded in ``options`` (unknown fields dropped); a UserError
    naming ``name`` when a required field is missing or the options record another method."""
    fields = cls.__dataclass_fields__
    missing = [k for k, f in fields.items() if k not in options and f.default is MISSING]
    if missing or options.get("method") != method:
        raise UserError(f"not the record of a {name} pretrain run (no {', '.join(missing) or 'method ' + method})",
                        fix=f"pass the folder of a `3dino pretrain --method {method}` run")
    return cls(**{k: v for k, v in options.items() if k in fields})


class SimMIMNetwork(nn.Module):
    """The backbone and SimMIM's prediction head: one linear layer from a patch token to its ``C * p^3`` voxels."""

    def __init__(self, backbone: VisionTransformer3D) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, backbone.in_chans * backbone.patch_size ** 3)

    def forward(self, crops: Tensor, masks: Tensor) -> Tensor:
        """``crops`` ``[B, C, g, g, g]``, ``masks`` bool ``[B, n]`` -> predicted voxels ``[B, n, C * p^3]``."""
        return self.head(self.backbone.forward_features(crops, masks=masks)["patch"])


def build_simmim_network(config: SimMIMRunConfig) -> SimMIMNetwork:
    """A freshly initialised network of ``config`` (call under the run's seed); mask token ~ N(0, 0.02) truncated."""
    backbone = build_backbone(config.preset, drop_path_rate=config.drop_path, pos_grid=config.pos_grid,
                              layerscale_init=config.layerscale_init)
    nn.init.trunc_normal_(backbone.mask_token, std=0.02)
    return SimMIMNetwork(backbone)


def simmim_optimizer(network: SimMIMNetwork) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) over backbone and head: no layer-wise decay, weight decay off for biases, norms,
    LayerScale and tokens (lr and weight decay are set each step from the schedules)."""
    groups = build_param_groups(network.backbone.named_parameters(), network.head.named_parameters(prefix="head"),
                                layer_decay=1.0, patch_embed_lr_mult=1.0)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)


def simmim_loss(network: nn.Module, crops: Tensor, masks: Tensor, patch: int) -> Tensor:
    """Masked L1 of ``network``'s reconstruction of ``crops`` (``[B, C, g, g, g]``) under ``masks`` ``[B, n]``."""
    prediction = network(crops, masks)
    return masked_l1(prediction.float(), patchify(crops, patch).float(), masks)


class SimMIMTask:
    """The SimMIM step on the shared :class:`~threedino_pipe.training.loop.TrainingLoop` (module docstring)."""

    def __init__(self, config: SimMIMRunConfig, dataset_folders: list[Path], dist: DistInfo,
                 init_state: dict | None = None) -> None:
        self.config, self.dist = config, dist
        torch.manual_seed(config.seed)  # the same initialisation on every rank
        self.network = build_simmim_network(config)
        torch.manual_seed(config.seed * 1_000_003 + 7919 * dist.rank)  # per-rank stream (drop path)
        if init_state is not None:
            self.network.load_state_dict(init_state["network"])
        self.network.to(dist.device)
        if config.grad_checkpointing:
            self.network.backbone.set_grad_checkpointing(True)
        self.optimizer = simmim_optimizer(self.network)
        self.scaler = make_scaler(config.precision, dist.device)
        self.total_batch = config.batch_size * dist.world_size
        self.schedules = make_schedules(config.iters, self.total_batch, peak_lr=config.peak_lr, min_lr=MIN_LR,
                                        warmup_iters=config.warmup_iters, weight_decay=config.weight_decay,
                                        weight_decay_end=config.weight_decay)
        dataset = PretrainDataset(dataset_folders, config.configuration, config.min_axis)
        if dist.is_main:
            logger.info(dataset.summary())
        self.loader = make_pretrain_loader(dataset, config.batch_size, config.num_workers, config.seed,
                                           config.global_crop, n_local=0, n_global=1, geometric_only=True,
                                           rank=dist.rank, world_size=dist.world_size)
        self.probe_cases = first_probe_cases(dataset_folders) if dist.is_main and config.probe_every else None
        self.model = DistributedDataParallel(self.network) if dist.world_size > 1 else self.network
        self.n_patches = (config.global_crop // self.network.backbone.patch_size) ** 3

    def masks(self, it: int) -> Tensor:
        """This rank's rows of iteration ``it``'s masks, drawn for the whole global batch."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + it)
        drawn = random_token_masks(self.total_batch, self.n_patches, self.config.mask_ratio, generator=generator)
        rank, batch = self.dist.rank, self.config.batch_size
        return drawn[rank * batch:(rank + 1) * batch]

    def step(self, it: int) -> dict[str, Any]:
        config, device = self.config, self.dist.device
        tick = time.perf_counter()
        batch = next(self.loader)
        values = step_schedules(self.optimizer, self.schedules, it)
        masks = self.masks(it)
        crops = batch["global_crops"].to(device, non_blocking=True)
        with autocast(config.precision, device):
            loss = simmim_loss(self.model, crops, masks.to(device), self.network.backbone.patch_size)
        terms = {"loss": loss.item()}
        check_finite([terms["loss"]], it, terms)
        optimizer_step(loss, self.optimizer, self.scaler, clip=lambda: clip_gradients(self.network, CLIP_NORM))
        return {**terms, "masked_fraction": float(masks.float().mean()), "probe_bacc": math.nan,
                "lr": values["lr"], "wd": values["wd"],
                "crops_per_s": crops.shape[0] * self.dist.world_size / (time.perf_counter() - tick),
                "memory_mb": peak_memory_mb(device)}

    def after_step(self, iteration: int, row: dict[str, Any], say: Callable[[str], None]) -> bool:
        if self.probe_cases is None or not (iteration % self.config.probe_every == 0
                                            or iteration == self.config.iters):
            return False
        score = probe_score(self.network.backbone, self.probe_cases, self.dist.device, self.config.precision)
        row["probe_bacc"] = score["balanced_accuracy"]
        say(f"iteration {iteration}: patch probe of the backbone on {self.probe_cases.dataset} (fold 0 validation "
            f"patches): balanced accuracy {score['balanced_accuracy']:.3f}")
        return False

    def status(self, row: dict[str, Any]) -> str:
        probe = "" if math.isnan(row["probe_bacc"]) else f" probe {row['probe_bacc']:.3f}"
        return f"masked L1 {row['loss']:.4f}{probe}"

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        restore_optimisation(state, self.optimizer, self.scaler, self.loader)

    def on_save(self, folder: Path, iteration: int) -> None:
        pass

    def finish(self, folder: Path, iteration: int) -> None:
        save_run_backbone(self.network.backbone, folder, iteration, self.config, "simmim_backbone")

    def close(self) -> None:
        self.loader.close()


def train_simmim(config: SimMIMRunConfig, folder: Path, dataset_folders: list[Path], dist: DistInfo, *,
                 resume: bool, stop_after: int | None = None, init_state: dict | None = None) -> Path:
    """Run (or resume) SimMIM training into ``folder`` (run.json already written); returns the folder."""
    return run_pretraining(SimMIMTask(config, dataset_folders, dist, init_state), config, folder, dist,
                           CHECKPOINT_FORMAT, CURVES, resume=resume, stop_after=stop_after)
