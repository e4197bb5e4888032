"""``3dino adapt-highres``: continue a pretrain run at high resolution (docs/method.md).

Starts from a pretrain run's checkpoint (final, latest, or a snapshot with ``--iteration``),
interpolates the stored position embedding from the 6^3 to the 7^3 grid, and trains on the
``pretrain_highres`` configuration (112^3 / 64^3 crops, volumes with min axis > 48) with every
schedule restarted and compressed to its own length, base lr 0.001. Writes
``<results>/pretrain/<run>__highres/`` with the same files as pretrain.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from threedino_pipe.artifacts import Fingerprint, Plans, PretrainConfiguration, RunRecord
from threedino_pipe.planning.planner import cases_passing, largest_smallest_axis
from threedino_pipe.runtime.checkpoints import load_checkpoint
from threedino_pipe.runtime.distributed import cleanup, init_distributed
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import stderr_console
from threedino_pipe.training.pretrain_run import train_run
from threedino_pipe.training.run_setup import dataset_plans, run_folder, run_lock
from threedino_pipe.training.simmim_setup import simmim_augmentations, simmim_config
from threedino_pipe.training.simmim_trainer import SimMIMRunConfig, build_simmim_network
from threedino_pipe.training.ssl_setup import (
    config_from_plans,
    describe,
    plans_dependencies,
    pooled_configuration,
    recipe_decisions,
    resolve_augment_device,
    source_checkpoint,
)
from threedino_pipe.training.ssl_trainer import SSLRunConfig, load_ssl_pair
from threedino_pipe.training_data.pretrain_loader import PretrainDataset


def run(from_run: Path, *, iteration: int | None = None, iters: int = 12_500, run_name: str | None = None,
        batch_size: int | None = None, base_lr: float = 0.001, stop_after: int | None = None,
        restart: bool = False, num_workers: int = 2, device: str = "auto", precision: str = "auto",
        save_every: int = 100, snapshot_every: int | None = None, grad_checkpointing: bool = False,
        probe_every: int | None = None, augment_device: str = "auto") -> Path:
    """Adapt a pretrain run to 112^3 / 64^3 crops; returns the new run folder.

    The SSL recipe (``auto`` or ``paper``, as the source run) is configured anew for this run's batch
    and length, its run-length rules judged by the source run's length (the network is trained
    already); ``probe_every`` and ``augment_device`` as in ``pretrain``.
    """
    from_run = Path(from_run)
    source = RunRecord.read(from_run / RunRecord.FILE, rerun="3dino pretrain")
    if source.options.get("method") == "simmim":
        if base_lr != 0.001:
            raise UserError("--base-lr is a 3DINO option; a SimMIM run continues with SimMIM's learning-rate rule",
                            file=from_run / RunRecord.FILE, fix="leave --base-lr out for a --method simmim run")
        return _adapt_simmim(from_run, source, iteration=iteration, iters=iters, run_name=run_name,
                             batch_size=batch_size, stop_after=stop_after, restart=restart, num_workers=num_workers,
                             device=device, precision=precision, save_every=save_every, snapshot_every=snapshot_every,
                             grad_checkpointing=grad_checkpointing, probe_every=probe_every,
                             augment_device=augment_device)
    recorded = SSLRunConfig.from_options(source.options)
    checkpoint_path, plans_list, config = _sources(from_run, recorded, iteration)
    console = stderr_console()
    dist = init_distributed(device)
    held = contextlib.ExitStack()
    try:
        augmentations = resolve_augment_device(augment_device, dist.device)
        state = load_checkpoint(checkpoint_path, rerun="3dino pretrain")
        src_config, student, teacher = load_ssl_pair(state)
        grid = config.global_crop // 16
        for net in (student, teacher):
            net.backbone.interpolate_pos_embed_to(grid)
        run_config = config_from_plans(
            config, dist, console, datasets=recorded.datasets, configuration="pretrain_highres",
            preset=src_config.preset, iters=iters, batch_size=batch_size, base_lr=base_lr, seed=src_config.seed,
            precision=precision, drop_path=src_config.drop_path, koleo_weight=src_config.koleo_weight,
            head_dims=src_config.head_dims, init_from=f"{from_run.name}/{checkpoint_path.name}@{state['iteration']}",
            num_workers=num_workers, save_every=save_every, snapshot_every=snapshot_every,
            grad_checkpointing=grad_checkpointing, recipe_name=src_config.ssl_recipe().recipe,
            probe_every=probe_every, scale_iters=src_config.iters, augment_device=augmentations["implementation"],
            intensity_prob=src_config.intensity_prob)
        folder = run_folder(from_run.parent, run_name, f"{from_run.name}__highres")
        held.enter_context(run_lock(folder, dist))
        record = RunRecord(stage="adapt-highres", options=run_config.options(), volatile=list(SSLRunConfig.VOLATILE),
                           plans=plans_dependencies(plans_list, "pretrain_highres"),
                           decisions={**recipe_decisions(run_config), "augmentations": augmentations})
        line = (f"adapt-highres run {folder} from {checkpoint_path} (iteration {state['iteration']}): {iters} "
                f"iterations, crops {config.global_crop}/{config.local_crop}, position grid {src_config.pos_grid}^3 -> "
                f"{grid}^3, recipe {describe(run_config)}")
        return train_run(folder, record, run_config, [f for f, _ in plans_list], dist, console, restart=restart,
                         stop_after=stop_after, announce=lambda resume: line,
                         init_state={"student": student.state_dict(), "teacher": teacher.state_dict()})
    finally:
        held.close()
        cleanup()


def _sources(from_run: Path, recorded: SSLRunConfig | SimMIMRunConfig,
             iteration: int | None) -> tuple[Path, list[tuple[Path, Plans]], PretrainConfiguration]:
    """The source run's checkpoint, its datasets' plans and their pooled ``pretrain_highres`` configuration;
    every refusal (not a stage-1 run, no such snapshot, no volume passing the min axis) before any write."""
    if recorded.configuration != "pretrain":
        raise UserError("this run is not a stage-1 pretrain run", file=from_run / RunRecord.FILE,
                        fix="pass the folder of a `3dino pretrain` run")
    checkpoint_path = source_checkpoint(from_run, iteration)
    plans_list = [dataset_plans(d) for d in recorded.datasets]
    _refuse_without_volumes(plans_list)
    config = pooled_configuration(plans_list, "pretrain_highres")
    PretrainDataset([f for f, _ in plans_list], "pretrain_highres", config.min_axis)  # its refusals
    return checkpoint_path, plans_list, config


def _adapt_simmim(from_run: Path, source: RunRecord, *, iteration: int | None, iters: int, run_name: str | None,
                  batch_size: int | None, stop_after: int | None, restart: bool, num_workers: int, device: str,
                  precision: str, save_every: int, snapshot_every: int | None, grad_checkpointing: bool,
                  probe_every: int | None, augment_device: str) -> Path:
    """adapt-highres of a ``--method simmim`` run: SimMIM continued on ``pretrain_highres`` (112^3 crops), the
    position embedding interpolated to 7^3, the schedule restarted; returns the new run folder."""
    recorded = SimMIMRunConfig.from_options(source.options)
    checkpoint_path, plans_list, config = _sources(from_run, recorded, iteration)
    console = stderr_console()
    dist = init_distributed(device)
    held = contextlib.ExitStack()
    try:
        augmentations = simmim_augmentations(augment_device)
        state = load_checkpoint(checkpoint_path, rerun="3dino pretrain --method simmim")
        network = build_simmim_network(SimMIMRunConfig.from_options(state["config"]))
        network.load_state_dict(state["network"])
        network.backbone.interpolate_pos_embed_to(config.global_crop // 16)
        run_config, decisions = simmim_config(
            config, dist, console, preset=recorded.preset, iters=iters, batch_size=batch_size, precision=precision,
            snapshot_every=snapshot_every, probe_every=probe_every, drop_path=recorded.drop_path,
            overrides={"layerscale_init": recorded.layerscale_init}, datasets=recorded.datasets,
            configuration="pretrain_highres", seed=recorded.seed, mask_ratio=recorded.mask_ratio,
            num_workers=num_workers, save_every=save_every, grad_checkpointing=grad_checkpointing,
            augment_device=augmentations["implementation"],
            init_from=f"{from_run.name}/{checkpoint_path.name}@{state['iteration']}")
        folder = run_folder(from_run.parent, run_name, f"{from_run.name}__highres")
        held.enter_context(run_lock(folder, dist))
        record = RunRecord(stage="adapt-highres", options=run_config.options(),
                           volatile=list(SimMIMRunConfig.VOLATILE),
                           plans=plans_dependencies(plans_list, "pretrain_highres"),
                           decisions={**decisions, "augmentations": augmentations})
        line = (f"adapt-highres run {folder} (SimMIM) from {checkpoint_path} (iteration {state['iteration']}): "
                f"{iters} iterations, crop {config.global_crop}, position grid {recorded.pos_grid}^3 -> "
                f"{run_config.pos_grid}^3, mask ratio {run_config.mask_ratio:g}")
        return train_run(folder, record, run_config, [f for f, _ in plans_list], dist, console, restart=restart,
                         stop_after=stop_after, announce=lambda resume: line,
                         init_state={"network": network.state_dict()})
    finally:
        held.close()
        cleanup()


def _refuse_without_volumes(plans_list: list[tuple[Path, Plans]]) -> None:
    """Refuse, before anything is written, when no volume of the pooled datasets passes pretrain_highres's min_axis.

    Counted on each dataset's fingerprint (shape after crop-to-nonzero), as ``plan`` counts it.
    """
    passing, total, largest = 0, 0, 0
    for folder, plans in plans_list:
        min_axis = plans.configuration("pretrain_highres", file=Plans.in_folder(folder)).min_axis
        if not Fingerprint.in_folder(folder).is_file():
            return  # hand-made plans: the loader's own check decides
        fingerprint = Fingerprint.read(Fingerprint.in_folder(folder), rerun=f"3dino plan -d {folder.name}")
        passing += cases_passing(fingerprint, min_axis)
        total += fingerprint.num_cases
        largest = max(largest, largest_smallest_axis(fingerprint))
    if passing == 0:
        folder, plans = plans_list[0]
        names = ", ".join(f.name for f, _ in plans_list)
        min_axis = plans.configurations.pretrain_highres.min_axis
        raise UserError(f"no volume to adapt on: 0 of {total} cases of {names} have a smallest axis above "
                        f"pretrain_highres's min_axis of {min_axis} voxels (the largest smallest axis is {largest})",
                        file=Plans.in_folder(folder),
                        fix=f"lower the minimum: `3dino plan -d {folder.name} --highres-min-axis {max(0, largest - 1)}`"
                        f", then `3dino preprocess -d {folder.name} -c pretrain_highres` (plan each pooled dataset "
                        "alike), or pretrain on larger volumes")
