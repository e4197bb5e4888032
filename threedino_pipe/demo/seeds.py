"""The demo's comparison over finetune seeds: mean Dice of each side per seed, and the difference.

Each finetune seed draws another 25 % subset (the same for both sides), other crops and another
initialisation, so the seeds show how much of a difference between backbones is the run's luck.
The table (``seeds.csv``) has one row per seed (each side's mean Dice over labels and held-out cases, pretrained minus
none) and a last row with the mean over seeds and its Student-t 95 % CI (NaN with one seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from threedino_pipe.artifacts import EvaluationSummary
from threedino_pipe.demo.layout import SIDES, DemoLayout
from threedino_pipe.evaluation.outputs import write_text
from threedino_pipe.evaluation.statistics import t_interval


def mean_dice(layout: DemoLayout, side: str, seed: int) -> float:
    """Mean Dice over labels and held-out cases of one side's evaluation (NaN when undefined)."""
    summary = EvaluationSummary.read(EvaluationSummary.in_folder(layout.evaluation(side, seed)))
    value = (summary.mean_over_labels or {}).get("dice", {}).get("mean")
    return math.nan if value is None else float(value)


def seed_table(layout: DemoLayout, seeds: Sequence[int]) -> pd.DataFrame:
    """Rows: ``seed``, each side's mean Dice, ``difference`` (pretrained - none); last row the mean over seeds.

    The last row's ``seed`` is ``mean (95% CI)`` and its ``ci95`` column holds the t-interval of
    the per-seed differences.
    """
    a, b = SIDES
    rows = [{"seed": str(seed), a: mean_dice(layout, a, seed), b: mean_dice(layout, b, seed)} for seed in seeds]
    for row in rows:
        row["difference"] = row[a] - row[b]
    table = pd.DataFrame(rows)
    lo, hi = t_interval(table["difference"].to_numpy())
    mean = {"seed": "mean over seeds", a: table[a].mean(), b: table[b].mean(), "difference": table["difference"].mean(),
            "ci95": "n/a (one seed)" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]"}
    table["ci95"] = ""
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def write_seed_table(layout: DemoLayout, seeds: Sequence[int]) -> pd.DataFrame:
    """Compute :func:`seed_table` and write it to ``evaluation/seeds.csv`` (atomically); returns it."""
    table = seed_table(layout, seeds)
    write_text(table.to_csv(index=False, float_format="%.4f"), layout.seeds_summary)
    return table
