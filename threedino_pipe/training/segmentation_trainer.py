"""The segmentation finetuning loop (``3dino finetune`` with an adapter, unetr or linear head).

One iteration: a batch of patches (:mod:`threedino_pipe.data.patch_loader`), forward under
autocast, MONAI ``DiceCELoss`` (softmax; plain labels) or ``DiceLoss`` (sigmoid; region labels)
in float32, AdamW step, MONAI ``WarmupCosineSchedule`` step. Every ``val_every`` iterations (and
at the end) rank 0 predicts each validation case whole with the sliding window and computes
MONAI's Dice per case and class; an improvement of the mean foreground Dice writes
``checkpoint_best.pt`` (weights only) and ``model.json``. ``checkpoint_latest.pt`` (model,
optimiser, scheduler, data stream, RNG, validation history) is written atomically every
``save_every`` iterations and at every validation, so a killed run resumes where it stood.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice
from monai.optimizers import WarmupCosineSchedule
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from threedino_pipe import __version__, progress
from threedino_pipe.data.patch_loader import Augmentation, PatchLoader, SegmentationCases
from threedino_pipe.inference.sliding_window import predict_logits
from threedino_pipe.jsonio import write_json
from threedino_pipe.models.segmentation import SegmentationNetwork, build_segmentation_model
from threedino_pipe.training.checkpointing import (
    gathered_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from threedino_pipe.training.csv_log import CsvLog
from threedino_pipe.training.distributed import DistInfo, barrier, peak_memory_mb
from threedino_pipe.training.precision import autocast, make_scaler
from threedino_pipe.visualization.curves import plot_curves

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "threedino_pipe.finetune_checkpoint"
VALIDATION_SCHEMA_VERSION = 1


@dataclass
class SegRunConfig:
    """Everything that defines a finetune run (recorded in run.json; ``VOLATILE`` fields may change on resume).

    ``patch_size`` in voxels (preprocessed-array order); ``batch_size`` per process;
    ``targets``: for softmax, the label value of each output channel (sorted, 0 first); for
    sigmoid, the label values making up each region.
    """

    dataset: str
    head: str
    backbone_tag: str
    backbone_source: str
    backbone_sha256: str | None
    backbone_dims: str | dict
    frozen: bool
    preset: str | None
    pct: float
    fold: int
    seed: int
    train_ids: list[str]
    val_ids: list[str]
    iters: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_iters: int
    patch_size: list[int]
    in_channels: int
    output: str
    targets: list
    target_names: list[str]
    val_every: int
    overlap: float
    precision: str
    plans_checksum: str
    world_size: int = 1
    augmentation: dict = field(default_factory=dict)
    # volatile: may differ between a run and its resumption
    num_workers: int = 2
    save_every: int = 500
    device: str = "auto"

    VOLATILE = ("num_workers", "save_every", "device", "stop_after")

    @property
    def num_outputs(self) -> int:
        return len(self.targets)

    def options(self) -> dict[str, Any]:
        return asdict(self)


class TargetMaker:
    """Label maps ``[B, 1, ...]`` (label values) -> loss targets.

    softmax: channel indices ``[B, 1, ...]`` (long; value ``targets[i]`` -> index i).
    sigmoid: one float channel per region ``[B, R, ...]`` (1 where the label is one of the region's values).
    """

    def __init__(self, output: str, targets: list) -> None:
        self.output, self.targets = output, targets
        if output == "softmax":
            values = [int(v) for v in targets]
            self.lut = torch.zeros(max(values) + 1, dtype=torch.long)
            self.lut[torch.tensor(values)] = torch.arange(len(values))
        else:
            self.regions = [torch.tensor([int(v) for v in (t if isinstance(t, list) else [t])]) for t in targets]

    def __call__(self, seg: Tensor) -> Tensor:
        seg = seg.long()
        if self.output == "softmax":
            return self.lut.to(seg.device)[seg.clamp(0, len(self.lut) - 1)]
        return torch.cat([torch.isin(seg, r.to(seg.device)) for r in self.regions], dim=1).float()

    def one_hot(self, seg: Tensor) -> Tensor:
        """Per-class (softmax, background included) or per-region binary maps ``[B, K, ...]``."""
        t = self(seg)
        if self.output == "softmax":
            return torch.nn.functional.one_hot(t[:, 0], len(self.targets)).movedim(-1, 1).float()
        return t


def make_loss(output: str) -> torch.nn.Module:
    """MONAI DiceCELoss (softmax over classes) or DiceLoss (sigmoid per region), MONAI's defaults otherwise."""
    if output == "softmax":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return DiceLoss(sigmoid=True)


def build_network(config: SegRunConfig, backbone_state: dict | None) -> SegmentationNetwork:
    """The network, initialised with ``torch.manual_seed(seed)``; pretrained backbone weights loaded strictly."""
    torch.manual_seed(config.seed)
    net = build_segmentation_model(config.head, config.backbone_dims, config.in_channels, config.num_outputs,
                                   freeze_backbone=config.frozen)
    if backbone_state is not None:
        net.backbone.load_state_dict(backbone_state, strict=True)
    return net


def validate(net: torch.nn.Module, config: SegRunConfig, val_cases: SegmentationCases, targets: TargetMaker,
             device: torch.device) -> dict:
    """Dice per validation case and class (MONAI ``compute_dice``; NaN where the reference class is empty).

    Returns ``{"mean_dice", "per_class": {name: mean over cases}, "per_case": {case: {name: dice}}}``;
    ``mean_dice`` = mean over foreground classes (regions) of their mean over cases, NaNs left out.
    """
    net.eval()
    per_case: dict[str, dict[str, float | None]] = {}
    columns = []
    for index, case in enumerate(val_cases.cases):
        image_arr, seg_arr = val_cases.arrays(index)
        image = torch.from_numpy(np.ascontiguousarray(image_arr[...], dtype=np.float32))
        seg = torch.from_numpy(np.asarray(seg_arr[...]).astype(np.int64))[None]
        logits = predict_logits(net, image, config.patch_size, overlap=config.overlap, device=device,
                                precision=config.precision)[None]
        reference = targets.one_hot(seg)
        if config.output == "softmax":
            pred = torch.nn.functional.one_hot(logits.argmax(1), config.num_outputs).movedim(-1, 1).float()
            dice = compute_dice(pred, reference, include_background=False)[0]
        else:
            dice = compute_dice((logits > 0).float(), reference, include_background=True)[0]
        values = dice.double().tolist()
        columns.append(values)
        per_case[case.case_id] = {n: (None if math.isnan(v) else round(v, 6))
                                  for n, v in zip(config.target_names, values, strict=True)}
    net.train()
    table = np.asarray(columns, dtype=np.float64).reshape(len(columns), -1)
    with np.errstate(all="ignore"):
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in table.T]
    finite = [m for m in means if math.isfinite(m)]
    return {"mean_dice": round(float(np.mean(finite)), 6) if finite else 0.0,
            "per_class": {n: (None if math.isnan(m) else round(m, 6))
                          for n, m in zip(config.target_names, means, strict=True)},
            "per_case": per_case}


def _write_validation(folder: Path, config: SegRunConfig, history: list[dict], best: dict | None,
                      done: int) -> None:
    latest = history[-1] if history else None
    write_json(folder / "validation.json", {
        "kind": "validation", "schema_version": VALIDATION_SCHEMA_VERSION, "version": __version__,
        "metric": "dice", "classes": config.target_names, "val_cases": config.val_ids,
        "iterations_done": done, "iters": config.iters, "finished": done >= config.iters,
        "best": best, "latest": latest,
        "history": [{"iteration": h["iteration"], "mean_dice": h["mean_dice"], "per_class": h["per_class"]}
                    for h in history]})


def train_segmentation(config: SegRunConfig, folder: Path, finetune_dir: Path, dist: DistInfo, *, resume: bool,
                       rerun: str, model_json: dict, backbone_state: dict | None = None,
                       stop_after: int | None = None) -> dict | None:
    """Run (or resume) finetuning into ``folder``; returns the best validation record (rank 0).

    Args:
        config: the run's definition.
        folder: the run folder (run.json written by the caller).
        finetune_dir: ``<preprocessed>/<Dataset>/finetune``.
        dist: rank and device.
        resume: continue from ``checkpoint_latest.pt``.
        rerun: the preprocess command named in errors about missing cases.
        model_json: model.json without ``model_args`` and the best-checkpoint fields (filled in here).
        backbone_state: pretrained backbone weights (None: random initialisation).
        stop_after: checkpoint and return after this many iterations of this invocation.
    """
    device = dist.device
    net = build_network(config, backbone_state).to(device)
    targets = TargetMaker(config.output, config.targets)
    loss_fn = make_loss(config.output)
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=config.warmup_iters, t_total=config.iters)
    scaler = make_scaler(config.precision, device)
    train_cases = SegmentationCases(finetune_dir, config.train_ids, rerun)
    val_cases = SegmentationCases(finetune_dir, config.val_ids, rerun) if dist.is_main else None
    aug = Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.augmentation.items()}) \
        if config.augmentation else None
    loader = PatchLoader(train_cases, tuple(config.patch_size), config.batch_size, config.num_workers, config.seed,
                         aug, rank=dist.rank, world_size=dist.world_size)
    start, history, best = 0, [], None
    if resume:
        state = load_checkpoint(folder / "checkpoint_latest.pt", rerun="the same command with --restart")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        start, history, best = int(state["iteration"]), list(state["history"]), state["best"]
        restore_rng_state(state["rng"], dist.rank)
        if dist.is_main:
            logger.info("resuming %s at iteration %d of %d", folder.name, start, config.iters)
    model = DistributedDataParallel(net) if dist.world_size > 1 else net
    log = CsvLog(folder / "log.csv", resume_iteration=start if resume else None) if dist.is_main else None
    end = config.iters if stop_after is None else min(config.iters, start + stop_after)
    net.train()

    def checkpoint_state(iteration: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "iteration": iteration, "config": config.options(),
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "loader": loader.state_dict(),
                "rng": gathered_rng_state(dist.rank, dist.world_size), "history": history, "best": best}

    with progress.make_progress() as bar:
        task = bar.add_task(folder.name, total=config.iters, completed=start)
        for it in range(start, end):
            tick = time.perf_counter()
            batch = next(loader)
            image = batch["data"].to(device, non_blocking=True)
            target = targets(batch["seg"]).to(device, non_blocking=True)
            lr = optimizer.param_groups[0]["lr"]
            with autocast(config.precision, device):
                logits = model(image)
            loss = loss_fn(logits.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {it}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            iteration = it + 1
            seconds = time.perf_counter() - tick
            row = {"iteration": iteration, "loss": float(loss.detach()), "lr": lr, "val_dice": None,
                   "patches_per_s": image.shape[0] * dist.world_size / seconds, "seconds": seconds,
                   "memory_mb": peak_memory_mb(device)}
            validate_now = iteration % config.val_every == 0 or iteration == config.iters
            if validate_now and dist.is_main:
                record = {"iteration": iteration, **validate(net, config, val_cases, targets, device)}
                history.append(record)
                row["val_dice"] = record["mean_dice"]
                if best is None or record["mean_dice"] > best["mean_dice"]:
                    best = record
                    save_checkpoint({"model": net.state_dict()}, folder / "checkpoint_best.pt")
                    write_json(folder / "model.json", {
                        **model_json, "model_args": net.model_args(), "best_iteration": iteration,
                        "best_metric": {"name": "dice", "value": record["mean_dice"]}})
                message = (f"iteration {iteration}: validation Dice {record['mean_dice']:.4f} "
                           f"(best {best['mean_dice']:.4f} at iteration {best['iteration']})")
                bar.console.print(message) if progress.enabled() else logger.info(message)
            if log is not None:
                log.write(row)
            bar.update(task, completed=iteration)
            if validate_now or iteration % config.save_every == 0 or iteration == end:
                state = checkpoint_state(iteration)
                if dist.is_main:
                    save_checkpoint(state, folder / "checkpoint_latest.pt")
                    _write_validation(folder, config, history, best, iteration)
                    plot_curves(folder / "log.csv", folder / "curves.png",
                                columns=["loss", "val_dice", "lr", "patches_per_s"], title=folder.name)
                barrier()
    loader.close()
    return best


