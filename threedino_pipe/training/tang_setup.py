"""Set-up of a ``3dino pretrain --method tang`` run: the options it refuses, its augmentations and its run config."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from threedino_pipe.artifacts import PretrainConfiguration
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import resolve_precision
from threedino_pipe.training.run_setup import batch_for_device
from threedino_pipe.training.simmim_setup import worker_augmentations
from threedino_pipe.training.ssl_setup import CPU_BATCH_CAP
from threedino_pipe.training.tang_trainer import DROP_PATH, PEAK_LR, WARMUP_ITERS, TangRunConfig


def tang_augmentations(requested: str) -> dict[str, str]:
    """``--augment-device`` under tang: run.json's ``decisions.augmentations``."""
    return worker_augmentations(requested, "tang", "crops in the data-loading workers and rotates and cuts out "
                                "its crops itself", "two plain crops per volume in the data-loading workers; the "
                                "rotations and cutouts are drawn in the training process, seeded by the iteration")


def tang_config(config: PretrainConfiguration, dist: DistInfo, console: Console, *, preset: str, iters: int,
                batch_size: int | None, precision: str, snapshot_every: int | None, probe_every: int | None,
                drop_path: float | None, overrides: dict[str, Any], **fields) -> tuple[TangRunConfig, dict]:
    """The run's :class:`TangRunConfig` from the plans' ``config`` and the options; and run.json's decisions.

    ``overrides`` are the user's ``peak_lr`` and ``warmup_iters`` (None = Tang et al.'s); ``--layerscale-init``
    is refused (neither MONAI's ViT nor its Swin encoder has LayerScale). ``fields``: the rest (datasets,
    configuration, seed, arch, num_workers, save_every, ...).
    """
    if overrides.get("layerscale_init") is not None:
        raise UserError("--layerscale-init: --method tang trains encoders without LayerScale (as MONAI's ViT "
                        "and Swin encoder)", fix="leave --layerscale-init out with --method tang")
    batch = batch_for_device(config.batch_size, batch_size, dist, CPU_BATCH_CAP, console)
    peak_lr, warmup = overrides.get("peak_lr"), overrides.get("warmup_iters")
    arch = fields.get("arch", "vit")
    decisions = {
        "peak_lr": "set by the user" if peak_lr is not None else "Tang et al.'s 4e-4 (not scaled with the batch)",
        "warmup_iters": "set by the user" if warmup is not None else
        "Tang et al.'s 500 iterations, at most a tenth of the run",
        "two_crops_per_volume": f"the plans' global crop ({config.global_crop}^3 voxels), two per volume and "
        "iteration, each rotated and cut out on its own",
        "encoder": "our 3D ViT (the paper's MONAI-ViT)" if arch == "vit" else
        "MONAI's SwinUNETR(...).swinViT (the paper's Swin Transfer-FD)",
    }
    run_config = TangRunConfig(
        preset=preset, iters=iters, batch_size=batch, global_crop=config.global_crop, min_axis=config.min_axis,
        peak_lr=float(peak_lr if peak_lr is not None else PEAK_LR),
        warmup_iters=int(warmup if warmup is not None else min(WARMUP_ITERS, round(0.1 * iters))),
        precision=resolve_precision(precision, dist.device), drop_path=DROP_PATH if drop_path is None else drop_path,
        world_size=dist.world_size, snapshot_every=max(1, iters // 10) if snapshot_every is None else snapshot_every,
        probe_every=(max(1, iters // 10) if probe_every is None else probe_every) if arch == "vit" else 0, **fields)
    if run_config.warmup_iters > iters:
        raise UserError(f"--warmup-iters {run_config.warmup_iters} is longer than --iters {iters}",
                        fix="pass a shorter --warmup-iters or more --iters")
    if batch < 2:
        console.print("[yellow]note[/]: with one volume per process the contrastive term has no negatives "
                      "(it is constant); pass --batch-size 2 or more")
    family = "vit3d" if arch == "vit" else "swin"
    return run_config, {"method": "tang", "arch": arch, "backbone_family": family, "tang": decisions}
