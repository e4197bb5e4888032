"""The segmentation finetuning loop (``3dino finetune`` with an adapter, unetr or linear head).

One iteration: a batch of patches (:mod:`threedino_pipe.training_data.patch_loader`), forward under
autocast, MONAI ``DiceCELoss`` (softmax; plain labels) or ``DiceLoss`` (sigmoid; region labels)
in float32, AdamW step, MONAI ``WarmupCosineSchedule`` step. Every ``val_every`` iterations (and
at the end) rank 0 predicts each validation case whole with the sliding window of ``3dino predict``
(:func:`threedino_pipe.inference.predictor.blended_probabilities`, the run's overlap and precision)
and scores the label map it gives (MONAI's Dice per case and class, on the preprocessed grid);
each class's (region's) mean Dice is logged as ``val_dice_<name>`` beside the mean ``val_dice``
in log.csv and drawn in one panel of curves.png; an improvement of the mean foreground Dice writes
``checkpoint_best.pt`` (weights only) and ``model.json``; the last iteration writes
``checkpoint_final.pt`` (weights only). ``checkpoint_latest.pt`` (model,
optimiser, scheduler, data stream, RNG, validation history) is written atomically every
``save_every`` iterations and at every validation, so a killed run resumes where it stood.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
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

from threedino_pipe.artifacts import CHECKPOINT_FILES, BestMetric, ModelCard, SegmentationValidation, ValidationScore
from threedino_pipe.inference import geometry
from threedino_pipe.inference.air_windows import AirRule
from threedino_pipe.inference.predictor import InferenceOptions, blended_probabilities
from threedino_pipe.models.backbones import DEFAULT_FAMILY
from threedino_pipe.models.segmentation import SegmentationNetwork, build_segmentation_model
from threedino_pipe.runtime.checkpoints import save_checkpoint
from threedino_pipe.runtime.device import peak_memory_mb
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.precision import autocast, make_scaler
from threedino_pipe.training.loop import LoopSettings, TrainingLoop, check_finite, optimizer_step
from threedino_pipe.training_data.patch_loader import Augmentation, PatchLoader, SegmentationCases

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "threedino_pipe.finetune_checkpoint"
FINAL_WEIGHTS = CHECKPOINT_FILES["final"]  # weights only, like checkpoint_best.pt
CURVES = ["loss", "val_dice", "lr", "patches_per_s"]
CLASS_DICE_PREFIX = "val_dice_"


def class_dice_columns(target_names: list[str]) -> list[str]:
    """The log.csv columns of the validation Dice of each foreground class or region."""
    return [f"{CLASS_DICE_PREFIX}{name}" for name in target_names]


def curve_panels(target_names: list[str]) -> list:
    """The panels of a finetune run's curves.png: :data:`CURVES` with the per-class Dice after the mean."""
    panels: list = list(CURVES)
    panels.insert(panels.index("val_dice") + 1, ("val_dice per class", class_dice_columns(target_names)))
    return panels


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
    world_size: int = 1
    augmentation: dict = field(default_factory=dict)
    backbone_family: str = DEFAULT_FAMILY
    # volatile: may differ between a run and its resumption
    num_workers: int = 2
    save_every: int = 500
    device: str = "auto"
    backbone_method: str | None = None  # recorded, not compared: backbone_sha256 already pins the file

    VOLATILE = ("num_workers", "save_every", "device", "stop_after", "backbone_method")

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
                                   freeze_backbone=config.frozen, backbone_family=config.backbone_family)
    if backbone_state is not None:
        net.backbone.load_state_dict(backbone_state, strict=True)
    return net


def case_labels(net: torch.nn.Module, image: np.ndarray, config: SegRunConfig, values: list[int],
                device: torch.device, air: AirRule | None = None) -> np.ndarray:
    """The label map (``X x Y x Z`` label values) validation scores for one preprocessed case ``C x X x Y x Z``.

    ``3dino predict``'s sliding window and label rule with the run's overlap and precision
    (``values``: the label value of each output channel, as in model.json); for a case that needs
    no resampling it equals the crop of what ``3dino predict`` writes with the run's checkpoint.
    ``air`` (the case's normalisation schemes and spacing): windows of air outside the body are skipped
    as ``predict`` skips them (``inference/air_windows``); None: every window runs.
    """
    data = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    options = InferenceOptions(overlap=config.overlap, precision=config.precision)
    probabilities = blended_probabilities(data, [(net, config.patch_size)], config.output, config.num_outputs,
                                          options, device, streamed=True, air=air)
    return geometry.labels_on_grid(probabilities, output=config.output, values=values)


def validate(net: torch.nn.Module, config: SegRunConfig, val_cases: SegmentationCases, targets: TargetMaker,
             values: list[int], device: torch.device, iteration: int) -> ValidationScore:
    """Dice per validation case and class of :func:`case_labels` (MONAI ``compute_dice`` of the label
    map's classes or regions; NaN where the reference class is empty).

    ``mean_dice`` = mean over foreground classes (regions) of their mean over cases, NaNs left out;
    ``per_class``: the mean over cases; ``per_case``: case -> class -> Dice (None: the reference lacks it).
    """
    net.eval()
    per_case: dict[str, dict[str, float | None]] = {}
    columns = []
    for index, case in enumerate(val_cases.cases):
        image_arr, seg_arr = val_cases.arrays(index)
        air = AirRule(case.schemes, case.spacing) if case.schemes else None
        labels = case_labels(net, image_arr[...], config, values, device, air)
        seg = torch.from_numpy(np.asarray(seg_arr[...]).astype(np.int64))[None]
        predicted = targets.one_hot(torch.from_numpy(labels.astype(np.int64))[None, None])
        dice = compute_dice(predicted, targets.one_hot(seg), include_background=config.output != "softmax")[0]
        scores = dice.double().tolist()
        columns.append(scores)
        per_case[case.case_id] = {n: (None if math.isnan(v) else round(v, 6))
                                  for n, v in zip(config.target_names, scores, strict=True)}
    net.train()
    table = np.asarray(columns, dtype=np.float64).reshape(len(columns), -1)
    with np.errstate(all="ignore"):
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in table.T]
    finite = [m for m in means if math.isfinite(m)]
    return ValidationScore(iteration=iteration, mean_dice=round(float(np.mean(finite)), 6) if finite else 0.0,
                           per_class={n: (None if math.isnan(m) else round(m, 6))
                                      for n, m in zip(config.target_names, means, strict=True)},
                           per_case=per_case)


def _write_validation(folder: Path, config: SegRunConfig, history: list[ValidationScore],
                      best: ValidationScore | None, done: int) -> None:
    SegmentationValidation(classes=config.target_names, val_cases=config.val_ids, iterations_done=done,
                           iters=config.iters, finished=done >= config.iters, best=best,
                           latest=history[-1] if history else None,
                           history=[h.point() for h in history]).write(SegmentationValidation.in_folder(folder))


class SegmentationTask:
    """The finetuning step, validation and best-model bookkeeping on the shared training loop."""

    def __init__(self, config: SegRunConfig, folder: Path, finetune_dir: Path, dist: DistInfo, *, rerun: str,
                 model_card: ModelCard, backbone_state: dict | None = None) -> None:
        self.config, self.folder, self.dist, self.card = config, Path(folder), dist, model_card
        device = dist.device
        self.net = build_network(config, backbone_state).to(device)
        self.targets = TargetMaker(config.output, config.targets)
        self.loss_fn = make_loss(config.output)
        self.optimizer = torch.optim.AdamW(self.net.trainable_parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.scheduler = WarmupCosineSchedule(self.optimizer, warmup_steps=config.warmup_iters, t_total=config.iters)
        self.scaler = make_scaler(config.precision, device)
        train_cases = SegmentationCases(finetune_dir, config.train_ids, rerun)
        self.val_cases = SegmentationCases(finetune_dir, config.val_ids, rerun) if dist.is_main else None
        aug = Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.augmentation.items()}) \
            if config.augmentation else None
        self.loader = PatchLoader(train_cases, tuple(config.patch_size), config.batch_size, config.num_workers,
                                  config.seed, aug, rank=dist.rank, world_size=dist.world_size)
        self.history: list[ValidationScore] = []
        self.best: ValidationScore | None = None
        self.model = DistributedDataParallel(self.net) if dist.world_size > 1 else self.net
        self.net.train()

    def step(self, it: int) -> dict[str, Any]:
        device = self.dist.device
        tick = time.perf_counter()
        batch = next(self.loader)
        image = batch["data"].to(device, non_blocking=True)
        target = self.targets(batch["seg"]).to(device, non_blocking=True)
        lr = self.optimizer.param_groups[0]["lr"]
        with autocast(self.config.precision, device):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), target)
        check_finite([float(loss.detach())], it, {"loss": float(loss.detach())})
        optimizer_step(loss, self.optimizer, self.scaler)
        self.scheduler.step()
        return {"loss": float(loss.detach()), "lr": lr, "val_dice": None,
                **dict.fromkeys(class_dice_columns(self.config.target_names)),
                "patches_per_s": image.shape[0] * self.dist.world_size / (time.perf_counter() - tick),
                "memory_mb": peak_memory_mb(device)}

    def after_step(self, iteration: int, row: dict[str, Any], say: Callable[[str], None]) -> bool:
        config = self.config
        validate_now = iteration % config.val_every == 0 or iteration == config.iters
        if validate_now and self.dist.is_main:
            record = validate(self.net, config, self.val_cases, self.targets, self.card.output_values(),
                              self.dist.device, iteration)
            self.history.append(record)
            row["val_dice"] = record.mean_dice
            row.update(zip(class_dice_columns(config.target_names),
                           (record.per_class[name] for name in config.target_names), strict=True))
            if self.best is None or record.mean_dice > self.best.mean_dice:
                self.best = record
                save_checkpoint({"model": self.net.state_dict()}, self.folder / "checkpoint_best.pt")
                self.card.model_copy(update={
                    "model_args": self.net.model_args(), "best_iteration": iteration,
                    "best_metric": BestMetric(name="dice", value=record.mean_dice)}).write(
                    ModelCard.in_folder(self.folder))
            say(f"iteration {iteration}: validation Dice {record.mean_dice:.4f} "
                f"(best {self.best.mean_dice:.4f} at iteration {self.best.iteration})")
        return validate_now

    def status(self, row: dict[str, Any]) -> str:
        best = f" best Dice {self.best.mean_dice:.3f}" if self.best else ""
        return f"loss {row['loss']:.3f}{best}"

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "loader": self.loader.state_dict(), "history": [h.model_dump() for h in self.history],
                "best": None if self.best is None else self.best.model_dump()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.history = [ValidationScore.model_validate(h) for h in state["history"]]
        self.best = None if state["best"] is None else ValidationScore.model_validate(state["best"])

    def on_save(self, folder: Path, iteration: int) -> None:
        _write_validation(folder, self.config, self.history, self.best, iteration)

    def finish(self, folder: Path, iteration: int) -> None:
        """``checkpoint_final.pt``: the weights after the last iteration (``predict --checkpoint final``)."""
        save_checkpoint({"model": self.net.state_dict()}, Path(folder) / FINAL_WEIGHTS)

    def close(self) -> None:
        self.loader.close()


def train_segmentation(config: SegRunConfig, folder: Path, finetune_dir: Path, dist: DistInfo, *, resume: bool,
                       rerun: str, model_card: ModelCard, backbone_state: dict | None = None,
                       stop_after: int | None = None) -> ValidationScore | None:
    """Run (or resume) finetuning into ``folder``; returns the best validation record (rank 0).

    Args:
        config: the run's definition.
        folder: the run folder (run.json written by the caller).
        finetune_dir: ``<preprocessed>/<Dataset>/finetune``.
        dist: rank and device.
        resume: continue from ``checkpoint_latest.pt``.
        rerun: the preprocess command named in errors about missing cases.
        model_card: model.json as known before training (``model_args`` and the best-checkpoint fields are
            filled in at each new best).
        backbone_state: pretrained backbone weights (None: random initialisation).
        stop_after: checkpoint and return after this many iterations of this invocation.
    """
    task = SegmentationTask(config, folder, finetune_dir, dist, rerun=rerun, model_card=model_card,
                            backbone_state=backbone_state)
    settings = LoopSettings(iters=config.iters, save_every=config.save_every, checkpoint_format=CHECKPOINT_FORMAT,
                            config=config.options(), curves=curve_panels(config.target_names),
                            stop_after=stop_after)
    TrainingLoop(task, folder, dist, settings).run(resume=resume)
    return task.best
