"""``3dino study``: every cell of the label-efficiency experiment, then its tables, figure and report.

A cell is an ordinary finetune run (reused when finished with the same options, beside an existing run with
other ones), predict on the held-out test cases and evaluate (:mod:`threedino_pipe.study.runner`). Cells are
independent and resumable; ``--cells K/N`` runs one share, ``--collect`` aggregates (docs/study.md).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console

from threedino_pipe.artifacts import Plans, Splits, StudyCell, StudyRecord
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.progress import stderr_console
from threedino_pipe.stages.finetune import DEFAULT_ITERS
from threedino_pipe.study import aggregate, cell_finetune, slurm, test_cases
from threedino_pipe.study import cells as study_cells
from threedino_pipe.study.layout import StudyLayout
from threedino_pipe.study.runner import CellOptions, is_done, run_cell

DEFAULT_NAME = "main"
SECONDS = "seconds"  # the log.csv column of one iteration's wall time


@dataclass(frozen=True)
class Setup:
    """The checked study: its record (options, cells, test cases), layout and the cells' options."""

    study: StudyRecord
    layout: StudyLayout
    options: CellOptions
    raw: Path
    args: list[str]


def _check_grid(pcts: list[float], seeds: list[int], folds: list[int], splits: Splits, pre: Path) -> None:
    for pct in pcts:
        if not 0 < pct <= 100:
            raise UserError(f"--pct {pct:g} is outside (0, 100]", fix="pass label shares like --pct 10 25 50 100")
    for fold in folds:
        splits.fold(fold, file=Splits.in_folder(pre))
    for name, values in (("--pct", pcts), ("--seeds", seeds), ("--folds", folds)):
        if len(set(values)) != len(values):
            raise UserError(f"{name} names a value twice", fix=f"give each {name} value once")


def _check_gpus(gpus: int | None, task: str) -> None:
    if gpus is None:
        return
    if gpus < 1:
        raise UserError(f"--gpus-per-cell {gpus} must be at least 1", fix="pass --gpus-per-cell 1 or more")
    if task == "classification":
        raise UserError("--gpus-per-cell: the probe cells of a classification study run in one process",
                        fix="leave --gpus-per-cell out")


def _reference(entries: list[study_cells.Entry], reference: str | None) -> str:
    labels = [e.label for e in entries]
    if reference is None:
        return next((e.label for e in entries if e.backbone == "none"), labels[0])
    if reference not in labels:
        raise UserError(f"--reference {reference} is none of the --backbones entries ({', '.join(labels)})",
                        fix="pass one of these names")
    return reference


def _args(dataset: str, entries, pcts, seeds, folds, name, on_validation, reference, options: CellOptions
          ) -> list[str]:
    """The study's options as command-line arguments (for the SLURM script)."""
    args = ["-d", dataset, "--backbones", *[e.text for e in entries], "--pct", *[f"{p:g}" for p in pcts],
            "--seeds", *map(str, seeds), "--folds", *map(str, folds), "--name", name, "--reference", reference,
            "--num-workers", str(options.num_workers), "--device", options.device]
    return (args + cell_finetune.settings_flags(options.settings) + (["--on-validation"] if on_validation else [])
            + (["--gpus-per-cell", str(options.gpus)] if options.gpus else []))


def _check_settings(settings: dict, task: str) -> None:
    """``--iters``, ``--batch-size``, ``--val-every`` at least 1, ``--lr`` above 0; a classification study's probe
    takes only ``--iters`` and ``--batch-size``.

    Raises:
        UserError: a value out of range, or ``--lr``/``--val-every`` for probe cells.
    """
    for name, value in settings.items():
        flag = f"--{name.replace('_', '-')}"
        if not (value > 0 if name == "lr" else value >= 1):
            raise UserError(f"{flag} {value:g} is out of range", fix=f"pass {flag} above 0" if name == "lr"
                            else f"pass {flag} 1 or more")
        if task == "classification" and name in ("lr", "val_every"):
            raise UserError(f"{flag}: the probe cells of a classification study choose their learning rate on the "
                            "validation cases and take no such option", fix=f"leave {flag} out")


def setup(dataset: str, *, backbones: list[str], pct: list[float], seeds: list[int], folds: list[int],
          iters: int | None, name: str, on_validation: bool, reference: str | None, num_workers: int,
          device: str, gpus_per_cell: int | None = None, batch_size: int | None = None, lr: float | None = None,
          val_every: int | None = None) -> Setup:
    """Check every option and find the test cases, before anything is written."""
    raw = paths.resolve_dataset(dataset)
    pre = paths.resolve_preprocessed(dataset)
    plans = Plans.of_dataset(pre)
    if plans.task not in ("segmentation", "classification"):
        raise UserError(f"{pre.name} is an {plans.task} dataset: a study needs labels", file=Plans.in_folder(pre),
                        fix="run the study on a labelled (segmentation or classification) dataset")
    cell_options = CellOptions(pre.name, iters, num_workers, device, gpus_per_cell, batch_size, lr, val_every)
    _check_settings(cell_options.settings, plans.task)
    entries = study_cells.parse_entries(backbones)
    study_cells.check_heads(entries, plans.task, Plans.in_folder(pre))
    _check_gpus(gpus_per_cell, plans.task)
    pcts, seeds, folds = [float(p) for p in pct], list(seeds), list(folds)
    _check_grid(pcts, seeds, folds, Splits.of_dataset(pre, dataset), pre)
    dataset_results = paths.results_root() / pre.name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]*", name):
        raise UserError(f"--name {name!r} is not a plain folder name", fix="use letters, digits, '.', '_', '+', '-'")
    layout = StudyLayout.of(dataset_results, name)
    source, case_ids = test_cases.find_test_cases(raw, pre, dataset, folds, on_validation)
    ref = _reference(entries, reference)
    options = {"backbones": [e.text for e in entries], "pct": pcts, "seeds": seeds, "folds": folds, "iters": iters,
               "on_validation": on_validation, **({"gpus_per_cell": gpus_per_cell} if gpus_per_cell else {}),
               **{k: v for k, v in cell_options.settings.items() if k != "iters"}}  # older studies: without them
    study = StudyRecord(dataset=pre.name, name=name, options=options, reference=ref, task=plans.task,
                        test_source=source, selection_biased=source == "validation", test_cases=case_ids,
                        cells=study_cells.make_cells(entries, pcts, seeds, folds))
    args = _args(dataset, entries, pcts, seeds, folds, name, on_validation, ref, cell_options)
    return Setup(study, layout, cell_options, raw, args)


def _open(layout: StudyLayout, study: StudyRecord) -> None:
    """Write ``study.json``, or check that the folder's study is this one (other options: refused)."""
    if layout.record.is_file():
        old = StudyRecord.read(layout.record)
        if old.model_dump(exclude={"version"}) != study.model_dump(exclude={"version"}):
            raise UserError("this study folder holds a study with other options, backbones, test cases or "
                            "reference", file=layout.record,
                            fix="pass another --name for a second study beside it, or delete the folder")
        return
    layout.folder.mkdir(parents=True, exist_ok=True)
    study.write(layout.record)


def _study_walls(layout: StudyLayout, study: StudyRecord) -> dict[str, float]:
    """Wall seconds of this study's done cells."""
    walls: dict[str, float] = {}
    for spec in study.cells:
        if layout.folder.is_dir() and layout.cell_record(spec.cell).is_file():
            record = StudyCell.read(layout.cell_record(spec.cell))
            if record.outcome == "done":
                walls[spec.cell] = record.wall_seconds
    return walls


def seconds_per_iteration(dataset_results: Path, head: str) -> float | None:
    """The median seconds of one training iteration over the ``log.csv`` of this dataset's finetune runs of
    ``head`` (validation iterations included); None without any."""
    values: list[float] = []
    for log in sorted(Path(dataset_results).glob(f"finetune__{head}__*/log.csv")):
        table = pd.read_csv(log)
        if SECONDS in table.columns:
            values += table[SECONDS].dropna().tolist()
    return statistics.median(values) if values else None


def estimate(layout: StudyLayout, study: StudyRecord, iters: int | None) -> dict[str, tuple[float, str]]:
    """Per cell ``(seconds, how)``: a done cell's own wall time; else the median of this study's done cells of its
    entry, else of all; else iterations x the median iteration time of the dataset's runs of its head (training
    only); cells with none of these are left out."""
    walls = _study_walls(layout, study)
    per_iteration: dict[str, float | None] = {}
    out = {}
    for spec in study.cells:
        pool = [walls[c.cell] for c in study.cells if c.cell in walls and c.label == spec.label] or list(walls.values())
        head = spec.head or study_cells.default_head(study.task, spec.backbone)
        if head not in per_iteration:
            per_iteration[head] = seconds_per_iteration(layout.folder.parent, head)
        if spec.cell in walls:
            out[spec.cell] = (walls[spec.cell], "its wall time")
        elif pool:
            out[spec.cell] = (statistics.median(pool), "this study's done cells")
        elif per_iteration[head] is not None:
            out[spec.cell] = ((iters or DEFAULT_ITERS) * per_iteration[head],
                              f"the dataset's {head} runs' iteration time, training only")
    return out


def dry_run(setup_: Setup, console: Console) -> int:
    """List the cells with their state and estimated time; writes nothing."""
    layout, study = setup_.layout, setup_.study
    estimates = estimate(layout, study, setup_.options.iters)
    total = 0.0
    console.print(f"study {study.name} of {study.dataset}: {len(study.cells)} cells, test cases "
                  f"{len(study.test_cases)} ({study.test_source}), reference {study.reference}")
    flags = " ".join(cell_finetune.settings_flags(setup_.options.settings)) or "none"
    console.print(f"every cell's finetune options: {flags} (the others finetune's defaults)")
    for index, spec in enumerate(study.cells, 1):
        state = "done" if layout.folder.is_dir() and is_done(layout, spec.cell) else "to run"
        seconds, how = estimates.get(spec.cell, (None, ""))
        total += 0.0 if seconds is None or state == "done" else seconds
        guess = "unknown (no finished cell or run to go by)" if seconds is None else f"~{seconds:.0f} s ({how})"
        console.print(f"{index:4d}  {spec.cell}  {state}  {guess}")
    console.print(f"estimated time of the cells to run: ~{total:.0f} s")
    return 0


def run_cells(setup_: Setup, share: str | None, console: Console) -> int:
    """Run the cells (all, or one share) not done yet; returns the number that failed."""
    layout, study = setup_.layout, setup_.study
    chosen = study.cells if share is None else study_cells.share(study.cells, *study_cells.parse_share(share))
    tests = test_cases.prepare(setup_.raw, study.test_source, study.test_cases, layout)
    failed = 0
    for index, spec in enumerate(chosen, 1):
        if is_done(layout, spec.cell):
            console.print(f"[bold]study[/] [{index}/{len(chosen)}] {spec.cell}: done already")
            continue
        console.print(f"[bold]study[/] [{index}/{len(chosen)}] {spec.cell}: finetune, predict, evaluate")
        record = run_cell(spec, setup_.options, tests, layout)
        if record.outcome == "failed":
            failed += 1
            console.print(f"[red]study[/] {spec.cell} failed: {record.error}")
        else:
            console.print(f"[bold]study[/] {spec.cell} done in {record.wall_seconds:.0f} s")
    return failed


def collect(setup_: Setup, console: Console) -> int:
    """Aggregate every cell's results into the study's outputs; 1 when a cell is failed or not run."""
    collected = aggregate.collect(setup_.layout, setup_.study)
    aggregate.write_outputs(setup_.layout, setup_.study, collected)
    console.print(f"[green]study[/]: {setup_.layout.out('report.html')}")
    if not collected.complete:
        left = collected.cells[collected.cells["status"] != "done"]
        console.print(f"[red]study[/]: {len(left)} cell(s) not done ({', '.join(sorted(set(left['status'])))}): "
                      f"listed in {setup_.layout.out('cells.csv')}; rerun the study to retry them")
        return 1
    return 0


def run(dataset: str, *, backbones: list[str], pct: list[float], seeds: list[int] | None = None,
        folds: list[int] | None = None, iters: int | None = None, name: str = DEFAULT_NAME,
        on_validation: bool = False, reference: str | None = None, dry_run_only: bool = False,
        cells: str | None = None, collect_only: bool = False, emit_slurm: Path | None = None,
        num_workers: int = 2, device: str = "auto", gpus_per_cell: int | None = None, batch_size: int | None = None,
        lr: float | None = None, val_every: int | None = None) -> int:
    """Run (or list, share, collect, emit as a SLURM array) the study; returns the exit code (docs/study.md)."""
    if sum(bool(x) for x in (dry_run_only, cells, collect_only, emit_slurm)) > 1:
        raise UserError("--dry-run, --cells, --collect and --emit-slurm exclude each other", fix="pass one of them")
    console = stderr_console()
    setup_ = setup(dataset, backbones=backbones, pct=pct, seeds=list(seeds or [0]), folds=list(folds or [0]),
                   iters=iters, name=name, on_validation=on_validation, reference=reference,
                   num_workers=num_workers, device=device, gpus_per_cell=gpus_per_cell, batch_size=batch_size, lr=lr,
                   val_every=val_every)
    if dry_run_only:
        return dry_run(setup_, console)
    if emit_slurm is not None:
        path = slurm.write_script(emit_slurm, setup_.args, len(setup_.study.cells), f"study__{name}",
                                  gpus=gpus_per_cell or 1)
        console.print(f"[green]study[/]: {path} (sbatch {path}; then `3dino study ... --collect`)")
        return 0
    _open(setup_.layout, setup_.study)
    if collect_only:
        return collect(setup_, console)
    failed = run_cells(setup_, cells, console)
    if cells is not None:
        console.print(f"[green]study[/]: share {cells} ended ({failed} failed); when every share has ended, run "
                      "the same command with --collect instead of --cells")
        return 1 if failed else 0
    return max(collect(setup_, console), 1 if failed else 0)
