"""``3dino adapt-highres``: continue a pretrain run at high resolution (METHOD.md).

Starts from a pretrain run's checkpoint (final, latest, or a snapshot with ``--iteration``),
interpolates the stored position embedding from the 6^3 to the 7^3 grid, and trains on the
``pretrain_highres`` configuration (112^3 / 64^3 crops, volumes with min axis > 48) with every
schedule restarted and compressed to its own length, base lr 0.001. Writes
``<results>/pretrain/<run>__highres/`` with the same files as pretrain.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from threedino_pipe.errors import UserError
from threedino_pipe.jsonio import read_artifact
from threedino_pipe.training.checkpointing import load_checkpoint
from threedino_pipe.training.distributed import cleanup, init_distributed
from threedino_pipe.training.pretrain import _prepare, config_from_plans, configuration_of, finished_already, load_plans
from threedino_pipe.training.run_folder import RUN_SCHEMA_VERSION
from threedino_pipe.training.ssl_trainer import SSLRunConfig, _build, train_ssl


def source_checkpoint(run_dir: Path, iteration: int | None) -> Path:
    """The checkpoint to start from: ``checkpoint_<iteration>.pt``, else final, else latest."""
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


def run(from_run: Path, *, iteration: int | None = None, iters: int = 12_500, run_name: str | None = None,
        batch_size: int | None = None, base_lr: float = 0.001, stop_after: int | None = None,
        restart: bool = False, num_workers: int = 2, device: str = "auto", precision: str = "auto",
        save_every: int = 100, snapshot_every: int | None = None, grad_checkpointing: bool = False) -> Path:
    """Adapt a pretrain run to 112^3 / 64^3 crops; returns the new run folder."""
    from_run = Path(from_run)
    source = read_artifact(from_run / "run.json", "run", RUN_SCHEMA_VERSION, rerun="3dino pretrain")
    options = source["options"]
    if options.get("configuration") != "pretrain":
        raise UserError("this run is not a stage-1 pretrain run", file=from_run / "run.json",
                        fix="pass the folder of a `3dino pretrain` run")
    checkpoint_path = source_checkpoint(from_run, iteration)
    console = Console(stderr=True)
    plans_list = [load_plans(d) for d in options["datasets"]]
    config = configuration_of(plans_list, "pretrain_highres")
    dist = init_distributed(device)
    try:
        state = load_checkpoint(checkpoint_path, rerun="3dino pretrain")
        fields = SSLRunConfig.__dataclass_fields__
        src_config = SSLRunConfig(**{k: v for k, v in state["config"].items() if k in fields})
        student, teacher = _build(src_config)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        grid = config["global_crop"] // 16
        for net in (student, teacher):
            net.backbone.interpolate_pos_embed_to(grid)
        run_config = config_from_plans(
            config, dist, console, datasets=options["datasets"], configuration="pretrain_highres",
            preset=src_config.preset, iters=iters, batch_size=batch_size, base_lr=base_lr, seed=src_config.seed,
            precision=precision, drop_path=src_config.drop_path, koleo_weight=src_config.koleo_weight,
            head_dims=src_config.head_dims, init_from=f"{from_run.name}/{checkpoint_path.name}@{state['iteration']}",
            num_workers=num_workers, save_every=save_every, snapshot_every=snapshot_every,
            grad_checkpointing=grad_checkpointing)
        folder = from_run.parent / (run_name or f"{from_run.name}__highres")
        resume = _prepare(folder, run_config.options(), restart, dist, SSLRunConfig.VOLATILE)
        if finished_already(folder, resume, stop_after, console):
            return folder
        if dist.is_main:
            console.print(f"adapt-highres run {folder} from {checkpoint_path} (iteration {state['iteration']}): "
                          f"{iters} iterations, crops {config['global_crop']}/{config['local_crop']}, position grid "
                          f"{src_config.pos_grid}^3 -> {grid}^3")
        train_ssl(run_config, folder, [f for f, _, _ in plans_list], dist, resume=resume, stop_after=stop_after,
                  init_state=None if resume else {"student": student.state_dict(), "teacher": teacher.state_dict()})
        return folder
    finally:
        cleanup()
