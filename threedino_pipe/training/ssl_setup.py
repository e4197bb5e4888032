"""Set-up shared by ``pretrain`` and ``adapt-highres``: pooled plans, the run config, the source checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import Plans, PretrainConfiguration
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import resolve_precision
from threedino_pipe.training.run_setup import batch_for_device
from threedino_pipe.training.ssl_trainer import SSLRunConfig

CPU_BATCH_CAP = 4
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
                      batch_size: int | None, precision: str, snapshot_every: int | None, **fields) -> SSLRunConfig:
    """The run's :class:`SSLRunConfig`: crop sizes, batch and position grid from the plans' ``config``.

    ``fields`` are the remaining :class:`SSLRunConfig` fields (datasets, configuration, lr, seed, ...);
    ``precision`` is resolved for the device, ``snapshot_every`` defaults to a tenth of ``iters``.
    """
    if batch_size is None and preset != config.preset:
        console.print(f"note: plans.json sized batch {config.batch_size} for preset {config.preset}, not {preset}; "
                      "pass --batch-size to choose another")
    return SSLRunConfig(
        preset=preset, iters=iters,
        batch_size=batch_for_device(config.batch_size, batch_size, dist, CPU_BATCH_CAP, console),
        global_crop=config.global_crop, local_crop=config.local_crop, num_local_crops=config.num_local_crops,
        min_axis=config.min_axis, precision=resolve_precision(precision, dist.device),
        pos_grid=config.global_crop // 16, world_size=dist.world_size,
        snapshot_every=max(1, iters // 10) if snapshot_every is None else snapshot_every, **fields)


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
