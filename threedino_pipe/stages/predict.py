"""``3dino predict``: every case of an input into the input's exact geometry (docs/predict.md).

Writes into the output folder: one label image per case (``<case><ending>``, the input's format;
NIfTI for DICOM series), optionally ``<case>_probabilities.npz``, ``predictions.csv`` for
classification models, ``predict_args.json`` (models, checksums, version, options) and
``failures.csv`` (``case,file,error``; header only when every case succeeded).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from threedino_pipe.artifacts import CHECKPOINT_FILES, PredictArgs, PredictOptions
from threedino_pipe.inference import folder_runner
from threedino_pipe.inference.fold_runs import runs_for_folds
from threedino_pipe.inference.input_cases import InputCase, discover_cases
from threedino_pipe.inference.model_loading import LoadedModel, load_models
from threedino_pipe.inference.predictor import PROBABILITIES, CaseResult, InferenceOptions, predict_case, prepare_case
from threedino_pipe.runtime.distributed import DistInfo, barrier, cleanup, init_distributed
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.locks import TargetLock
from threedino_pipe.runtime.precision import PRECISIONS, resolve_precision

log = logging.getLogger(__name__)

_DIST_TIMEOUT = timedelta(days=7)  # ranks wait for each other only at the end; a shard may take long


def _check_options(overlap: float, window_batch_size: int, num_workers: int, precision: str) -> None:
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap {overlap} is outside [0, 1)", fix="pass e.g. --overlap 0.5 (the paper: 0.75)")
    if window_batch_size < 1:
        raise UserError(f"--window-batch-size {window_batch_size} is below 1", fix="pass 1 or more")
    if num_workers < 0:
        raise UserError(f"--num-workers {num_workers} is negative", fix="pass 0 (no read-ahead) or more")
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}", fix=f"pass one of {', '.join(PRECISIONS)}")


def _check_outputs_spare_inputs(cases: list[InputCase], output_dir: Path) -> None:
    inputs = {Path(f).resolve() for case in cases for f in case.files}
    for case in cases:
        target = (output_dir / case.output_name).resolve()
        if target in inputs:
            raise UserError(f"the output of case '{case.case_id}' would overwrite its input", file=target,
                            fix="write the predictions into another folder (-o)")


def check_resume(path: Path, args: PredictArgs) -> None:
    """Refuse ``--continue`` into a folder whose ``predict_args.json`` names other models or output options."""
    if not path.is_file():
        return
    try:
        old = PredictArgs.read(path)
    except UserError as exc:
        raise UserError(f"--continue into a folder whose predict_args.json cannot be used ({exc.problem})",
                        file=path, fix="predict into a new output folder, or leave out --continue") from None
    if old.identity() != args.identity():
        sources = ", ".join(m.source for m in old.models)
        raise UserError(f"--continue into a folder written by another model ({sources}); its outputs would mix "
                        "two models", file=path,
                        fix="predict into a new output folder (or leave out --continue to predict every case again)")
    for key, now, before in args.changed_output_options(old):
        raise UserError(f"--continue with --{key} {now} into a folder predicted with --{key} {before}", file=path,
                        fix=f"pass --{key} {before}, or predict into a new output folder")


def _prediction_row(result: CaseResult, class_names: list[str]) -> list[str]:
    probs = result.probabilities
    best = max(range(len(probs)), key=probs.__getitem__)
    return [result.case_id, class_names[best], *(f"{p:.6f}" for p in probs)]


@dataclass(frozen=True)
class FoldSelection:
    """``-d DATASET -f F ...``: the dataset's finetune runs of these folds, narrowed by head, pct and seed."""

    dataset: str | None = None
    folds: tuple[int, ...] = ()
    head: str | None = None
    pct: float | None = None
    seed: int | None = None

    def models(self, given: list[Path]) -> list[Path]:
        """The ``-m`` paths, or the run folders the selection names; refuses a mix or a half selection."""
        narrowing = [f"--{k}" for k in ("head", "pct", "seed") if getattr(self, k) is not None]
        if given and (self.dataset or self.folds):
            raise UserError("both -m and -d/-f name the models", fix="pass either -m (repeat for several models) or "
                            "-d DATASET -f FOLD ... (the dataset's finetune runs of those folds)")
        if given:
            if narrowing:
                raise UserError(f"{', '.join(narrowing)} narrow the runs -f selects, but -m names the models",
                                fix=f"leave out {', '.join(narrowing)}, or select with -d DATASET -f FOLD ...")
            return list(given)
        if not self.folds:
            raise UserError("no model given" + (f" (-d {self.dataset} needs -f)" if self.dataset else ""),
                            fix="pass -m RUN_FOLDER_OR_ZIP, or -d DATASET -f 0 1 2 3 4 (the dataset's finetune runs "
                            "of those folds)")
        if not self.dataset:
            raise UserError(f"-f {' '.join(map(str, self.folds))} selects folds, but of which dataset?",
                            fix="pass -d DATASET too (e.g. -d 501 -f 0 1 2 3 4)")
        return runs_for_folds(self.dataset, self.folds, head=self.head, pct=self.pct, seed=self.seed)


def run(input_path: Path, output_dir: Path, models: list[Path], *, overlap: float = 0.5, tta: bool = False,
        resume: bool = False, save_probabilities: bool = False, window_batch_size: int = 1, device: str = "auto",
        precision: str = "auto", num_workers: int = 1, checkpoint: str = "best",
        selection: FoldSelection | None = None) -> int:
    """Predict every case of ``input_path`` with the averaged ``models`` into ``output_dir``.

    ``checkpoint`` ``best`` (the default) or ``final`` picks each run's weights file; ``selection``
    (``-d -f``) names the models instead of ``models``.

    Returns:
        The exit code: 0 when every case was predicted, 1 when any case failed (``failures.csv``).

    Raises:
        UserError: bad options, unusable models or inputs, or ``--continue`` into another model's folder;
            nothing is written then.
    """
    _check_options(overlap, window_batch_size, num_workers, precision)
    if checkpoint not in CHECKPOINT_FILES:
        raise UserError(f"unknown --checkpoint {checkpoint!r}", fix=f"pass one of {', '.join(CHECKPOINT_FILES)}")
    models = (selection or FoldSelection()).models(list(models or []))
    input_path, output_dir = Path(input_path), Path(output_dir)
    ranks = init_distributed(device, backend="gloo", timeout=_DIST_TIMEOUT)  # gloo: only barriers are needed
    try:
        return _predict(input_path, output_dir, models, ranks, overlap=overlap, tta=tta, resume=resume,
                        save_probabilities=save_probabilities, window_batch_size=window_batch_size, device=device,
                        precision=precision, num_workers=num_workers, checkpoint=checkpoint)
    finally:
        cleanup()


def _predict(input_path: Path, output_dir: Path, models: list[Path], ranks: DistInfo, *, overlap: float, tta: bool,
             resume: bool, save_probabilities: bool, window_batch_size: int, device: str, precision: str,
             num_workers: int, checkpoint: str) -> int:
    """:func:`run` after the options are checked and the process group joined."""
    dev = ranks.device
    with contextlib.ExitStack() as stack:
        if ranks.is_main:  # rank 0 holds the output folder before anything is read; a second command refuses
            stack.enter_context(TargetLock(output_dir, "output folder"))
        loaded = load_models(list(models), stack, checkpoint=checkpoint)
        cases = discover_cases(input_path, len(loaded[0].card.channel_names), exclude=output_dir)
        _check_outputs_spare_inputs(cases, output_dir)
        inference = InferenceOptions(overlap=overlap, tta=tta, window_batch_size=window_batch_size,
                                     save_probabilities=save_probabilities,
                                     precision=resolve_precision(precision, dev))
        options = PredictOptions(**asdict(inference), precision_requested=precision, device=device,
                                 device_used=str(dev), num_workers=num_workers, resume=resume, checkpoint=checkpoint)
        args = PredictArgs(models=[m.identity() for m in loaded], input=str(input_path.resolve()),
                           output=str(output_dir.resolve()), num_cases=len(cases), world_size=ranks.world_size,
                           options=options)
        if resume:
            check_resume(PredictArgs.in_folder(output_dir), args)
        barrier()  # every rank has checked the old predict_args.json before rank 0 replaces it
        output_dir.mkdir(parents=True, exist_ok=True)
        if ranks.rank == 0:
            args.write(PredictArgs.in_folder(output_dir))
        for model in loaded:
            model.network.to(dev)
        return _run_shard(cases, loaded, inference, dev, output_dir, ranks, resume, num_workers)


def _run_shard(cases: list[InputCase], loaded: list[LoadedModel], inference: InferenceOptions,
               dev: torch.device, output_dir: Path, ranks: DistInfo, resume: bool, num_workers: int) -> int:
    card = loaded[0].card
    classification = card.task == "classification"
    mine = folder_runner.shard(cases, ranks.rank, ranks.world_size)
    predictions_path = folder_runner.part_path(output_dir, folder_runner.PREDICTIONS, ranks.rank, ranks.world_size)
    header = ["case_id", "predicted_class", *(f"prob_{c}" for c in card.class_names)]
    rows: list[list[str]] = []
    if classification:
        _, existing = folder_runner.read_csv_rows(output_dir / folder_runner.PREDICTIONS) if resume else ([], [])
        done = {row[0] for row in existing if row}
        if ranks.world_size == 1:
            rows = [row for row in existing if row]
            folder_runner.write_csv(predictions_path, header, rows)
        elif ranks.rank == 0 and not resume:
            (output_dir / folder_runner.PREDICTIONS).unlink(missing_ok=True)
    else:  # a label file is written last, so its presence marks a finished case
        done = {c.case_id for c in mine if resume and (output_dir / c.output_name).is_file()
                and (not inference.save_probabilities or (output_dir / f"{c.case_id}{PROBABILITIES}").is_file())}
    todo = [c for c in mine if c.case_id not in done]
    where = f" (rank {ranks.rank} of {ranks.world_size}: {len(mine)})" if ranks.world_size > 1 else ""
    log.info("%d case(s)%s; %d already predicted (--continue), predicting %d on %s", len(cases), where,
             len(mine) - len(todo), len(todo), dev)
    recipe = card.preprocessing()

    def on_result(result: CaseResult) -> None:
        if classification:
            rows.append(_prediction_row(result, list(card.class_names)))
            folder_runner.write_csv(predictions_path, header, rows)

    outcome = folder_runner.run_cases(
        todo, prepare=lambda case: prepare_case(case, recipe),
        predict=lambda prepared: predict_case(prepared, loaded, inference, dev, output_dir),
        failures_path=folder_runner.part_path(output_dir, folder_runner.FAILURES, ranks.rank, ranks.world_size),
        num_workers=num_workers, on_result=on_result)
    failures = len(outcome.failures)
    barrier()
    if ranks.world_size > 1 and ranks.rank == 0:
        failures = len(folder_runner.merge_parts(output_dir, folder_runner.FAILURES, ranks.world_size))
        if classification:
            folder_runner.merge_parts(output_dir, folder_runner.PREDICTIONS, ranks.world_size, key_column=0)
    predicted = len(outcome.results)
    if failures:
        log.warning("%d case(s) failed (listed in %s); %d predicted", failures, output_dir / folder_runner.FAILURES,
                    predicted)
    else:
        log.info("%d case(s) predicted into %s", predicted, output_dir)
    return 1 if failures else 0
