"""Evaluation figures as PNG bytes (matplotlib's object API with the Agg canvas: no display needed).

Each function returns the PNG file's bytes; the caller writes them atomically and embeds them
in ``report.html``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIDE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def segmentation_boxplot(per_case: pd.DataFrame, labels: Sequence[str]) -> bytes:
    """Box plot with the cases as jittered points: Dice (left) and HD95 in mm (right), one box per label."""
    fig = Figure(figsize=(max(6.0, 1.6 * len(labels) + 3), 3.8))
    rng = np.random.default_rng(0)
    for ax, (metric, title) in zip(fig.subplots(1, 2), (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")), strict=True):
        data = [per_case.loc[per_case["label"] == name, metric].dropna().to_numpy() for name in labels]
        positions = np.arange(1, len(labels) + 1)
        ax.set_title(title)
        if not labels:
            ax.text(0.5, 0.5, "no label", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.55, showfliers=False)
        for pos, values in zip(positions, data, strict=True):
            ax.scatter(pos + rng.uniform(-0.15, 0.15, values.size), values, s=10, alpha=0.6, color=SIDE_COLOURS[0])
        ax.set_xticks(positions, list(labels), rotation=30 if len(labels) > 3 else 0, ha="right"
                      if len(labels) > 3 else "center")
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(-0.02, 1.02)
    return _png(fig)


def confusion_matrix_plot(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """K x K counts (rows = reference, columns = predicted) as an annotated heat map."""
    k = len(class_names)
    fig = Figure(figsize=(1.0 * k + 2.5, 1.0 * k + 2.0))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_xticks(range(k), list(class_names))
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("reference class")
    ax.set_title("Confusion matrix")
    return _png(fig)


def roc_plot(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> bytes:
    """One-vs-rest ROC curve of every class present with its AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    for c, name in enumerate(class_names):
        positive = y_true == c
        if 0 < positive.sum() < positive.size:
            fpr, tpr, _ = roc_curve(positive, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _p_text(p: float) -> str:
    if p is None or math.isnan(p):
        return "p n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def comparison_barplot(groups: Sequence[str], sides: Mapping[str, Sequence[tuple[float, float, float]]],
                       *, ylabel: str, title: str, p_values: Sequence[float] | None = None) -> bytes:
    """Grouped bars (one group per label or metric, one bar per side) with 95 % CI error bars.

    Args:
        groups: the x-axis groups.
        sides: side name -> one ``(mean, ci_lo, ci_hi)`` per group.
        p_values: one per group, written above the group.
    """
    fig = Figure(figsize=(max(5.0, 1.4 * len(groups) + 2.5), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(sides))
    x = np.arange(len(groups))
    top = 0.0
    for s, (name, values) in enumerate(sides.items()):
        mean = np.array([v[0] for v in values], dtype=float)
        lo = np.array([v[1] for v in values], dtype=float)
        hi = np.array([v[2] for v in values], dtype=float)
        err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)]).clip(min=0)
        ax.bar(x + (s - (len(sides) - 1) / 2) * width, mean, width, yerr=err, capsize=4, label=name,
               color=SIDE_COLOURS[s % len(SIDE_COLOURS)])
        if np.isfinite(hi).any() or np.isfinite(mean).any():
            top = max(top, float(np.nanmax(np.concatenate([hi, mean]))))
    if p_values is not None:
        for xi, p in zip(x, p_values, strict=True):
            ax.text(xi, top * 1.04 if top > 0 else 0.02, _p_text(p), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(top=top * 1.15 if top > 0 else 1.0)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _single_point_ci(ax, rows: pd.DataFrame, colour, offset: float, entry: str) -> None:
    """An entry's 95 % CI at a study's only % labels as an error bar, moved ``offset`` x 4 % along the log axis."""
    x = rows["pct"].to_numpy(dtype=float) * (1.0 + 0.04 * offset)
    mean = rows["mean"].to_numpy(dtype=float)
    err = np.vstack([np.nan_to_num(mean - rows["ci95_lo"].to_numpy(dtype=float)),
                     np.nan_to_num(rows["ci95_hi"].to_numpy(dtype=float) - mean)]).clip(min=0)
    ax.errorbar(x, mean, yerr=err, fmt="o", color=colour, capsize=4, label=entry)


def label_efficiency_plot(summary: pd.DataFrame, entries: Sequence[str], label: str | None,
                          metrics: Sequence[tuple[str, str]] = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"))
                          ) -> tuple[bytes, bytes]:
    """The study's figure: each metric (one panel) against % labels on a log axis, one line per backbone entry
    (mean over test cases, seeds averaged) with its 95 % bootstrap CI as a band. Returns ``(png, svg)`` bytes.

    ``summary``: :func:`threedino_pipe.evaluation.label_efficiency.summary_table`'s rows of structure ``label``
    (``label`` None: every row of each metric, titled by the metric only).
    """
    fig = Figure(figsize=(5.2 * len(metrics), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    pcts = sorted(summary["pct"].unique())
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for index, entry in enumerate(entries):
            rows = summary[(summary["metric"] == metric) & (summary["entry"] == entry)
                           & ((summary["label"] == label) if label is not None else True)].sort_values("pct")
            colour = SIDE_COLOURS[index % len(SIDE_COLOURS)]
            if len(pcts) == 1:  # one grid point: no band to draw, so the CI as an error bar, entries side by side
                _single_point_ci(ax, rows, colour, index - (len(entries) - 1) / 2, entry)
                ax.set_xlim(pcts[0] / 1.5, pcts[0] * 1.5)
                continue
            ax.plot(rows["pct"], rows["mean"], marker="o", color=colour, label=entry)
            ax.fill_between(rows["pct"], rows["ci95_lo"], rows["ci95_hi"], color=colour, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(pcts)
        ax.set_xticklabels([f"{p:g}" for p in pcts])
        ax.minorticks_off()
        ax.set_xlabel("% of the training labels")
        ax.set_title(title if label is None else f"{title}, {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    png = _png(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return png, buffer.getvalue()
