"""The demo's comparison over finetune seeds: mean Dice of each side per seed, and the difference.

Each finetune seed draws another 25 % subset (the same for both sides), other crops and another
initialisation, so the seeds show how much of a difference between backbones is the run's luck.
The table (``seeds.csv``) is computed from the demo study's ``per_case.csv``: one row per seed (each
side's mean Dice over the held-out cases of the per-case mean over labels, pretrained minus none) and a
last row with the mean over seeds and its Student-t 95 % CI (n/a with one seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from threedino_pipe.demo.layout import SIDES, DemoLayout
from threedino_pipe.evaluation.outputs import write_text
from threedino_pipe.evaluation.statistics import t_interval


def mean_dice(per_case: pd.DataFrame) -> pd.Series:
    """(backbone, seed) -> the mean over held-out cases of each case's mean Dice over labels (NaNs left out)."""
    by_case = per_case.groupby(["backbone", "seed", "case_id"])["dice"].mean()
    return by_case.groupby(level=[0, 1]).mean()


def seed_table(per_case: pd.DataFrame, names: Mapping[str, str]) -> pd.DataFrame:
    """Rows: ``seed``, each side's mean Dice, ``difference`` (pretrained - none); last row the mean over seeds.

    ``per_case``: the study's per_case.csv (columns backbone, seed, case_id, dice, ...); ``names``: each side's
    backbone name in it. The last row's ``seed`` is ``mean over seeds`` and its ``ci95`` column holds the
    t-interval of the per-seed differences; a side without a defined Dice for a seed has NaN there.
    """
    a, b = SIDES
    means = mean_dice(per_case)
    seeds = sorted(int(s) for s in means.index.get_level_values(1).unique())
    rows = [{"seed": str(seed), **{side: float(means.get((names[side], seed), math.nan)) for side in SIDES}}
            for seed in seeds]
    for row in rows:
        row["difference"] = row[a] - row[b]
    table = pd.DataFrame(rows, columns=["seed", a, b, "difference"])
    lo, hi = t_interval(table["difference"].to_numpy())
    mean = {"seed": "mean over seeds", a: table[a].mean(), b: table[b].mean(), "difference": table["difference"].mean(),
            "ci95": "n/a (one seed)" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]"}
    table["ci95"] = ""
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def write_seed_table(layout: DemoLayout, names: Mapping[str, str]) -> pd.DataFrame:
    """:func:`seed_table` of the demo study's ``per_case.csv``, written to ``evaluation/seeds.csv`` (atomically)."""
    table = seed_table(pd.read_csv(layout.study.out("per_case.csv")), names)
    write_text(table.to_csv(index=False, float_format="%.4f"), layout.seeds_summary)
    return table
