"""The ``3dino`` command line: one thin command per stage.

Each command parses its options and calls one ``run(...)`` function of its stage module; no
logic lives here. User errors (:class:`~threedino_pipe.runtime.errors.UserError`) are printed without a
traceback and give a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from threedino_pipe import __version__
from threedino_pipe.cli_habits import HabitGroup
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.logs import configure_logging
from threedino_pipe.runtime.openmp import passive_openmp

app = typer.Typer(
    name="3dino",
    help="3DINO pipeline: plan, preprocess, pretrain, adapt-highres, finetune, predict and evaluate "
    "3D self-supervised ViTs on CT/MRI/PET volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=HabitGroup,
)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print debug messages.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars (they are also hidden "
                                          "when stderr is not a terminal).")]
Dataset = Annotated[str, typer.Option("--dataset", "-d", help="Dataset id (501) or folder name (Dataset501_Name).")]
NumProcesses = Annotated[int, typer.Option("--num-processes", "-np", min=1,
                                           help="Worker processes for reading and preprocessing cases.")]


def _common(verbose: bool, no_progress: bool) -> None:
    configure_logging(verbose)
    progress.set_enabled(not no_progress)


@app.command()
def verify(
    dataset: Dataset,
    allow_nan: Annotated[bool, typer.Option("--allow-nan", help="Report NaN/Inf voxels as a warning instead of "
                                            "an error; preprocess then replaces them by the volume mean.")] = False,
    num_processes: NumProcesses = 2,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Check a raw dataset and report every problem at once (exit 1 if any error)."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import verify as stage
    raise typer.Exit(stage.run(dataset, allow_nan=allow_nan, num_processes=num_processes))


@app.command()
def plan(
    dataset: Dataset,
    preset: Annotated[str | None, typer.Option("--preset", help="Model preset tiny|small|base|large "
                                               "(default: chosen for the memory target).")] = None,
    norm: Annotated[str | None, typer.Option("--norm", help="Finetune normalisation: dataset (dataset-level "
                                             "percentiles, the CT default) or volume (per-volume percentiles, "
                                             "the default for other modalities).")] = None,
    target_spacing: Annotated[str | None, typer.Option("--target-spacing", help="Finetune spacing in mm, "
                                                       "i,j,k order, e.g. 0.8,0.8,3 (default: median rule).")] = None,
    patch_size: Annotated[str | None, typer.Option("--patch-size", help="Finetune patch in voxels, e.g. "
                                                   "112,112,64 (default: 112^3 clipped to the data).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Finetune batch size "
                                                   "(default: from the memory target).")] = None,
    memory_gb: Annotated[float, typer.Option("--memory-gb", min=1.0, help="GPU memory target the plans are "
                                             "made for, in GB (not the memory of this machine).")] = 8.0,
    allow_nan: Annotated[bool, typer.Option("--allow-nan", help="Accept NaN/Inf voxels (replaced by the "
                                            "volume mean in preprocess).")] = False,
    highres_min_axis: Annotated[int | None, typer.Option("--highres-min-axis", min=0, help="pretrain_highres "
                                "(adapt-highres) keeps volumes whose smallest axis after cropping is above this many "
                                "voxels (default: the method's 48; docs/method.md, Data: the method skips thinner "
                                "volumes because a random crop of one, resized to the 112^3 / 64^3 cube, is stretched "
                                "several times along that axis, mostly interpolation). Lower it for thin data; "
                                "adapt-highres refuses when no volume passes.")] = None,
    test_fraction: Annotated[float | None, typer.Option("--test-fraction", min=0.0, max=0.99, help="Share of the "
                             "cases held out as splits.json's test list, which no command trains or validates on "
                             "(default: 0.2 from 20 cases on, else 0; 0 = none).")] = None,
    splits_from: Annotated[Path | None, typer.Option("--splits-from", help="Import the folds of nnU-Net's "
                           "splits_final.json (a list of {train: [...], val: [...]}); cases in no fold become the "
                           "test list.")] = None,
    num_processes: NumProcesses = 2,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Verify a raw dataset, write dataset_fingerprint.json and plans.json."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import plan as stage
    stage.run(dataset, preset=preset, norm=norm, target_spacing=target_spacing, patch_size=patch_size,
              batch_size=batch_size, memory_gb=memory_gb, allow_nan=allow_nan, num_processes=num_processes,
              highres_min_axis=highres_min_axis, test_fraction=test_fraction, splits_from=splits_from)


@app.command()
def preprocess(
    dataset: Dataset,
    configurations: Annotated[list[str] | None, typer.Option("--configuration", "-c", help="Configuration(s) "
                              "to preprocess: pretrain, pretrain_highres, finetune (default: all in plans.json "
                              "that apply to the dataset's task).")] = None,
    num_processes: NumProcesses = 2,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Crop, resample and normalise every case as plans.json says; write splits.json."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import preprocess as stage
    stage.run(dataset, configurations=configurations or None, num_processes=num_processes)


Device = Annotated[str, typer.Option("--device", help="auto (a GPU when present, else the CPU), cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option("--precision", help="auto (bf16 where supported, fp16 on GPUs without bf16, "
                                        "else fp32), fp32, bf16 or fp16.")]
AugmentDevice = Annotated[str, typer.Option("--augment-device", help="auto (batched torch augmentations on the "
                                            "training GPU; MONAI in the workers on a CPU), cpu-monai or torch "
                                            "(docs/augmentation.md).")]
Workers = Annotated[int, typer.Option("--num-workers", min=0, help="Data-loading worker processes per training "
                                      "process (0 = in-process; the batches are the same for any number).")]
StopAfter = Annotated[int | None, typer.Option("--stop-after", min=1, help="Checkpoint and exit cleanly after this "
                                               "many iterations of this invocation (rerun to continue).")]
Restart = Annotated[bool, typer.Option("--restart", help="Discard the run folder's previous content and start over.")]
SaveEvery = Annotated[int, typer.Option("--save-every", min=1, help="Iterations between checkpoint_latest.pt saves.")]
SnapshotEvery = Annotated[int | None, typer.Option("--snapshot-every", min=0, help="Iterations between kept "
                                                   "checkpoint_<iteration>.pt snapshots (default: a tenth of "
                                                   "--iters; 0 = none).")]
ProbeEvery = Annotated[int | None, typer.Option("--probe-every", min=0, help="Iterations between patch probes of the "
                                                "teacher when a pooled dataset is labelled (default: a tenth of "
                                                "--iters; 0 = never).")]
GradCheckpointing = Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute block activations in the "
                                                 "backward pass (less memory, about 30 % slower).")]


@app.command()
def pretrain(
    datasets: Annotated[list[str], typer.Option("--dataset", "-d", help="Dataset id(s) to pool (repeat -d, or give "
                                                "several ids after one -d).")],
    more: Annotated[list[str] | None, typer.Argument(help="Further dataset ids (3dino pretrain -d 501 502 503).",
                                                     show_default=False)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Backbone preset tiny|small|base|large (default: "
                                               "plans.json's).")] = None,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Training iterations (the paper: 125,000).")] = 125_000,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Volumes per process and iteration "
                                                   "(default: plans.json's, capped at 4 on a CPU).")] = None,
    run_name: Annotated[str | None, typer.Option("--run", "--run-name", help="Run folder name under "
                                                 "results/pretrain/ (default: <preset>__<dataset ids>); under "
                                                 "torchrun write --run-name (torchrun reads --run itself).")] = None,
    stop_after: StopAfter = None,
    restart: Restart = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, crops, augmentations and masks.")] = 0,
    num_workers: Workers = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    drop_path: Annotated[float | None, typer.Option("--drop-path", min=0.0, max=1.0, help="Stochastic depth rate "
                                                    "(default: 0.3 for dino, 0.1 for simmim).")] = None,
    koleo_weight: Annotated[float, typer.Option("--koleo-weight", min=0.0, help="Weight of the KoLeo term.")] = 0.1,
    base_lr: Annotated[float, typer.Option("--base-lr", help="Base lr, scaled by sqrt(total batch / 1024); the "
                                           "auto recipe keeps the peak at least half of it.")] = 0.002,
    prototypes: Annotated[int | None, typer.Option("--prototypes", min=2, help="DINO/iBOT prototypes (default: "
                                                   "65,536; 1,024 for tiny).")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="auto: the paper's settings adapted to this run's batch "
                                        "and length (docs/pretrain.md); paper: the paper's settings unchanged.")
                      ] = "auto",
    centering: Annotated[str | None, typer.Option("--centering", help="Teacher centring: sinkhorn (over the "
                                                  "batch), sinkhorn_queue (over a queue of recent teacher outputs) "
                                                  "or softmax (DINO v1). Default: the recipe's.")] = None,
    ibot_centering: Annotated[str | None, typer.Option("--ibot-centering", help="Centring of the iBOT (masked "
                                                       "patch) targets, same choices as --centering. Default: "
                                                       "the recipe's.")] = None,
    queue_size: Annotated[int | None, typer.Option("--queue-size", min=1, help="Teacher embeddings per process "
                                                   "in the sinkhorn_queue (default: the recipe's).")] = None,
    peak_lr: Annotated[float | None, typer.Option("--peak-lr", min=0.0, help="Peak learning rate, replacing the "
                                                  "recipe's rule (default: the recipe's).")] = None,
    momentum_start: Annotated[float | None, typer.Option("--momentum-start", min=0.0, max=1.0, help="Teacher EMA "
                                                         "momentum at the start, cosine to 1 (default: the "
                                                         "recipe's; the paper: 0.992).")] = None,
    layerscale_init: Annotated[float | None, typer.Option("--layerscale-init", min=0.0, help="Initial LayerScale "
                                                          "of the blocks (default: the recipe's; the paper: "
                                                          "1e-5).")] = None,
    warmup_iters: Annotated[int | None, typer.Option("--warmup-iters", min=0, help="Learning-rate warm-up in "
                                                     "iterations (default: the recipe's; the paper: a tenth of "
                                                     "--iters).")] = None,
    freeze_last_layer_iters: Annotated[int | None, typer.Option("--freeze-last-layer-iters", min=0, help="Keep the "
                                                                "heads' prototypes (last layers) fixed for this many "
                                                                "iterations (default: the recipe's; the paper: the "
                                                                "first 1 %).")] = None,
    teacher_temp: Annotated[float | None, typer.Option("--teacher-temp", min=0.001, help="Teacher temperature "
                                                       "reached after the warm-up from 0.04 (default: the "
                                                       "recipe's; the paper: 0.07).")] = None,
    probe_every: ProbeEvery = None,
    budget_hours: Annotated[float | None, typer.Option("--budget-hours", min=0.0, help="Train for about this many "
                                                       "hours: the iterations come from the step time measured at "
                                                       "the start (recorded in run.json); replaces --iters.")
                            ] = None,
    save_every: SaveEvery = 100,
    snapshot_every: SnapshotEvery = None,
    grad_checkpointing: GradCheckpointing = False,
    augment_device: AugmentDevice = "auto",
    method: Annotated[str, typer.Option("--method", help="Objective: dino (3DINO), simmim (masked voxel "
                                        "reconstruction, L1; the paper's MIM-ViT baseline) or tang (Tang et al.'s "
                                        "inpainting, rotation and contrastive coding; MONAI-ViT / Swin "
                                        "Transfer-FD).")] = "dino",
    mask_ratio: Annotated[float | None, typer.Option("--mask-ratio", help="simmim: fraction of patches masked "
                                                     "(default 0.6, SimMIM's).")] = None,
    intensity_prob: Annotated[float, typer.Option("--intensity-prob", min=0.0, max=1.0, help="dino: probability "
                                                  "of the crops' intensity augmentation (gamma, noise or histogram "
                                                  "shift; the method: 0.8).")] = 0.8,
    arch: Annotated[str, typer.Option("--arch", help="Encoder: vit (our 3D ViT) or, with --method tang only, swin "
                                      "(MONAI's SwinUNETR encoder; backbone.pt in Tang et al.'s layout).")] = "vit",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Self-supervised pretraining of a 3D ViT or Swin (3DINO, SimMIM, Tang et al.) on preprocessed datasets."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import pretrain as stage
    overrides = {"centering": centering, "ibot_centering": ibot_centering, "queue_size": queue_size, "peak_lr": peak_lr,
                 "momentum_start": momentum_start, "layerscale_init": layerscale_init, "warmup_iters": warmup_iters,
                 "teacher_temp_end": teacher_temp, "freeze_last_layer_iters": freeze_last_layer_iters}
    stage.run(list(datasets) + list(more or []), preset=preset, iters=iters, batch_size=batch_size,
              run_name=run_name, stop_after=stop_after, restart=restart, seed=seed, num_workers=num_workers,
              device=device, precision=precision, drop_path=drop_path, koleo_weight=koleo_weight, base_lr=base_lr,
              prototypes=prototypes, save_every=save_every, snapshot_every=snapshot_every,
              grad_checkpointing=grad_checkpointing, recipe=recipe, recipe_overrides=overrides,
              probe_every=probe_every, budget_hours=budget_hours, augment_device=augment_device, method=method,
              mask_ratio=mask_ratio, intensity_prob=intensity_prob, arch=arch)


@app.command("adapt-highres")
def adapt_highres(
    from_run: Annotated[Path, typer.Option("--from", help="Pretrain run folder to continue from.")],
    iteration: Annotated[int | None, typer.Option("--iteration", help="Start from snapshot checkpoint_<N>.pt "
                                                  "(default: checkpoint_final.pt, else checkpoint_latest.pt).")] = None,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Iterations (the paper: 12,500).")] = 12_500,
    run_name: Annotated[str | None, typer.Option("--run", "--run-name", help="Run folder name (default: "
                                                 "<from>__highres); --run-name under torchrun.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Volumes per process and iteration "
                                                   "(default: plans.json's highres batch, capped at 4 on a "
                                                   "CPU).")] = None,
    base_lr: Annotated[float, typer.Option("--base-lr", help="Base lr, scaled by sqrt(total batch / 1024); the "
                                           "auto recipe keeps the peak at least half of it.")] = 0.001,
    probe_every: ProbeEvery = None,
    stop_after: StopAfter = None,
    restart: Restart = False,
    num_workers: Workers = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    save_every: SaveEvery = 100,
    snapshot_every: SnapshotEvery = None,
    grad_checkpointing: GradCheckpointing = False,
    augment_device: AugmentDevice = "auto",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """High-resolution adaptation of a pretrain run (112/64 crops, 7^3 position grid)."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import adapt_highres as stage
    stage.run(from_run, iteration=iteration, iters=iters, run_name=run_name, batch_size=batch_size, base_lr=base_lr,
              stop_after=stop_after, restart=restart, num_workers=num_workers, device=device, precision=precision,
              save_every=save_every, snapshot_every=snapshot_every, grad_checkpointing=grad_checkpointing,
              probe_every=probe_every, augment_device=augment_device)


@app.command()
def finetune(
    dataset: Dataset,
    pct: Annotated[float, typer.Option("--pct", help="Percent of the fold's training cases to train on (the nested "
                                       "label-efficiency subset of splits.json: round(P % of the cases); too few "
                                       "cases is an error naming the minimum).")] = 100.0,
    fold: Annotated[int, typer.Option("--fold", min=0, help="Cross-validation fold of splits.json.")] = 0,
    head: Annotated[str | None, typer.Option("--head", help="adapter (ViT-Adapter + UNet decoder), unetr, linear, "
                                             "swinunetr (MONAI's SwinUNETR, trained end to end, on a Swin backbone), "
                                             "or probe (classification datasets). Default: adapter with a pretrained "
                                             "backbone (linear with a Hugging Face folder), unetr with --backbone "
                                             "none, swinunetr with a Swin file, probe for classification.")] = None,
    backbone: Annotated[str, typer.Option("--backbone", help="auto (the newest adapt-highres run, else the newest "
                                          "pretrain run), a pretrain run folder (3DINO: the paper's 3DINO-ViT; "
                                          "--method simmim: MIM-ViT; --method tang --arch vit: MONAI-ViT; --arch "
                                          "swin: Swin Transfer-FD), a backbone file (ours, the official 3DINO-ViT, "
                                          "or Tang et al.'s model_swinvit.pt: Swin Transfer), a local Hugging Face "
                                          "folder of Dinov2Model or DINOv3ViTModel (2D, slice by slice: DINOv3; pip "
                                          "install threedino-pipe\\[natural]), or none (random init, trained end to "
                                          "end: Random; with --head swinunetr: Swin Random).")]
    = "auto",
    unfreeze: Annotated[bool, typer.Option("--unfreeze", help="Train the pretrained backbone too (default: "
                                           "frozen).")] = False,
    preset: Annotated[str | None, typer.Option("--preset", help="Backbone preset tiny|small|base|large for "
                                               "--backbone none (default: plans.json's); with a pretrained backbone "
                                               "the file must match it.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", min=1, help="Training iterations (default: the paper's "
                                              "30,000 with 10 % linear warmup, then cosine; 12,500 for the "
                                              "probe).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Patches per process and iteration "
                                                   "(default: plans.json's, capped at 2 on a CPU).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="AdamW peak learning rate (default: 1e-4 for "
                                             "adapter and unetr, 1e-3 for linear).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = 1e-5,
    seed: Annotated[int, typer.Option("--seed", min=0, max=4, help="Which of the 5 subset draws stored in "
                                      "splits.json; also seeds initialisation and patch sampling.")] = 0,
    val_every: Annotated[int | None, typer.Option("--val-every", min=1, help="Iterations between validations on "
                                                  "the fold's validation cases (default: a tenth of --iters, at "
                                                  "most 1,000).")] = None,
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.99, help="Sliding-window overlap for "
                                           "validation.")] = 0.5,
    save_every: SaveEvery = 500,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train without data augmentation.")] = False,
    num_workers: Workers = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    stop_after: StopAfter = None,
    restart: Restart = False,
    run_name: Annotated[str | None, typer.Option("--run", "--run-name", help="Run folder name under "
                                                 "results/<Dataset>/ (default: finetune__<head>__<backbone tag>"
                                                 "__pct<P>__fold<F>__seed<S>); a second run beside the first. "
                                                 "Under torchrun write --run-name.")] = None,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Finetune a segmentation head (or a classification probe) on a label subset; resumes when rerun."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import finetune as stage
    stage.run(dataset, pct=pct, fold=fold, head=head, backbone=backbone, unfreeze=unfreeze, preset=preset,
              iters=iters, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, val_every=val_every,
              overlap=overlap, num_workers=num_workers, device=device, precision=precision, stop_after=stop_after,
              restart=restart, save_every=save_every, augment=not no_augment, run_name=run_name)


@app.command()
def embed(
    model: Annotated[Path, typer.Option("--model", "-m", help="A finetune run folder or model zip (cases are "
                                        "preprocessed as in finetuning), or a pretrain run folder or backbone "
                                        "checkpoint (per-volume 0.05/99.95 percentile normalisation).")],
    input_dir: Annotated[Path, typer.Option("--input", "-i", help="Folder (or list file) of cases: "
                                            "{case}_{XXXX} files per channel, or one file per case.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV file to write (or a folder: "
                                         "features.csv inside it), one row per case.")],
    layers: Annotated[int, typer.Option("--layers", help="CLS tokens of the last 1 or 4 blocks.")] = 4,
    avgpool: Annotated[bool, typer.Option("--avgpool/--no-avgpool", help="Also the last block's mean patch "
                                          "token.")] = True,
    device: Device = "auto",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Frozen-backbone features (CLS, mean patch token) of a folder of cases into one CSV table."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import embed as stage
    stage.run(model, input_dir, output, layers=layers, avgpool=avgpool, device=device)


def _fold_selection(dataset: str | None, folds: list[int] | None, more_folds: list[int] | None, head: str | None,
                    pct: float | None, seed: int | None):
    """``-d DATASET -f F [F ...]`` (the folds after -f arrive as the FOLDS argument) as a FoldSelection."""
    from threedino_pipe.stages.predict import FoldSelection
    if more_folds and not folds:
        raise UserError(f"unexpected argument(s) {' '.join(map(str, more_folds))}",
                        fix="fold numbers follow -f (-d 501 -f 0 1 2 3 4); models follow -m")
    return FoldSelection(dataset=dataset, folds=tuple([*(folds or []), *(more_folds or [])]), head=head, pct=pct,
                         seed=seed)


@app.command()
def predict(
    output_dir: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created).")],
    input_dir: Annotated[Path | None, typer.Option("--input", "-i", help="A folder of scans ({case}_0000.nii.gz "
                         "channel files, plain single-channel files), a folder tree of DICOM studies (any names and "
                         "nesting), a text file listing one scan per line, or one scan. Or --from-pacs.")] = None,
    model: Annotated[list[Path] | None, typer.Option("--model", "-m", help="Finetune run folder or model zip; "
                     "repeat -m for several folds (their probabilities are averaged).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="With -f: the dataset whose finetune runs "
                       "-f selects (id or folder name).")] = None,
    folds: Annotated[list[int] | None, typer.Option("--fold", "-f", min=0, help="Instead of -m: the dataset's "
                     "finetune run of each fold (-d 501 -f 0 1 2 3 4; averaged).")] = None,
    more_folds: Annotated[list[int] | None, typer.Argument(help="Further fold numbers after -f (-f 0 1 2 3 4).",
                                                           show_default=False, metavar="FOLDS")] = None,
    head: Annotated[str | None, typer.Option("--head", help="With -f: only runs of this head (when a fold has "
                    "several runs).")] = None,
    pct: Annotated[float | None, typer.Option("--pct", help="With -f: only runs of this --pct.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="With -f: only runs of this --seed.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Weights of each run: best (checkpoint_best.pt, "
                          "the best validation) or final (checkpoint_final.pt, after the last iteration).")
                          ] = "best",
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.99, help="Overlap of neighbouring sliding "
                       "windows per axis (the paper used 0.75).")] = 0.5,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average over the 8 flip combinations "
                   "of the three axes (8x slower).")] = False,
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases whose output already exists; refuses a "
                      "folder that another model (or other --overlap/--tta) wrote.")] = False,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write "
                                  "<case>_probabilities.npz (float16 probabilities on the input grid).")] = False,
    window_batch_size: Annotated[int, typer.Option("--window-batch-size", min=1, help="Sliding windows per forward "
                                 "pass.")] = 1,
    device: Device = "auto",
    precision: Precision = "auto",
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Cases read and preprocessed ahead in "
                           "background threads while the current one is predicted (0 = none).")] = 1,
    output_format: Annotated[list[str] | None, typer.Option("--output-format", help="nifti, dicom-seg or rtstruct; "
                             "repeat or comma-separate for several (default: nifti; nifti,dicom-seg for DICOM "
                             "input).")] = None,
    series_rule: Annotated[list[str] | None, typer.Option("--series-rule", help="DICOM input: CHANNEL[:MODALITY]"
                           "=REGEX, the SeriesDescription pattern (and modality) of a channel's series; "
                           "repeatable.")] = None,
    min_slices: Annotated[int, typer.Option("--min-slices", min=2, help="DICOM input: fewest slices of a usable "
                          "series.")] = 10,
    from_pacs: Annotated[str | None, typer.Option("--from-pacs", help="Instead of -i: retrieve the --study/--query "
                         "studies from this DICOM node (AET@host:port; C-GET) or DICOMweb service (http(s) URL; "
                         "WADO-RS) into OUT/.retrieved/.")] = None,
    study: Annotated[list[str] | None, typer.Option("--study", help="With --from-pacs: a StudyInstanceUID to "
                     "retrieve and predict; repeatable.")] = None,
    query: Annotated[list[str] | None, typer.Option("--query", help="With --from-pacs: KEY=VALUE, a study-level "
                     "match (StudyDate=YYYYMMDD[-YYYYMMDD], ModalitiesInStudy, StudyDescription, AccessionNumber, "
                     "PatientID, ...) selecting studies to retrieve (C-FIND or QIDO-RS); repeatable (all must "
                     "match); joins --study.")] = None,
    send_to: Annotated[list[str] | None, typer.Option("--send-to", help="Send each case's DICOM results (SEG, "
                       "RTSTRUCT) to this node (AET@host:port; C-STORE) or DICOMweb service (URL; STOW-RS) when "
                       "it finishes; repeatable.")] = None,
    ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title towards --from-pacs and --send-to "
                        "nodes.")] = "THREEDINO",
    move_listen: Annotated[str | None, typer.Option("--move-listen", help="With --from-pacs NODE: retrieve with "
                           "C-MOVE, receiving on HOST:PORT (the node must know --ae-title there).")] = None,
    qc: Annotated[bool, typer.Option("--qc/--no-qc", help="Segmentation models: qc.csv and qc_report.html "
                  "(volumes, components, border share, confidence and flags per case and structure).")] = True,
    qc_min_confidence: Annotated[float, typer.Option("--qc-min-confidence", min=0.0, max=1.0, help="QC: flag a "
                                 "structure whose mean probability is below this (low_confidence).")] = 0.7,
    keep_patient_names: Annotated[bool, typer.Option("--keep-patient-names", help="DICOM input: name each "
                                  "study's outputs by its PatientID instead of its salted study key.")] = False,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="Skip sliding windows that hold only air outside "
                    "the body (a conservative body mask with a margin); --no-skip runs every window.")] = True,
    coarse: Annotated[bool, typer.Option("--coarse/--no-coarse", help="First run the model on the case "
                      "downsampled by 2 and skip full-resolution windows far from anything it found (a low "
                      "threshold and a 10 mm margin).")] = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Predict every case of a folder into the input's exact geometry (exit 1 if any case failed)."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import predict as stage
    selection = _fold_selection(dataset, folds, more_folds, head, pct, seed)
    raise typer.Exit(stage.run(input_dir, output_dir, model or [], overlap=overlap, tta=tta, resume=resume,
                               save_probabilities=save_probabilities, window_batch_size=window_batch_size,
                               device=device, precision=precision, num_workers=num_workers, checkpoint=checkpoint,
                               selection=selection, output_formats=output_format, series_rules=series_rule,
                               min_slices=min_slices, from_pacs=from_pacs, studies=study, query=query, send_to=send_to,
                               ae_title=ae_title, move_listen=move_listen, qc=qc,
                               qc_min_confidence=qc_min_confidence, keep_patient_names=keep_patient_names,
                               skip=skip, coarse=coarse))


@app.command()
def listen(
    output_dir: Annotated[Path, typer.Option("--output", "-o", help="The node's folder: incoming/, results/, "
                          "journal.jsonl, listen.log (created; a restart in the same folder resumes).")],
    model: Annotated[list[Path] | None, typer.Option("--model", "-m", help="Finetune run folder or model zip; repeat "
                     "for several folds (averaged).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="With -f: the dataset whose finetune runs "
                       "-f selects (id or folder name).")] = None,
    folds: Annotated[list[int] | None, typer.Option("--fold", "-f", min=0, help="Instead of -m: the dataset's "
                     "finetune run of each fold (-d 501 -f 0 1 2 3 4; averaged), chosen when the node starts.")] = None,
    more_folds: Annotated[list[int] | None, typer.Argument(help="Further fold numbers after -f (-f 0 1 2 3 4).",
                                                           show_default=False, metavar="FOLDS")] = None,
    head: Annotated[str | None, typer.Option("--head", help="With -f: only runs of this head.")] = None,
    pct: Annotated[float | None, typer.Option("--pct", help="With -f: only runs of this --pct.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="With -f: only runs of this --seed.")] = None,
    ae_title: Annotated[str, typer.Option("--ae-title", help="The node's AE title (also the calling AE title "
                        "towards --send-to).")] = "THREEDINO",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")] = 11112,
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (0.0.0.0: every interface).")
                    ] = "127.0.0.1",
    allow_ae: Annotated[list[str] | None, typer.Option("--allow-ae", help="Accept associations only from this "
                        "calling AE title; repeatable (default: any).")] = None,
    quiet_seconds: Annotated[float, typer.Option("--quiet-seconds", help="Predict a study once no file came for "
                             "it for this many seconds.")] = 120.0,
    send_to: Annotated[list[str] | None, typer.Option("--send-to", help="Send each study's DICOM results to this "
                       "node (AET@host:port) or DICOMweb URL; repeatable.")] = None,
    retry_seconds: Annotated[float, typer.Option("--retry-seconds", help="Wait after a failed send round before "
                             "the next (doubles each round, at most 1 h).")] = 60.0,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Weights of each run: best or final.")] = "best",
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.99, help="Overlap of neighbouring sliding "
                       "windows per axis.")] = 0.5,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation (8 flips; 8x slower).")] = False,
    window_batch_size: Annotated[int, typer.Option("--window-batch-size", min=1, help="Sliding windows per "
                                 "forward pass.")] = 1,
    device: Device = "auto",
    precision: Precision = "auto",
    output_format: Annotated[list[str] | None, typer.Option("--output-format", help="dicom-seg, rtstruct or nifti; "
                             "repeat or comma-separate (default: dicom-seg).")] = None,
    series_rule: Annotated[list[str] | None, typer.Option("--series-rule", help="CHANNEL[:MODALITY]=REGEX, the "
                           "SeriesDescription pattern of a channel's series; repeatable.")] = None,
    min_slices: Annotated[int, typer.Option("--min-slices", min=2, help="Fewest slices of a usable series.")] = 10,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write each study's "
                                  "<case>_probabilities.npz into its results folder (not sent).")] = False,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="Skip sliding windows of air outside the body "
                    "(as for 3dino predict).")] = True,
    coarse: Annotated[bool, typer.Option("--coarse/--no-coarse", help="The coarse pass (as for 3dino predict).")
                      ] = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """A DICOM storage node: predict each study once it is quiet, send the results on (stops on SIGINT/SIGTERM)."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import listen as stage
    selection = _fold_selection(dataset, folds, more_folds, head, pct, seed)
    raise typer.Exit(stage.run(output_dir, selection.models(model or []), ae_title=ae_title, port=port, bind=bind,
                               allow_ae=allow_ae or [],
                               quiet_seconds=quiet_seconds, send_to=send_to or [], retry_seconds=retry_seconds,
                               checkpoint=checkpoint, overlap=overlap, tta=tta, window_batch_size=window_batch_size,
                               device=device, precision=precision, output_formats=output_format,
                               series_rules=series_rule or [], min_slices=min_slices,
                               save_probabilities=save_probabilities, skip=skip, coarse=coarse))


@app.command()
def evaluate(
    reference: Annotated[Path, typer.Option("--reference", "-r", help="Reference: a folder of label images "
                                            "(segmentation) or a case_id,label CSV (classification).")],
    prediction: Annotated[Path | None, typer.Option("--prediction", "-p", help="Predictions: a folder of label "
                                                    "images named like the references, or predictions.csv (or "
                                                    "its folder).")] = None,
    compare: Annotated[tuple[str, str] | None, typer.Option("--compare", metavar="A B", help="Compare two models "
                       "instead of -p: A and B are each a prediction folder or `3dino evaluate` output folder, or "
                       "several comma-separated (one per run, e.g. run1,run2,run3).")] = None,
    names: Annotated[str | None, typer.Option("--names", metavar="NAME_A,NAME_B", help="Names of the two "
                     "--compare sides in tables and plots (default: from the folder names).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset id or name: labels, regions "
                       "and classes from its dataset.json (default: every label value found; classes from the "
                       "prob_<class> columns).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: "
                      "PRED_DIR/evaluation; with --compare ./evaluation_compare).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling.")] = 0,
    num_bootstrap: Annotated[int, typer.Option("--num-bootstrap", min=1, help="Bootstrap resamples for the 95 % "
                                               "confidence intervals.")] = 1000,
    num_processes: NumProcesses = 2,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Dice/HD95 or AUC/F1/accuracy per case with bootstrap CIs, or a statistical comparison of two models.

    Exit code 1 when a reference case has no prediction or a prediction could not be evaluated.
    """
    _common(verbose, no_progress)
    from threedino_pipe.stages import evaluate as stage
    raise typer.Exit(stage.run(reference, prediction, compare=compare, names=names.split(",") if names else None,
                               dataset=dataset, output=output, seed=seed, num_bootstrap=num_bootstrap,
                               num_processes=num_processes))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="auto: from the run (a finetune run: a model zip, model.json "
                                     "+ weights, for `3dino predict -m`; a pretrain or adapt-highres run: the "
                                     "teacher backbone and heads in the released 3DINO layout); zip or 3dino "
                                     "confirm it.")] = "auto",
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="A finetune run's weights in the zip: best "
                          "(checkpoint_best.pt) or final (checkpoint_final.pt). Default: best.",
                          show_default=False)] = None,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Export a finetune run as a model zip, or a pretrain backbone in the released 3DINO layout."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import export as stage
    stage.run(run_dir, output, fmt=fmt, checkpoint=checkpoint)


@app.command()
def visualize(
    model: Annotated[Path, typer.Option("--model", "-m", help="A pretrain or adapt-highres run folder or backbone "
                                        "checkpoint (per-volume 0.05/99.95 percentile normalisation), or a finetune "
                                        "run folder or model zip (the scan is preprocessed as in finetuning).")],
    scan: Annotated[Path, typer.Option("--input", "-i", help="One scan: an image file or a DICOM series folder.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (created); default "
                                                "./visualize/<scan name without ending>.")] = None,
    size: Annotated[int, typer.Option("--size", min=0, help="Longest side, in voxels, of the network input: the "
                                      "preprocessed scan is resized to it (sides rounded to multiples of the patch "
                                      "size); 0 keeps the preprocessed scale.")] = 192,
    threshold: Annotated[float, typer.Option("--threshold", help="Foreground threshold on the first principal "
                                             "component, in standard deviations over the patches.")] = 0.0,
    rgb_pca: Annotated[str, typer.Option("--rgb-pca", help="Colours: 'foreground' = first 3 components of a second "
                                         "PCA on the foreground patches; 'all' = components 2-4 of the first "
                                         "PCA.")] = "foreground",
    channel: Annotated[int | None, typer.Option("--channel", min=0, help="Which channel of a multi-channel finetune "
                                                "model the scan is; default: its _XXXX name suffix, else 0.")] = None,
    per_head: Annotated[bool, typer.Option("--per-head", help="Also one attention map per head (NIfTI and "
                                           "attention_heads.png).")] = False,
    device: Device = "auto",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """PCA and CLS-attention maps of a backbone's last layer on one scan: PNG planes and NIfTI volumes."""
    _common(verbose, no_progress)
    from threedino_pipe.stages import visualize as stage
    stage.run(model, scan, output, size=size, threshold=threshold, rgb_from=rgb_pca, channel=channel,
              per_head=per_head, device=device)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, runs, study, "
                                      "report.html and timings.json (rerun with the same options to reuse finished "
                                      "stages).")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option("--quick", help="Smallest run, under 3 minutes on 2 CPU cores (for CI): "
                                        "fewer cases and iterations, one finetune seed instead of 3.")] = False,
    pretrain_here: Annotated[bool, typer.Option("--pretrain-here", help="Pretrain and adapt-highres for a few "
                                                "iterations inside the demo instead of using the bundled backbone "
                                                "(pretrained for an hour by `3dino pretrain`; docs/demo.md).")] = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """The whole chain on bundled real scans (MNI152), CPU-sized, with an HTML report.

    plan, preprocess, the bundled pretrained backbone (or a brief pretrain), then `3dino study` of it against
    --backbone none at 25 % labels (3 seeds: finetune, predict, evaluate, paired tests, figure)."""
    _common(verbose, no_progress)
    from threedino_pipe.demo import chain as stage
    stage.run(out=out, quick=quick, pretrain_here=pretrain_here)


class _ManyValues(typer.core.TyperCommand):
    """A command whose list options take several values after one flag (``--pct 10 25 50 100``)."""

    MANY = ("--backbones", "--pct", "--seeds", "--folds")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        spread, current, fresh = [], None, False
        for arg in args:
            if arg.startswith("-"):
                flag, _, value = arg.partition("=")
                current, fresh = (flag if flag in self.MANY else None), not value
            elif current is not None and not fresh:
                spread.append(current)  # a further value of a list option: repeat its flag
            else:
                fresh = False
            spread.append(arg)
        return super().parse_args(ctx, spread)


@app.command(cls=_ManyValues)
def study(
    dataset: Dataset,
    backbones: Annotated[list[str], typer.Option("--backbones", help="Backbone entries, each a pretrain run folder, "
                         "a backbone file, auto or none, optionally with its head (RUN:adapter, none:unetr): "
                         "--backbones RUN none.")],
    pct: Annotated[list[float], typer.Option("--pct", help="Label shares in % of the fold's training cases "
                   "(--pct 10 25 50 100; 100 is needed for labels-needed).")],
    seeds: Annotated[list[int] | None, typer.Option("--seeds", min=0, help="Finetune seeds (subset draw and "
                     "initialisation): --seeds 0 1 2 (default 0).")] = None,
    folds: Annotated[list[int] | None, typer.Option("--folds", min=0, help="Cross-validation folds: --folds 0 1 "
                     "(default 0).")] = None,
    iters: Annotated[int | None, typer.Option("--iters", min=1, help="Finetune iterations of every cell "
                     "(default: finetune's).")] = None,
    name: Annotated[str, typer.Option("--name", help="The study's name: its folder is "
                    "results/DatasetNNN_Name/study__NAME/.")] = "main",
    on_validation: Annotated[bool, typer.Option("--on-validation", help="Without a test list: evaluate on the "
                             "fold's validation cases, marking every output selection-biased.")] = False,
    reference: Annotated[str | None, typer.Option("--reference", help="The entry the others are tested against and "
                         "whose 100 % mean sets labels-needed (default: the none entry, else the first).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells with their state and estimated time; "
                       "run nothing.")] = False,
    cells: Annotated[str | None, typer.Option("--cells", help="K/N: run only the K-th of N shares of the cells "
                     "(any scheduler); aggregate later with --collect.")] = None,
    collect: Annotated[bool, typer.Option("--collect", help="Aggregate the cells' results (after the shares); run "
                       "no cell.")] = False,
    emit_slurm: Annotated[Path | None, typer.Option("--emit-slurm", help="Write a SLURM job-array script (one cell "
                          "per task) to this file; run nothing.")] = None,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Finetune's data-loading worker processes "
                           "(results do not depend on it).")] = 2,
    device: Device = "auto",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
    gpus_per_cell: Annotated[int | None, typer.Option("--gpus-per-cell", min=1, help="Run each cell's finetune under "
                             "torchrun --standalone --nproc-per-node G (G GPUs per SLURM task with --emit-slurm).")
                             ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Finetune --batch-size of every cell "
                          "(default: finetune's).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Finetune --lr of every segmentation cell (default: "
                  "finetune's).")] = None,
    val_every: Annotated[int | None, typer.Option("--val-every", min=1, help="Finetune --val-every of every "
                         "segmentation cell (default: finetune's).")] = None,
) -> None:
    """Label-efficiency curves: finetune, predict and evaluate each cell, then statistics.

    One cell per backbone x pct x seed x fold; then summary, paired tests, labels needed, a figure and
    report.html (exit 1 if a cell failed)."""
    _common(verbose, no_progress)
    from threedino_pipe.study import command as stage
    raise typer.Exit(stage.run(dataset, backbones=backbones, pct=pct, seeds=seeds, folds=folds, iters=iters,
                               name=name, on_validation=on_validation, reference=reference, dry_run_only=dry_run,
                               cells=cells, collect_only=collect, emit_slurm=emit_slurm, num_workers=num_workers,
                               device=device, gpus_per_cell=gpus_per_cell, batch_size=batch_size, lr=lr,
                               val_every=val_every))


@app.callback(invoke_without_command=True)
def _version(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


def main() -> None:
    """Console entry point: run the app, print user errors without a traceback."""
    passive_openmp()
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc.render()}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
