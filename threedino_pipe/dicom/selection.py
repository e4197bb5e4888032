"""Which series of a study feed which model channel, and why every other series was left out.

Rules, applied to every series of a study (the first that fails is the series' reason):

1. it holds pixel data (SR, KO, PR, RTSTRUCT, ... are skipped as non-image objects);
2. its Modality is one the model reads; a channel's modality comes from its name
   (:func:`channel_modality`: ``CT...`` -> CT, ``T1``/``T2``/``FLAIR``/``ADC``/``DWI``/``MR...`` -> MR,
   ``PET``/``PT``/``SUV`` -> PT) or from an explicit rule;
3. none of its files was skipped by the index (truncated, unreadable);
4. ImageType does not contain LOCALIZER;
5. every plane states its position, orientation and pixel spacing, and the planes form one
   regular grid: one orientation, one pixel spacing and size, no duplicate positions, no missing
   slices, even steps, no in-plane drift (:func:`threedino_pipe.dicom.geometry.analyse_stack`);
6. one sample per pixel (no colour);
7. at least ``min_slices`` slices (default 10);
8. per channel, the SeriesDescription matches the channel's pattern when one is given
   (case-insensitive regular-expression search).

The usable series of a channel's modality are ranked by (ImageType ORIGINAL before DERIVED,
PRIMARY before SECONDARY, thinner slices first, rounded to 0.1 mm). The best is chosen; when two
share the best rank the study fails as ambiguous, naming both, because choosing would be a guess
(e.g. two kernels of one CT); a SeriesDescription pattern settles it. A study with no usable
series for a channel fails naming every series and why it was left out; a series chosen for two
channels, or channels from different frames of reference, fail too. Failures are per study: the
other studies go on.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pydicom.uid import UID

from threedino_pipe.dicom.index import DicomIndex, SeriesRecord, StudyRecord
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

DEFAULT_MIN_SLICES = 10
_MODALITY_PATTERNS = (
    ("CT", re.compile(r"^(CT|CECT|NCCT|CTA)")),
    ("PT", re.compile(r"^(PET|PT|SUV|FDG)")),
    ("MR", re.compile(r"^(MRI?|T1|T2|FLAIR|ADC|DWI|DTI|PD|SWI|DIXON|TOF|B0|GRE|MPRAGE|STIR)")),
)
SELECTION_COLUMNS = (
    "study_uid", "series_uid", "series_number", "modality", "image_type", "series_description", "instances",
    "frames", "orientation", "pixel_spacing_mm", "slice_spacing_mm", "status", "channel", "rank", "reason")


def channel_modality(name: str) -> str | None:
    """The DICOM Modality a channel named ``name`` reads (CT, MR, PT), or None when the name does not say."""
    upper = name.strip().upper()
    for modality, pattern in _MODALITY_PATTERNS:
        if pattern.match(upper):
            return modality
    return None


@dataclass(frozen=True)
class ChannelRule:
    """How one model channel picks its series.

    Attributes:
        channel: the channel's key in dataset.json (``"0"``, ``"1"``, ...).
        name: the channel's name (``"CT"``, ``"T1"``, ...), used in messages.
        modality: the DICOM Modality it reads.
        description: optional regular expression searched (case-insensitive) in SeriesDescription.
    """

    channel: str
    name: str
    modality: str
    description: str | None = None

    def matches_description(self, text: str) -> bool:
        return self.description is None or re.search(self.description, text, re.IGNORECASE) is not None


def parse_series_rule(text: str) -> tuple[str, str | None, str]:
    """Parse ``CHANNEL[:MODALITY]=REGEX`` (a ``--series-rule`` value) into (channel, modality, regex).

    Raises:
        UserError: no ``=``, or a regular expression that does not compile.
    """
    head, sep, pattern = text.partition("=")
    if not sep or not head.strip():
        raise UserError(f"series rule {text!r} is not CHANNEL=REGEX", fix="e.g. --series-rule 'T1=mprage|t1w'")
    channel, _, modality = head.partition(":")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UserError(f"series rule {text!r}: the pattern does not compile ({exc})",
                        fix="give a Python regular expression after '='") from None
    return channel.strip(), (modality.strip().upper() or None), pattern


def rules_for_channels(channel_names: Mapping[str, str], patterns: Mapping[str, str] | None = None,
                       modalities: Mapping[str, str] | None = None) -> list[ChannelRule]:
    """One rule per channel of a model.

    Args:
        channel_names: dataset.json's ``channel_names`` (key -> name).
        patterns: SeriesDescription regex per channel, keyed by channel key or name.
        modalities: Modality per channel (key or name), for names that do not say it.

    Raises:
        UserError: a channel whose modality cannot be told, or a pattern naming no channel.
    """
    patterns, modalities = dict(patterns or {}), dict(modalities or {})
    known = set(channel_names) | set(channel_names.values())
    for given in (*patterns, *modalities):
        if given not in known:
            raise UserError(f"a series rule names channel {given!r}, which the model does not have",
                            fix=f"use one of {', '.join(sorted(known))}")
    rules = []
    for key, name in channel_names.items():
        modality = modalities.get(key) or modalities.get(name) or channel_modality(name)
        if modality is None:
            raise UserError(f"cannot tell which DICOM modality channel {key} ({name!r}) reads",
                            fix=f"give it in a series rule, e.g. --series-rule '{name}:MR=.'")
        rules.append(ChannelRule(key, name, modality.upper(), patterns.get(key) or patterns.get(name)))
    return rules


@dataclass(frozen=True)
class SeriesDecision:
    """What selection did with one series (one row of ``series_selection.csv``).

    ``status``: ``chosen`` (feeds ``channel``), ``candidate`` (usable for ``channel`` but ranked
    ``rank`` > 1), ``tied`` (as good as another for ``channel``: the study is ambiguous) or ``skipped``.
    """

    study_uid: str
    series_uid: str
    series_number: int | None
    modality: str
    image_type: str
    series_description: str
    instances: int
    frames: int
    orientation: str
    pixel_spacing_mm: str
    slice_spacing_mm: str
    status: str
    channel: str
    rank: int
    reason: str


@dataclass
class StudySelection:
    """The outcome for one study.

    Attributes:
        chosen: channel key -> the series feeding it (empty when the study failed).
        ranked: channel key -> every usable series for it, best first (for a fallback).
        error: the per-study failure (None when every channel has its series).
        chosen_rank: channel key -> the chosen series' rank among every usable series of the channel's
            modality in the study, SeriesDescription pattern or not, leaving out series chosen for other
            channels (1: nothing ranks higher; 2 or more: a pattern chose a lower-ranked series).
        candidate_ranks: channel key -> SeriesInstanceUID -> that rank, for the chosen series and every
            other series in ``ranked`` (a series read instead of one that cannot be read has rank 2 or more).
    """

    study_uid: str
    decisions: list[SeriesDecision]
    chosen: dict[str, SeriesRecord] = field(default_factory=dict)
    ranked: dict[str, list[SeriesRecord]] = field(default_factory=dict)
    error: UserError | None = None
    chosen_rank: dict[str, int] = field(default_factory=dict)
    candidate_ranks: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def alternatives(self, channel: str) -> list[tuple[SeriesRecord, int]]:
        """The usable series of ``channel`` after its chosen one, best first, with their ranks (a read fallback),
        leaving out series chosen for other channels."""
        taken = {s.series_uid for s in self.chosen.values()}
        ranks = self.candidate_ranks.get(channel, {})
        return [(s, ranks[s.series_uid]) for s in self.ranked.get(channel, []) if s.series_uid not in taken]


def _label(series: SeriesRecord) -> str:
    description = f" {series.series_description!r}" if series.series_description else ""
    return f"series {series.series_number if series.series_number is not None else '?'}{description} " \
           f"({series.series_uid})"


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def _series_problem(series: SeriesRecord, modalities: set[str], min_slices: int,
                    display: Callable[[str], str]) -> str:
    """Why ``series`` cannot feed any channel ("" when it can)."""
    if not series.instances:
        reasons = "; ".join(f"{display(s.path)}: {s.reason}" for s in series.skipped[:3])
        return f"no readable file ({reasons})"
    if not series.is_image:
        classes = ", ".join(_sop_class_name(u) for u in series.sop_class_uids)
        return f"not an image series: {series.modality or 'no modality'} ({classes})"
    if series.modality not in modalities:
        return f"modality {series.modality}; the model reads {', '.join(sorted(modalities))}"
    if series.skipped:
        first = series.skipped[0]
        more = f" and {len(series.skipped) - 1} more" if len(series.skipped) > 1 else ""
        return (f"{len(series.skipped)} file(s) of this series are unusable: {display(first.path)} "
                f"({first.reason}){more}")
    if "LOCALIZER" in series.image_type:
        return f"a localizer (ImageType {'/'.join(series.image_type)})"
    if series.geometry_problems:
        return "; ".join(series.geometry_problems)
    stack = series.stack
    if stack is None or not stack.ok:
        return stack.describe() if stack is not None else "no slice geometry"
    if any(i.samples_per_pixel != 1 for i in series.instances):
        return "colour images (SamplesPerPixel > 1)"
    if len(stack.order) < min_slices:
        return f"{len(stack.order)} slice(s), fewer than the minimum of {min_slices}"
    return ""


def _rank_key(series: SeriesRecord) -> tuple:
    image_type = series.image_type
    spacing = series.stack.slice_spacing_mm if series.stack and series.stack.slice_spacing_mm else 0.0
    return (len(image_type) > 0 and image_type[0] == "ORIGINAL", len(image_type) > 1 and image_type[1] == "PRIMARY",
            -round(spacing, 1))


def _describe_rank(series: SeriesRecord) -> str:
    image_type = "/".join(series.image_type[:2]) or "no ImageType"
    spacing = series.stack.slice_spacing_mm if series.stack else None
    return f"{image_type}, {spacing:.3g} mm slices" if spacing else image_type


def select_study(study: StudyRecord, rules: Sequence[ChannelRule], *, min_slices: int = DEFAULT_MIN_SLICES,
                 display: Callable[[str], str] = str) -> StudySelection:
    """Choose the series of one study for each channel rule (see the module docstring for the rules).

    Args:
        display: turns a file path into the form shown in messages (e.g. relative to the input).
    """
    modalities = {r.modality for r in rules}
    problems = {uid: _series_problem(s, modalities, min_slices, display) for uid, s in study.series.items()}
    usable = [s for uid, s in study.series.items() if not problems[uid]]
    status: dict[str, tuple[str, str, int, str]] = {
        uid: ("skipped", "", 0, problem) for uid, problem in problems.items() if problem}
    failures: list[str] = []
    chosen: dict[str, SeriesRecord] = {}
    ranked: dict[str, list[SeriesRecord]] = {}
    for rule in rules:
        candidates = [s for s in usable if s.modality == rule.modality]
        matching = [s for s in candidates if rule.matches_description(s.series_description)]
        for s in candidates:
            if s not in matching and s.series_uid not in status:
                status[s.series_uid] = ("skipped", "", 0,
                                        f"SeriesDescription does not match {rule.description!r} (channel {rule.name})")
        matching.sort(key=_rank_key, reverse=True)
        ranked[rule.channel] = matching
        if not matching:
            left_out = "; ".join(f"{_label(s)}: {problems[s.series_uid] or status[s.series_uid][3]}"
                                 for s in study.series.values()) or "no series"
            failures.append(f"no usable {rule.modality} series for channel {rule.name} ({left_out})")
            continue
        best = _rank_key(matching[0])
        tied = [s for s in matching if _rank_key(s) == best]
        if len(tied) > 1:
            names = " and ".join(_label(s) for s in tied)
            failures.append(f"{len(tied)} equally good series for channel {rule.name} ({_describe_rank(tied[0])}): "
                            f"{names}")
            for s in tied:
                status[s.series_uid] = ("tied", rule.name, 1, f"as good as another series for channel {rule.name}")
            continue
        chosen[rule.channel] = matching[0]
        status[matching[0].series_uid] = ("chosen", rule.name, 1,
                                          f"best of {len(matching)} usable series ({_describe_rank(matching[0])})")
        for rank, s in enumerate(matching[1:], start=2):
            if status.get(s.series_uid, ("",))[0] not in ("chosen", "tied"):
                status[s.series_uid] = ("candidate", rule.name, rank,
                                        f"usable but ranked {rank} ({_describe_rank(s)})")
    by_series: dict[str, list[str]] = {}
    for channel, series in chosen.items():
        by_series.setdefault(series.series_uid, []).append(channel)
    for uid, channels in by_series.items():
        if len(channels) > 1:
            names = ", ".join(r.name for r in rules if r.channel in channels)
            failures.append(f"the rules choose {_label(study.series[uid])} for channels {names}")
    frames_of_reference = {f for s in chosen.values() for f in s.frame_of_reference_uids}
    if len(chosen) > 1 and len(frames_of_reference) > 1:
        failures.append("the chosen series lie in different frames of reference ("
                        + ", ".join(_label(s) for s in chosen.values()) + ")")
    decisions = []
    for uid, series in study.series.items():
        state, channel, rank, reason = status.get(uid, ("skipped", "", 0, "not needed by any channel"))
        summary = series.summary()
        decisions.append(SeriesDecision(
            study_uid=study.study_uid, series_uid=uid, series_number=series.series_number,
            modality=series.modality, image_type=summary["image_type"], series_description=series.series_description,
            instances=len(series.instances), frames=series.number_of_frames, orientation=summary["orientation"],
            pixel_spacing_mm=summary["pixel_spacing_mm"], slice_spacing_mm=summary["slice_spacing_mm"],
            status=state, channel=channel, rank=rank, reason=reason))
    error = None
    if failures:
        fix = "give a SeriesDescription pattern per channel (--series-rule CHANNEL=REGEX) or remove the extra series"
        if not any("equally good" in f or "choose" in f for f in failures):
            fix = "check that the study holds a complete axial series of the modality the model reads"
        error = UserError(f"study {study.study_uid}: " + "; ".join(failures), fix=fix)
        chosen = {}
    ranks = _study_ranks(chosen, ranked, usable, rules)
    return StudySelection(study.study_uid, decisions, chosen, ranked, error,
                          {c: ranks[c][s.series_uid] for c, s in chosen.items()}, ranks)


def _study_ranks(chosen: Mapping[str, SeriesRecord], ranked: Mapping[str, Sequence[SeriesRecord]],
                 usable: Sequence[SeriesRecord], rules: Sequence[ChannelRule]) -> dict[str, dict[str, int]]:
    """Per channel with a chosen series, for it and each series in ``ranked``: 1 + the usable series of the
    channel's modality that rank above it (patterns ignored, series chosen for other channels left out)."""
    ranks: dict[str, dict[str, int]] = {}
    for rule in rules:
        if rule.channel not in chosen:
            continue
        others = {s.series_uid for c, s in chosen.items() if c != rule.channel}
        peers = [_rank_key(s) for s in usable if s.modality == rule.modality and s.series_uid not in others]
        ranks[rule.channel] = {s.series_uid: 1 + sum(key > _rank_key(s) for key in peers)
                               for s in [chosen[rule.channel], *ranked.get(rule.channel, [])]}
    return ranks


def with_read_fallbacks(selection: StudySelection, fallbacks: Sequence[tuple[str, str, str]]) -> StudySelection:
    """``selection`` with its decisions updated after reading: each (series UID, problem, series read instead)
    of ``fallbacks`` marks that series ``unreadable`` (it was chosen or tried, and its pixels could not be
    read) and the series read instead ``chosen`` (its reason naming the series it replaced); with no series
    read instead (``""``: none of the channel's could be read, the study failed) the reason says so."""
    dropped = {uid: (problem, used) for uid, problem, used in fallbacks}
    replaced: dict[str, str] = {}
    for uid, _, used in fallbacks:
        if used:
            replaced.setdefault(used, uid)  # the first series dropped for it: the one selection chose
    decisions = []
    for decision in selection.decisions:
        if decision.series_uid in dropped:
            problem, used = dropped[decision.series_uid]
            instead = f"series {used} was read instead" if used else \
                "no usable series of the channel can be read, so the study failed (failures.csv)"
            decision = replace(decision, status="unreadable", reason=f"cannot be read ({problem}); {instead}")
        elif decision.series_uid in replaced:
            decision = replace(decision, status="chosen", reason=f"read instead of series "
                               f"{replaced[decision.series_uid]}, which cannot be read; {decision.reason}")
        decisions.append(decision)
    return replace(selection, decisions=decisions)


def select_series(index: DicomIndex, rules: Sequence[ChannelRule], *,
                  min_slices: int = DEFAULT_MIN_SLICES) -> list[StudySelection]:
    """:func:`select_study` for every study of ``index`` (file paths shown relative to its root)."""
    return [select_study(study, rules, min_slices=min_slices, display=index.display_path)
            for study in index.studies.values()]


def selection_csv_text(selections: Sequence[StudySelection]) -> str:
    """``series_selection.csv`` as text: one row per series of every study (columns: SELECTION_COLUMNS)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SELECTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for selection in selections:
        for decision in selection.decisions:
            writer.writerow(asdict(decision))
    return buffer.getvalue()


def write_selection_csv(path: str | Path, selections: Sequence[StudySelection]) -> None:
    """Write ``series_selection.csv`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(selection_csv_text(selections))
