"""``3dino pretrain``: self-supervised pretraining (3DINO, SimMIM or Tang et al.) on pooled preprocessed datasets.

Reads each dataset's ``plans.json`` (configuration ``pretrain``) and ``pretrain/`` arrays; writes
``<results>/pretrain/<run>/`` (docs/architecture.md, the stage contract). A rerun of the same command resumes; one
with other options refuses (``--run`` / ``--restart``). ``--method`` picks the objective: ``dino`` (3DINO,
:mod:`threedino_pipe.training.ssl_trainer`) ``simmim`` (:mod:`threedino_pipe.training.simmim_trainer`) or ``tang``
(:mod:`threedino_pipe.training.tang_trainer`, ``--arch vit|swin``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import RunRecord
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.distributed import DistInfo, cleanup, init_distributed
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import PRECISIONS
from threedino_pipe.runtime.progress import stderr_console
from threedino_pipe.training.pretrain_run import train_run
from threedino_pipe.training.run_setup import dataset_plans, run_folder, run_lock
from threedino_pipe.training.simmim_setup import check_method, simmim_augmentations, simmim_config
from threedino_pipe.training.simmim_trainer import SimMIMRunConfig
from threedino_pipe.training.ssl_model import HEAD_DIMS
from threedino_pipe.training.ssl_setup import (
    budget_iterations,
    config_from_plans,
    describe,
    plans_dependencies,
    pooled_configuration,
    recipe_decisions,
    resolve_augment_device,
)
from threedino_pipe.training.ssl_trainer import SSLRunConfig
from threedino_pipe.training.tang_setup import tang_augmentations, tang_config
from threedino_pipe.training.tang_trainer import TangRunConfig
from threedino_pipe.training_data.augment_params import INTENSITY_PROB

logger = logging.getLogger(__name__)


def run(datasets: list[str], *, preset: str | None = None, iters: int = 125_000, batch_size: int | None = None,
        run_name: str | None = None, stop_after: int | None = None, restart: bool = False, seed: int = 0,
        num_workers: int = 2, device: str = "auto", precision: str = "auto", drop_path: float | None = None,
        koleo_weight: float = 0.1, base_lr: float = 0.002, prototypes: int | None = None,
        save_every: int = 100, snapshot_every: int | None = None, grad_checkpointing: bool = False,
        recipe: str = "auto", recipe_overrides: dict | None = None, probe_every: int | None = None,
        budget_hours: float | None = None, augment_device: str = "auto", method: str = "dino",
        mask_ratio: float | None = None, intensity_prob: float = INTENSITY_PROB, arch: str = "vit") -> Path:
    """Pretrain a 3D ViT with 3DINO (``method`` ``dino``) or SimMIM (``simmim``) on the pooled ``datasets``;
    returns the run folder.

    ``drop_path`` None is the method's (0.3 for 3DINO, 0.1 for SimMIM); ``mask_ratio`` (SimMIM only) None is 0.6.
    Under ``simmim`` the 3DINO-only options (KoLeo, base lr, prototypes, recipe, centring, teacher settings,
    ``budget_hours``) are refused when set; ``recipe_overrides`` may set ``peak_lr``, ``warmup_iters`` and
    ``layerscale_init``. ``method`` ``tang`` (Tang et al.'s inpainting, rotation and contrastive self-supervision)
    refuses the same 3DINO-only options; ``arch`` (``vit`` or, only under tang, ``swin``) picks its encoder.

    ``recipe`` ``auto`` adapts the paper's settings to the run's batch and length, ``paper`` keeps them
    (:mod:`threedino_pipe.ssl.recipe`); ``recipe_overrides`` sets single settings (None = the recipe's).
    ``probe_every`` (default a tenth of the run; 0 = never) runs the patch probe when a pooled dataset is
    labelled. ``budget_hours`` replaces ``iters`` by what fits, from the step time measured at the start.
    ``augment_device`` ``auto`` augments with batched torch on a GPU, with MONAI in the workers on a CPU
    (``cpu-monai`` / ``torch`` force one; the choice is recorded in run.json's decisions).
    ``intensity_prob`` (3DINO only) is the probability of the augmentations' intensity step (the method: 0.8).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision}", fix=f"use one of {', '.join(PRECISIONS)}")
    overrides = {k: v for k, v in (recipe_overrides or {}).items() if v is not None}
    check_method(method, {"--koleo-weight": koleo_weight, "--base-lr": base_lr, "--prototypes": prototypes,
                          "--recipe": recipe, "--centering": overrides.get("centering"),
                          "--queue-size": overrides.get("queue_size"),
                          "--ibot-centering": overrides.get("ibot_centering"),
                          "--freeze-last-layer-iters": overrides.get("freeze_last_layer_iters"),
                          "--momentum-start": overrides.get("momentum_start"),
                          "--teacher-temp": overrides.get("teacher_temp_end"), "--budget-hours": budget_hours,
                          "--intensity-prob": intensity_prob},
                 mask_ratio, arch)
    console = stderr_console()
    plans_list = [dataset_plans(d) for d in datasets]
    config = pooled_configuration(plans_list, "pretrain")
    preset = preset or config.preset
    if preset not in HEAD_DIMS:
        raise UserError(f"unknown --preset {preset}", fix=f"use one of {', '.join(HEAD_DIMS)}")
    names = [folder.name for folder, _ in plans_list]
    ids = "+".join(str(paths.dataset_id(n)) for n in names)
    label = preset if method == "dino" else f"{preset}__{method}" if method == "simmim" else \
        f"{preset}__{method}-{arch}"  # existing 3DINO runs keep their folders; tang's name its encoder
    folder = run_folder(paths.results_root() / "pretrain", run_name, f"{label}__{ids}")
    dist = init_distributed(device)
    held = contextlib.ExitStack()
    try:
        if method in ("simmim", "tang"):
            augmentations = (simmim_augmentations if method == "simmim" else tang_augmentations)(augment_device)
            method_config = simmim_config if method == "simmim" else tang_config
            extra = {"mask_ratio": mask_ratio} if method == "simmim" else {"arch": arch}
            run_config, decisions = method_config(
                config, dist, console, preset=preset, iters=iters, batch_size=batch_size, precision=precision,
                snapshot_every=snapshot_every, probe_every=probe_every, drop_path=drop_path, overrides=overrides,
                datasets=names, configuration="pretrain", seed=seed, **extra, num_workers=num_workers,
                save_every=save_every, grad_checkpointing=grad_checkpointing,
                augment_device=augmentations["implementation"])
            held.enter_context(run_lock(folder, dist))
            record = RunRecord(stage="pretrain", options=run_config.options(), volatile=list(run_config.VOLATILE),
                               plans=plans_dependencies(plans_list, "pretrain"),
                               decisions={**decisions, "augmentations": augmentations})
            return _train(folder, record, run_config, plans_list, dist, console, restart, stop_after)
        augmentations = resolve_augment_device(augment_device, dist.device)
        held.enter_context(run_lock(folder, dist))
        head_dims = dict(HEAD_DIMS[preset])
        if prototypes:
            head_dims["out_dim"] = int(prototypes)

        def make_config(n_iters: int) -> SSLRunConfig:
            return config_from_plans(
                config, dist, console, datasets=names, configuration="pretrain", preset=preset, iters=n_iters,
                batch_size=batch_size, base_lr=base_lr, seed=seed, precision=precision,
                drop_path=0.3 if drop_path is None else drop_path,
                koleo_weight=koleo_weight, head_dims=head_dims, num_workers=num_workers, save_every=save_every,
                snapshot_every=snapshot_every, grad_checkpointing=grad_checkpointing, recipe_name=recipe,
                recipe_overrides=recipe_overrides or {}, probe_every=probe_every,
                augment_device=augmentations["implementation"], intensity_prob=intensity_prob)
            held.enter_context(run_lock(folder, dist))

        budget = None
        if budget_hours is not None:
            budget = budget_iterations(folder, budget_hours, restart, make_config, [f for f, _ in plans_list], dist,
                                       console)
            iters = budget.iters
        run_config = make_config(iters)
        record = RunRecord(stage="pretrain", options={**run_config.options(), "budget_hours": budget_hours},
                           volatile=list(SSLRunConfig.VOLATILE), plans=plans_dependencies(plans_list, "pretrain"),
                           decisions={**recipe_decisions(run_config), "method": "dino", "backbone_family": "vit3d",
                                      "augmentations": augmentations},
                           budget=budget)
        return _train(folder, record, run_config, plans_list, dist, console, restart, stop_after)
    finally:
        held.close()
        cleanup()


def _train(folder: Path, record: RunRecord, run_config: SSLRunConfig | SimMIMRunConfig | TangRunConfig,
           plans_list: list, dist: DistInfo, console: Console, restart: bool, stop_after: int | None) -> Path:
    """Open (or resume) the run folder with ``record`` and train the run's method into it."""
    if isinstance(run_config, TangRunConfig):
        what = f"Tang et al. (inpainting, rotation, contrastive), encoder {run_config.arch}, " \
               f"peak lr {run_config.peak_lr:.3g}"
    elif isinstance(run_config, SimMIMRunConfig):
        what = f"SimMIM, mask ratio {run_config.mask_ratio:g}, peak lr {run_config.peak_lr:.3g}"
    else:
        what = f"3DINO, recipe {describe(run_config)}"

    def announce(resume: bool) -> str:
        return (f"pretrain run {folder} ({'resuming' if resume else 'new'}): preset {run_config.preset}, "
                f"{run_config.iters} iterations, batch {run_config.batch_size} x {dist.world_size} process(es), "
                f"{run_config.precision}, device {dist.device}, augmentations {run_config.augment_device}, {what}")

    train_run(folder, record, run_config, [f for f, _ in plans_list], dist, console, restart=restart,
              stop_after=stop_after, announce=announce)
    if dist.is_main:
        console.print(f"[green]pretrain[/]: {folder}")
    return folder
