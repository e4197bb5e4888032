"""DICOM studies as ``3dino predict`` cases: index a folder tree, choose each study's series, name the cases.

The route (docs/predict.md, *DICOM input*): an input folder without image files at its top level
is indexed from headers only (:func:`threedino_pipe.dicom.index.index_folder`); when it holds
DICOM studies, each study's series are chosen for the model's channels
(:func:`threedino_pipe.dicom.selection.select_series`, rules from the model card's channel names
and ``--series-rule``, at least ``--min-slices`` slices). A usable study becomes one case named by
its salted study key (:class:`threedino_pipe.artifacts.StudyKeys`); a study without usable
series, or with two equally good ones, is a failure of that study only.

The layout before this route stays as it was: a tree holding exactly one DICOM series, all its
files in one folder (the input itself or one folder in it), is one case named by that folder and
read by ITK (:mod:`threedino_pipe.inference.input_cases`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import StudyKeys
from threedino_pipe.dicom.header import read_text_elements
from threedino_pipe.dicom.index import DicomIndex, SeriesRecord, StudyRecord, index_folder
from threedino_pipe.dicom.selection import (
    DEFAULT_MIN_SLICES,
    ChannelRule,
    StudySelection,
    parse_series_rule,
    rules_for_channels,
    select_series,
    with_read_fallbacks,
    write_selection_csv,
)
from threedino_pipe.dicom.volume import SeriesVolume, read_series
from threedino_pipe.inference.folder_runner import Failure
from threedino_pipe.inference.input_cases import InputCase, ReadFallback, is_image_file
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

SELECTION_FILE = "series_selection.csv"


def parse_rules(channel_names: dict[str, str], series_rules: Sequence[str],
                stored: Mapping[str, str] | None = None) -> list[ChannelRule]:
    """The channel rules of a model: its channel names, its stored ``series_rules`` (model.json, from
    dataset.json) and the ``--series-rule CHANNEL[:MODALITY]=REGEX`` values, which override a stored
    pattern of the same channel.

    Raises:
        UserError: a malformed rule, a rule naming no channel, or a channel whose modality cannot be told.
    """
    by_name = {name: key for key, name in channel_names.items()}
    patterns: dict[str, str] = {by_name.get(k, k): v for k, v in (stored or {}).items()}
    modalities: dict[str, str] = {}
    for text in series_rules:
        channel, modality, pattern = parse_series_rule(text)
        patterns[by_name.get(channel, channel)] = pattern
        if modality:
            modalities[channel] = modality
    return rules_for_channels(channel_names, patterns, modalities)


def _is_single_series_folder(index: DicomIndex, source: Path) -> bool:
    """True for the layout read before indexing: one series, all its files in ``source`` or one folder in it."""
    series = list(index.iter_series())
    if len(series) != 1 or index.skipped:
        return False
    folders = {Path(i.path).parent for i in series[0].instances}
    if len(folders) != 1:
        return False
    folder = folders.pop().resolve()
    return folder == source.resolve() or folder.parent == source.resolve()


def index_dicom_input(source: Path, *, exclude: Path | None = None, processes: int = 2,
                      dicom_only: bool = False) -> DicomIndex | None:
    """The index of ``source`` when it goes the DICOM route (module docstring), else None.

    ``dicom_only`` (studies retrieved from a PACS, or DICOM outputs asked for): one series in one
    folder goes the DICOM route too.
    """
    source = Path(source)
    if not source.is_dir():
        return None
    if any(is_image_file(entry) for entry in source.iterdir() if not entry.name.startswith(".")):
        return None
    index = index_folder(source, processes=max(1, processes), exclude=exclude)
    if not index.studies or (not dicom_only and _is_single_series_folder(index, source)):
        return None
    return index


@dataclass
class DicomInput:
    """An indexed DICOM input and what selection made of each study."""

    index: DicomIndex
    selections: list[StudySelection]
    channels: tuple[str, ...]  # channel keys in the model's order

    @property
    def usable(self) -> int:
        """Studies whose every channel has its series."""
        return sum(s.ok for s in self.selections)

    def write_selection(self, output_dir: Path, fallbacks: Sequence[tuple[str, str, str]] = ()) -> Path:
        """Write ``series_selection.csv`` (every series of every study) into ``output_dir``; ``fallbacks``
        ((series that could not be read, the problem, series read instead), from ``predict_log.jsonl``)
        mark those series ``unreadable`` and the series read instead ``chosen``."""
        path = Path(output_dir) / SELECTION_FILE
        write_selection_csv(path, [with_read_fallbacks(s, fallbacks) for s in self.selections] if fallbacks
                            else self.selections)
        return path

    def record_keys(self, keys: StudyKeys, *, keep_patient_names: bool = False) -> None:
        """Record every study's key in ``keys``; with ``keep_patient_names`` its output name from PatientID
        (:func:`patient_names`)."""
        names = patient_names(self, keys) if keep_patient_names else {}
        for selection in self.selections:
            keys.key_of(selection.study_uid, names.get(selection.study_uid))

    def cases(self, keys: StudyKeys) -> tuple[list[InputCase], list[Failure]]:
        """One case per usable study (named by ``keys``: its study key or recorded name, sorted) and one failure
        per other study."""
        cases, failures = [], []
        for selection in self.selections:
            key = keys.name_of(selection.study_uid)
            if not selection.ok:
                series = " ".join(d.series_uid for d in selection.decisions)
                failures.append(Failure(key, f"series {series}" if series else f"study {selection.study_uid}",
                                        selection.error.problem))
                continue
            chosen = tuple(selection.chosen[c] for c in self.channels)
            label = "series " + " ".join(s.series_uid for s in chosen)
            cases.append(InputCase(key, tuple(Path(s.instances[0].path) for s in chosen), series=chosen,
                                   input_root=self.index.root, label=label,
                                   series_ranks=tuple(selection.chosen_rank.get(c, 1) for c in self.channels),
                                   alternatives=tuple(tuple(selection.alternatives(c)) for c in self.channels)))
        for failure in failures:
            log.warning("%s failed: %s", failure.case, failure.error)
        return sorted(cases, key=lambda c: c.case_id), failures


def select_dicom(index: DicomIndex, rules: Sequence[ChannelRule], *, min_slices: int = DEFAULT_MIN_SLICES
                 ) -> DicomInput:
    """Choose every study's series (``series_selection.csv`` rows; per-study failures kept, not raised)."""
    selections = select_series(index, rules, min_slices=min_slices)
    result = DicomInput(index, selections, tuple(r.channel for r in rules))
    log.info("DICOM input: %d stud(ies), %d usable, %d series", len(selections), result.usable,
             sum(len(s.decisions) for s in selections))
    return result


def _file_name(text: str) -> str:
    """``text`` as a file name stem: runs of characters other than letters, digits, ``.``, ``_``, ``-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:64]


def _patient_id(study: StudyRecord) -> str:
    """The PatientID of a study, read from one of its files ("" when none says it)."""
    paths = [i.path for s in study.series.values() for i in s.instances] or \
        [f.path for s in study.series.values() for f in s.skipped]
    for path in paths[:3]:
        try:
            return read_text_elements(path, ["PatientID"])["PatientID"]
        except Exception:  # noqa: BLE001 - a damaged file: try the next one
            continue
    return ""


def patient_names(dicom: DicomInput, keys: StudyKeys) -> dict[str, str]:
    """Study UID -> output name from its PatientID (``--keep-patient-names``), made a safe file name.

    A patient with several studies in the input gets ``<PatientID>_<first 8 digits of the study key>``
    for each (so names never collide); a study without a usable PatientID keeps its study key.
    """
    ids = {s.study_uid: _file_name(_patient_id(dicom.index.studies[s.study_uid])) for s in dicom.selections}
    counts = Counter(ids.values())
    names = {}
    for study_uid, name in ids.items():
        if name:
            names[study_uid] = name if counts[name] == 1 else f"{name}_{keys.key_of(study_uid)[:8]}"
    return names


class NoReadableSeries(UserError):
    """No usable series of a study's channel can be read: ``dropped`` holds each series tried, with its problem
    (``ReadFallback`` without a series read instead), for the case's predict_log line and series_selection.csv."""

    def __init__(self, problem: str, *, file: str | None, fix: str | None,
                 dropped: tuple[ReadFallback, ...]) -> None:
        super().__init__(problem, file=file, fix=fix)
        self.dropped = dropped


def _read_channel(case: InputCase, index: int) -> tuple[SeriesRecord, SeriesVolume, list[ReadFallback]]:
    """Channel ``index`` of a DICOM study as read: its chosen series, or when that cannot be read the first of
    its alternatives (``InputCase.alternatives``) that can, with a :class:`ReadFallback` per series dropped.

    Raises:
        NoReadableSeries: no series of the channel can be read (the chosen one's problem, naming the others').
    """
    series = case.series[index]
    try:
        return series, read_series(series, display=case.display), []
    except UserError as exc:
        first = exc
    dropped = [(series.series_uid, first)]
    for alternative, rank in case.alternatives[index] if index < len(case.alternatives) else ():
        try:
            volume = read_series(alternative, display=case.display)
        except UserError as exc:
            dropped.append((alternative.series_uid, exc))
            continue
        log.warning("%s: series %s cannot be read (%s); channel %d is read from series %s (ranked %d) instead",
                    case.case_id, series.series_uid, first.problem, index, alternative.series_uid, rank)
        return alternative, volume, [ReadFallback(index, uid, exc.problem, alternative.series_uid, rank)
                                     for uid, exc in dropped]
    others = "; ".join(f"series {uid}: {exc.problem}" for uid, exc in dropped[1:])
    raise NoReadableSeries(first.problem + (f"; no other usable series of the channel can be read either ({others})"
                                            if others else ""), file=first.file, fix=first.fix,
                           dropped=tuple(ReadFallback(index, uid, exc.problem) for uid, exc in dropped))


def read_study(case: InputCase) -> tuple[list[SeriesVolume], InputCase]:
    """Every channel of a DICOM study (:func:`_read_channel`) and the case as read: when a channel fell back
    to another series, ``series``, ``files``, ``label`` and ``series_ranks`` name the series read and
    ``fallbacks`` says why (``case`` itself otherwise)."""
    read = [_read_channel(case, index) for index in range(len(case.series))]
    fallbacks = tuple(f for _, _, found in read for f in found)
    volumes = [volume for _, volume, _ in read]
    if not fallbacks:
        return volumes, case
    ranks = list(case.series_ranks or [1] * len(read))
    for fallback in fallbacks:
        ranks[fallback.channel] = fallback.rank
    series = tuple(record for record, _, _ in read)
    return volumes, dataclasses.replace(case, files=tuple(Path(s.instances[0].path) for s in series), series=series,
                                        label="series " + " ".join(s.series_uid for s in series),
                                        series_ranks=tuple(ranks), fallbacks=fallbacks)
