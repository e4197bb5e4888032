"""``3dino preprocess -d N``: every case through every configuration of ``plans.json``, then splits.

Reads the raw dataset and ``<preprocessed>/<Dataset>/plans.json``; writes, per configuration,
``<configuration>/<case>.b2nd`` (+ ``<case>_seg.b2nd``) and ``<case>.json``, then
``splits.json`` (labelled datasets). A rerun skips finished cases (see
:mod:`.case_writer`); see docs/preprocess.md.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from threedino_pipe.artifacts import DatasetJson, Fingerprint, Plans, Splits
from threedino_pipe.planning.planner import cases_passing
from threedino_pipe.preprocessing.case_writer import (
    CaseJob,
    is_finished,
    remove_partials,
    write_case,
)
from threedino_pipe.preprocessing.pipeline import check_recipe
from threedino_pipe.raw_data.raw import CaseFiles, discover_cases
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.locks import TargetLock
from threedino_pipe.runtime.paths import preprocessed_dataset, resolve_dataset

log = logging.getLogger(__name__)
SPLITS_SEED = 12345


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _worker(job: CaseJob) -> tuple[str, tuple[str, str | None, str | None] | None]:
    """Run one job; a UserError comes back as data (its keyword fields do not survive pickling)."""
    try:
        return write_case(job), None
    except UserError as exc:
        return job.case.case_id, (exc.problem, exc.file, exc.fix)


def _run_jobs(jobs: list[CaseJob], num_processes: int, description: str) -> None:
    if not jobs:
        return
    workers = min(num_processes, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        _init_worker(threads)
        for job in progress.track(jobs, description, total=len(jobs)):
            _raise_if_failed(_worker(job))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_worker, job) for job in jobs]
        try:
            for future in progress.track(as_completed(futures), description, total=len(futures)):
                _raise_if_failed(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _raise_if_failed(result: tuple[str, tuple | None]) -> None:
    case_id, error = result
    if error is not None:
        problem, file, fix = error
        raise UserError(f"case '{case_id}': {problem}", file=file, fix=fix)


def _check_plans(plans: Plans, raw: Path, plans_path: Path, num_channels: int, dataset: str) -> None:
    if plans.dataset != raw.name:
        raise UserError(f"plans.json was made for {plans.dataset}, not {raw.name}", file=plans_path,
                        fix=f"rerun `3dino plan -d {dataset}`")
    for name in plans.configuration_names():
        try:
            check_recipe(plans.preprocessing(name), num_channels)
        except UserError as exc:
            raise UserError(exc.problem, file=plans_path, fix=exc.fix) from None


def _without_empty_highres(plans: Plans, out: Path, dataset: str) -> list[str]:
    """Every configuration of ``plans`` but ``pretrain_highres`` when no case passes its min_axis (with a note)."""
    names = plans.configuration_names()
    fingerprint_path = Fingerprint.in_folder(out)
    if "pretrain_highres" not in names or not fingerprint_path.is_file():
        return names
    fingerprint = Fingerprint.read(fingerprint_path, rerun=f"3dino plan -d {dataset}")
    min_axis = plans.configurations.pretrain_highres.min_axis
    if cases_passing(fingerprint, min_axis) > 0:
        return names
    log.info("note: pretrain_highres skipped: 0 of %d cases have a smallest axis above its min_axis of %d voxels "
             "(adapt-highres could use none); `3dino plan -d %s --highres-min-axis N` lowers it", fingerprint.num_cases,
             min_axis, dataset)
    return [name for name in names if name != "pretrain_highres"]


def _chosen(plans: Plans, configurations: list[str] | None, plans_path: Path, dataset: str) -> list[str]:
    available = plans.configuration_names()
    if not configurations:
        return _without_empty_highres(plans, plans_path.parent, dataset)
    unknown = [c for c in configurations if c not in available]
    if unknown:
        raise UserError(f"configuration(s) {', '.join(unknown)} not in plans.json (it has: {', '.join(available)})",
                        file=plans_path, fix="pass -c with one of those (finetune exists only for labelled datasets)")
    return list(dict.fromkeys(configurations))


def _jobs(raw: Path, out: Path, cases: list[CaseFiles], plans: Plans, configuration: str
          ) -> tuple[list[CaseJob], int]:
    folder = out / configuration
    removed = remove_partials(folder)
    if removed:
        log.info("%s: removed %d partial file(s) of an interrupted run", configuration, len(removed))
    checksum = plans.stored_checksum(configuration)
    with_seg = plans.stores_labels(configuration)
    jobs = [CaseJob(raw, case, plans, configuration, folder, checksum) for case in cases
            if not is_finished(folder, case.case_id, checksum, with_seg, case.class_label)]
    return jobs, len(cases) - len(jobs)


def _print_test_list(splits: Splits, num_cases: int) -> None:
    """The held-out cases, on stderr: which they are and that no command trains or validates on them."""
    if not splits.test:
        log.info("test list: none (splits.json 'test' is empty; `3dino plan --test-fraction F` holds cases out)")
        return
    log.info("test list: %d of %d cases held out (splits.json 'test'): finetune and the pretraining probe never "
             "train or validate on them (pretraining, without labels, sees their images); predict and evaluate them "
             "at the end (docs/preprocess.md): %s",
             len(splits.test), num_cases, ", ".join(splits.test))


def run(dataset: str, *, configurations: list[str] | None = None, num_processes: int = 2) -> None:
    """Preprocess every case of a raw dataset as its ``plans.json`` says and write ``splits.json``.

    Args:
        dataset: dataset id (``501``) or folder name (``Dataset501_Name``).
        configurations: the plans configurations to run (default: every one in plans.json).
        num_processes: worker processes (cases are processed in parallel).

    Raises:
        UserError: missing/foreign plans.json, a raw dataset with layout errors, an unknown
            configuration, an unreadable or inconsistent case.
    """
    raw = resolve_dataset(dataset)
    out = preprocessed_dataset(raw)
    with TargetLock(out, "preprocessed dataset"):  # before any file is read: a second command refuses at once
        _preprocess(dataset, raw, out, configurations, num_processes)


def _preprocess(dataset: str, raw: Path, out: Path, configurations: list[str] | None, num_processes: int) -> None:
    """:func:`run` while holding the lock of the preprocessed folder ``out``."""
    plans_path = Plans.in_folder(out)
    if not plans_path.is_file():
        raise UserError("plans.json is missing", file=plans_path, fix=f"run `3dino plan -d {dataset}` first")
    plans = Plans.read(plans_path, rerun=f"3dino plan -d {dataset}")
    spec = DatasetJson.read(raw)
    _check_plans(plans, raw, plans_path, spec.num_channels, dataset)
    cases, problems = discover_cases(raw, spec)
    errors = [p for p in problems if p.is_error]
    if errors:
        first = errors[0]
        raise UserError(f"the raw dataset has {len(errors)} layout error(s), first: {first.file}: {first.problem}",
                        file=raw, fix=f"run `3dino verify -d {dataset}` and fix what it reports")
    if not cases:
        raise UserError("imagesTr/ holds no cases", file=raw / "imagesTr", fix="add the training images")
    jobs: list[CaseJob] = []
    chosen = _chosen(plans, configurations, plans_path, dataset)
    for configuration in chosen:
        todo, skipped = _jobs(raw, out, cases, plans, configuration)
        log.info("%s: %d case(s) to preprocess, %d already done", configuration, len(todo), skipped)
        jobs += todo
    _run_jobs(jobs, num_processes, f"preprocess {', '.join(chosen)}")
    if spec.task != "unlabeled":
        from threedino_pipe.training_data.splits import write_splits
        class_labels = ({c.case_id: int(c.class_label) for c in cases}
                        if spec.task == "classification" else None)
        path = write_splits(out, [c.case_id for c in cases], class_labels, seed=SPLITS_SEED, plan=plans.splits)
        log.info("wrote %s", path)
        _print_test_list(Splits.read(path), len(cases))
    log.info("preprocessed data in %s", out)
