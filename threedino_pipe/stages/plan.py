"""``3dino plan``: verify a raw dataset, write ``dataset_fingerprint.json`` and ``plans.json``.

Reads the raw ``DatasetNNN_Name/`` folder; writes both files atomically to the dataset's
preprocessed folder, and nothing at all when the dataset or an option is bad (docs/plan.md).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from threedino_pipe.artifacts import DatasetJson, Fingerprint, ImportedFold, Normalization, Plans
from threedino_pipe.planning import memory
from threedino_pipe.planning.planner import (
    NORMS,
    PATCH_MULTIPLE,
    PRETRAIN,
    PlanOptions,
    cases_passing,
    largest_smallest_axis,
    make_plans,
)
from threedino_pipe.planning.split_plan import plan_splits
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.locks import TargetLock

FINETUNE_FLAGS = ("--norm", "--target-spacing", "--patch-size", "--batch-size", "--test-fraction", "--splits-from")


def _three(value: str, flag: str, example: str) -> list[str]:
    parts = [p.strip() for p in value.replace("x", ",").split(",")]
    if len(parts) != 3 or not all(parts):
        raise UserError(f"{flag} '{value}' must give three values (i,j,k), separated by commas",
                        fix=f"pass e.g. {flag} {example}")
    return parts


def parse_spacing(value: str) -> tuple[float, float, float]:
    """``"0.8,0.8,3"`` -> (0.8, 0.8, 3.0) mm; anything else is a :class:`UserError` naming the option."""
    parts = _three(value, "--target-spacing", "0.8,0.8,3")
    try:
        spacing = tuple(float(p) for p in parts)
    except ValueError:
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserError(f"--target-spacing '{value}' must be three positive numbers in mm",
                        fix="pass e.g. --target-spacing 0.8,0.8,3")
    return spacing


def parse_patch_size(value: str) -> tuple[int, int, int]:
    """``"112,112,64"`` -> (112, 112, 64) voxels; each a positive multiple of 16 (the ViT patch)."""
    parts = _three(value, "--patch-size", "112,112,64")
    if not all(p.isdigit() and int(p) > 0 and int(p) % PATCH_MULTIPLE == 0 for p in parts):
        raise UserError(f"--patch-size '{value}' must be three positive multiples of {PATCH_MULTIPLE} "
                        f"(the ViT's patch size) in voxels", fix="pass e.g. --patch-size 112,112,64")
    return tuple(int(p) for p in parts)


def parse_options(*, preset: str | None, norm: str | None, target_spacing: str | None, patch_size: str | None,
                  batch_size: int | None, memory_gb: float, allow_nan: bool,
                  highres_min_axis: int | None = None, test_fraction: float | None = None,
                  splits_from: Path | None = None) -> PlanOptions:
    """Check every option before any data is read."""
    if test_fraction is not None and not (math.isfinite(test_fraction) and 0 <= test_fraction < 1):
        raise UserError(f"--test-fraction {test_fraction:g} is outside [0, 1)",
                        fix="pass a share such as 0.2, or 0 for no test list")
    if test_fraction is not None and splits_from is not None:
        raise UserError("--test-fraction and --splits-from both decide the test list",
                        fix="pass one of them (with --splits-from the test list is the cases in no imported fold)")
    if splits_from is not None:
        ImportedFold.read_nnunet(splits_from)  # its format, before any data is read
    if highres_min_axis is not None and highres_min_axis < 0:
        raise UserError(f"--highres-min-axis {highres_min_axis} must be 0 or more voxels",
                        fix="pass e.g. --highres-min-axis 24")
    if preset is not None and preset not in memory.PRESETS:
        raise UserError(f"--preset '{preset}' is not a preset", fix=f"use one of {', '.join(memory.PRESETS)}")
    if norm is not None and norm not in NORMS:
        raise UserError(f"--norm '{norm}' is not a normalisation", fix="use --norm dataset or --norm volume")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1", fix="pass e.g. --batch-size 2")
    if not (math.isfinite(memory_gb) and memory_gb > 0):
        raise UserError(f"--memory-gb {memory_gb} must be a positive number of GB", fix="pass e.g. --memory-gb 8")
    return PlanOptions(preset=preset, norm=norm,
                       target_spacing=None if target_spacing is None else parse_spacing(target_spacing),
                       patch_size=None if patch_size is None else parse_patch_size(patch_size),
                       batch_size=batch_size, allow_nan=allow_nan, highres_min_axis=highres_min_axis,
                       test_fraction=test_fraction, splits_from=None if splits_from is None else str(splits_from))


LOG_WIDTH = 120  # columns of the printed table when stdout is not a terminal and COLUMNS is unset


def _console() -> Console:
    """Stdout console as wide as the terminal, else ``COLUMNS``, else :data:`LOG_WIDTH` (logs); long reasons
    wrap inside their table cell instead of widening the table."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console(soft_wrap=False)  # rich reads the terminal's width, or COLUMNS
    return Console(width=LOG_WIDTH, soft_wrap=False)


def _value(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], Normalization):
        return ", ".join(entry.scheme for entry in value)
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def print_summary(plans: Plans, fingerprint: Fingerprint, console: Console) -> None:
    """The main decisions of ``plans`` with their reasons, as a table."""
    channels = ", ".join(f"{c.name} -> {c.modality_guess}" for c in fingerprint.channels.values())
    console.print(f"{fingerprint.dataset}: {fingerprint.num_cases} cases, median spacing "
                  f"{_value(fingerprint.median_spacing)} mm, median shape {_value(fingerprint.median_shape)}, "
                  f"channels {channels}", highlight=False)
    table = Table("decision", "value", highlight=False)
    table.add_column("reason", overflow="fold")  # wraps (words, then long words) to fit the console's width
    table.add_row("transpose", _value(plans.transpose), plans.decision("transpose"))
    table.add_row("preset", plans.configurations.pretrain.preset, plans.decision("preset"))
    for name in plans.configuration_names():
        config = plans.configuration(name)
        shown = ("batch_size", "spacing", "patch_size", "normalization", "image_interpolation") if name == "finetune" \
            else ("batch_size",)
        for field in shown:
            if field in type(config).model_fields:
                table.add_row(f"{name}.{field}", _value(getattr(config, field)), config.reason(field))
        if name in PRETRAIN:
            kept = cases_passing(fingerprint, config.min_axis)
            value = f"{config.min_axis} ({kept} of {fingerprint.num_cases} cases pass)"
            table.add_row(f"{name}.min_axis", f"[yellow]{value}[/]" if kept == 0 else value, config.reason("min_axis"))
    if plans.splits is not None:
        for name in ("test_fraction", "folds", "groups"):
            value = {"test_fraction": f"{plans.splits.test_fraction:g}",
                     "folds": "imported" if plans.splits.folds else "drawn",
                     "groups": str(len(set(plans.splits.groups.values())))}[name]
            table.add_row(f"splits.{name}", value, plans.decision(f"splits.{name}"))
    console.print(table)


def run(dataset: str, *, preset: str | None = None, norm: str | None = None, target_spacing: str | None = None,
        patch_size: str | None = None, batch_size: int | None = None, memory_gb: float = 8.0,
        allow_nan: bool = False, num_processes: int = 2, highres_min_axis: int | None = None,
        test_fraction: float | None = None, splits_from: Path | None = None) -> None:
    """Verify raw dataset ``dataset`` (id or folder name), fingerprint it and write its plans.

    Raises:
        UserError: a bad option, or a dataset with verify errors (printed first); nothing is written.
    """
    from threedino_pipe.planning.fingerprint import compute_fingerprint
    from threedino_pipe.raw_data.verification import check_dataset, print_report, summary

    console = _console()
    for line in paths.describe_defaults():
        console.print(f"[yellow]note[/]: {line}")
    memory_gb = float(memory_gb)
    options = parse_options(preset=preset, norm=norm, target_spacing=target_spacing, patch_size=patch_size,
                            batch_size=batch_size, memory_gb=memory_gb, allow_nan=allow_nan,
                            highres_min_axis=highres_min_axis, test_fraction=test_fraction, splits_from=splits_from)
    folder = paths.resolve_dataset(dataset)
    spec, cases, problems = check_dataset(folder, allow_nan=allow_nan, num_processes=num_processes)
    errors = [p for p in problems if p.is_error]
    if errors:
        print_report(folder, len(cases), problems)
        raise UserError(f"the dataset has {len(errors)} error(s), listed above; nothing was planned", file=folder,
                        fix=f"fix them (`3dino verify -d {dataset}` lists them) and rerun `3dino plan -d {dataset}`",
                        exit_code=1)
    if problems:
        console.print(f"[yellow]verify[/]: {summary(len(cases), problems)} (`3dino verify -d {dataset}` lists them)")
    given = [flag for flag, value in zip(FINETUNE_FLAGS, (norm, target_spacing, patch_size, batch_size, test_fraction,
                                                          splits_from), strict=True) if value is not None]
    if spec.task == "unlabeled" and given:
        raise UserError(f"{', '.join(given)} set the finetune configuration, which an unlabeled dataset does not have",
                        file=DatasetJson.in_folder(folder), fix="leave these options out")
    fingerprint = compute_fingerprint(folder, spec, cases, num_processes)
    plans = make_plans(fingerprint, spec, options, memory_gb)
    if spec.task != "unlabeled":
        split, reasons = plan_splits(spec, [c.case_id for c in cases], test_fraction=test_fraction,
                                     splits_from=splits_from)
        plans = plans.model_copy(update={"splits": split, "decisions": {**plans.decisions, **reasons}})
    out = paths.preprocessed_dataset(folder)
    plans_path = Plans.in_folder(out)
    changed = plans_path.is_file() and not plans.same_as_file(plans_path)
    with TargetLock(out, "preprocessed dataset"):  # not while `preprocess` reads the plans and writes the data
        fingerprint.write(Fingerprint.in_folder(out))
        plans.write(plans_path)
    print_summary(plans, fingerprint, console)
    _warnings(plans, fingerprint, console, dataset)
    if changed:
        console.print("[yellow]note[/]: plans.json changed: rerun `3dino preprocess` for data made with the old plans")
    console.print(f"wrote {Fingerprint.in_folder(out)}")
    console.print(f"wrote {plans_path}")


def _warnings(plans: Plans, fingerprint: Fingerprint, console: Console, dataset: str) -> None:
    """Volumes the pretraining crops will skip, and batches that do not fit the memory target."""
    if cases_passing(fingerprint, plans.configurations.pretrain.min_axis) < fingerprint.num_cases:
        console.print(f"[yellow]warning[/]: {plans.decision('pretrain.min_axis')}")
    highres = plans.configurations.pretrain_highres
    if highres is not None and cases_passing(fingerprint, highres.min_axis) == 0:
        largest = largest_smallest_axis(fingerprint)
        console.print(f"[yellow]warning[/]: 0 of {fingerprint.num_cases} cases pass for pretrain_highres (smallest "
                      f"axis above {highres.min_axis} voxels; the largest here is {largest}): `3dino preprocess` "
                      f"skips pretrain_highres and `3dino adapt-highres` refuses; `3dino plan -d {dataset} "
                      f"--highres-min-axis {max(0, largest - 1)}` lowers the minimum (thin crops are stretched more)")
    for name in plans.configuration_names():
        reason = plans.configuration(name).reason("batch_size")
        if reason.startswith("does not fit"):
            console.print(f"[yellow]warning[/]: {name}.batch_size {reason}")
