"""``3dino predict -d 501 -f 0 1 2 3 4``: a dataset's finetune run folders, one per fold (nnU-Net's habit).

A run folder qualifies when it lies in ``<results>/<DatasetNNN_Name>/`` and holds a ``model.json``
whose ``fold`` is asked for (and whose ``head``, ``pct`` and ``seed`` match the narrowing options
given). Each asked fold must have exactly one; otherwise the refusal lists what is there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from threedino_pipe.artifacts import ModelCard
from threedino_pipe.runtime import paths
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)


def _cards(folder: Path) -> list[tuple[Path, ModelCard]]:
    """(run folder, model card) of every finetune run folder in ``folder`` whose model.json reads."""
    found = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and ModelCard.in_folder(p).is_file()):
        try:
            found.append((run, ModelCard.read(ModelCard.in_folder(run))))
        except UserError as exc:
            log.warning("skipped %s: %s", run, exc.problem)
    return found


def _describe(run: Path, card: ModelCard) -> str:
    return f"{run.name} (head {card.head}, backbone {card.backbone.tag}, pct {card.pct:g}, seed {card.seed})"


def runs_for_folds(dataset: str, folds: Sequence[int], *, head: str | None = None, pct: float | None = None,
                   seed: int | None = None) -> list[Path]:
    """The run folder of each of ``folds`` among ``dataset``'s finetune runs, in the order of ``folds``.

    Raises:
        UserError: no results folder of the dataset, a fold without a matching run, or a fold with several
            (the candidates are listed with the options that tell them apart).
    """
    folder = paths.resolve_dataset(dataset, paths.results_root(), kind="results")
    cards = _cards(folder)
    wanted = [(run, card) for run, card in cards
              if (head is None or card.head == head) and (pct is None or card.pct == float(pct))
              and (seed is None or card.seed == seed)]
    narrowed = ", ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
                         for k, v in (("head", head), ("pct", pct), ("seed", seed)) if v is not None)
    chosen = []
    for fold in dict.fromkeys(folds):
        matches = [(run, card) for run, card in wanted if card.fold == fold]
        if not matches:
            others = sorted({c.fold for _, c in wanted})
            raise UserError(f"no finetune run of fold {fold}{' with ' + narrowed if narrowed else ''} in "
                            f"{folder.name} (folds with runs: {', '.join(map(str, others)) or 'none'})", file=folder,
                            fix=f"run `3dino finetune -d {dataset} --fold {fold}` first, or leave fold {fold} out "
                            "of -f")
        if len(matches) > 1:
            listing = "; ".join(_describe(run, card) for run, card in matches)
            raise UserError(f"fold {fold} has {len(matches)} finetune runs in {folder.name}: {listing}", file=folder,
                            fix="narrow the choice with --head, --pct and --seed, or name the run folders with -m "
                            "(one -m per fold)")
        chosen.append(matches[0][0])
    return chosen
