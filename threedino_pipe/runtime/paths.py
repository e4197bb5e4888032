"""Data folders and dataset ids.

Folders come from ``THREEDINO_RAW``, ``THREEDINO_PREPROCESSED`` and ``THREEDINO_RESULTS``.
Raw data falls back to ``nnUNet_raw``; every folder falls back to ``./3dino_data/<name>``,
which :func:`describe_defaults` reports so the commands can print it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from threedino_pipe.runtime.errors import UserError

_DEFAULT_BASE = "3dino_data"
_DATASET_RE = re.compile(r"^Dataset(\d{3,})_(.+)$")


def _folder(env_names: tuple[str, ...], default: str) -> tuple[Path, str | None]:
    for name in env_names:
        value = os.environ.get(name)
        if value:
            return Path(value), name
    return Path.cwd() / _DEFAULT_BASE / default, None


def raw_root() -> Path:
    """Folder holding ``DatasetNNN_Name`` raw datasets."""
    return _folder(("THREEDINO_RAW", "nnUNet_raw"), "raw")[0]


def preprocessed_root() -> Path:
    """Folder holding preprocessed datasets (fingerprint, plans, arrays, splits)."""
    return _folder(("THREEDINO_PREPROCESSED",), "preprocessed")[0]


def results_root() -> Path:
    """Folder holding pretrain runs, finetune runs and evaluations."""
    return _folder(("THREEDINO_RESULTS",), "results")[0]


def describe_defaults() -> list[str]:
    """One line per folder that fell back to its default under the current directory."""
    lines = []
    for env, default in ((("THREEDINO_RAW", "nnUNet_raw"), "raw"),
                         (("THREEDINO_PREPROCESSED",), "preprocessed"),
                         (("THREEDINO_RESULTS",), "results")):
        path, source = _folder(env, default)
        if source is None:
            lines.append(f"{env[0]} is not set: using {path}")
    return lines


def dataset_id(name: str) -> int | None:
    """The numeric id of a folder name ``DatasetNNN_Name``, or None if it is not one."""
    match = _DATASET_RE.match(name)
    return int(match.group(1)) if match else None


def resolve_dataset(spec: str | int, root: Path | None = None, *, kind: str = "raw") -> Path:
    """Resolve ``501`` or ``Dataset501_Name`` to the one matching dataset folder under ``root``.

    ``kind`` (``raw``, ``preprocessed`` or ``results``) names the folder in the error messages: which folder was
    searched and which environment variable points to it.

    Raises:
        UserError: when no folder or several folders match; the message lists what exists.
    """
    root = raw_root() if root is None else Path(root)
    spec = str(spec).strip()
    existing = sorted(p.name for p in root.iterdir() if p.is_dir() and dataset_id(p.name) is not None) \
        if root.is_dir() else []
    if spec.isdigit():
        matches = [n for n in existing if dataset_id(n) == int(spec)]
    else:
        matches = [n for n in existing if n == spec]
    if len(matches) == 1:
        return root / matches[0]
    listing = ", ".join(existing) if existing else "none"
    if not matches:
        fixes = {"preprocessed": f"run `3dino plan -d {spec}` and `3dino preprocess -d {spec}` first, or set "
                                 "THREEDINO_PREPROCESSED to the folder holding the preprocessed dataset",
                 "results": f"run `3dino finetune -d {spec}` first, or set THREEDINO_RESULTS to the folder holding "
                            "its runs"}
        fix = fixes.get(kind, "pass an existing id or name, or set THREEDINO_RAW to the folder holding it")
        raise UserError(f"no dataset '{spec}' in the {kind} folder (datasets there: {listing})", file=root, fix=fix)
    raise UserError(f"dataset id {spec} is ambiguous: {', '.join(matches)}", file=root,
                    fix="pass the full folder name, e.g. -d " + matches[0])


def preprocessed_dataset(raw_dataset: Path) -> Path:
    """The preprocessed folder of a raw dataset (same folder name)."""
    return preprocessed_root() / raw_dataset.name


def resolve_preprocessed(spec: str | int) -> Path:
    """Resolve a dataset id or name to its preprocessed folder (the raw folder need not exist)."""
    return resolve_dataset(spec, preprocessed_root(), kind="preprocessed")
