"""``3dino pretrain``: 3DINO self-supervised pretraining on pooled preprocessed datasets.

Reads each dataset's ``plans.json`` (configuration ``pretrain``) and ``pretrain/`` arrays; writes
``<results>/pretrain/<run>/`` (DESIGN.md section 2). A rerun of the same command resumes; one
with other options refuses (``--run`` / ``--restart``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from rich.console import Console

from threedino_pipe import paths
from threedino_pipe.errors import UserError
from threedino_pipe.jsonio import read_artifact
from threedino_pipe.training.distributed import DistInfo, barrier, cleanup, init_distributed
from threedino_pipe.training.precision import PRECISIONS, resolve_precision
from threedino_pipe.training.run_folder import prepare_run_folder
from threedino_pipe.training.ssl_model import HEAD_DIMS
from threedino_pipe.training.ssl_trainer import SSLRunConfig, train_ssl

logger = logging.getLogger(__name__)
CPU_BATCH_CAP = 4
PLANS_SCHEMA_VERSION = 1


def load_plans(spec: str) -> tuple[Path, dict, str]:
    """Preprocessed folder, plans and plans checksum of dataset ``spec`` (id or name)."""
    folder = paths.resolve_preprocessed(spec)
    plans_path = folder / "plans.json"
    if not plans_path.is_file():
        raise UserError("plans.json is missing", file=plans_path, fix=f"run `3dino plan -d {spec}` and "
                        f"`3dino preprocess -d {spec}` first")
    plans = read_artifact(plans_path, "plans", PLANS_SCHEMA_VERSION, rerun=f"3dino plan -d {spec}")
    return folder, plans, hashlib.sha256(plans_path.read_bytes()).hexdigest()[:16]


def configuration_of(plans_list: list[tuple[Path, dict, str]], name: str) -> dict:
    """The pooled datasets' ``name`` configuration; crop sizes must agree across datasets."""
    configs = []
    for folder, plans, _ in plans_list:
        config = plans["configurations"].get(name)
        if config is None:
            raise UserError(f"plans.json has no '{name}' configuration", file=folder / "plans.json",
                            fix=f"rerun `3dino plan -d {folder.name}`")
        if not (folder / name).is_dir():
            raise UserError(f"the '{name}' configuration is not preprocessed", file=folder / name,
                            fix=f"run `3dino preprocess -d {folder.name} -c {name}`")
        configs.append(config)
    keys = ("global_crop", "local_crop", "num_local_crops", "min_axis")
    for folder_plans, config in zip(plans_list, configs, strict=True):
        if any(config[k] != configs[0][k] for k in keys):
            raise UserError(f"crop sizes differ between pooled datasets ({plans_list[0][0].name}: "
                            f"{[configs[0][k] for k in keys]}, {folder_plans[0].name}: {[config[k] for k in keys]})",
                            file=folder_plans[0] / "plans.json", fix="plan the datasets with the same crop sizes")
    return configs[0]


def default_batch(config: dict, preset: str, dist: DistInfo, requested: int | None, console: Console) -> int:
    """``--batch-size``, else the plans' batch (planned for a GPU memory target), capped on CPU."""
    if requested is not None:
        return requested
    batch = int(config["batch_size"])
    if preset != config["preset"]:
        console.print(f"note: plans.json sized batch {batch} for preset {config['preset']}, not {preset}; "
                      "pass --batch-size to choose another")
    if dist.device.type == "cpu" and batch > CPU_BATCH_CAP:
        console.print(f"note: running on the CPU: batch per process capped at {CPU_BATCH_CAP} (plans.json says "
                      f"{batch} for a GPU); pass --batch-size to override")
        batch = CPU_BATCH_CAP
    return batch


def run(datasets: list[str], *, preset: str | None = None, iters: int = 125_000, batch_size: int | None = None,
        run_name: str | None = None, stop_after: int | None = None, restart: bool = False, seed: int = 0,
        num_workers: int = 2, device: str = "auto", precision: str = "auto", drop_path: float = 0.3,
        koleo_weight: float = 0.1, base_lr: float = 0.002, prototypes: int | None = None,
        save_every: int = 100, snapshot_every: int | None = None, grad_checkpointing: bool = False) -> Path:
    """Pretrain a 3D ViT with 3DINO on the pooled ``datasets``; returns the run folder."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision}", fix=f"use one of {', '.join(PRECISIONS)}")
    console = Console(stderr=True)
    plans_list = [load_plans(d) for d in datasets]
    config = configuration_of(plans_list, "pretrain")
    preset = preset or config["preset"]
    if preset not in HEAD_DIMS:
        raise UserError(f"unknown --preset {preset}", fix=f"use one of {', '.join(HEAD_DIMS)}")
    dist = init_distributed(device)
    try:
        names = [folder.name for folder, _, _ in plans_list]
        head_dims = dict(HEAD_DIMS[preset])
        if prototypes:
            head_dims["out_dim"] = int(prototypes)
        run_config = config_from_plans(
            config, dist, console, datasets=names, configuration="pretrain", preset=preset, iters=iters,
            batch_size=batch_size, base_lr=base_lr, seed=seed, precision=precision, drop_path=drop_path,
            koleo_weight=koleo_weight, head_dims=head_dims, num_workers=num_workers, save_every=save_every,
            snapshot_every=snapshot_every, grad_checkpointing=grad_checkpointing)
        ids = "+".join(str(paths.dataset_id(n)) for n in names)
        folder = paths.results_root() / "pretrain" / (run_name or f"{preset}__{ids}")
        options = {**run_config.options(), "plans_checksums": {n: c for (_, _, c), n in zip(plans_list, names,
                                                                                         strict=True)}}
        resume = _prepare(folder, options, restart, dist, SSLRunConfig.VOLATILE)
        if finished_already(folder, resume, stop_after, console):
            return folder
        if dist.is_main:
            console.print(f"pretrain run {folder} ({'resuming' if resume else 'new'}): preset {preset}, "
                          f"{iters} iterations, batch {run_config.batch_size} x {dist.world_size} process(es), "
                          f"{run_config.precision}, device {dist.device}")
        train_ssl(run_config, folder, [f for f, _, _ in plans_list], dist, resume=resume, stop_after=stop_after)
        if dist.is_main:
            console.print(f"[green]pretrain[/]: {folder}")
        return folder
    finally:
        cleanup()


def config_from_plans(config: dict, dist: DistInfo, console: Console, *, preset: str, iters: int,
                      batch_size: int | None, precision: str, snapshot_every: int | None, **fields) -> SSLRunConfig:
    """The run's :class:`SSLRunConfig`: crop sizes, batch and position grid from the plans' ``config``.

    ``fields`` are the remaining :class:`SSLRunConfig` fields (datasets, configuration, lr, seed, ...);
    ``precision`` is resolved for the device, ``snapshot_every`` defaults to a tenth of ``iters``.
    """
    return SSLRunConfig(
        preset=preset, iters=iters, batch_size=default_batch(config, preset, dist, batch_size, console),
        global_crop=config["global_crop"], local_crop=config["local_crop"], num_local_crops=config["num_local_crops"],
        min_axis=config["min_axis"], precision=resolve_precision(precision, dist.device),
        pos_grid=config["global_crop"] // 16, world_size=dist.world_size,
        snapshot_every=max(1, iters // 10) if snapshot_every is None else snapshot_every, **fields)


def finished_already(folder: Path, resume: bool, stop_after: int | None, console: Console) -> bool:
    """True (and says so) when the run in ``folder`` already holds ``checkpoint_final.pt``."""
    if (folder / "checkpoint_final.pt").is_file() and resume and not stop_after:
        console.print(f"{folder} is finished already (checkpoint_final.pt); pass --restart to train again")
        return True
    return False


def _prepare(folder: Path, options: dict, restart: bool, dist: DistInfo, volatile: tuple[str, ...]) -> bool:
    """Rank 0 creates or checks the run folder first; the other ranks then read it."""
    resume = False
    if dist.is_main:
        resume = prepare_run_folder(folder, options, restart=restart, volatile=volatile)
    barrier()
    if not dist.is_main:
        resume = prepare_run_folder(folder, options, volatile=volatile)
    return resume
