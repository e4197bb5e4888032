"""``3dino predict``: every case of an input into the input's exact geometry (docs/predict.md).

Writes into the output folder: per case the formats of ``--output-format`` (``<case><ending>``, the
label image in the input's format, NIfTI for DICOM; ``<case>_seg.dcm``; ``<case>_rtstruct.dcm``),
optionally ``<case>_probabilities.npz``, ``predictions.csv`` for classification models,
``predict_args.json`` (models, checksums, version, options) and ``failures.csv``
(``case,file,error``; header only when every case succeeded). For DICOM input also
``series_selection.csv`` and the private ``.study_keys.json`` (cases are named by study key); with
``--from-pacs`` the retrieved studies in ``.retrieved/<study key>/``, and with ``--from-pacs`` or
``--send-to`` the journal ``journal.jsonl`` (retrieved studies, acknowledged result objects). With
``--qc`` (default) for segmentation models: ``qc.csv`` and ``qc_report.html`` per batch, from the
per-case records ``.qc/<case>.json`` (``threedino_pipe.evaluation.qc_report``).
Every case gets a line of ``predict_log.jsonl`` (inputs, models, options, times, outcome, outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from threedino_pipe import __version__
from threedino_pipe.artifacts import CHECKPOINT_FILES, ModelCard, PredictArgs, PredictLogLine, PredictOptions, StudyKeys
from threedino_pipe.artifacts.journal import JournalLine
from threedino_pipe.dicom.pacs import DEFAULT_CALLING_AE
from threedino_pipe.dicom.seg_writer import ModelIdentity
from threedino_pipe.dicom.selection import DEFAULT_MIN_SLICES
from threedino_pipe.evaluation.qc import DEFAULT_MIN_CONFIDENCE, check_min_confidence
from threedino_pipe.evaluation.qc_report import QcBatch
from threedino_pipe.inference import folder_runner
from threedino_pipe.inference.case_log import CaseLog, logged_fallbacks
from threedino_pipe.inference.case_outputs import CaseOutputs, parse_formats
from threedino_pipe.inference.dicom_cases import (
    DicomInput,
    NoReadableSeries,
    index_dicom_input,
    parse_rules,
    select_dicom,
)
from threedino_pipe.inference.fold_runs import runs_for_folds
from threedino_pipe.inference.input_cases import InputCase, discover_cases
from threedino_pipe.inference.model_loading import LoadedModel, load_models
from threedino_pipe.inference.pacs_cases import RETRIEVED, PacsLink, ResultSender, asks_for_dicom, retrieve_studies
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


def _check_outputs_spare_inputs(cases: list[InputCase], output_dir: Path, outputs: CaseOutputs) -> None:
    inputs = {Path(f).resolve() for case in cases for f in case.files}
    for case in cases:
        for name in outputs.names(case):
            target = (output_dir / name).resolve()
            if target in inputs:
                raise UserError(f"the output of case '{case.case_id}' would overwrite its input", file=target,
                                fix="write the predictions into another folder (-o)")


def case_outputs(loaded: list[LoadedModel], formats: tuple[str, ...]) -> CaseOutputs:
    """The outputs of a run: formats, the model identity (name, version, backbone tag, weights checksum), labels.

    An ensemble is named by its runs' names joined by ``+`` and identified by the SHA-256 of its sorted
    weights checksums.
    """
    card = loaded[0].card
    names = [Path(m.source).name.removesuffix(".zip") for m in loaded]
    checksums = sorted(m.weights_sha256 for m in loaded)
    checksum = checksums[0] if len(checksums) == 1 else hashlib.sha256("".join(checksums).encode()).hexdigest()
    model = ModelIdentity(name="+".join(names), version=f"threedino-pipe {__version__}",
                          backbone_tag=card.backbone.tag, weights_checksum=checksum)
    labels = {} if card.task == "classification" else {
        int(v): str(n) for v, n in zip(card.output_values(), card.output_names(), strict=True) if int(v) != 0}
    return CaseOutputs(formats=formats, model=model, labels=labels)


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


def run(input_path: Path | None, output_dir: Path, models: list[Path], *, overlap: float = 0.5, tta: bool = False,
        resume: bool = False, save_probabilities: bool = False, window_batch_size: int = 1, device: str = "auto",
        precision: str = "auto", num_workers: int = 1, checkpoint: str = "best",
        selection: FoldSelection | None = None, output_formats: list[str] | None = None,
        series_rules: list[str] | None = None, min_slices: int = DEFAULT_MIN_SLICES, from_pacs: str | None = None,
        studies: list[str] | None = None, query: list[str] | None = None, send_to: list[str] | None = None,
        ae_title: str = DEFAULT_CALLING_AE, move_listen: str | None = None, qc: bool = True,
        qc_min_confidence: float = DEFAULT_MIN_CONFIDENCE, keep_patient_names: bool = False,
        skip: bool = True, coarse: bool = False) -> int:
    """Predict every case of ``input_path`` with the averaged ``models`` into ``output_dir``.

    ``checkpoint`` ``best`` (the default) or ``final`` picks each run's weights file; ``selection``
    (``-d -f``) names the models instead of ``models``. ``output_formats``: ``nifti``, ``dicom-seg``,
    ``rtstruct`` (default: nifti, plus dicom-seg for DICOM input); ``series_rules``
    (``CHANNEL[:MODALITY]=REGEX``) and ``min_slices`` choose the series of DICOM studies.
    ``from_pacs`` (a node or DICOMweb URL, instead of ``input_path``) with ``studies`` and/or ``query``
    (``KEY=VALUE`` study-level matches, C-FIND or QIDO-RS): retrieve these studies first; ``send_to``: send
    each case's DICOM results when it finishes; ``ae_title``: ours;
    ``move_listen``: retrieve with C-MOVE to this ``HOST:PORT`` (``inference.pacs_cases``). ``qc``
    (segmentation models): ``qc.csv`` and ``qc_report.html`` with ``qc_min_confidence`` (docs/predict.md, *QC*).
    ``keep_patient_names`` names a DICOM study's outputs by its PatientID instead of its study key.
    ``skip``: sliding windows that hold only air outside the body are not run (``inference/air_windows``);
    ``coarse``: a coarse pass first, and windows far from anything it found are not run
    (``inference/coarse_windows``).

    Returns:
        The exit code: 0 when every case was predicted, 1 when any case failed (``failures.csv``).

    Raises:
        UserError: bad options, unusable models or inputs, or ``--continue`` into another model's folder;
            nothing is written then.
    """
    _check_options(overlap, window_batch_size, num_workers, precision)
    check_min_confidence(qc_min_confidence)
    if checkpoint not in CHECKPOINT_FILES:
        raise UserError(f"unknown --checkpoint {checkpoint!r}", fix=f"pass one of {', '.join(CHECKPOINT_FILES)}")
    models = (selection or FoldSelection()).models(list(models or []))
    link = PacsLink.from_options(input_given=input_path is not None, from_pacs=from_pacs, studies=studies or [],
                                 send_to=send_to or [], calling_ae=ae_title, move_listen=move_listen,
                                 query=query or [])
    if link is not None:
        link.check()  # a node that refuses us fails the command before anything is written
        link = link.with_query_matches()  # so does a --query that matches nothing
    output_dir = Path(output_dir)
    input_path = Path(input_path) if input_path is not None else output_dir / RETRIEVED
    ranks = init_distributed(device, backend="gloo", timeout=_DIST_TIMEOUT)  # gloo: only barriers are needed
    try:
        return _predict(input_path, output_dir, models, ranks, overlap=overlap, tta=tta, resume=resume,
                        save_probabilities=save_probabilities, window_batch_size=window_batch_size, device=device,
                        precision=precision, num_workers=num_workers, checkpoint=checkpoint,
                        output_formats=list(output_formats or []), series_rules=list(series_rules or []),
                        min_slices=min_slices, link=link, qc=qc, qc_min_confidence=qc_min_confidence,
                        keep_patient_names=keep_patient_names, skip=skip, coarse=coarse)
    finally:
        cleanup()


def _predict(input_path: Path, output_dir: Path, models: list[Path], ranks: DistInfo, *, overlap: float, tta: bool,
             resume: bool, save_probabilities: bool, window_batch_size: int, device: str, precision: str,
             num_workers: int, checkpoint: str, output_formats: list[str], series_rules: list[str],
             min_slices: int, link: PacsLink | None = None, qc: bool = True,
             qc_min_confidence: float = DEFAULT_MIN_CONFIDENCE, keep_patient_names: bool = False,
             skip: bool = True, coarse: bool = False) -> int:
    """:func:`run` after the options are checked and the process group joined."""
    dev = ranks.device
    with contextlib.ExitStack() as stack:
        if ranks.is_main:  # rank 0 holds the output folder before anything is read; a second command refuses
            stack.enter_context(TargetLock(output_dir, "output folder"))
        loaded = load_models(list(models), stack, checkpoint=checkpoint)
        card = loaded[0].card
        retrieving = link is not None and link.source is not None
        failed_retrieval = retrieve_studies(link, output_dir, resume=resume) if retrieving and ranks.is_main else []
        barrier()  # the other ranks index what rank 0 retrieved
        dicom = _dicom_input(input_path, output_dir, card, series_rules, min_slices,
                             num_workers, dicom_only=retrieving or asks_for_dicom(output_formats))
        if retrieving and dicom is not None:  # .retrieved/ may hold earlier runs' studies: only --study's
            dicom.selections = [s for s in dicom.selections if s.study_uid in link.studies]
        outputs = case_outputs(loaded, parse_formats(output_formats, dicom_input=dicom is not None or retrieving))
        if link is not None:
            link.check_formats(outputs.formats)
        cases = [] if dicom or retrieving else discover_cases(input_path, len(card.channel_names), exclude=output_dir)
        _check_outputs_spare_inputs(cases, output_dir, outputs)
        inference = InferenceOptions(overlap=overlap, tta=tta, window_batch_size=window_batch_size,
                                     save_probabilities=save_probabilities,
                                     precision=resolve_precision(precision, dev), qc=_qc_applies(qc, card),
                                     skip=skip, coarse=coarse)
        options = PredictOptions(**asdict(inference), precision_requested=precision, device=device,
                                 device_used=str(dev), num_workers=num_workers, resume=resume, checkpoint=checkpoint,
                                 output_formats=list(outputs.formats), series_rules=series_rules,
                                 min_slices=min_slices, qc_min_confidence=qc_min_confidence,
                                 keep_patient_names=keep_patient_names)
        args = PredictArgs(models=[m.identity() for m in loaded], input=str(input_path.resolve()),
                           output=str(output_dir.resolve()), num_cases=dicom.usable if dicom else len(cases),
                           world_size=ranks.world_size, options=options)
        if resume:
            check_resume(PredictArgs.in_folder(output_dir), args)
        barrier()  # every rank has checked the old predict_args.json before rank 0 replaces it
        output_dir.mkdir(parents=True, exist_ok=True)
        if ranks.rank == 0:
            args.write(PredictArgs.in_folder(output_dir))
        failed_before: list[folder_runner.Failure] = []
        if dicom is not None:
            cases, failed_before = _name_studies(dicom, output_dir, ranks, keep_patient_names)
        for model in loaded:
            model.network.to(dev)
        sender = link.sender(JournalLine.in_folder(output_dir), outputs.formats) if link is not None else None
        checks = QcBatch(output_dir, card, outputs.model.weights_checksum, qc_min_confidence, cases) \
            if inference.qc else None
        case_log = CaseLog(PredictLogLine.rank_part(output_dir, ranks.rank, ranks.world_size), args.models, options,
                           list(card.ordered_channel_names().values()), outputs, output_dir,
                           classification=card.task == "classification")
        code = _run_shard(cases, loaded, inference, dev, output_dir, ranks, resume, num_workers, outputs,
                          [*failed_retrieval, *failed_before] if ranks.rank == 0 else [], case_log, sender, checks)
        fallbacks = logged_fallbacks(PredictLogLine.in_folder(output_dir)) if dicom and ranks.rank == 0 else []
        if fallbacks:  # a chosen series that could not be read: series_selection.csv names the one read instead
            dicom.write_selection(output_dir, fallbacks)
        return code


def _qc_applies(qc: bool, card: ModelCard) -> bool:
    """``--qc`` for this model: segmentation only (a classification model is noted and not checked)."""
    if qc and card.task == "classification":
        log.info("QC (qc.csv, qc_report.html) is for segmentation models; this classification model has none")
    return qc and card.task != "classification"


def _dicom_input(input_path: Path, output_dir: Path, card: ModelCard, series_rules: list[str],
                 min_slices: int, num_workers: int, dicom_only: bool = False) -> DicomInput | None:
    """The DICOM route's studies (``inference.dicom_cases``), or None for image files and the one-series folder."""
    if min_slices < 2:
        raise UserError(f"--min-slices {min_slices} is below 2", fix="pass 2 or more (the default is 10)")
    index = index_dicom_input(input_path, exclude=output_dir, processes=max(1, num_workers), dicom_only=dicom_only)
    if index is None:
        if series_rules:
            log.warning("--series-rule is used for DICOM studies only; the input holds none")
        return None
    rules = parse_rules(card.ordered_channel_names(), series_rules, card.series_rules)
    return select_dicom(index, rules, min_slices=min_slices)


def _name_studies(dicom: DicomInput, output_dir: Path, ranks: DistInfo, keep_patient_names: bool = False
                  ) -> tuple[list[InputCase], list[folder_runner.Failure]]:
    """Name every study by its salted key, or by its PatientID with ``keep_patient_names`` (rank 0 writes
    ``.study_keys.json`` and ``series_selection.csv``)."""
    if ranks.rank == 0:
        keys = StudyKeys.in_output(output_dir)
        dicom.record_keys(keys, keep_patient_names=keep_patient_names)
        keys.write(StudyKeys.in_folder(output_dir))
        dicom.write_selection(output_dir)
    barrier()  # the other ranks name the studies with the salt rank 0 wrote
    return dicom.cases(StudyKeys.read(StudyKeys.in_folder(output_dir)))


def _run_shard(cases: list[InputCase], loaded: list[LoadedModel], inference: InferenceOptions,
               dev: torch.device, output_dir: Path, ranks: DistInfo, resume: bool, num_workers: int,
               outputs: CaseOutputs, failed_before: list[folder_runner.Failure], case_log: CaseLog,
               sender: ResultSender | None = None, checks: QcBatch | None = None) -> int:
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
    else:  # the label file is written last, so its presence marks a finished case
        done = {c.case_id for c in mine if resume and (output_dir / outputs.marker(c)).is_file()
                and (not inference.save_probabilities or (output_dir / f"{c.case_id}{PROBABILITIES}").is_file())}
    todo = [c for c in mine if c.case_id not in done]
    if sender is not None:  # what an earlier run predicted but did not get acknowledged
        sender.on_sent = case_log.sent  # each acknowledged object goes into its case's predict_log line
        if resume:
            case_log.carry_over(sender.journal_path, [c.case_id for c in mine])
        failed_before = [*failed_before, *sender.catch_up(output_dir, [c.case_id for c in mine if c.case_id in done])]
    where = f" (rank {ranks.rank} of {ranks.world_size}: {len(mine)})" if ranks.world_size > 1 else ""
    log.info("%d case(s)%s; %d already predicted (--continue), predicting %d on %s", len(cases), where,
             len(mine) - len(todo), len(todo), dev)
    recipe = card.preprocessing()

    def predict_and_send(prepared) -> CaseResult:
        case_log.read(prepared.case)  # the series read (after a read fallback, not those chosen)
        result = predict_case(prepared, loaded, inference, dev, output_dir, outputs)
        if sender is not None:  # a send that fails after its retries is this case's failure
            sender.send_case(output_dir, result.case_id)
        return result

    def on_result(result: CaseResult) -> None:
        if checks is not None:
            checks.add(result)
        if classification:
            rows.append(_prediction_row(result, list(card.class_names)))
            folder_runner.write_csv(predictions_path, header, rows)

    def prepare(case: InputCase):
        try:
            return prepare_case(case_log.start(case), recipe, inference.qc)
        except NoReadableSeries as exc:  # the failed case's line (and series_selection.csv) names each series tried
            case_log.read(dataclasses.replace(case, fallbacks=exc.dropped))
            raise

    case_log.failed_before(failed_before)
    case_log.sent_earlier_results([c for c in mine if c.case_id in done])
    outcome = folder_runner.run_cases(
        todo, prepare=prepare,
        predict=predict_and_send,
        failures_path=folder_runner.part_path(output_dir, folder_runner.FAILURES, ranks.rank, ranks.world_size),
        num_workers=num_workers, on_result=on_result, failed_before=failed_before, on_case=case_log.done)
    failures = len(outcome.failures)
    barrier()
    if ranks.world_size > 1 and ranks.rank == 0:
        failures = len(folder_runner.merge_parts(output_dir, folder_runner.FAILURES, ranks.world_size))
        PredictLogLine.merge_parts(output_dir, ranks.world_size)
        if classification:
            folder_runner.merge_parts(output_dir, folder_runner.PREDICTIONS, ranks.world_size, key_column=0)
    if checks is not None and ranks.rank == 0:  # every rank's records are written: the batch files of all cases
        checks.finish([c.case_id for c in cases if (output_dir / outputs.marker(c)).is_file()])
    predicted = len(outcome.results)
    if failures:
        log.warning("%d case(s) failed (listed in %s); %d predicted", failures, output_dir / folder_runner.FAILURES,
                    predicted)
    else:
        log.info("%d case(s) predicted into %s", predicted, output_dir)
    return 1 if failures else 0
