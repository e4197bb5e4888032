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
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from threedino_pipe import progress
from threedino_pipe.data.pretrain_loader import PretrainDataset, make_pretrain_loader
from threedino_pipe.models.checkpoint import save_backbone
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.ssl import (
    DINOLoss,
    apply_schedules,
    build_param_groups,
    clip_gradients,
    iBOTPatchLoss,
    make_schedules,
    random_patch_masks,
    schedule_values,
    update_teacher,
)
from threedino_pipe.training.checkpointing import (
    gathered_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from threedino_pipe.training.csv_log import CsvLog
from threedino_pipe.training.distributed import DistInfo, barrier, peak_memory_mb
from threedino_pipe.training.precision import autocast, make_scaler
from threedino_pipe.training.ssl_model import SSLLosses, SSLNetwork, build_ssl_network, make_teacher
from threedino_pipe.visualization.curves import plot_curves

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "threedino_pipe.ssl_checkpoint"
COLLAPSE_STD = 1e-4
COLLAPSE_AFTER = 50  # iterations before the collapse check starts (a fresh ViT's CLS tokens all look alike)


@dataclass
class SSLRunConfig:
    """Everything that defines an SSL run (recorded in run.json; ``volatile`` fields may change on resume).

    Crop sizes in voxels; ``batch_size`` per rank; ``base_lr`` before the sqrt(total batch / 1024) rule.
    """

    datasets: list[str]
    configuration: str
    preset: str
    iters: int
    batch_size: int
    global_crop: int
    local_crop: int
    num_local_crops: int
    min_axis: int
    base_lr: float
    seed: int = 0
    precision: str = "fp32"
    drop_path: float = 0.3
    koleo_weight: float = 0.1
    head_dims: dict = field(default_factory=dict)
    pos_grid: int = 6
    world_size: int = 1
    init_from: str | None = None
    # volatile: may differ between a run and its resumption
    num_workers: int = 0
    save_every: int = 100
    snapshot_every: int = 0
    log_every: int = 1
    grad_checkpointing: bool = False

    VOLATILE = ("num_workers", "save_every", "snapshot_every", "log_every", "grad_checkpointing", "stop_after",
                "device")

    def options(self) -> dict[str, Any]:
        return asdict(self)


def _build(config: SSLRunConfig) -> tuple[SSLNetwork, SSLNetwork]:
    backbone = build_backbone(config.preset, drop_path_rate=config.drop_path, pos_grid=config.pos_grid)
    student = build_ssl_network(backbone, config.head_dims)
    return student, make_teacher(student)


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


def _save(folder: Path, name: str, state: dict) -> None:
    save_checkpoint(state, folder / name)


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
    device = dist.device
    torch.manual_seed(config.seed)  # the same initialisation on every rank (teacher included)
    student, teacher = _build(config)
    torch.manual_seed(config.seed * 1_000_003 + 7919 * dist.rank)  # per-rank stream (drop path)
    if init_state is not None:
        student.load_state_dict(init_state["student"])
        teacher.load_state_dict(init_state["teacher"])
    student.to(device)
    teacher.to(device)
    if config.grad_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    optimizer = _optimizer(student)
    scaler = make_scaler(config.precision, device)
    total_batch = config.batch_size * dist.world_size
    schedules = make_schedules(config.iters, total_batch, base_lr=config.base_lr)
    out_dim = config.head_dims["out_dim"]
    losses = SSLLosses(DINOLoss(out_dim), iBOTPatchLoss(out_dim), koleo_weight=config.koleo_weight)
    dataset = PretrainDataset(dataset_folders, config.configuration, config.min_axis)
    if dist.is_main:
        logger.info(dataset.summary())
    loader = make_pretrain_loader(dataset, config.batch_size, config.num_workers, config.seed, config.global_crop,
                                  config.local_crop, config.num_local_crops, rank=dist.rank,
                                  world_size=dist.world_size)
    start = 0
    if resume:
        state = load_checkpoint(folder / "checkpoint_latest.pt", rerun="the same command with --restart")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        start = int(state["iteration"])
        restore_rng_state(state["rng"], dist.rank)
        if dist.is_main:
            logger.info("resuming %s at iteration %d of %d", folder.name, start, config.iters)
    model = DistributedDataParallel(student) if dist.world_size > 1 else student
    log = CsvLog(folder / "log.csv", resume_iteration=start if resume else None) if dist.is_main else None
    grid = tuple([config.global_crop // student.backbone.patch_size] * 3)
    end = config.iters if stop_after is None else min(config.iters, start + stop_after)
    warned = False

    def checkpoint_state(iteration: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "iteration": iteration, "config": config.options(),
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "loader": loader.state_dict(), "rng": gathered_rng_state(dist.rank, dist.world_size)}

    with progress.make_progress() as bar:
        task = bar.add_task(f"{folder.name}", total=config.iters, completed=start)
        for it in range(start, end):
            tick = time.perf_counter()
            batch = next(loader)
            values = schedule_values(schedules, it)
            apply_schedules(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + it)
            masks = _rank_rows(random_patch_masks(2 * total_batch, grid, generator=generator),
                               config.batch_size, dist.rank)
            global_crops = batch["global_crops"].to(device, non_blocking=True)
            local_crops = batch["local_crops"].to(device, non_blocking=True)
            with autocast(config.precision, device):
                targets = teacher.teacher_targets(global_crops, masks)
                outputs = model(global_crops, local_crops, masks)
                loss, terms = losses(outputs, targets, masks, values["teacher_temp"])
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"non-finite loss at iteration {it}: {terms}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            for part in (student.backbone, student.dino_head, student.ibot_head):
                clip_gradients(part, 3.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            update_teacher(student, teacher, values["momentum"])
            iteration = it + 1
            seconds = time.perf_counter() - tick
            crops = (global_crops.shape[0] + local_crops.shape[0]) * dist.world_size
            if log is not None and (iteration % config.log_every == 0 or iteration == end):
                log.write({"iteration": iteration, **terms, "lr": values["lr"], "wd": values["wd"],
                           "momentum": values["momentum"], "teacher_temp": values["teacher_temp"],
                           "last_layer_lr": values["last_layer_lr"], "crops_per_s": crops / seconds,
                           "seconds": seconds, "memory_mb": peak_memory_mb(device)})
            if dist.is_main and not warned and iteration >= max(COLLAPSE_AFTER, config.iters // 10) and \
                    (terms["cls_std"] < COLLAPSE_STD or terms["teacher_entropy"] < 0.01):
                logger.warning("representation collapse suspected at iteration %d: CLS feature std %.2e, teacher "
                               "entropy %.3f of its maximum", iteration, terms["cls_std"], terms["teacher_entropy"])
                warned = True
            bar.update(task, completed=iteration)
            if iteration % config.save_every == 0 or iteration == end:
                state = checkpoint_state(iteration)
                if dist.is_main:
                    _save(folder, "checkpoint_latest.pt", state)
                    if config.snapshot_every and iteration % config.snapshot_every == 0:
                        _save(folder, f"checkpoint_{iteration}.pt", state)
                    plot_curves(folder / "log.csv", folder / "curves.png",
                                columns=["loss", "dino_global", "dino_local", "ibot", "koleo", "lr",
                                         "teacher_temp", "teacher_entropy", "crops_per_s"], title=folder.name)
                barrier()
    loader.close()
    if end == config.iters:
        state = checkpoint_state(end)  # every rank: it gathers the RNG states
    if end == config.iters and dist.is_main:
        _save(folder, "checkpoint_final.pt", state)
        save_backbone(teacher.backbone, folder / "backbone.pt", preset=config.preset,
                      meta={"run": folder.name, "iteration": end, "datasets": config.datasets,
                            "configuration": config.configuration, "kind": "teacher_backbone"})
    barrier()
    return folder

