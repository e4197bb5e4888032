"""``curves.png``: the numeric columns of a training ``log.csv`` against the iteration.

One panel per column, or per group of columns (e.g. the validation Dice of each class, with a
legend). The iteration axis has integer ticks. Tick labels carry their whole value (no offset
or ``1e-5`` multiplier above the axis), and a near-constant series (spread under
:data:`NEAR_CONSTANT` of its magnitude) is drawn in a band of +-5 % around its value, so a flat
learning rate reads as a flat line at its value, not as noise. Series logged on only some
iterations (validation, probes) or with few points (up to :data:`FEW_POINTS`) are drawn with
markers, so a single validation still shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from threedino_pipe.runtime.atomic_files import atomic_path

FEW_POINTS = 20  # series with at most this many points get markers
NEAR_CONSTANT = 1e-3  # spread / magnitude under this: the panel shows a band around the value
Panel = str | tuple[str, Sequence[str]]  # a column, or (title, columns) drawn in one panel


def _panels(table: pd.DataFrame, columns: Sequence[Panel] | None) -> list[tuple[str, list[str]]]:
    """(title, columns with at least one value) of each panel to draw; all-NaN columns are not logged yet."""
    if columns is None:
        columns = [c for c in table.columns if c != "iteration" and pd.api.types.is_numeric_dtype(table[c])]
    panels = []
    for panel in columns:
        title, names = (panel, [panel]) if isinstance(panel, str) else (panel[0], list(panel[1]))
        names = [c for c in names if c in table and pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
        if names:
            panels.append((title, names))
    return panels


def _value_axis(ax: Axes, values: np.ndarray) -> None:
    """Plain tick labels (no offset, no multiplier); a band of +-5 % around a near-constant series."""
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    magnitude = max(abs(low), abs(high))
    if high - low <= NEAR_CONSTANT * magnitude:
        centre = (low + high) / 2
        half = 0.05 * abs(centre) if centre else 1.0
        ax.set_ylim(centre - half, centre + half)


def curves_figure(table: pd.DataFrame, columns: Sequence[Panel] | None = None, *, title: str = "") -> Figure | None:
    """The figure of ``table`` (a log.csv) against its ``iteration`` column; None when nothing is logged yet.

    Args:
        columns: the panels: a column name, or ``(title, [columns])`` for several series in one
            panel; default every numeric column but ``iteration``.
    """
    if table.empty or "iteration" not in table:
        return None
    panels = _panels(table, columns)
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows))  # no pyplot: the process's matplotlib backend stays as it is
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (panel_title, names) in zip(axes.flat, panels, strict=False):
        shown = []
        for name in names:
            valid = table[["iteration", name]].dropna()
            # logged every few iterations (validation, probes) or only a few times: mark the points
            few = len(valid) < len(table) / 2 or len(valid) <= FEW_POINTS
            ax.plot(valid["iteration"], valid[name], lw=1.2, marker="o" if few else None, ms=4 if few else 0,
                    label=name)
            shown.append(valid[name].to_numpy(dtype=np.float64))
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _value_axis(ax, np.concatenate(shown))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(log_csv: str | Path, out_png: str | Path, *, columns: Sequence[Panel] | None = None,
                title: str = "") -> Path | None:
    """Write :func:`curves_figure` of ``log_csv`` to ``out_png`` (atomically).

    Returns the PNG path, or None when the log has no rows (or no logged value) yet.
    """
    fig = curves_figure(pd.read_csv(log_csv), columns, title=title)
    if fig is None:
        return None
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return out_png
