"""``curves.png``: every numeric column of a training ``log.csv`` against the iteration."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from threedino_pipe.runtime.atomic_files import atomic_path


def plot_curves(log_csv: str | Path, out_png: str | Path, *, columns: list[str] | None = None,
                title: str = "") -> Path | None:
    """Plot ``columns`` (default: every numeric column but ``iteration``) in a grid of panels.

    Returns the PNG path, or None when the log has no rows yet.
    """
    table = pd.read_csv(log_csv)
    if table.empty or "iteration" not in table:
        return None
    numeric = [c for c in table.columns if c != "iteration" and pd.api.types.is_numeric_dtype(table[c])]
    columns = [c for c in (columns or numeric) if c in table and table[c].notna().any()]  # all-NaN: not logged yet
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = (len(columns) + ncols - 1) // ncols
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows))  # no pyplot: the process's matplotlib backend stays as it is
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        valid = table[["iteration", column]].dropna()
        sparse = len(valid) < len(table) / 2  # logged every few iterations (validation, probes): mark the points
        ax.plot(valid["iteration"], valid[column], lw=1.2, marker="o" if sparse else None, ms=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return out_png
