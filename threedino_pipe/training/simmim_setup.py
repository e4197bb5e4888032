"""Set-up of a ``3dino pretrain --method simmim`` run: the options it takes, refuses, and its run config."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from threedino_pipe.artifacts import PretrainConfiguration
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import resolve_precision
from threedino_pipe.training.run_setup import batch_for_device
from threedino_pipe.training.simmim_trainer import (
    DROP_PATH,
    LAYERSCALE_INIT,
    MASK_RATIO,
    WARMUP_FRACTION,
    SimMIMRunConfig,
    simmim_peak_lr,
)
from threedino_pipe.training.ssl_setup import CPU_BATCH_CAP

METHODS = ("dino", "simmim", "tang")
ARCHS = ("vit", "swin")  # --arch: the encoder; only --method tang trains MONAI's Swin encoder
# 3DINO's own options (CLI name -> the value that means "not given"): SimMIM and Tang et al. have no teacher,
# heads or recipe
DINO_ONLY = {"--koleo-weight": 0.1, "--base-lr": 0.002, "--prototypes": None, "--recipe": "auto",
             "--centering": None, "--queue-size": None, "--momentum-start": None, "--teacher-temp": None,
             "--ibot-centering": None, "--freeze-last-layer-iters": None, "--budget-hours": None,
             "--intensity-prob": 0.8}
OWN_SETTINGS = {"simmim": "--peak-lr, --warmup-iters, --layerscale-init, --drop-path, --mask-ratio",
                "tang": "--arch, --peak-lr, --warmup-iters, --drop-path"}


def check_method(method: str, given: dict[str, Any], mask_ratio: float | None, arch: str = "vit") -> None:
    """Refuse an unknown ``--method`` or ``--arch``, 3DINO-only options under simmim and tang, ``--mask-ratio``
    under dino and tang, and ``--arch swin`` under any method but tang.

    ``given`` maps the CLI names of :data:`DINO_ONLY` to the values passed.
    """
    if method not in METHODS:
        raise UserError(f"unknown --method {method}", fix=f"use one of {', '.join(METHODS)}")
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch}", fix=f"use one of {', '.join(ARCHS)}")
    if arch != "vit" and method != "tang":
        raise UserError(f"--arch {arch}: --method {method} trains the 3D ViT only",
                        fix="leave --arch out, or pass --method tang (Tang et al.'s recipe trains MONAI's Swin "
                        "encoder)")
    if method != "simmim" and mask_ratio is not None:
        raise UserError(f"--mask-ratio is SimMIM's option (--method {method} draws its own masks)",
                        fix="pass --method simmim, or leave --mask-ratio out")
    if method == "dino":
        return
    passed = [name for name, default in DINO_ONLY.items() if given.get(name, default) != default]
    if passed:
        raise UserError(f"{', '.join(passed)} {'is a 3DINO option' if len(passed) == 1 else 'are 3DINO options'}; "
                        f"--method {method} has no teacher, prototypes, KoLeo term, recipe or step-time budget",
                        fix=f"leave {', '.join(passed)} out with --method {method} (its settings: "
                        f"{OWN_SETTINGS[method]})")
    if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
        raise UserError(f"--mask-ratio {mask_ratio} must lie strictly between 0 and 1",
                        fix=f"pass e.g. --mask-ratio {MASK_RATIO} (SimMIM's)")


def worker_augmentations(requested: str, method: str, what: str, reason: str) -> dict[str, str]:
    """``--augment-device`` of a method whose crops are made in the data-loading workers only (simmim, tang):
    run.json's ``decisions.augmentations``; anything but ``auto``/``cpu-monai`` is refused, saying ``what``."""
    if requested not in ("auto", "cpu-monai"):
        raise UserError(f"--augment-device {requested}: --method {method} {what}",
                        fix=f"leave --augment-device out with --method {method}")
    return {"implementation": "cpu-monai", "reason": f"{method}: {reason}"}


def simmim_augmentations(requested: str) -> dict[str, str]:
    """``--augment-device`` under simmim: run.json's ``decisions.augmentations`` (only the loader's workers)."""
    return worker_augmentations(requested, "simmim", "augments its crops with flips and rotations in the "
                                "data-loading workers", "one crop per volume with flips and 90-degree rotations "
                                "only, cheap enough for the data-loading workers on any device")


def simmim_config(config: PretrainConfiguration, dist: DistInfo, console: Console, *, preset: str, iters: int,
                  batch_size: int | None, precision: str, snapshot_every: int | None, probe_every: int | None,
                  drop_path: float | None, overrides: dict[str, Any], **fields) -> tuple[SimMIMRunConfig, dict]:
    """The run's :class:`SimMIMRunConfig` from the plans' ``config`` and the options; and run.json's decisions.

    ``overrides`` are the user's ``peak_lr``, ``warmup_iters`` and ``layerscale_init`` (None = SimMIM's);
    ``fields`` the rest (datasets, configuration, seed, mask_ratio, num_workers, save_every, ...).
    """
    batch = batch_for_device(config.batch_size, batch_size, dist, CPU_BATCH_CAP, console)
    total = batch * dist.world_size
    peak_lr, warmup = overrides.get("peak_lr"), overrides.get("warmup_iters")
    layerscale = overrides.get("layerscale_init")
    decisions = {
        "peak_lr": "set by the user" if peak_lr is not None else
        f"SimMIM's 1e-4 per 512 volumes scaled linearly to the total batch {total}, at least 1e-4",
        "one_crop_per_volume": f"the plans' global crop ({config.global_crop}^3 voxels), one per volume and "
        "iteration; no local crops",
    }
    mask_ratio = fields.pop("mask_ratio", None)
    run_config = SimMIMRunConfig(
        preset=preset, iters=iters, batch_size=batch, global_crop=config.global_crop, min_axis=config.min_axis,
        peak_lr=float(peak_lr if peak_lr is not None else simmim_peak_lr(total)),
        warmup_iters=int(warmup if warmup is not None else round(WARMUP_FRACTION * iters)),
        mask_ratio=float(MASK_RATIO if mask_ratio is None else mask_ratio),
        precision=resolve_precision(precision, dist.device), drop_path=DROP_PATH if drop_path is None else drop_path,
        layerscale_init=LAYERSCALE_INIT if layerscale is None else float(layerscale),
        pos_grid=config.global_crop // 16, world_size=dist.world_size,
        snapshot_every=max(1, iters // 10) if snapshot_every is None else snapshot_every,
        probe_every=max(1, iters // 10) if probe_every is None else probe_every, **fields)
    if run_config.warmup_iters > iters:
        raise UserError(f"--warmup-iters {run_config.warmup_iters} is longer than --iters {iters}",
                        fix="pass a shorter --warmup-iters or more --iters")
    return run_config, {"method": "simmim", "backbone_family": "vit3d", "simmim": decisions}
