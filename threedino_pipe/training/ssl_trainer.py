"""The 3DINO training loop shared by ``pretrain`` and ``adapt-highres``.

One iteration: draw this rank's share of a multi-crop batch, draw the global crops' patch masks
(seeded by the iteration, identical on every rank, each rank takes its rows), teacher targets,
student pass, DINO + iBOT + KoLeo loss, AdamW step with layer-wise lr decay and the schedules,
per-part gradient clipping, EMA update of the teacher. Under torchrun the student is wrapped in
DDP (gloo on CPU, NCCL on GPU) and Sinkhorn-Knopp sums are all-reduced across ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.weight_files import save_backbone
from threedino_pipe.runtime.device import peak_memory_mb
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import autocast, make_scaler
from threedino_pipe.ssl import (
    DINOLoss,
    build_param_groups,
    clip_gradients,
    iBOTPatchLoss,
    random_patch_masks,
    step_schedules,
    update_teacher,
)
from threedino_pipe.ssl.centering import TeacherCentring
from threedino_pipe.ssl.ema import relative_distance
from threedino_pipe.ssl.recipe import SSLRecipe, paper, recipe_schedules
from threedino_pipe.ssl.signals import LearningSignals
from threedino_pipe.training.feature_probe import ProbeCases, load_probe_cases, probe_score
from threedino_pipe.training.loop import LoopSettings, TrainingLoop, check_finite, optimizer_step
from threedino_pipe.training.run_options import PretrainRunOptions
from threedino_pipe.training.ssl_model import SSLLosses, SSLNetwork, build_ssl_network, make_teacher
from threedino_pipe.training_data.augment_params import INTENSITY_PROB, AugmentParams
from threedino_pipe.training_data.pretrain_loader import PretrainDataset, make_pretrain_loader
from threedino_pipe.training_data.torch_augmentations import BatchAugmenter, batch_seed

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "threedino_pipe.ssl_checkpoint"
COLLAPSE_AFTER = 50  # iterations before the collapse check starts (a fresh ViT's CLS tokens all look alike)
CURVES = ["loss", "dino_global", "dino_local", "ibot", "koleo", "target_entropy", "prototypes_used", "cls_rank",
          "patch_rank", "teacher_cls_std", "agreement", "st_distance", "probe_bacc", "lr", "momentum", "teacher_temp",
          "crops_per_s"]


@dataclass
class SSLRunConfig(PretrainRunOptions):
    """Everything that defines an SSL run (recorded in run.json; ``volatile`` fields may change on resume).

    Crop sizes in voxels; ``batch_size`` per rank; ``base_lr`` before the sqrt(total batch / 1024) rule.
    """

    local_crop: int
    num_local_crops: int
    base_lr: float
    seed: int = 0
    precision: str = "fp32"
    drop_path: float = 0.3
    koleo_weight: float = 0.1
    head_dims: dict = field(default_factory=dict)
    pos_grid: int = 6
    world_size: int = 1
    init_from: str | None = None
    recipe: dict = field(default_factory=dict)  # SSLRecipe.options() (ssl/recipe.py); empty: the paper's
    recipe_reasons: dict = field(default_factory=dict)  # why each setting deviates from the paper (not compared)
    augment_device: str = "cpu-monai"  # MONAI in the loader's workers, or "torch": batched on the training device
    method: str = "dino"  # the objective (``3dino pretrain --method``); runs recorded before it ran 3DINO
    intensity_prob: float = INTENSITY_PROB  # the augmentations' intensity step (gamma/noise/histogram shift)
    VOLATILE = (*PretrainRunOptions.VOLATILE, "recipe_reasons")

    def ssl_recipe(self) -> SSLRecipe:
        """The run's recipe (a run recorded before recipes existed ran the paper's)."""
        if self.recipe:
            return SSLRecipe(**self.recipe, deviations=dict(self.recipe_reasons))
        return paper(self.batch_size * self.world_size, self.iters, self.head_dims["out_dim"], self.base_lr)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SSLRunConfig:
        """The config a checkpoint or run.json recorded (fields this version does not know are dropped)."""
        fields = cls.__dataclass_fields__
        refuse_other_method(options)
        missing = [k for k, f in fields.items() if k not in options and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise UserError(f"not the record of a pretrain or adapt-highres run (no {', '.join(missing)})",
                            fix="pass the folder of a `3dino pretrain` or `3dino adapt-highres` run")
        return cls(**{k: v for k, v in options.items() if k in fields})


def refuse_other_method(options: dict[str, Any]) -> None:
    """A UserError when run options record another pretraining method than 3DINO (``--method simmim``)."""
    if options.get("method", "dino") != "dino":
        raise UserError(f"a `--method {options['method']}` run: it has no 3DINO student, teacher or heads",
                        fix="pass the folder of a `3dino pretrain` run made with --method dino; the "
                        "run's backbone.pt is what finetune, embed and visualize take")


def build_ssl_pair(config: SSLRunConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """Student and teacher networks of ``config`` (call under the run's seed)."""
    backbone = build_backbone(config.preset, drop_path_rate=config.drop_path, pos_grid=config.pos_grid,
                              layerscale_init=config.ssl_recipe().layerscale_init)
    student = build_ssl_network(backbone, config.head_dims)
    return student, make_teacher(student)


def load_ssl_pair(state: dict[str, Any]) -> tuple[SSLRunConfig, SSLNetwork, SSLNetwork]:
    """Config, student and teacher of an SSL checkpoint ``state`` (weights loaded strictly)."""
    config = SSLRunConfig.from_options(state["config"])
    student, teacher = build_ssl_pair(config)
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    return config, student, teacher


def _optimizer(student: SSLNetwork) -> torch.optim.AdamW:
    groups = build_param_groups(student.backbone.named_parameters(),
                                chain(student.dino_head.named_parameters(prefix="dino_head"),
                                      student.ibot_head.named_parameters(prefix="ibot_head")))
    # fused: one kernel for all parameters (small preset on CPU: 0.07 s instead of 0.32 s per step)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)


def _rank_rows(masks_all: Any, batch: int, rank: int, n_global: int = 2):
    """This rank's rows of masks drawn for the global batch (crop-major over ``batch * world`` images)."""
    from threedino_pipe.ssl import PatchMasks, masked_patch_weights
    total = masks_all.masks.shape[0] // n_global
    rows = torch.cat([torch.arange(k * total + rank * batch, k * total + (rank + 1) * batch) for k in range(n_global)])
    masks = masks_all.masks[rows]
    return PatchMasks(masks=masks, mask_indices=masks.flatten().nonzero().flatten(),
                      weights=masked_patch_weights(masks), n_masked=masks.sum(1), ratios=masks_all.ratios[rows])


class SSLTask:
    """The 3DINO step on the shared :class:`~threedino_pipe.training.loop.TrainingLoop` (module docstring)."""

    def __init__(self, config: SSLRunConfig, dataset_folders: list[Path], dist: DistInfo,
                 init_state: dict | None = None) -> None:
        self.config, self.dist = config, dist
        device = dist.device
        torch.manual_seed(config.seed)  # the same initialisation on every rank (teacher included)
        self.student, self.teacher = build_ssl_pair(config)
        torch.manual_seed(config.seed * 1_000_003 + 7919 * dist.rank)  # per-rank stream (drop path)
        if init_state is not None:
            self.student.load_state_dict(init_state["student"])
            self.teacher.load_state_dict(init_state["teacher"])
        self.student.to(device)
        self.teacher.to(device)
        if config.grad_checkpointing:
            self.student.backbone.set_grad_checkpointing(True)
        self.optimizer = _optimizer(self.student)
        self.scaler = make_scaler(config.precision, device)
        self.total_batch = config.batch_size * dist.world_size
        self.recipe = config.ssl_recipe()
        self.schedules = recipe_schedules(self.recipe, config.iters, self.total_batch)
        out_dim = config.head_dims["out_dim"]
        self.losses = SSLLosses(DINOLoss(out_dim), iBOTPatchLoss(out_dim), koleo_weight=config.koleo_weight)
        self.dino_centring = TeacherCentring(self.recipe.centering, queue_size=self.recipe.queue_size)
        self.ibot_centring = TeacherCentring(self.recipe.ibot_centering, queue_size=self.recipe.queue_size)
        self.signals = LearningSignals(out_dim)
        dataset = PretrainDataset(dataset_folders, config.configuration, config.min_axis)
        if dist.is_main:
            logger.info(dataset.summary())
        self.augmenter = (BatchAugmenter(AugmentParams(intensity_prob=config.intensity_prob))
                          if config.augment_device == "torch" else None)
        self.loader = make_pretrain_loader(dataset, config.batch_size, config.num_workers, config.seed,
                                           config.global_crop, config.local_crop, config.num_local_crops,
                                           augment=self.augmenter is None, rank=dist.rank, world_size=dist.world_size,
                                           intensity_prob=config.intensity_prob)
        self.probe_cases = first_probe_cases(dataset_folders) if dist.is_main and config.probe_every else None
        self.model = DistributedDataParallel(self.student) if dist.world_size > 1 else self.student
        self.grid = tuple([config.global_crop // self.student.backbone.patch_size] * 3)

    def step(self, it: int) -> dict[str, Any]:
        config, device = self.config, self.dist.device
        tick = time.perf_counter()
        batch = next(self.loader)
        values = step_schedules(self.optimizer, self.schedules, it)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + it)
        masks = _rank_rows(random_patch_masks(2 * self.total_batch, self.grid, generator=generator),
                           config.batch_size, self.dist.rank)
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True)
        if self.augmenter is not None:  # --augment-device torch: the loader's crops are not augmented yet
            global_crops, local_crops = self.augmenter(global_crops, local_crops,
                                                       batch_seed(config.seed, batch["batch_index"], self.dist.rank))
        temp = values["teacher_temp"]
        with autocast(config.precision, device):
            teacher = self.teacher.teacher_outputs(global_crops, masks)
            dino_probs = self.dino_centring.targets(teacher["dino"], self.teacher.dino_head.prototypes, temp)
            ibot_probs = self.ibot_centring.targets(teacher["ibot"], self.teacher.ibot_head.prototypes, temp)
            outputs = self.model(global_crops, local_crops, masks)
            loss, terms = self.losses(outputs, dino_probs, ibot_probs, masks)
        check_finite([terms["loss"]], it, terms)
        optimizer_step(loss, self.optimizer, self.scaler, clip=self._clip)
        update_teacher(self.student, self.teacher, values["momentum"])
        signals = self.signals.update(outputs, teacher, dino_probs, ibot_probs)
        crops = (global_crops.shape[0] + local_crops.shape[0]) * self.dist.world_size
        return {**terms, **signals, "st_distance": relative_distance(self.student.backbone, self.teacher.backbone),
                "probe_bacc": math.nan, "lr": values["lr"], "wd": values["wd"], "momentum": values["momentum"],
                "teacher_temp": temp, "last_layer_lr": values["last_layer_lr"],
                "crops_per_s": crops / (time.perf_counter() - tick), "memory_mb": peak_memory_mb(device)}

    def _clip(self) -> None:
        for part in (self.student.backbone, self.student.dino_head, self.student.ibot_head):
            clip_gradients(part, 3.0)

    def after_step(self, iteration: int, row: dict[str, Any], say: Callable[[str], None]) -> bool:
        if not self.dist.is_main:
            return False
        probe_now = self.probe_cases is not None and (iteration % self.config.probe_every == 0
                                                      or iteration == self.config.iters)
        if probe_now:
            score = probe_score(self.teacher.backbone, self.probe_cases, self.dist.device, self.config.precision)
            row["probe_bacc"] = score["balanced_accuracy"]
            say(f"iteration {iteration}: patch probe of the teacher on {self.probe_cases.dataset} (fold 0 validation "
                f"patches): balanced accuracy {score['balanced_accuracy']:.3f}")
        warning = self.signals.warning(row, iteration, self.config.iters, COLLAPSE_AFTER)
        if warning:
            say(f"warning: {warning}")
        return False

    def status(self, row: dict[str, Any]) -> str:
        probe = "" if math.isnan(row["probe_bacc"]) else f" probe {row['probe_bacc']:.3f}"
        return (f"loss {row['loss']:.3f} entropy {row['target_entropy']:.3f} prototypes "
                f"{row['prototypes_used']:.1%} rank {row['cls_rank']:.1f}{probe}")

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "loader": self.loader.state_dict(), "dino_centring": self.dino_centring.state_dict(),
                "ibot_centring": self.ibot_centring.state_dict(), "signals": self.signals.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        restore_optimisation(state, self.optimizer, self.scaler, self.loader)
        if "dino_centring" in state:
            self.dino_centring.load_state_dict(state["dino_centring"])
            self.ibot_centring.load_state_dict(state["ibot_centring"])
            self.signals.load_state_dict(state["signals"])

    def on_save(self, folder: Path, iteration: int) -> None:
        pass

    def finish(self, folder: Path, iteration: int) -> None:
        save_run_backbone(self.teacher.backbone, folder, iteration, self.config, "teacher_backbone")

    def close(self) -> None:
        self.loader.close()


def restore_optimisation(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler | None, loader: Any) -> None:
    """Restore a pretraining checkpoint's optimiser, gradient scaler (when both have one) and data stream."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])


def save_run_backbone(backbone: torch.nn.Module, folder: Path, iteration: int, config: Any, kind: str) -> None:
    """``backbone.pt`` of a finished pretraining run, its metadata naming the run, the data, the pretraining
    ``method`` and the backbone ``family`` (``config``: the run's SSLRunConfig or SimMIMRunConfig)."""
    save_backbone(backbone, folder / "backbone.pt", preset=config.preset,
                  meta={"run": folder.name, "iteration": iteration, "datasets": config.datasets,
                        "configuration": config.configuration, "kind": kind, "method": config.method,
                        "family": backbone.family})


def run_pretraining(task: Any, config: Any, folder: Path, dist: DistInfo, checkpoint_format: str, curves: list,
                    *, resume: bool, stop_after: int | None) -> Path:
    """Run (or resume) a pretraining ``task`` into ``folder`` on the shared TrainingLoop; returns the folder."""
    settings = LoopSettings(iters=config.iters, save_every=config.save_every, checkpoint_format=checkpoint_format,
                            config=config.options(), curves=curves, snapshot_every=config.snapshot_every,
                            log_every=config.log_every, final_checkpoint=True, stop_after=stop_after)
    TrainingLoop(task, folder, dist, settings).run(resume=resume)
    return folder


def first_probe_cases(dataset_folders: list[Path]) -> ProbeCases | None:
    """The first pooled dataset with labelled finetune arrays and splits, for the patch probe."""
    for folder in dataset_folders:
        cases = load_probe_cases(folder)
        if cases is not None:
            return cases
    return None


def train_ssl(config: SSLRunConfig, folder: Path, dataset_folders: list[Path], dist: DistInfo, *,
              resume: bool, stop_after: int | None = None, init_state: dict | None = None) -> Path:
    """Run (or resume) SSL training into ``folder``; returns the folder.

    Args:
        config: the run's definition.
        folder: the run folder (run.json already written by the caller).
        dataset_folders: preprocessed dataset folders to pool.
        dist: this process's rank and device.
        resume: continue from ``checkpoint_latest.pt``.
        stop_after: checkpoint and return after this many iterations of this invocation.
        init_state: ``{"student": ..., "teacher": ...}`` state dicts to start from (adapt-highres).
    """
    return run_pretraining(SSLTask(config, dataset_folders, dist, init_state), config, folder, dist,
                           CHECKPOINT_FORMAT, CURVES, resume=resume, stop_after=stop_after)
