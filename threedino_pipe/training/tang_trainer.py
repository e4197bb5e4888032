"""Tang et al.'s self-supervision (``3dino pretrain --method tang --arch vit|swin``) on the shared TrainingLoop.

One iteration: this rank's batch of two plain crops per volume (the multi-crop loader's two global crops, no
augmentation), each crop rotated by a random multiple of 90 degrees and given a random inner cutout (drawn from a
generator seeded by the seed, the iteration and the rank), the network's three heads, and the loss
``L1 inpainting + rotation cross-entropy + contrastive`` (:mod:`threedino_pipe.ssl.tang`), AdamW step with a
warm-up and cosine schedule and gradient clipping. The contrastive negatives are the other volumes of the rank's
batch (as in Tang et al.'s code). Under torchrun the network is wrapped in DDP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from threedino_pipe.runtime.device import peak_memory_mb
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.precision import autocast, make_scaler
from threedino_pipe.ssl import build_param_groups, clip_gradients, make_schedules, step_schedules
from threedino_pipe.ssl.tang import (
    apply_cutout,
    contrastive_loss,
    cutout_masks,
    draw_rotations,
    inpainting_l1,
    rotate_crops,
    rotation_loss,
    tang_loss,
)
from threedino_pipe.training.loop import check_finite, optimizer_step
from threedino_pipe.training.run_options import PretrainRunOptions
from threedino_pipe.training.simmim_trainer import SimMIMTask, config_from_options
from threedino_pipe.training.ssl_trainer import first_probe_cases, run_pretraining, save_run_backbone
from threedino_pipe.training.tang_network import TangNetwork, build_tang_network, save_swin_backbone, swin_dims
from threedino_pipe.training_data.pretrain_loader import PretrainDataset, make_pretrain_loader

CHECKPOINT_FORMAT = "threedino_pipe.tang_checkpoint"
METHOD = "tang"
ARCHS = ("vit", "swin")
CURVES = ["loss", ("terms", ["inpaint", "rotation", "contrast"]), "rotation_accuracy", "probe_bacc", "lr",
          "crops_per_s"]
# Tang et al.'s pretraining settings (their released code's defaults): AdamW, lr 4e-4, weight decay 0.1, gradient
# norm clipped at 1, warm-up (500 steps) then cosine, no stochastic depth; docs/method.md, "Tang et al."
PEAK_LR, WEIGHT_DECAY, CLIP_NORM, WARMUP_ITERS, DROP_PATH, MIN_LR = 4e-4, 0.1, 1.0, 500, 0.0, 1e-6


@dataclass
class TangRunConfig(PretrainRunOptions):
    """Everything that defines a Tang et al. run (recorded in run.json; ``VOLATILE`` fields may change on resume).

    Crop size in voxels; ``batch_size`` volumes per rank (two crops each); ``arch`` ``vit`` or ``swin``.
    """

    peak_lr: float
    warmup_iters: int
    arch: str = "vit"
    seed: int = 0
    precision: str = "fp32"
    drop_path: float = DROP_PATH
    weight_decay: float = WEIGHT_DECAY
    world_size: int = 1
    augment_device: str = "cpu-monai"
    method: str = METHOD

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TangRunConfig:
        """The config a checkpoint or run.json recorded (fields this version does not know are dropped)."""
        return config_from_options(cls, options, METHOD, "Tang et al.")


def tang_optimizer(network: TangNetwork) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) over the encoder and heads, one learning rate; no weight decay on biases and norms."""
    groups = build_param_groups(network.backbone.named_parameters(),
                                [(n, p) for n, p in network.named_parameters() if not n.startswith("backbone.")],
                                num_layers=1, layer_decay=1.0, patch_embed_lr_mult=1.0)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def tang_views(crops: Tensor, seed: int, it: int, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs (rotated, cut out), targets (rotated) and rotation classes of iteration ``it``'s ``crops``
    ``[2B, C, S, S, S]`` on ``rank`` (drawn from a generator seeded by the three)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + it) * 7919 + rank)
    rotations = draw_rotations(crops.shape[0], generator)
    targets = rotate_crops(crops, rotations)
    inputs = apply_cutout(targets, cutout_masks(crops.shape[0], crops.shape[-1], generator), generator)
    return inputs, targets, rotations


def tang_terms(model: torch.nn.Module, inputs: Tensor, targets: Tensor, rotations: Tensor, precision: str,
               device: torch.device) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The loss, its three terms and the rotation logits of ``model`` on ``inputs`` ``[2B, C, S, S, S]`` (crop-major:
    rows 0..B-1 the volumes' first crops, B..2B-1 their second)."""
    n = inputs.shape[0] // 2
    with autocast(precision, device):
        logits, projections, reconstruction = model(inputs)
    terms = {"inpaint": inpainting_l1(reconstruction.float(), targets),
             "rotation": rotation_loss(logits.float(), rotations),
             "contrast": contrastive_loss(projections[:n].float(), projections[n:].float())}
    return tang_loss(terms), terms, logits


class TangTask(SimMIMTask):
    """Tang et al.'s step on the shared :class:`~threedino_pipe.training.loop.TrainingLoop` (module docstring);
    probing, state and closing as SimMIM's task (the probe only for the ViT)."""

    def __init__(self, config: TangRunConfig, dataset_folders: list[Path], dist: DistInfo,
                 init_state: dict | None = None) -> None:
        self.config, self.dist = config, dist
        torch.manual_seed(config.seed)  # the same initialisation on every rank
        self.network = build_tang_network(config.arch, config.preset, config.global_crop, 1, config.drop_path)
        torch.manual_seed(config.seed * 1_000_003 + 7919 * dist.rank)  # per-rank stream (drop path)
        if init_state is not None:
            self.network.load_state_dict(init_state["network"])
        self.network.to(dist.device)
        self.optimizer = tang_optimizer(self.network)
        self.scaler = make_scaler(config.precision, dist.device)
        self.schedules = make_schedules(config.iters, config.batch_size * dist.world_size, peak_lr=config.peak_lr,
                                        min_lr=MIN_LR, warmup_iters=config.warmup_iters,
                                        weight_decay=config.weight_decay, weight_decay_end=config.weight_decay)
        dataset = PretrainDataset(dataset_folders, config.configuration, config.min_axis)
        self.loader = make_pretrain_loader(dataset, config.batch_size, config.num_workers, config.seed,
                                           config.global_crop, n_local=0, n_global=2, augment=False,
                                           rank=dist.rank, world_size=dist.world_size)
        wants_probe = dist.is_main and config.probe_every and config.arch == "vit"
        self.probe_cases = first_probe_cases(dataset_folders) if wants_probe else None
        self.model = DistributedDataParallel(self.network) if dist.world_size > 1 else self.network

    def step(self, it: int) -> dict[str, Any]:
        config, device = self.config, self.dist.device
        tick = time.perf_counter()
        batch = next(self.loader)
        values = step_schedules(self.optimizer, self.schedules, it)
        inputs, targets, rotations = (t.to(device, non_blocking=True)
                                      for t in tang_views(batch["global_crops"], config.seed, it, self.dist.rank))
        loss, terms, logits = tang_terms(self.model, inputs, targets, rotations, config.precision, device)
        row = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        check_finite(row.values(), it, row)
        optimizer_step(loss, self.optimizer, self.scaler, clip=lambda: clip_gradients(self.network, CLIP_NORM))
        return {**row, "rotation_accuracy": float((logits.argmax(1) == rotations).float().mean()),
                "probe_bacc": math.nan, "lr": values["lr"], "wd": values["wd"],
                "crops_per_s": inputs.shape[0] * self.dist.world_size / (time.perf_counter() - tick),
                "memory_mb": peak_memory_mb(device)}

    def status(self, row: dict[str, Any]) -> str:
        probe = "" if math.isnan(row["probe_bacc"]) else f" probe {row['probe_bacc']:.3f}"
        return (f"loss {row['loss']:.4f} (L1 {row['inpaint']:.4f}, rotation {row['rotation']:.3f}, "
                f"contrastive {row['contrast']:.3f}){probe}")

    def finish(self, folder: Path, iteration: int) -> None:
        if self.config.arch == "vit":
            save_run_backbone(self.network.backbone, folder, iteration, self.config, "tang_backbone")
            return
        meta = {"run": folder.name, "iteration": iteration, "datasets": self.config.datasets,
                "configuration": self.config.configuration, "kind": "tang_backbone", "preset": self.config.preset}
        save_swin_backbone(self.network.backbone, folder / "backbone.pt", swin_dims(self.config.preset, 1), meta)


def train_tang(config: TangRunConfig, folder: Path, dataset_folders: list[Path], dist: DistInfo, *,
               resume: bool, stop_after: int | None = None, init_state: dict | None = None) -> Path:
    """Run (or resume) Tang et al.'s pretraining into ``folder`` (run.json already written); returns the folder."""
    return run_pretraining(TangTask(config, dataset_folders, dist, init_state), config, folder, dist,
                           CHECKPOINT_FORMAT, CURVES, resume=resume, stop_after=stop_after)
