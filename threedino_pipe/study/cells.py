"""The cells of a study: backbone entries (``RUN``, ``RUN:head``, ``none``) x pct x seed x fold, and shares."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts.study import StudyCellSpec
from threedino_pipe.models.segmentation import SEGMENTATION_HEADS
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training.probe import HEAD as PROBE  # the classification head: the linear probe

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Entry:
    """One ``--backbones`` entry: what finetune ``--backbone`` gets, its ``--head`` (None: finetune's default)
    and the name of its line in tables and figures."""

    text: str
    backbone: str
    head: str | None
    label: str


def _tag(backbone: str) -> str:
    """The entry's name: ``none``/``auto`` as given, a run folder's name, a ``backbone.pt``'s folder's name, or a
    file's stem (as finetune's backbone tag)."""
    if backbone in ("none", "auto"):
        return backbone
    path = Path(backbone)
    if path.is_dir() or path.name == "backbone.pt":
        return path.resolve().name if path.is_dir() else path.resolve().parent.name
    return path.name.split(".")[0] or path.name


def default_head(task: str, backbone: str) -> str:
    """The head finetune picks: the probe for classification, else adapter (pretrained) or unetr (``none``)."""
    if task == "classification":
        return PROBE
    return "unetr" if backbone == "none" else "adapter"


def check_heads(entries: list[Entry], task: str, plans_file: Path) -> None:
    """The entries' heads fit the dataset's task (the probe classifies, the other heads segment).

    Raises:
        UserError: an entry names a head of the other task.
    """
    for entry in entries:
        if entry.head is not None and (entry.head == PROBE) != (task == "classification"):
            fitting = PROBE if task == "classification" else ", ".join(SEGMENTATION_HEADS)
            raise UserError(f"--backbones {entry.text}: the {entry.head} head does not fit this {task} dataset",
                            file=plans_file, fix=f"name {fitting} after the colon, or no head (finetune's default)")


def parse_entry(text: str) -> Entry:
    """``RUN``, ``RUN:HEAD`` or ``none[:HEAD]`` (HEAD one of the segmentation heads, or ``probe``)."""
    backbone, head = text, None
    if ":" in text:
        before, after = text.rsplit(":", 1)
        if after in (*SEGMENTATION_HEADS, PROBE):
            backbone, head = before, after
        elif not Path(text).exists():
            raise UserError(f"--backbones {text}: unknown head {after!r}",
                            fix=f"name one of the heads {', '.join((*SEGMENTATION_HEADS, PROBE))} after the colon "
                                "(RUN:adapter, none:unetr, SWIN_RUN:swinunetr)")
    if backbone not in ("none", "auto"):
        backbone = str(Path(backbone).absolute())  # the same entry from any folder (shares, SLURM tasks)
    label = _tag(backbone) + (f":{head}" if head else "")
    return Entry(text=backbone + (f":{head}" if head else ""), backbone=backbone, head=head, label=label)


def parse_entries(texts: list[str]) -> list[Entry]:
    """The entries of ``--backbones``, checked: each backbone file or folder exists, no two share a name.

    Raises:
        UserError: no entry, a missing backbone path, or two entries with the same name.
    """
    if not texts:
        raise UserError("no --backbones given", fix="pass e.g. --backbones results/pretrain/RUN none")
    entries = [parse_entry(t) for t in texts]
    for entry in entries:
        if entry.backbone not in ("none", "auto") and not Path(entry.backbone).exists():
            raise UserError(f"--backbones {entry.text}: no such backbone file or run folder", file=entry.backbone,
                            fix="pass a pretrain run folder, a backbone file, auto or none")
    labels = [e.label for e in entries]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UserError(f"--backbones: two entries are both named {twice[0]}",
                        fix="give each entry once, or different heads (RUN:adapter RUN:unetr)")
    return entries


def make_cells(entries: list[Entry], pcts: list[float], seeds: list[int], folds: list[int]) -> list[StudyCellSpec]:
    """Every (entry, pct, seed, fold) as a cell, in run order: fold, pct, seed, then the entries (so every
    comparison has both sides early)."""
    cells = []
    for fold in folds:
        for pct in pcts:
            for seed in seeds:
                for entry in entries:
                    name = f"{_UNSAFE.sub('-', entry.label)}__pct{pct:g}__fold{fold}__seed{seed}"
                    cells.append(StudyCellSpec(cell=name, entry=entry.text, label=entry.label,
                                               backbone=entry.backbone, head=entry.head, pct=float(pct), seed=seed,
                                               fold=fold))
    names = [c.cell for c in cells]
    if len(set(names)) != len(names):
        raise UserError("two --backbones entries give the same cell folder name",
                        fix="give entries whose names differ in letters or digits")
    return cells


def parse_share(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 1 <= K <= N.

    Raises:
        UserError: another form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"--cells {text} is not K/N with 1 <= K <= N", fix="pass e.g. --cells 1/4 ... --cells 4/4")
    return int(match.group(1)), int(match.group(2))


def share(cells: list[StudyCellSpec], k: int, n: int) -> list[StudyCellSpec]:
    """The K-th of N shares: cells K-1, K-1+N, K-1+2N, ... of the run order (shares are disjoint and cover all)."""
    return cells[k - 1::n]
