"""``3dino finetune``: train a segmentation head (or, for classification, the linear probe) on a label subset.

Reads the dataset's ``plans.json`` (configuration ``finetune``), ``splits.json`` and
``finetune/`` arrays, and a backbone (:mod:`threedino_pipe.models.backbone_choice`); writes
``<results>/<DatasetNNN_Name>/finetune__<head>__<backbone tag>__pct<P>__fold<F>__seed<S>/``
(docs/schemas.md, "Finetune run folder and model.json"). ``--pct P --fold F --seed S`` pick the
same training cases for every backbone and head (:func:`threedino_pipe.training_data.splits.select_subset`);
``--seed`` also seeds the initialisation and the patch stream. A rerun of the same command
resumes; one with other options refuses (``--restart``, or ``--run NAME`` for a second run beside it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import (
    BackboneRecord,
    FinetuneConfiguration,
    ModelCard,
    Plans,
    RunRecord,
    SegmentationValidation,
    Splits,
    Subset,
)
from threedino_pipe.models.backbone_choice import BackboneChoice, resolve_backbone
from threedino_pipe.models.backbones import get_family
from threedino_pipe.models.presets import PRESETS
from threedino_pipe.models.segmentation import (
    END_TO_END_HEADS,
    HEAD_FAMILY,
    HEAD_NEEDS,
    HEAD_TRAINING_DEFAULTS,
    SEGMENTATION_HEADS,
    check_head_family,
)
from threedino_pipe.models.swin import FAMILY as SWIN
from threedino_pipe.models.swin import repeat_channels
from threedino_pipe.runtime import paths, progress
from threedino_pipe.runtime.distributed import cleanup, init_distributed
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.precision import PRECISIONS, resolve_precision
from threedino_pipe.training import probe
from threedino_pipe.training.run_setup import (
    batch_for_device,
    dataset_plans,
    open_run,
    run_beside,
    run_folder,
    run_lock,
)
from threedino_pipe.training.segmentation_trainer import SegRunConfig, train_segmentation
from threedino_pipe.training_data.label_volumes import training_volume_ranges
from threedino_pipe.training_data.patch_loader import Augmentation
from threedino_pipe.training_data.splits import select_subset

logger = logging.getLogger(__name__)
CONFIGURATION = "finetune"
ALL_HEADS = (*SEGMENTATION_HEADS, "probe")
CPU_BATCH_CAP = 2
DEFAULT_ITERS = 30_000
WARMUP_FRACTION = 0.1      # docs/method.md, "Downstream: segmentation": 3,000 warm-up iterations of 30,000
DEFAULT_WEIGHT_DECAY = 1e-5
SWIN_MULTIPLE = 32         # SwinUNETR halves a patch five times (2-voxel patches, four mergings)


def run_folder_name(head: str, tag: str, pct: float, fold: int, seed: int) -> str:
    """``finetune__<head>__<tag>__pct<P>__fold<F>__seed<S>`` (P printed with ``%g``: 100, 25, 2.5)."""
    return f"finetune__{head}__{tag}__pct{pct:g}__fold{fold}__seed{seed}"


def default_val_every(iters: int) -> int:
    """A tenth of the run, at most every 1,000 iterations, at least every iteration."""
    return max(1, min(1000, iters // 10))


def output_targets(labels: dict | None) -> tuple[str, list, list[str]]:
    """``(output, targets, names)`` of the dataset's labels.

    Plain labels: softmax over the declared values, sorted (background 0 first); ``targets`` are
    those values, ``names`` the foreground label names. Region labels (a label lists several
    values): sigmoid, one channel per region in the order of ``labels``; ``targets`` are each
    region's value lists, ``names`` the region names.
    """
    labels = labels or {}
    if any(isinstance(v, list) for v in labels.values()):
        regions = [(name, v if isinstance(v, list) else [v]) for name, v in labels.items()
                   if not (not isinstance(v, list) and int(v) == 0)]
        return "sigmoid", [[int(x) for x in v] for _, v in regions], [name for name, _ in regions]
    by_value = {int(v): name for name, v in labels.items()}
    values = sorted(set(by_value) | {0})
    return "softmax", values, [by_value.get(v, f"label_{v}") for v in values if v != 0]


def _check_options(head: str | None, precision: str, preset: str | None, overlap: float, iters: int | None) -> None:
    if head is not None and head not in ALL_HEADS:
        raise UserError(f"unknown --head {head}", fix=f"use one of {', '.join(ALL_HEADS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision}", fix=f"use one of {', '.join(PRECISIONS)}")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown --preset {preset}", fix=f"use one of {', '.join(PRESETS)}")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap {overlap} is outside [0, 1)", fix="pass e.g. 0.5 (validation) or 0.75")
    if iters is not None and iters < 1:
        raise UserError(f"--iters {iters} must be at least 1", fix="pass --iters 1 or more")


def run(dataset: str, *, pct: float = 100.0, fold: int = 0, head: str | None = None, backbone: str = "auto",
        unfreeze: bool = False, preset: str | None = None, iters: int | None = None, batch_size: int | None = None,
        lr: float | None = None, weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int = 0,
        val_every: int | None = None, overlap: float = 0.5, num_workers: int = 2, device: str = "auto",
        precision: str = "auto", stop_after: int | None = None, restart: bool = False, save_every: int = 500,
        augment: bool = True, run_name: str | None = None, beside: bool = False) -> Path:
    """Finetune on ``dataset``'s ``--pct`` subset of ``fold``; returns the run folder (see the module docstring).

    ``run_name`` (``--run``) names the run folder instead of the derived name. ``beside`` (``3dino study``'s
    cells): when that folder holds a run made with other options, use the first of ``<name>__2``,
    ``<name>__3``, ... that is free or holds this very run, instead of refusing.
    """
    _check_options(head, precision, preset, overlap, iters)
    console = progress.stderr_console(quiet=os.environ.get("RANK", "0") != "0")  # under torchrun rank 0 speaks
    pre, plans = dataset_plans(dataset)
    if plans.task == "classification" or head == "probe":
        _check_probe(pre, plans, head)
        more = {} if iters is None else {"iters": iters}  # the probe has its own default (12,500)
        return probe.run(dataset, pct=pct, fold=fold, seed=seed, backbone=backbone, preset=preset,
                         batch_size=batch_size, device=device, num_workers=num_workers, restart=restart,
                         stop_after=stop_after, run_name=run_name, beside=beside, **more)
    config, finetune_dir = _segmentation_configuration(pre, plans, dataset)
    splits = Splits.of_dataset(pre, dataset)
    train_ids = select_subset(splits, fold, seed, pct, None, splits_file=Splits.in_folder(pre))
    val_ids = list(splits.fold(fold).val)
    choice = resolve_backbone(backbone, paths.results_root(), expect=preset, family=HEAD_FAMILY.get(head))
    console.print(choice.how)
    head = head or default_head(choice)
    check_head_family(head, choice.family, file=choice.source)
    if head in HEAD_NEEDS:
        get_family(choice.family).require(HEAD_NEEDS[head], f"--head {head} cannot be built", file=choice.source)
    frozen = choice.pretrained and not unfreeze and head not in END_TO_END_HEADS
    patch = head_patch_size(head, config, pre, dataset, console)
    iters = iters or DEFAULT_ITERS
    dist = init_distributed(device)
    held = contextlib.ExitStack()
    try:
        output, targets, names = output_targets(plans.labels)
        run_config = SegRunConfig(
            dataset=pre.name, head=head, backbone_tag=choice.tag, backbone_source=choice.source,
            backbone_sha256=choice.sha256, backbone_dims=choice.dims if choice.pretrained else
            (preset or config.preset), frozen=frozen,
            preset=choice.info.get("preset") if choice.pretrained else (preset or config.preset),
            pct=float(pct), fold=fold, seed=seed, train_ids=train_ids, val_ids=val_ids, iters=iters,
            batch_size=batch_for_device(config.batch_size, batch_size, dist, CPU_BATCH_CAP, console, "patches"),
            lr=float(lr if lr is not None else HEAD_TRAINING_DEFAULTS[head]["lr"]), weight_decay=weight_decay,
            warmup_iters=round(WARMUP_FRACTION * iters), patch_size=patch,
            in_channels=plans.num_channels, output=output, targets=targets, target_names=names,
            val_every=val_every or default_val_every(iters), overlap=overlap,
            precision=resolve_precision(precision, dist.device), world_size=dist.world_size,
            augmentation=Augmentation.for_spacing(config.spacing).options() if augment else {},
            backbone_family=choice.family, backbone_method=choice.method,
            num_workers=num_workers, save_every=save_every, device=device)
        tag = choice.tag if frozen or not choice.pretrained or head in END_TO_END_HEADS else f"{choice.tag}-unfrozen"
        folder = run_folder(paths.results_root() / pre.name, run_name, run_folder_name(head, tag, pct, fold, seed))
        record = RunRecord(stage="finetune", options=run_config.options(), volatile=list(SegRunConfig.VOLATILE),
                           plans={pre.name: plans.dependencies(CONFIGURATION)})
        if beside:
            folder = run_beside(folder, record)
        held.enter_context(run_lock(folder, dist))
        resume = open_run(folder, record, restart=restart, dist=dist)
        if resume and _finished(folder, iters) and not stop_after:
            console.print(f"{folder} is finished already ({iters} iterations); pass --restart to train again")
            return folder
        if dist.is_main:
            _write_subset(folder, run_config)
            console.print(f"finetune run {folder} ({'resuming' if resume else 'new'}): head {head}, backbone "
                          f"{choice.tag} ({'frozen' if frozen else 'trained'}), {len(train_ids)} training / "
                          f"{len(val_ids)} validation cases, patch {run_config.patch_size}, batch "
                          f"{run_config.batch_size} x {dist.world_size} process(es), {iters} iterations, lr "
                          f"{run_config.lr:g}, {run_config.precision}, device {dist.device}")
        best = train_segmentation(run_config, folder, finetune_dir, dist, resume=resume,
                                  rerun=f"3dino preprocess -d {dataset} -c finetune",
                                  model_card=_model_card(plans, run_config, choice, finetune_dir),
                                  backbone_state=_backbone_state(choice, plans.num_channels),
                                  stop_after=stop_after)
        if dist.is_main:
            if best is not None:
                console.print(f"best validation Dice {best.mean_dice:.4f} at iteration {best.iteration}")
            console.print(f"[green]finetune[/]: {folder}")
        return folder
    finally:
        held.close()
        cleanup()


def default_head(choice: BackboneChoice) -> str:
    """The head when ``--head`` is left out: ``swinunetr`` for a Swin encoder; ``unetr`` with ``--backbone none``;
    ``adapter`` on a pretrained backbone whose family offers it, else ``linear`` (a natural-image 2D backbone,
    ``hf2d``)."""
    if choice.family == SWIN:
        return "swinunetr"
    if not choice.pretrained:
        return "unetr"
    return "adapter" if HEAD_NEEDS["adapter"] in get_family(choice.family).capabilities else "linear"


def head_patch_size(head: str, config: FinetuneConfiguration, pre: Path, dataset: str, console: Console) -> list[int]:
    """The training patch: plans.json's; for ``swinunetr`` each side rounded down to a multiple of 32 voxels
    (SwinUNETR's five halvings), a side under 32 being a UserError naming plans.json."""
    patch = [int(p) for p in config.patch_size]
    if head != "swinunetr":
        return patch
    if min(patch) < SWIN_MULTIPLE:
        raise UserError(f"--head swinunetr needs patch sides of at least {SWIN_MULTIPLE} voxels (multiples of "
                        f"{SWIN_MULTIPLE}); the finetune patch size is {patch}", file=Plans.in_folder(pre),
                        fix=f"rerun `3dino plan -d {dataset} --patch-size ...` with multiples of {SWIN_MULTIPLE}, "
                        f"then `3dino preprocess -d {dataset}`")
    cropped = [p - p % SWIN_MULTIPLE for p in patch]
    if cropped != patch:
        console.print(f"note: --head swinunetr trains on {cropped} patches (plans.json's {patch} rounded down to "
                      f"multiples of {SWIN_MULTIPLE}); `3dino plan --patch-size` chooses others")
    return cropped


def _backbone_state(choice: BackboneChoice, in_channels: int) -> dict | None:
    """The pretrained backbone's weights for the network (None: random initialisation); a 1-channel Swin
    encoder's patch embedding repeated over ``in_channels`` channels (``models.swin.repeat_channels``)."""
    if not choice.pretrained:
        return None
    state = choice.model.state_dict()
    return repeat_channels(state, in_channels) if choice.family == SWIN else state


def _check_probe(pre: Path, plans: Plans, head: str | None) -> None:
    if plans.task != "classification":
        raise UserError(f"--head probe classifies whole cases, but {pre.name} is a {plans.task} dataset",
                        file=Plans.in_folder(pre), fix="use --head adapter, unetr or linear for segmentation")
    if head not in (None, "probe"):
        raise UserError(f"{pre.name} is a classification dataset: the {head} head segments", file=Plans.in_folder(pre),
                        fix="pass --head probe (the linear probe on the frozen backbone), or leave --head out")


def _segmentation_configuration(pre: Path, plans: Plans, dataset: str) -> tuple[FinetuneConfiguration, Path]:
    """The finetune configuration of a segmentation dataset and its preprocessed folder, checked."""
    finetune_dir = pre / CONFIGURATION
    if plans.task != "segmentation" or plans.configurations.finetune is None:
        raise UserError(f"{pre.name} is a {plans.task} dataset: there is nothing to finetune on",
                        file=Plans.in_folder(pre),
                        fix="finetune on a labelled (segmentation or classification) dataset")
    if not finetune_dir.is_dir():
        raise UserError("the finetune configuration is not preprocessed", file=finetune_dir,
                        fix=f"run `3dino preprocess -d {dataset} -c finetune`")
    config = plans.configurations.finetune
    if any(p % 16 for p in config.patch_size):
        raise UserError(f"the finetune patch size {config.patch_size} is not a multiple of the ViT's 16-voxel "
                        "patches", file=Plans.in_folder(pre),
                        fix=f"rerun `3dino plan -d {dataset} --patch-size ...` with multiples of 16")
    return config, finetune_dir


def _model_card(plans: Plans, config: SegRunConfig, choice: BackboneChoice, finetune_dir: Path) -> ModelCard:
    """model.json before training: the network's arguments and best checkpoint are filled in at each new best;
    the structures' volume ranges over the training cases (``label_volumes_ml``) come from their case files."""
    card = ModelCard(
        task="segmentation", dataset=config.dataset, plans=plans, configuration=CONFIGURATION,
        channel_names=plans.channel_names, labels=plans.labels, regions_class_order=plans.regions_class_order,
        class_names=plans.class_names, head=config.head, model_args={},
        backbone=BackboneRecord(tag=choice.tag, source=choice.source, sha256=choice.sha256, frozen=config.frozen,
                                family=config.backbone_family, method=choice.method,
                                preset=choice.info.get("preset") if choice.pretrained else None),
        in_channels=config.in_channels, num_outputs=config.num_outputs, output=config.output,
        patch_size=config.patch_size, fold=config.fold, pct=config.pct, seed=config.seed,
        series_rules=plans.series_rules)
    card.label_volumes_ml = training_volume_ranges(finetune_dir, config.train_ids, card.structures())
    return card


def _write_subset(folder: Path, config: SegRunConfig) -> None:
    """``subset.json``: the training case ids ``--pct --fold --seed`` chose (and the fold's validation cases)."""
    Subset(dataset=config.dataset, fold=config.fold, seed=config.seed, pct=config.pct, ids=config.train_ids,
           val_ids=config.val_ids).write(Subset.in_folder(folder))


def _finished(folder: Path, iters: int) -> bool:
    path = SegmentationValidation.in_folder(folder)
    return path.is_file() and SegmentationValidation.read(path).iterations_done >= iters
