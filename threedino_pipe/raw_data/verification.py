"""The check of a raw dataset behind ``3dino verify`` and ``3dino plan``: every problem at once.

:func:`check_dataset` is the check itself (``plan`` calls it first and refuses to plan on
errors); :func:`print_report` prints a table of every problem and a one-line summary. Nothing is
written anywhere. The checks and their tolerances are described in ``docs/verify.md``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import sys
from pathlib import Path

from threedino_pipe.artifacts import DatasetJson
from threedino_pipe.raw_data.case_checks import check_case
from threedino_pipe.raw_data.problems import Problem
from threedino_pipe.raw_data.raw import CaseFiles, discover_cases
from threedino_pipe.runtime import progress

log = logging.getLogger(__name__)
_CRASH_FIX = ("the reading process died (out of memory, or a reader crash on a damaged file): open the case's files "
              "in an image viewer, re-export them, or rerun with -np 1 on a machine with more memory")


def _crashed(case: CaseFiles) -> Problem:
    return Problem("error", case.case_id, "checking this case's files crashed the worker process", _CRASH_FIX,
                   case.case_id)


def _check_in_pool(folder: Path, cases: list[CaseFiles], spec: DatasetJson, allow_nan: bool,
                   num_processes: int) -> dict[str, list[Problem]]:
    """Per-case problems from a process pool; a case whose worker dies is retried alone once."""
    results: dict[str, list[Problem]] = {}
    crashed: list[CaseFiles] = []
    context = multiprocessing.get_context("spawn")  # safe with threads, the same on every OS
    with cf.ProcessPoolExecutor(max_workers=num_processes, mp_context=context) as pool:
        futures = {pool.submit(check_case, folder, case, spec, allow_nan): case for case in cases}
        for future in progress.track(cf.as_completed(futures), "verify", total=len(futures)):
            case = futures[future]
            try:
                results[case.case_id] = future.result()
                log.debug("checked %s: %d problem(s)", case.case_id, len(results[case.case_id]))
            except cf.process.BrokenProcessPool:
                crashed.append(case)
    for case in crashed:  # a broken pool fails every pending case: find the culprit alone
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            try:
                results[case.case_id] = pool.submit(check_case, folder, case, spec, allow_nan).result()
            except cf.process.BrokenProcessPool:
                results[case.case_id] = [_crashed(case)]
    return results


def check_dataset(folder: Path, *, allow_nan: bool = False,
                  num_processes: int = 2) -> tuple[DatasetJson, list[CaseFiles], list[Problem]]:
    """Check a raw dataset folder: layout, every case's files, voxels and geometry.

    Args:
        folder: the raw ``DatasetNNN_Name`` folder.
        allow_nan: report NaN/Inf image voxels as warnings instead of errors.
        num_processes: worker processes reading cases (1: read in this process).

    Returns:
        (the parsed dataset.json, the training cases found, every problem: dataset-level first,
        then per case in case order).

    Raises:
        UserError: dataset.json is missing or malformed (nothing else can be checked then).
    """
    folder = Path(folder)
    spec = DatasetJson.read(folder)
    for note in spec.notes:
        log.info("note: %s", note)
    cases, problems = discover_cases(folder, spec)
    checkable = [c for c in cases if any(p is not None for p in c.images) or c.label is not None]
    if num_processes <= 1 or len(checkable) <= 1:
        per_case = {}
        for case in progress.track(checkable, "verify", total=len(checkable)):
            per_case[case.case_id] = check_case(folder, case, spec, allow_nan)
            log.debug("checked %s: %d problem(s)", case.case_id, len(per_case[case.case_id]))
    else:
        per_case = _check_in_pool(folder, checkable, spec, allow_nan, min(num_processes, len(checkable)))
    by_case: dict[str, list[Problem]] = {}  # layout problems, grouped by case in discovery order
    for problem in problems:
        by_case.setdefault(problem.case, []).append(problem)
    ordered = by_case.pop("", [])
    for case in cases:
        ordered += by_case.pop(case.case_id, []) + per_case.get(case.case_id, [])
    for rest in by_case.values():  # problems naming a case without images (e.g. a stray csv line)
        ordered += rest
    return spec, cases, ordered


def summary(num_cases: int, problems: list[Problem]) -> str:
    """``"N cases, E errors, W warnings"``."""
    errors = sum(p.is_error for p in problems)
    return f"{num_cases} cases, {errors} errors, {len(problems) - errors} warnings"


def print_report(folder: Path, num_cases: int, problems: list[Problem]) -> None:
    """A table of every problem (severity, case, file, problem, fix) and the summary, on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False) if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)
    console.print(f"[bold]verify[/bold] {folder}", highlight=False)
    if problems:
        table = Table(show_lines=sys.stdout.isatty(), highlight=False)  # row rules help wrapped rows
        for name in ("severity", "case", "file", "problem", "fix"):
            table.add_column(name, overflow="fold")
        for p in problems:
            style = "red" if p.is_error else "yellow"
            table.add_row(f"[{style}]{p.severity}[/{style}]", p.case, p.file, p.problem, p.fix)
        console.print(table)
    else:
        console.print("no problems found")
    errors = any(p.is_error for p in problems)
    tail = "verify failed: fix the errors and rerun" if errors else "verify passed"
    console.print(f"{folder.name}: {summary(num_cases, problems)} ({tail})", highlight=False)
