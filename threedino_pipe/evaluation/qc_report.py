"""QC of a ``3dino predict`` batch: a record per case, ``qc.csv`` and ``qc_report.html`` (docs/predict.md, *QC*).

:class:`QcBatch` is what predict runs: :meth:`QcBatch.add` after each case writes the case's
record ``.qc/<case>.json`` and its thumbnail ``.qc/<case>.png`` (measures:
:mod:`threedino_pipe.evaluation.qc`); :meth:`QcBatch.finish` at the end of the batch (rank 0 after
the others) builds the batch files from the records of every finished case, those predicted before
``--continue`` and by other ranks included.

``qc.csv``: one row per case and structure, cases sorted by id, structures in the model's order,
columns :data:`QC_COLUMNS`; a flag column holds ``1`` (raised), ``0``, or nothing (not evaluated).
``qc_report.html``: self-contained (thumbnails embedded as base64 PNG); the flagged cases first,
each with its structures and its three-plane thumbnail, then one table of the cases without flags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from threedino_pipe.artifacts import CaseQc, ModelCard, StructureQc
from threedino_pipe.evaluation import report
from threedino_pipe.evaluation.qc import (
    CONNECTIVITY,
    FLAGS,
    QcRules,
    case_flags,
    measure_case,
    structure_flags,
    thumbnail_png,
    write_thumbnail,
)
from threedino_pipe.inference.folder_runner import write_csv
from threedino_pipe.inference.input_cases import InputCase
from threedino_pipe.inference.predictor import CaseResult
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

QC_CSV = "qc.csv"
QC_REPORT = "qc_report.html"
QC_COLUMNS = ("case_id", "structure", "label_values", "volume_ml", "components", "border_share", "mean_confidence",
              "training_min_ml", "training_max_ml", *FLAGS, "flags")
_MAX_LISTED = 50


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _flag(value: bool | None) -> str:
    return "" if value is None else str(int(value))


def structure_row(record: CaseQc, structure: StructureQc, rules: QcRules) -> list[str]:
    """One ``qc.csv`` row (:data:`QC_COLUMNS`)."""
    limits = (rules.volume_ranges or {}).get(structure.name)
    flags = structure_flags(structure, rules, record.series_ranks)
    return [record.case_id, structure.name, " ".join(map(str, structure.label_values)),
            _number(structure.volume_ml, 3), str(structure.components), _number(structure.border_share, 4),
            _number(structure.mean_confidence, 4), _number(None if limits is None else limits.min_ml, 3),
            _number(None if limits is None else limits.max_ml, 3), *(_flag(flags[f]) for f in FLAGS),
            " ".join(f for f in FLAGS if flags[f])]


def csv_rows(records: Sequence[CaseQc], rules: QcRules) -> list[list[str]]:
    """Every row of ``qc.csv``: cases sorted by id, structures in the model's order."""
    return [structure_row(r, s, rules) for r in sorted(records, key=lambda r: r.case_id) for s in r.structures]


def _table(rows: Sequence[Sequence[str]], with_case: bool = True) -> pd.DataFrame:
    """The report's table of ``qc.csv`` rows: the training range in one column, the flag columns folded into one."""
    columns = ["case_id", "structure", "volume_ml", "training range (mL)", "components", "border_share",
               "mean_confidence", "flags"]
    shown = [[row[0], row[1], row[3], f"{row[7]} - {row[8]}" if row[7] else "not recorded", *row[4:7],
              row[-1] or "none"] for row in rows]
    start = 0 if with_case else 1
    return pd.DataFrame([r[start:] for r in shown], columns=columns[start:])


def _case_section(output_dir: Path, record: CaseQc, rules: QcRules) -> report.Section:
    flags = case_flags(record, rules)
    thumbnail = CaseQc.thumbnail_path(output_dir, record.case_id)
    figures = [(f"{record.case_id}: the three planes through the structures' centre, without and with the "
                "predicted labels", thumbnail.read_bytes())] if thumbnail.is_file() else []
    paragraphs = [] if figures else [f"No thumbnail: {thumbnail.name} is missing."]
    if "series_ranked_second" in flags:
        paragraphs.append(f"Read from a series ranked {max(record.series_ranks)} among the study's usable series of "
                          "its modality (series_selection.csv says which and why).")
    rows = [structure_row(record, s, rules) for s in record.structures]
    return report.Section(f"{record.case_id}: {', '.join(flags)}", paragraphs=paragraphs,
                          tables=[("", _table(rows, with_case=False))], figures=figures)


def _notes(rules: QcRules, card: ModelCard) -> list[str]:
    notes = [f"Per case and structure: volume in mL (voxels x the input's voxel volume), connected components "
             f"({CONNECTIVITY}-connectivity), the share of the structure's voxels in the outermost voxel layer of the "
             "image (a structure cut by the scan's edge), and the model's mean probability of the structure over its "
             f"voxels. Flags: empty; volume outside the range seen in training; mean probability below "
             f"{rules.min_confidence:g}; the study's series ranked below another usable series."]
    if card.label_volumes_ml is None:
        notes.append("The model's model.json holds no training volume ranges (label_volumes_ml; models finetuned "
                     "before they were recorded): volume_outside_training_range is not evaluated.")
    return notes


def render_report(output_dir: Path, records: Sequence[CaseQc], missing: Sequence[str], rules: QcRules,
                  card: ModelCard) -> str:
    """The HTML page: notes, a summary, the flagged cases (thumbnails), then the other cases in one table."""
    ordered = sorted(records, key=lambda r: r.case_id)
    flagged = [r for r in ordered if case_flags(r, rules)]
    calm = [r for r in ordered if not case_flags(r, rules)]
    ranges = card.label_volumes_ml
    info = [("cases with QC", str(len(ordered))), ("flagged cases", str(len(flagged))),
            ("low confidence below", f"{rules.min_confidence:g}"),
            ("training volume ranges", "not recorded" if ranges is None else
             "; ".join(f"{name} {r.min_ml:.1f} - {r.max_ml:.1f} mL" for name, r in ranges.items()))]
    warnings = []
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
        warnings.append(f"{len(missing)} predicted case(s) have no QC record (predicted with --no-qc, by an earlier "
                        f"version, or their QC failed: see the log): {listed}")
    sections = [_case_section(output_dir, r, rules) for r in flagged]
    sections.append(report.Section("Cases without flags", paragraphs=[] if calm else ["None."],
                                   tables=[("", _table(csv_rows(calm, rules)))] if calm else []))
    return report.render("QC of the predictions", info, [], [], warnings, notes=_notes(rules, card),
                         sections=sections)


def write(output_dir: Path, records: Sequence[CaseQc], missing: Sequence[str], rules: QcRules,
          card: ModelCard) -> tuple[Path, Path]:
    """Write ``qc.csv`` and ``qc_report.html`` into ``output_dir`` (atomically); returns their paths."""
    output_dir = Path(output_dir)
    csv_path, html_path = output_dir / QC_CSV, output_dir / QC_REPORT
    write_csv(csv_path, QC_COLUMNS, csv_rows(records, rules))
    page = render_report(output_dir, records, missing, rules, card)
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return csv_path, html_path


class QcBatch:
    """QC of one ``3dino predict`` batch (segmentation models): a record per case, the batch files at the end.

    Args:
        output_dir: the prediction folder.
        card: the (first) model's card: its structures and training volume ranges.
        weights_checksum: identifies the model(s); records of another model are not used.
        min_confidence: ``--qc-min-confidence``.
        cases: the batch's cases (their DICOM series ranks).
    """

    def __init__(self, output_dir: Path, card: ModelCard, weights_checksum: str, min_confidence: float,
                 cases: Sequence[InputCase]) -> None:
        self.output_dir, self.card, self.weights_checksum = Path(output_dir), card, weights_checksum
        self.rules = QcRules(min_confidence, card.label_volumes_ml)
        self.series_ranks = {c.case_id: c.series_ranks for c in cases}

    def add(self, result: CaseResult) -> None:
        """Measure a predicted case and write its record and thumbnail; drops ``result.qc`` (its arrays).

        A failure of QC is logged and leaves the case without a record; the batch goes on.
        """
        inputs, result.qc = result.qc, None
        if inputs is None:
            return
        try:
            record = measure_case(result.case_id, inputs.labels, inputs.geometry.spacing, self.card.structures(),
                                  inputs.confidence, weights_checksum=self.weights_checksum,
                                  series_ranks=result.read_as.series_ranks if result.read_as is not None else
                                  self.series_ranks.get(result.case_id, ()))  # read_as: after a read fallback
            thumbnail = CaseQc.thumbnail_path(self.output_dir, result.case_id)
            write_thumbnail(thumbnail_png(inputs, result.case_id), thumbnail)
            record.thumbnail = thumbnail.name
            record.write(CaseQc.path(self.output_dir, result.case_id))
        except Exception as exc:  # noqa: BLE001 - QC must not stop a batch whose outputs are written
            log.warning("QC of %s failed (%s: %s); the case has no QC record", result.case_id, type(exc).__name__,
                        exc)

    def records(self, case_ids: Sequence[str]) -> tuple[list[CaseQc], list[str]]:
        """The records of ``case_ids`` written for this model, and the ids without one."""
        found, missing = [], []
        for case_id in case_ids:
            path = CaseQc.path(self.output_dir, case_id)
            record = None
            if path.is_file():
                try:
                    record = CaseQc.read(path)
                except UserError as exc:
                    log.warning("%s: %s; the case is listed without QC", path, exc.problem)
            if record is not None and record.weights_checksum == self.weights_checksum:
                found.append(record)
            else:
                missing.append(case_id)
        return found, missing

    def finish(self, case_ids: Sequence[str]) -> tuple[Path, Path] | None:
        """Write ``qc.csv`` and ``qc_report.html`` from the records of the finished ``case_ids``; returns their
        paths (None, logged, when they could not be written)."""
        records, missing = self.records(sorted(case_ids))
        try:
            paths = write(self.output_dir, records, missing, self.rules, self.card)
        except Exception as exc:  # noqa: BLE001 - the predictions are written; say why their QC files are not
            log.error("qc.csv and qc_report.html could not be written (%s: %s)", type(exc).__name__, exc)
            return None
        flagged = sum(bool(case_flags(r, self.rules)) for r in records)
        log.info("QC: %d case(s), %d flagged: %s", len(records), flagged, paths[1])
        return paths
