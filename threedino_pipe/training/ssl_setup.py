"""Set-up shared by ``pretrain`` and ``adapt-highres``: pooled plans, the run config, the source checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from threedino_pipe.artifacts import BudgetRecord, Plans, PretrainConfiguration, RunRecord
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import resolve_precision
from threedino_pipe.ssl.centering import MODES
from threedino_pipe.ssl.recipe import SSLRecipe, apply_overrides, configure, paper
from threedino_pipe.training.run_setup import batch_for_device
from threedino_pipe.training.ssl_trainer import SSLRunConfig, SSLTask

CPU_BATCH_CAP = 4
RECIPES = ("auto", "paper")
AUGMENT_DEVICES = ("auto", "cpu-monai", "torch")
BUDGET_WARMUP, BUDGET_STEPS = 2, 3
BUDGET_PLACEHOLDER_ITERS = 1000  # the recipe's length while the step is timed (the step time does not depend on it)
POOLED_FIELDS = ("global_crop", "local_crop", "num_local_crops", "min_axis")


def pooled_configuration(plans_list: list[tuple[Path, Plans]], name: str) -> PretrainConfiguration:
    """The pooled datasets' ``name`` configuration; crop sizes must agree across datasets."""
    configs = []
    for folder, plans in plans_list:
        config = plans.configuration(name, file=folder / Plans.FILE)
        if not (folder / name).is_dir():
            raise UserError(f"the '{name}' configuration is not preprocessed", file=folder / name,
                            fix=f"run `3dino preprocess -d {folder.name} -c {name}`")
        configs.append(config)
    first = [getattr(configs[0], k) for k in POOLED_FIELDS]
    for (folder, _), config in zip(plans_list, configs, strict=True):
        values = [getattr(config, k) for k in POOLED_FIELDS]
        if values != first:
            raise UserError(f"crop sizes differ between pooled datasets ({plans_list[0][0].name}: {first}, "
                            f"{folder.name}: {values})", file=folder / Plans.FILE,
                            fix="plan the datasets with the same crop sizes")
    return configs[0]


def plans_dependencies(plans_list: list[tuple[Path, Plans]], configuration: str) -> dict[str, dict]:
    """Per pooled dataset, the plans fields a run on ``configuration`` depends on (recorded in run.json)."""
    return {folder.name: plans.dependencies(configuration) for folder, plans in plans_list}


def config_from_plans(config: PretrainConfiguration, dist: DistInfo, console: Console, *, preset: str, iters: int,
                      batch_size: int | None, precision: str, snapshot_every: int | None, recipe_name: str = "auto",
                      recipe_overrides: dict | None = None, probe_every: int | None = None,
                      scale_iters: int | None = None, **fields) -> SSLRunConfig:
    """The run's :class:`SSLRunConfig`: crop sizes, batch and position grid from the plans' ``config``,
    the SSL recipe for the run's total batch and length.

    ``fields`` are the remaining :class:`SSLRunConfig` fields (datasets, configuration, base_lr, head_dims,
    seed, ...); ``precision`` is resolved for the device; ``snapshot_every`` and ``probe_every`` default to
    a tenth of ``iters``; ``recipe_name`` is ``auto`` or ``paper`` and ``recipe_overrides`` set single
    settings of it; ``scale_iters`` is the length its run-length rules judge (:mod:`threedino_pipe.ssl.recipe`).
    """
    if batch_size is None and preset != config.preset:
        console.print(f"note: plans.json sized batch {config.batch_size} for preset {config.preset}, not {preset}; "
                      "pass --batch-size to choose another")
    batch = batch_for_device(config.batch_size, batch_size, dist, CPU_BATCH_CAP, console)
    recipe = make_recipe(recipe_name, batch * dist.world_size, iters, fields["head_dims"]["out_dim"],
                         fields["base_lr"], dist.world_size, recipe_overrides or {}, scale_iters)
    return SSLRunConfig(
        preset=preset, iters=iters, batch_size=batch,
        global_crop=config.global_crop, local_crop=config.local_crop, num_local_crops=config.num_local_crops,
        min_axis=config.min_axis, precision=resolve_precision(precision, dist.device),
        pos_grid=config.global_crop // 16, world_size=dist.world_size, recipe=recipe.options(),
        recipe_reasons=dict(recipe.deviations),
        snapshot_every=max(1, iters // 10) if snapshot_every is None else snapshot_every,
        probe_every=max(1, iters // 10) if probe_every is None else probe_every, **fields)


def make_recipe(name: str, total_batch: int, iters: int, prototypes: int, base_lr: float, world_size: int,
                overrides: dict, scale_iters: int | None = None) -> SSLRecipe:
    """The ``auto`` or ``paper`` recipe with the user's single overrides (a UserError for bad values)."""
    if name not in RECIPES:
        raise UserError(f"unknown --recipe {name}", fix=f"use one of {', '.join(RECIPES)}")
    if name == "auto":
        recipe = configure(total_batch, iters, prototypes, base_lr, world_size, scale_iters)
    else:
        recipe = paper(total_batch, iters, prototypes, base_lr)
    try:
        return apply_overrides(recipe, overrides)
    except ValueError as exc:
        raise UserError(str(exc), fix=f"--centering and --ibot-centering take one of {', '.join(MODES)}") from None


def describe(config: SSLRunConfig) -> str:
    """One line: the recipe's name and its main settings."""
    r = config.ssl_recipe()
    queued = "sinkhorn_queue" in (r.centering, r.ibot_centering)
    queue = f" (queue {r.queue_size * config.world_size})" if queued else ""
    ibot = "" if r.ibot_centering == r.centering else f", iBOT {r.ibot_centering}"
    return (f"{r.recipe}: {r.prototypes} prototypes, peak lr {r.peak_lr:.3g}, teacher momentum {r.momentum_start:g} "
            f"-> 1, LayerScale {r.layerscale_init:g}, centring {r.centering}{ibot}{queue}")


def recipe_decisions(config: SSLRunConfig) -> dict:
    """What run.json records of the recipe: its name and every deviation from the paper with its reason."""
    recipe = config.ssl_recipe()
    return {"recipe": recipe.recipe, "deviations_from_paper": dict(recipe.deviations)}


def resolve_augment_device(requested: str, device: torch.device) -> dict[str, str]:
    """``--augment-device``: ``{"implementation": "cpu-monai" | "torch", "reason": ...}`` (run.json's decisions).

    ``auto`` picks the batched torch augmentations when training on a GPU (CPU workers running MONAI
    cannot feed one) and MONAI, the reference, in the data-loading workers on a CPU.
    """
    if requested not in AUGMENT_DEVICES:
        raise UserError(f"unknown --augment-device {requested}", fix=f"use one of {', '.join(AUGMENT_DEVICES)}")
    if requested != "auto":
        return {"implementation": requested, "reason": f"--augment-device {requested}"}
    if device.type == "cuda":
        return {"implementation": "torch", "reason": f"auto: training on {device}; the batched torch augmentations "
                "run there (MONAI in CPU workers makes a fraction of the crops a GPU consumes)"}
    return {"implementation": "cpu-monai", "reason": f"auto: training on the {device.type}; the MONAI pipelines "
            "(the reference) run in the data-loading workers"}


def budget_iterations(folder: Path, hours: float, restart: bool, make_config: Callable[[int], SSLRunConfig],
                      dataset_folders: list[Path], dist: DistInfo, console: Console) -> BudgetRecord:
    """The iterations that fit ``hours`` (``--budget-hours``).

    A run folder made with the same budget keeps its recorded count (a resume measures nothing);
    otherwise a throwaway copy of the run takes ``BUDGET_WARMUP`` untimed and ``BUDGET_STEPS`` timed
    steps (the slowest rank's time under torchrun) and the budget is divided by the step time. Data
    loading, checkpoints and probes are inside or beside the steps, so the run may end a few percent
    late or early; run.json records the measurement.
    """
    if hours <= 0:
        raise UserError(f"--budget-hours {hours} must be positive", fix="pass e.g. --budget-hours 2")
    path = folder / RunRecord.FILE
    if path.is_file() and not restart:
        recorded = RunRecord.read(path, rerun="the same command with --restart")
        if recorded.budget is not None and recorded.budget.hours == hours:
            return recorded.budget
    config = make_config(BUDGET_PLACEHOLDER_ITERS)
    config.probe_every = 0
    task = SSLTask(config, dataset_folders, dist)
    try:
        for it in range(BUDGET_WARMUP):
            task.step(it)
        tick = time.perf_counter()
        for it in range(BUDGET_WARMUP, BUDGET_WARMUP + BUDGET_STEPS):
            task.step(it)
        seconds = torch.tensor([(time.perf_counter() - tick) / BUDGET_STEPS])
    finally:
        task.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    step = max(round(float(seconds), 4), 1e-4)  # as recorded, so the count can be checked from run.json
    budget = BudgetRecord(hours=hours, measured_step_seconds=step, measured_steps=BUDGET_STEPS,
                          iters=max(1, int(hours * 3600 / step)))
    if dist.is_main:
        console.print(f"--budget-hours {hours:g}: a step takes {step:.2f} s here (mean of {BUDGET_STEPS} after "
                      f"{BUDGET_WARMUP} untimed): {budget.iters} iterations")
    return budget


def finished_already(folder: Path, resume: bool, stop_after: int | None, console: Console) -> bool:
    """True (and says so) when the run in ``folder`` already holds ``checkpoint_final.pt``."""
    if (folder / "checkpoint_final.pt").is_file() and resume and not stop_after:
        console.print(f"{folder} is finished already (checkpoint_final.pt); pass --restart to train again")
        return True
    return False


def source_checkpoint(run_dir: Path, iteration: int | None) -> Path:
    """The checkpoint of a pretrain run to start from: ``checkpoint_<iteration>.pt``, else final, else latest."""
    if iteration is not None:
        path = run_dir / f"checkpoint_{iteration}.pt"
        if not path.is_file():
            snaps = sorted(p.name for p in run_dir.glob("checkpoint_[0-9]*.pt"))
            raise UserError(f"no snapshot at iteration {iteration} (snapshots: {', '.join(snaps) or 'none'})",
                            file=path, fix="pass --iteration of an existing snapshot, or leave it out")
        return path
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise UserError("the pretrain run has no checkpoint yet", file=run_dir, fix="run `3dino pretrain` first")
