"""Which cases ``3dino predict`` reads: discovery and grouping of input files into cases.

An input (``-i``) is one of:

- a folder of image files (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and/or
  DICOM series folders (one series per sub-folder); hidden names and other files are skipped;
- a folder that itself holds one DICOM series (one case, named by the folder);
- a text file listing one image file or DICOM folder per line (relative to the list file's
  folder, or absolute; blank lines and lines starting with ``#`` are skipped);
- a single image file.

Grouping rule: entries are grouped into cases by their ``_XXXX`` suffix (``{case}_{XXXX}``, the
raw convention) when every group holds exactly the model's channels ``0000 .. C-1``. When every
name has the suffix and every group is complete (``0000 .. K``), some larger than the
model's single channel (``case_0000``, ``case_0001``), the input is refused,
listing the groups: reading them as separate cases would be silently wrong. Otherwise a
single-channel model takes each entry as its own case, named by its whole stem
(``patient_0012.nii.gz`` -> ``patient_0012``); anything else is an error listing the files.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_OUTPUT_ENDING = ".nii.gz"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")
_MAX_LISTED = 20


@dataclass(frozen=True)
class ReadFallback:
    """A channel's series that could not be read (``dropped``, with the problem) and the series read instead
    (``used``, of rank ``rank`` among the study's usable series of its modality; ``""`` and None when no usable
    series of the channel could be read, and the study failed)."""

    channel: int
    dropped: str
    problem: str
    used: str = ""
    rank: int | None = None


@dataclass(frozen=True)
class InputCase:
    """One case to predict.

    Attributes:
        case_id: the case name (output file stem, ``case_id`` in ``predictions.csv``).
        files: one entry per model channel, in channel order (an image file or a DICOM series folder;
            for an indexed DICOM study, the first file of each chosen series).
        series: for an indexed DICOM study (``inference.dicom_cases``), the chosen series per channel
            (``dicom.index.SeriesRecord``), read by ``dicom.volume.read_series``; empty for files.
        input_root: the folder the series were indexed under (messages show paths relative to it).
        label: how failures.csv names the input when no file is to blame (the series UIDs for DICOM).
        series_ranks: for an indexed DICOM study, per channel the chosen series' rank among the study's
            usable series of its modality (``StudySelection.chosen_rank``; 1 = the best); empty for files.
        alternatives: for an indexed DICOM study, per channel the other usable series with their ranks,
            best first (``StudySelection.alternatives``): read, in order, when the chosen one cannot be.
        fallbacks: set on the case as read (``inference.predictor.read_series_case``): each chosen series
            that could not be read and the series read instead.
    """

    case_id: str
    files: tuple[Path, ...]
    series: tuple = field(default=(), compare=False)
    input_root: Path | None = None
    label: str = ""
    series_ranks: tuple[int, ...] = field(default=(), compare=False)
    alternatives: tuple[tuple[tuple, ...], ...] = field(default=(), compare=False)
    fallbacks: tuple[ReadFallback, ...] = field(default=(), compare=False)

    @property
    def is_dicom(self) -> bool:
        """True for an indexed DICOM study (its channels are series, not files)."""
        return bool(self.series)

    def display(self, path: str | Path) -> str:
        """``path`` as messages show it: relative to the indexed input folder when it lies inside."""
        if self.input_root is not None:
            try:
                return str(Path(path).relative_to(self.input_root))
            except ValueError:
                pass
        return str(path)

    @property
    def output_ending(self) -> str:
        """The ending of channel 0's file (``.nii.gz`` for a DICOM series folder or study)."""
        if self.is_dicom:
            return DICOM_OUTPUT_ENDING
        return split_ending(self.files[0])[1] or DICOM_OUTPUT_ENDING

    @property
    def output_name(self) -> str:
        """File name of the case's label output, e.g. ``patient_0012.nii.gz``."""
        return f"{self.case_id}{self.output_ending}"


def split_ending(path: Path) -> tuple[str, str]:
    """(stem, ending) of an image path: ``a_0000.nii.gz`` -> (``a_0000``, ``.nii.gz``); a folder -> (name, "")."""
    name = path.name
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], name[-len(ending):]
    return name, ""


def is_image_file(path: Path) -> bool:
    return split_ending(path)[1] != ""


def _folder_is_one_series(folder: Path) -> bool:
    """True when ``folder`` holds DICOM slices itself (no image files, no sub-folders)."""
    import SimpleITK as sitk
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def list_entries(source: Path, exclude: Path | None = None) -> list[Path]:
    """The image files and DICOM folders an input names (see the module docstring), sorted for folders.

    ``exclude`` (the output folder) is left out when it lies inside the input folder.

    Raises:
        UserError: the input does not exist, is empty, or a list file names nothing.
    """
    source = Path(source)
    if not source.exists():
        raise UserError("input not found", file=source, fix="pass a folder of scans, a list file or a scan")
    if source.is_file():
        if is_image_file(source):
            return [source]
        return _read_list_file(source)
    entries, skipped = [], []
    excluded = None if exclude is None else Path(exclude).resolve()
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or (excluded is not None and entry.resolve() == excluded):
            continue
        if entry.is_dir() or is_image_file(entry):
            entries.append(entry)
        else:
            skipped.append(entry.name)
    if not entries and skipped and _folder_is_one_series(source):
        return [source]
    if skipped:
        log.warning("skipped %d file(s) that are not images (%s%s)", len(skipped), ", ".join(skipped[:5]),
                    ", ..." if len(skipped) > 5 else "")
    if not entries:
        raise UserError(f"the folder holds no image file ({', '.join(IMAGE_ENDINGS)}) and no DICOM series folder",
                        file=source, fix="pass the folder that holds the scans")
    return entries


def _read_list_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the list file ({exc})", file=path,
                        fix="a list file is text: one scan (file or DICOM folder) per line") from None
    entries = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line).expanduser()
        entries.append(entry if entry.is_absolute() else path.parent / entry)
    if not entries:
        raise UserError("the list file names no scan", file=path,
                        fix="write one scan (image file or DICOM series folder) per line")
    return entries


def _listing(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(shown) + more


def group_cases(entries: list[Path], num_channels: int, source: Path | None = None) -> list[InputCase]:
    """Apply the grouping rule (module docstring) to ``entries`` for a model with ``num_channels`` channels.

    Returns:
        Cases sorted by case id.

    Raises:
        UserError: two entries with one stem, or files that cannot form cases of ``num_channels`` channels.
    """
    stems: dict[str, Path] = {}
    for entry in entries:
        stem = split_ending(entry)[0]
        if stem in stems:
            raise UserError(f"two inputs share the name '{stem}': {stems[stem]} and {entry}", file=source,
                            fix="keep one file per scan (or per channel)")
        stems[stem] = entry
    matches = {stem: _CHANNEL_RE.match(stem) for stem in stems}
    if all(matches.values()):
        groups: dict[str, dict[int, Path]] = defaultdict(dict)
        for stem, match in matches.items():
            groups[match["case"]][int(match["index"])] = stems[stem]
        if all(set(channels) == set(range(num_channels)) for channels in groups.values()):
            return [InputCase(case, tuple(channels[c] for c in range(num_channels)))
                    for case, channels in sorted(groups.items())]
        if num_channels == 1 and all(set(channels) == set(range(len(channels))) for channels in groups.values()):
            raise _channel_count_mismatch(groups, num_channels, source)
    if num_channels == 1:
        return [InputCase(stem, (entry,)) for stem, entry in sorted(stems.items())]
    problems = _listing(_grouping_problems(matches, stems, num_channels))
    raise UserError(f"cannot group the inputs into cases of the model's {num_channels} channels "
                    f"({{case}}_0000 .. {{case}}_{num_channels - 1:04d}):{problems}",
                    file=source, fix=f"name each case's channel files {{case}}_0000 .. {{case}}_{num_channels - 1:04d} "
                    "(one file per channel, all channels present)")


def _channel_count_mismatch(groups: dict[str, dict[int, Path]], num_channels: int,
                            source: Path | None) -> UserError:
    """The refusal of complete channel groups ``_0000 .. _000K`` whose size is not the model's channel count."""
    lines = [f"case '{case}': {len(channels)} channel(s) ({', '.join(channels[c].name for c in sorted(channels))})"
             for case, channels in sorted(groups.items())]
    sizes = sorted({len(channels) for channels in groups.values()})
    return UserError(f"the file names form channel groups of {' or '.join(map(str, sizes))} channel(s) "
                     f"({{case}}_0000 .. {{case}}_{max(sizes) - 1:04d}), but the model takes {num_channels} "
                     f"channel(s):{_listing(lines)}", file=source,
                     fix=f"predict with a model of the same channels, or give each case exactly the model's "
                     f"{num_channels} channel file(s) {{case}}_0000 .. {{case}}_{num_channels - 1:04d}; separate "
                     "single-channel scans each get the suffix _0000 (case_0001.nii.gz -> case_0001_0000.nii.gz)")


def _grouping_problems(matches: dict, stems: dict[str, Path], num_channels: int) -> list[str]:
    lines = [f"{stems[stem].name}: no _XXXX channel suffix" for stem, m in matches.items() if m is None]
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for stem, match in matches.items():
        if match is not None:
            groups[match["case"]][int(match["index"])] = stems[stem]
    expected = set(range(num_channels))
    for case, channels in sorted(groups.items()):
        missing = sorted(expected - set(channels))
        extra = sorted(set(channels) - expected)
        if missing or extra:
            parts = ([f"missing channel(s) {', '.join(f'{c:04d}' for c in missing)}"] if missing else []) + \
                    ([f"unexpected channel(s) {', '.join(f'{c:04d}' for c in extra)}"] if extra else [])
            names = ", ".join(channels[c].name for c in sorted(channels))
            lines.append(f"case '{case}' ({names}): {'; '.join(parts)}")
    return lines


def discover_cases(source: Path, num_channels: int, exclude: Path | None = None) -> list[InputCase]:
    """The cases of an input (folder, list file or single scan) for a model with ``num_channels`` channels.

    ``exclude``: a folder inside the input folder that is not an input (the output folder).
    """
    return group_cases(list_entries(source, exclude), num_channels, source)
