"""``3dino finetune --head probe``: the paper's linear probe on a frozen backbone (classification).

Agreed entry point (called by the ``finetune`` command for ``--head probe``)::

    run(dataset: str, *, pct: float, fold: int = 0, seed: int = 0, backbone: str = "auto",
        preset: str | None = None, iters: int = 12500, batch_size: int | None = None,
        device: str = "auto", num_workers: int = 2, restart: bool = False,
        stop_after: int | None = None, num_augmentations: int = 8) -> Path   # the run folder

Steps: the fold's ``--pct`` subset (splits.json, stratified); frozen features of every training
case's centre view and ``num_augmentations`` augmented views and of every validation case's
centre view, computed once into ``features.pt`` (:mod:`threedino_pipe.inference.features`); the
whole grid (13 learning rates x layers {1, 4} x avgpool) trained at once on the cached features
(:mod:`threedino_pipe.training.probe_grid`); the best point on the validation cases (macro AUC,
ties by accuracy, then by validation cross-entropy, then grid order) becomes the model.
``--batch-size`` is the probe's batch (default 32); ``num_workers`` is accepted for the shared
finetune signature and unused (features are computed in this process). Run folder contents:
docs/probe.md.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from threedino_pipe.artifacts import (
    CHECKPOINT_FILES,
    BackboneRecord,
    BestMetric,
    CaseProperties,
    FinetuneConfiguration,
    ModelCard,
    Plans,
    ProbePoint,
    ProbeValidation,
    RunRecord,
    Splits,
    Subset,
    open_run_folder,
)
from threedino_pipe.evaluation.classification_metrics import classification_metrics, fast_metrics
from threedino_pipe.inference.features import (
    FLIP_AXIS,
    VIEW_CROSSSLICE_SCALE,
    VIEW_INPLANE_SCALE,
    FeatureCache,
    extract_cases,
)
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.models.backbones import get_family
from threedino_pipe.models.classification import MAX_LAYERS, FrozenFeatures, ProbeClassifier, probe_input
from threedino_pipe.models.presets import PRESETS
from threedino_pipe.preprocessing.arrays import open_array
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.checkpoints import load_checkpoint, save_checkpoint
from threedino_pipe.runtime.csv_log import CsvLog
from threedino_pipe.runtime.device import pick_device
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import stderr_console
from threedino_pipe.training.probe_grid import (
    LEARNING_RATES,
    GridPoint,
    ProbeGrid,
    batch_indices,
    cosine_factor,
    grid_points,
)
from threedino_pipe.training.run_setup import dataset_plans, new_run_fix, run_beside, run_folder
from threedino_pipe.training_data.splits import select_subset
from threedino_pipe.visualization.curves import plot_curves

logger = logging.getLogger(__name__)

HEAD = "probe"
CONFIGURATION = "finetune"
DEFAULT_BATCH = 32
DEFAULT_AUGMENTATIONS = 8
EXTRACT_BATCH = 8
VOLATILE = ("device",)
LOG_POINTS = 25          # log.csv rows (with validation of every grid point) per run, about
CHECKPOINT_POINTS = 10   # checkpoint_latest.pt saves per run (about)
SELECTION_RESOLUTION = 1e-4  # probabilities closer than this tie when ranking grid points by AUC


def run_folder_name(tag: str, pct: float, fold: int, seed: int) -> str:
    """``finetune__probe__<tag>__pct<P>__fold<F>__seed<S>`` (P printed with ``%g``: 100, 25, 2.5)."""
    return f"finetune__{HEAD}__{tag}__pct{pct:g}__fold{fold}__seed{seed}"


def _case_labels(finetune_dir: Path, case_ids: list[str], dataset: str) -> dict[str, int]:
    labels = {}
    for case in case_ids:
        path = CaseProperties.path(finetune_dir, case)
        if not path.is_file() or not (finetune_dir / f"{case}.b2nd").is_file():
            raise UserError(f"preprocessed case '{case}' is missing", file=path,
                            fix=f"run `3dino preprocess -d {dataset}`")
        label = CaseProperties.read(path, rerun=f"3dino preprocess -d {dataset}").class_label
        if label is None:
            raise UserError(f"case '{case}' has no class_label", file=path,
                            fix=f"rerun `3dino preprocess -d {dataset}` (and check labelsTr.csv)")
        labels[case] = int(label)
    return labels


def _backbone(spec: str, preset: str | None, config: FinetuneConfiguration, seed: int, console: Console) -> tuple:
    """(backbone, tag, record for model.json, cache key)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown --preset {preset}", fix=f"use one of {', '.join(PRESETS)}")
    choice = resolve_backbone(spec, paths.results_root(), expect=preset)
    console.print(choice.how)
    family = get_family(choice.family)
    family.require("cls_token", "the classification probe reads CLS tokens", file=choice.source)
    if choice.model is None:
        name = preset or config.preset
        torch.manual_seed(seed)
        model = family.build(name)
        console.print(f"probe on a frozen, randomly initialised {name} backbone (seed {seed})")
        record = BackboneRecord(tag=choice.tag, source="none", sha256=None, frozen=True, preset=name,
                                family=family.name)
        return model, choice.tag, record, f"none:{name}:{seed}"
    record = BackboneRecord(tag=choice.tag, source=choice.source, sha256=choice.sha256, frozen=True,
                            preset=choice.info.get("preset"), family=family.name, method=choice.method)
    return choice.model, choice.tag, record, choice.sha256


def _stack(features: dict[str, dict[str, torch.Tensor]], ids: list[str], labels: dict[str, int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full feature vectors ``[sum of views, (L + 1) * C * dim]`` and their labels."""
    rows, ys = [], []
    for case in ids:
        f = features[case]
        rows.append(probe_input(f["cls"], f["patch_mean"], f["cls"].shape[1], True))
        ys.extend([labels[case]] * f["cls"].shape[0])
    return torch.cat(rows), torch.tensor(ys, dtype=torch.long)


def _val_scores(grid: ProbeGrid, x_val: torch.Tensor, y_val: torch.Tensor, class_names: list[str]) -> list[dict]:
    """Validation AUC (macro), F1 (macro), accuracy and cross-entropy of every grid point.

    AUC ranks probabilities rounded to ``SELECTION_RESOLUTION``: a probe whose outputs barely
    depend on the input (e.g. on the constant CLS token of an untrained backbone) must not win
    the selection by float noise that happens to order a small validation set perfectly.
    """
    probs = grid.probabilities(x_val).cpu().numpy().astype(np.float64)
    y = y_val.cpu().numpy()
    out = []
    for g in range(len(grid.points)):
        p = probs[g]
        m = fast_metrics(y, p.argmax(1), np.round(p / SELECTION_RESOLUTION) * SELECTION_RESOLUTION, class_names)
        loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
        out.append({"auc": m["auc"]["macro"], "f1": m["f1"]["macro"], "accuracy": m["accuracy"]["all"], "loss": loss})
    return out


def best_point(scores: list[dict]) -> int:
    """Index of the best grid point: highest macro AUC (NaN lowest), then accuracy, then lowest loss, then first."""
    def key(g: int) -> tuple:
        auc = scores[g]["auc"]
        return (-(auc if np.isfinite(auc) else -1.0), -scores[g]["accuracy"], scores[g]["loss"], g)
    return min(range(len(scores)), key=key)


def _train(grid: ProbeGrid, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
           class_names: list[str], folder: Path, *, iters: int, batch: int, seed: int, resume: bool,
           stop_after: int | None, console: Console) -> bool:
    """Train the grid from checkpoint_latest.pt (if resuming); True when all ``iters`` are done."""
    start = 0
    latest = folder / "checkpoint_latest.pt"
    if resume and latest.is_file():
        state = load_checkpoint(latest, rerun="the same `3dino finetune` command")
        grid.load_state_dict(state["grid"])
        start = int(state["iteration"])
        console.print(f"resuming the probe grid at iteration {start} of {iters}")
    log = CsvLog(folder / "log.csv", resume_iteration=start if start else None)
    log_every = max(1, iters // LOG_POINTS)
    save_every = max(1, iters // CHECKPOINT_POINTS)
    end = iters if stop_after is None else min(iters, start + stop_after)
    threads = torch.get_num_threads()
    if x.device.type == "cpu":  # the probe's small matrix products run fastest on one thread
        torch.set_num_threads(1)
    try:
        _steps(grid, x, y, x_val, y_val, class_names, log, latest, start=start, end=end, iters=iters, batch=batch,
               seed=seed, log_every=log_every, save_every=save_every)
    finally:
        torch.set_num_threads(threads)
    return end == iters


def _steps(grid: ProbeGrid, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
           class_names: list[str], log: CsvLog, latest: Path, *, start: int, end: int, iters: int, batch: int,
           seed: int, log_every: int, save_every: int) -> None:
    running = []
    for t in range(start, end):
        idx = batch_indices(t, batch, x.shape[0], seed).to(x.device)
        losses = grid.step(x[idx], y[idx], cosine_factor(t, iters))
        running.append(losses)
        done = t + 1
        if done % log_every == 0 or done == end:
            scores = _val_scores(grid, x_val, y_val, class_names)
            best = scores[best_point(scores)]
            mean_loss = torch.stack(running).mean(0)
            log.write({"iteration": done, "lr_factor": cosine_factor(t, iters),
                       "train_loss_mean": float(mean_loss.mean()), "train_loss_min": float(mean_loss.min()),
                       "val_auc_best": best["auc"], "val_accuracy_best": best["accuracy"],
                       "val_loss_best": best["loss"]})
            running = []
        if done % save_every == 0 or done == end:
            save_checkpoint({"iteration": done, "iters": iters, "grid": grid.state_dict()}, latest)


@torch.no_grad()
def _mean_losses(grid: ProbeGrid, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cross-entropy of every grid point over all rows of ``x``, ``[G]``."""
    total = sum(grid.losses(x[i:i + chunk], y[i:i + chunk]) * len(y[i:i + chunk]) for i in range(0, len(y), chunk))
    return (total / len(y)).cpu()


def _write_predictions(path: Path, case_ids: list[str], probs: np.ndarray, class_names: list[str]) -> None:
    """``predictions.csv`` layout (docs/schemas.md): case_id, predicted_class, prob_<class>..."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "predicted_class", *[f"prob_{c}" for c in class_names]])
        for case, p in zip(case_ids, probs, strict=True):
            writer.writerow([case, class_names[int(p.argmax())], *[f"{v:.6f}" for v in p]])


def _write_grid_csv(path: Path, points: list[GridPoint], scores: list[dict], final_losses: torch.Tensor,
                    best: int) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["lr", "layers", "avgpool", "val_auc", "val_f1", "val_accuracy", "val_loss", "train_loss",
                         "best"])
        for g, (point, s) in enumerate(zip(points, scores, strict=True)):
            writer.writerow([f"{point.lr:g}", point.layers, point.avgpool, f"{s['auc']:.6f}", f"{s['f1']:.6f}",
                             f"{s['accuracy']:.6f}", f"{s['loss']:.6f}", f"{float(final_losses[g]):.6f}",
                             int(g == best)])


def _classification_configuration(pre: Path, plans: Plans, dataset: str) -> tuple[FinetuneConfiguration, Path]:
    """The finetune configuration of a classification dataset and its preprocessed folder, checked."""
    if plans.task != "classification":
        raise UserError(f"--head probe classifies whole cases, but {pre.name} is a {plans.task} dataset",
                        file=Plans.in_folder(pre), fix="use --head adapter, unetr or linear for segmentation")
    config = plans.configurations.finetune
    finetune_dir = pre / CONFIGURATION
    if config is None or not finetune_dir.is_dir():
        raise UserError("the finetune configuration is not preprocessed", file=finetune_dir,
                        fix=f"run `3dino preprocess -d {dataset} -c finetune`")
    return config, finetune_dir


def _subset(pre: Path, finetune_dir: Path, dataset: str, *, fold: int, seed: int, pct: float
            ) -> tuple[list[str], list[str], list[str], dict[str, int]]:
    """(the fold's training cases, the stratified ``--pct`` subset of them, its validation cases, class labels)."""
    splits_file = Splits.in_folder(pre)
    splits = Splits.of_dataset(pre, dataset)
    fold_split = splits.fold(fold, file=splits_file)
    fold_train, val_ids = list(fold_split.train), list(fold_split.val)
    labels = _case_labels(finetune_dir, sorted(set(fold_train) | set(val_ids)), dataset)
    train_ids = select_subset(splits, fold, seed, pct, {c: labels[c] for c in fold_train}, splits_file=splits_file)
    if not val_ids:
        raise UserError(f"fold {fold} has no validation cases", file=splits_file,
                        fix=f"add cases and rerun `3dino preprocess -d {dataset}`")
    return fold_train, train_ids, val_ids, labels


def run(dataset: str, *, pct: float, fold: int = 0, seed: int = 0, backbone: str = "auto",
        preset: str | None = None, iters: int = 12_500, batch_size: int | None = None, device: str = "auto",
        num_workers: int = 2, restart: bool = False, stop_after: int | None = None,
        num_augmentations: int = DEFAULT_AUGMENTATIONS, run_name: str | None = None, beside: bool = False) -> Path:
    """Train the linear-probe grid on ``dataset``'s ``--pct`` subset of ``fold``; returns the run folder
    (``run_name``: ``--run``, else the derived name; ``beside``: as finetune's, a run with other options
    there makes this one ``<name>__2``, ...)."""
    del num_workers  # see the module docstring
    console = stderr_console()
    if iters < 1:
        raise UserError(f"--iters {iters} must be at least 1", fix="pass --iters 1 or more")
    if num_augmentations < 0:
        raise UserError(f"num_augmentations {num_augmentations} must be >= 0", fix="pass 0 or more")
    pre, plans = dataset_plans(dataset)
    config, finetune_dir = _classification_configuration(pre, plans, dataset)
    class_names = list(plans.class_names)
    in_channels = plans.num_channels
    patch_size = list(config.patch_size)
    fold_train, train_ids, val_ids, labels = _subset(pre, finetune_dir, dataset, fold=fold, seed=seed, pct=pct)

    net, tag, backbone_record, backbone_key = _backbone(backbone, preset, config, seed, console)
    if net.in_chans != 1:
        raise UserError(f"the backbone takes {net.in_chans} input channels; the probe needs a single-channel "
                        "backbone (channels run through it separately)", file=backbone_record.source,
                        fix="pass a single-channel 3D ViT backbone")
    batch = int(batch_size or DEFAULT_BATCH)
    folder = run_folder(paths.results_root() / pre.name, run_name, run_folder_name(tag, pct, fold, seed))
    options = {"dataset": pre.name, "head": HEAD, "pct": float(pct), "fold": fold, "seed": seed,
               "backbone": backbone_record.source, "backbone_sha256": backbone_record.sha256,
               "preset": backbone_record.preset, "iters": iters, "batch_size": batch,
               "num_augmentations": num_augmentations, "learning_rates": list(LEARNING_RATES), "device": device}
    record = RunRecord(stage="finetune", options=options, volatile=list(VOLATILE),
                       plans={pre.name: plans.dependencies(CONFIGURATION)})
    if beside:
        folder = run_beside(folder, record)
    resume = open_run_folder(folder, record, restart=restart, new_run_fix=new_run_fix(folder))
    if resume and _finished(folder, iters):
        console.print(f"{folder} is finished already; pass --restart to train again")
        return folder
    Subset(dataset=pre.name, fold=fold, seed=seed, pct=float(pct), ids=train_ids, val_ids=val_ids,
           num_fold_train=len(fold_train),
           class_counts={name: sum(labels[c] == k for c in train_ids) for k, name in enumerate(class_names)}
           ).write(Subset.in_folder(folder))
    dev = pick_device(device)
    console.print(f"probe run {folder} ({'resuming' if resume else 'new'}): {len(train_ids)} training cases x "
                  f"{1 + num_augmentations} views, {len(val_ids)} validation cases, grid of "
                  f"{len(grid_points(min(MAX_LAYERS, net.depth)))}, {iters} iterations, batch {batch}, device {dev}")

    extractor = FrozenFeatures(net, MAX_LAYERS).to(dev)
    cache = FeatureCache(folder / "features.pt", {
        "backbone": backbone_key, "patch_size": patch_size, "seed": seed, "num_layers": extractor.num_layers,
        "plans_checksum": plans.stored_checksum(CONFIGURATION),
        "views": [list(VIEW_INPLANE_SCALE), list(VIEW_CROSSSLICE_SCALE), FLIP_AXIS]})
    wanted = [(c, 1 + num_augmentations) for c in train_ids] + [(c, 1) for c in val_ids if c not in train_ids]
    features = extract_cases(extractor, wanted, lambda c: open_array(finetune_dir / f"{c}.b2nd")[:], patch_size,
                             cache, seed=seed, device=dev, batch_size=EXTRACT_BATCH, description="frozen features")
    if cache.reused:
        console.print(f"reused the cached features of {cache.reused} case(s) from {cache.path.name}")
    x, y = _stack(features, train_ids, labels)
    x_val, y_val = _stack({c: {k: v[:1] for k, v in features[c].items()} for c in val_ids}, val_ids, labels)
    x, y, x_val, y_val = x.to(dev), y.to(dev), x_val.to(dev), y_val.to(dev)

    points = grid_points(extractor.num_layers)
    grid = ProbeGrid(points, extractor.num_layers, in_channels * net.embed_dim, len(class_names), seed=seed,
                     device=dev)
    if not _train(grid, x, y, x_val, y_val, class_names, folder, iters=iters, batch=batch, seed=seed,
                  resume=resume, stop_after=stop_after, console=console):
        console.print(f"stopped after --stop-after {stop_after} iterations; rerun the same command to continue")
        return folder
    _finish(folder, grid, points, x, y, x_val, y_val, val_ids, net, plans, pre.name, class_names, in_channels,
            patch_size, backbone_record, fold=fold, pct=pct, seed=seed, iters=iters, console=console)
    return folder


def _finished(folder: Path, iters: int) -> bool:
    latest = folder / "checkpoint_latest.pt"
    if not all(p.is_file() for p in (ModelCard.in_folder(folder), folder / "checkpoint_best.pt",
                                     ProbeValidation.in_folder(folder))):
        return False
    return int(load_checkpoint(latest).get("iteration", -1)) == iters if latest.is_file() else False


def _finish(folder: Path, grid: ProbeGrid, points: list[GridPoint], x: torch.Tensor, y: torch.Tensor,
            x_val: torch.Tensor, y_val: torch.Tensor, val_ids: list[str], net, plans: Plans, dataset: str,
            class_names: list[str], in_channels: int, patch_size: list[int], backbone_record: BackboneRecord, *,
            fold: int, pct: float, seed: int, iters: int, console: Console) -> None:
    """Pick the best grid point; write grid.csv, checkpoint_best.pt (= checkpoint_final.pt), model.json,
    validation.json, curves.png."""
    scores = _val_scores(grid, x_val, y_val, class_names)
    best = best_point(scores)
    point = points[best]
    _write_grid_csv(folder / "grid.csv", points, scores, _mean_losses(grid, x, y), best)

    probe = ProbeClassifier(net.cpu(), in_channels, len(class_names), point.layers, point.avgpool)
    weight, bias = grid.linear(best)
    with torch.no_grad():
        probe.head.weight.copy_(weight)
        probe.head.bias.copy_(bias)
    for name in CHECKPOINT_FILES.values():  # the grid point is chosen at the end: the same
        save_checkpoint({"model": probe.state_dict()}, folder / name)

    probs = np.round(grid.probabilities(x_val)[best].cpu().numpy().astype(np.float64), 6)  # as the CSV holds them
    y_true = y_val.cpu().numpy()
    metrics = classification_metrics(y_true, probs.argmax(1), probs, class_names)
    _write_predictions(folder / "validation_predictions.csv", val_ids, probs, class_names)
    ProbeValidation(iteration=iters, num_cases=len(val_ids), best=ProbePoint(**point.to_dict()), metrics=metrics,
                    selection="highest macro AUC, ties by accuracy, then by validation cross-entropy").write(
        ProbeValidation.in_folder(folder))
    ModelCard(
        task="classification", dataset=dataset, plans=plans, configuration=CONFIGURATION,
        channel_names=plans.channel_names, labels=plans.labels or {}, regions_class_order=plans.regions_class_order,
        class_names=class_names, head=HEAD, model_args=probe.model_args(), backbone=backbone_record,
        in_channels=in_channels, num_outputs=len(class_names), output="softmax", patch_size=patch_size,
        normalization=plans.configurations.finetune.normalization, weights="checkpoint_best.pt",
        input_view="centre: the whole preprocessed volume resized (trilinear) to patch_size "
                   "(threedino_pipe.inference.features.centre_view)",
        probe={**point.to_dict(), "grid_size": len(points)}, fold=fold, pct=float(pct), seed=seed,
        best_iteration=iters, best_metric=BestMetric(name="auc", value=metrics["auc"]["macro"]),
        series_rules=plans.series_rules).write(
        ModelCard.in_folder(folder))
    plot_curves(folder / "log.csv", folder / "curves.png", title=f"{dataset} probe: best of {len(points)} grid points")
    console.print(f"[green]probe[/]: {folder}: best lr {point.lr:g}, layers {point.layers}, avgpool "
                  f"{point.avgpool}: validation AUC {metrics['auc']['macro']:.3f}, F1 {metrics['f1']['macro']:.3f}, "
                  f"accuracy {metrics['accuracy']['all']:.3f} ({len(val_ids)} cases)")
