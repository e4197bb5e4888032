"""``dataset.json`` of a raw dataset: nnU-Net v2's description with our extensions (docs/raw_convention.md).

Fields: ``channel_names`` ({"0": "CT"}; nnU-Net v1's ``modality`` is accepted), ``labels``
({"background": 0, "liver": 1} or regions {"whole_tumor": [1, 2, 3]} with
``regions_class_order``), ``numTraining``, ``file_ending``; our extensions: ``task``
("segmentation", the default when labels are given; "classification" with ``class_names``;
"unlabeled" for pretraining-only collections) and nnU-Net v2's optional ``dataset`` listing
(case id -> ``{"images": [...], "label": ...}``) and ``series_rules`` (channel name or index ->
the SeriesDescription regular expression a DICOM series must match to feed that channel in
``3dino predict``; copied into plans.json and model.json). Other keys nnU-Net allows (``name``,
``description``, ``licence``, ...) are kept as they are.

The user writes this file, so a problem names the field and says how to write it (there is no
command to rerun).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PrivateAttr, Strict, ValidationError, field_validator, model_validator

from threedino_pipe.artifacts.base import Record, field_path
from threedino_pipe.runtime.atomic_files import read_json, write_json
from threedino_pipe.runtime.errors import UserError

TASKS = ("segmentation", "classification", "unlabeled")
LabelValue = Annotated[int, Strict()] | list[Annotated[int, Strict()]]
_LISTING_EXAMPLE = ('"dataset": {"case1": {"images": ["imagesTr/case1_0000.nii.gz"], '
                    '"label": "labelsTr/case1.nii.gz"}}')
# how to write each field right (the fix of an error about it)
FIXES = {
    "channel_names": 'write e.g. "channel_names": {"0": "T1", "1": "T2"} (channel indices 0, 1, 2, ... as keys)',
    "labels": 'write name -> value, e.g. "labels": {"background": 0, "organ": 1} (nnU-Net v2 style; nnU-Net v1 '
              'wrote value -> name); a region lists its values: "tumour": [1, 2]',
    "file_ending": 'add e.g. "file_ending": ".nii.gz"',
    "task": f"use one of {', '.join(TASKS)}",
    "numTraining": "set it to the number of training cases",
    "class_names": 'add e.g. "class_names": ["benign", "malignant"]',
    "regions_class_order": "add the label value written for each region, in the order of 'labels'",
    "case_groups": 'write group -> case ids, e.g. "case_groups": {"patient_07": ["case_012", "case_013"]}',
    "series_rules": 'write channel name -> SeriesDescription regular expression (searched case-insensitively), '
                    'e.g. "series_rules": {"CT": "soft|std"}',
    "dataset": f"each entry needs 'images' (a list of file paths) and, for segmentation, 'label': write e.g. "
               f"{_LISTING_EXAMPLE}",
}


def series_rules_problem(rules: Mapping[str, str], channel_names: Mapping[object, str]) -> str | None:
    """Why ``series_rules`` (channel name or index -> SeriesDescription regex) is unusable, or None.

    A key must name a channel (its index or name) and a value must be a Python regular expression.
    """
    known = {str(k) for k in channel_names} | {str(v) for v in channel_names.values()}
    for channel, pattern in rules.items():
        if channel not in known:
            return (f"'series_rules' names channel {channel!r}, which 'channel_names' does not have (one of "
                    f"{', '.join(sorted(known))})")
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"'series_rules' of channel {channel!r}: the pattern {pattern!r} does not compile ({exc})"
    return None


class DatasetJsonProblem(Exception):
    """A rule of the convention broken by ``field`` (raised by validators, turned into a UserError by ``read``)."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.field, self.problem, self.fix = field, problem, fix or FIXES.get(field)


class ListedCase(Record):
    """One entry of nnU-Net v2's ``dataset`` listing: image paths (one per channel) and the label path."""

    model_config = ConfigDict(extra="allow")
    images: list[str] = Field(min_length=1)
    label: str | None = None


class DatasetJson(Record):
    """The parsed ``dataset.json``; ``channel_names`` ordered by index, ``labels`` empty unless segmentation."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)
    FILE: ClassVar[str] = "dataset.json"

    channel_names: dict[int, str] = Field(min_length=1)
    labels: dict[str, LabelValue] = {}
    task: Literal["segmentation", "classification", "unlabeled"]
    file_ending: str
    num_training: Annotated[int, Strict()] | None = Field(None, alias="numTraining")
    class_names: list[str] = []
    regions_class_order: list[int] | None = None
    dataset: dict[str, ListedCase] | None = None
    case_groups: dict[str, list[str]] | None = None  # group -> its cases: kept on one side of every split
    series_rules: dict[str, str] | None = None  # channel name or index -> SeriesDescription regex (DICOM input)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _conventions(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise DatasetJsonProblem("(top level)", "dataset.json must hold a JSON object",
                                     "see dataset_templates/ and docs/raw_convention.md")
        data = dict(data)
        if "channel_names" not in data and "modality" in data:  # nnU-Net v1's name
            data["channel_names"] = data.pop("modality")
        channels = data.get("channel_names")
        if not isinstance(channels, dict) or not channels:
            raise DatasetJsonProblem("channel_names", "'channel_names' is missing or empty",
                                     'add e.g. "channel_names": {"0": "CT"}')
        if not all(str(k).isdigit() for k in channels):
            raise DatasetJsonProblem("channel_names", "'channel_names' keys must be channel indices \"0\", \"1\", ...")
        data["channel_names"] = {int(k): str(v) for k, v in sorted(channels.items(), key=lambda kv: int(kv[0]))}
        data.setdefault("task", "segmentation" if data.get("labels") else "unlabeled")
        if data["task"] not in TASKS:
            raise DatasetJsonProblem("task", f"unknown task '{data['task']}'")
        if data["task"] != "segmentation":
            data["labels"] = {}
        if isinstance(data.get("class_names"), list):
            data["class_names"] = [str(c) for c in data["class_names"]]
        return data

    @field_validator("channel_names")
    @classmethod
    def _contiguous(cls, names: dict[int, str]) -> dict[int, str]:
        if sorted(names) != list(range(len(names))):
            raise DatasetJsonProblem("channel_names", f"channel indices {sorted(names)} are not 0..{len(names) - 1}",
                                     "number the channels 0, 1, 2, ... without gaps")
        return names

    @field_validator("file_ending")
    @classmethod
    def _dotted(cls, ending: str) -> str:
        if not ending.startswith("."):
            raise DatasetJsonProblem("file_ending", "'file_ending' is missing or does not start with '.'")
        return ending

    @model_validator(mode="after")
    def _task_needs(self) -> DatasetJson:
        if self.task == "segmentation":
            if not self.labels:
                raise DatasetJsonProblem("labels", "'labels' is missing",
                                         'add e.g. "labels": {"background": 0, "organ": 1}')
            if 0 not in [v for v in self.labels.values() if isinstance(v, int)]:
                raise DatasetJsonProblem("labels", "'labels' has no background (value 0)", 'add "background": 0')
            if self.has_regions and self.regions_class_order is None:
                raise DatasetJsonProblem("regions_class_order", "region labels need 'regions_class_order'")
        if self.task == "classification" and len(self.class_names) < 2:
            raise DatasetJsonProblem("class_names", "a classification dataset needs 'class_names' with at least "
                                     "2 classes")
        problem = series_rules_problem(self.series_rules or {}, self.channel_names)
        if problem:
            raise DatasetJsonProblem("series_rules", problem)
        if self.task == "segmentation" and self.dataset:
            for case, item in self.dataset.items():
                if item.label is None:
                    raise DatasetJsonProblem("dataset", f"'dataset' entry '{case}' needs 'label': the label "
                                             "file's path")
        return self

    @classmethod
    def in_folder(cls, folder: str | Path) -> Path:
        """``folder/dataset.json``."""
        return Path(folder) / cls.FILE

    @classmethod
    def read(cls, folder: str | Path) -> DatasetJson:
        """Parse and check ``folder/dataset.json``.

        Raises:
            UserError: the file is missing, or a field is absent or malformed (named, with how to write it).
        """
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise UserError("dataset.json is missing", file=path,
                            fix="create it (see dataset_templates/ and docs/raw_convention.md)")
        data, note = _nnunet_classification(read_json(path), Path(folder))
        spec = cls.from_data(data, path)
        spec._notes = [note] if note else []
        return spec

    @property
    def notes(self) -> list[str]:
        """What ``read`` inferred from the folder (e.g. a classification dataset written the nnU-Net way)."""
        return list(self._notes)

    @classmethod
    def from_data(cls, data: Any, path: str | Path) -> DatasetJson:
        """Validate parsed ``data`` of the file ``path`` (errors name ``path``)."""
        try:
            return cls.model_validate(data)
        except DatasetJsonProblem as problem:
            raise UserError(problem.problem, file=path, fix=problem.fix) from None
        except ValidationError as exc:
            raise _validation_error(exc, path) from None

    def write(self, path: str | Path) -> Path:
        """Write atomically in nnU-Net's layout (``numTraining``, string channel keys); returns ``path``."""
        write_json(path, self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True))
        return Path(path)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, list) for v in self.labels.values())

    @property
    def label_values(self) -> set[int]:
        """Every integer value a label image may contain (0 included)."""
        values = {0}
        for v in self.labels.values():
            values.update(v if isinstance(v, list) else [v])
        return values


def _validation_error(exc: ValidationError, path: str | Path) -> UserError:
    """The first problem of ``exc`` as a UserError naming the field and how to write it."""
    error = exc.errors()[0]
    where = field_path(error["loc"]).replace("num_training", "numTraining")
    field = where.split(".")[0]
    given = repr(error.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    what = "is missing" if error["type"] == "missing" else f"is invalid ({given}): {error['msg']}"
    return UserError(f"'{where}' {what}", file=path, fix=FIXES.get(field, "see docs/raw_convention.md"))


def _nnunet_classification(data: Any, folder: Path) -> tuple[Any, str]:
    """A classification dataset written the nnU-Net way, as ours: ``(data, note)``; other data unchanged, no note.

    nnU-Net has no classification task; users write ``"labels": {"benign": 0, "malignant": 1}`` with
    a ``labelsTr.csv`` and no ``labelsTr/`` folder. Without a ``task`` (and ``class_names``), such a
    ``labels`` map of names to the integers 0..K-1 (K >= 2) is read as ``task: classification``
    with ``class_names`` in the order of the integers.
    """
    if not isinstance(data, dict) or "task" in data or "class_names" in data or "dataset" in data:
        return data, ""
    labels = data.get("labels")
    if not (isinstance(labels, dict) and (folder / "labelsTr.csv").is_file() and not (folder / "labelsTr").is_dir()):
        return data, ""
    values = list(labels.values())
    if not all(type(v) is int for v in values):
        return data, ""
    if sorted(values) != list(range(len(values))) or len(values) < 2:
        raise UserError(f"'labels' maps names to {sorted(values)}, but with labelsTr.csv and no labelsTr/ folder "
                        "this reads as a classification dataset, whose classes are numbered 0, 1, ..., K-1 "
                        "(at least 2)", file=folder / DatasetJson.FILE,
                        fix='number the classes from 0, e.g. "labels": {"benign": 0, "malignant": 1}, or write '
                        '"task": "classification" with "class_names": ["benign", "malignant"]')
    names = [str(name) for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    note = (f"dataset.json has no 'task', a 'labels' map of names to 0..{len(names) - 1} and labelsTr.csv without "
            f"a labelsTr/ folder: read as a classification dataset with class_names {names} (class i = the label "
            f"with value i); write \"task\": \"classification\" to make it explicit")
    return {**data, "task": "classification", "class_names": names}, note
