"""A self-contained ``report.html``: inputs, metric tables and figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import scipy

from threedino_pipe import __version__
from threedino_pipe.evaluation.segmentation_metrics import NEAR_EMPTY_FRACTION, NEAR_EMPTY_VOXELS
from threedino_pipe.evaluation.statistics import MIN_CASES_FOR_CI

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.warn { color: #a33; } figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
.note { border-left: 4px solid #d08a00; background: #fff6e0; padding: 0.6em 1em; margin: 1em 0; }
"""


@dataclass
class Section:
    """A titled part of the page: paragraphs, then tables, then figures (PNG bytes with a caption)."""

    heading: str
    paragraphs: Sequence[str] = ()
    tables: Sequence[tuple[str, pd.DataFrame]] = ()
    figures: Sequence[tuple[str, bytes]] = ()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table_html(table: pd.DataFrame) -> str:
    return table.to_html(index=False, escape=True, na_rep="n/a", float_format=lambda v: f"{v:.4g}", border=0)


def _figure_html(caption: str, png: bytes) -> str:
    return (f"<figure><img alt='{html.escape(caption)}' src='{png_data_uri(png)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _section_html(section: Section) -> list[str]:
    parts = [f"<h2>{html.escape(section.heading)}</h2>"]
    parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
    for caption, table in section.tables:
        if caption:
            parts.append(f"<h3>{html.escape(caption)}</h3>")
        parts.append(_table_html(table))
    parts += [_figure_html(caption, png) for caption, png in section.figures]
    return parts


def render(title: str, info: Sequence[tuple[str, str]], tables: Sequence[tuple[str, pd.DataFrame]],
           figures: Sequence[tuple[str, bytes]], warnings: Sequence[str] = (), *, notes: Sequence[str] = (),
           sections: Sequence[Section] = ()) -> str:
    """The whole HTML page as a string (no external file or network reference).

    Order: title, ``notes`` (highlighted paragraphs), the ``info`` table, warnings, ``tables``,
    ``figures``, then each of ``sections``.
    """
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    parts.append("<table>")
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in info]
    parts.append("</table>")
    if warnings:
        parts.append("<h2>Warnings</h2><ul>")
        parts += [f"<li class='warn'>{html.escape(w)}</li>" for w in warnings]
        parts.append("</ul>")
    for heading, table in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_table_html(table))
    parts += [_figure_html(caption, png) for caption, png in figures]
    for section in sections:
        parts += _section_html(section)
    parts.append(f"<p style='font-size:0.8em;color:#777'>threedino-pipe {html.escape(__version__)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


UNRELIABLE_CI_NOTE = (f"Confidence intervals over fewer than {MIN_CASES_FOR_CI} cases are marked unreliable: a "
                      "bootstrap over 1 to 4 values can draw only a few distinct means, so its interval is far too "
                      "narrow (one case gives [v, v]); evaluate more cases before reading them.")
NEAR_EMPTY_NOTE = (f"HD95 values computed on a near-empty mask are flagged (per_case.csv column hd95_near_empty, "
                   f"counted as 'near-empty' in the tables): the smaller of reference and prediction has fewer than "
                   f"{NEAR_EMPTY_VOXELS} voxels or fewer than {NEAR_EMPTY_FRACTION:.0%} of the other's. HD95 compares "
                   "only the surfaces present, so a prediction of a few voxels inside a structure can score a "
                   "smaller HD95 than a fair one while missing almost all of it: read these values with the Dice.")


def wilcoxon_floor_note(n_pairs: int, min_p: float) -> str:
    """The sentence on the smallest p-value a Wilcoxon signed-rank test can reach, for report notes."""
    return (f"With n pairs the exact two-sided Wilcoxon signed-rank test cannot give p below 2/2^n (4 pairs: "
            f"0.125; 5 or fewer can never reach 0.05); here {n_pairs} paired cases: p >= {min_p:.3g} (column "
            f"'smallest possible p', counting the pairs whose difference is not zero). scipy {scipy.__version__} "
            "(scipy.stats.wilcoxon, method 'auto') computes the exact p up to 50 pairs (a permutation test when "
            "differences tie; zero differences are dropped first) and the normal approximation above; older scipy "
            "versions switched to the normal approximation whenever a difference was zero or tied, which can give "
            "a small-sample p below this floor.")


def segmentation_notes(entries: Sequence[dict], near_empty: int) -> list[str]:
    """Report notes: CIs marked unreliable (fewer than 5 cases) and HD95 on near-empty masks, where present."""
    return ([UNRELIABLE_CI_NOTE] if any_unreliable(entries) else []) + ([NEAR_EMPTY_NOTE] if near_empty else [])


def ci_text(ci: Sequence[float], unreliable: bool = False) -> str:
    """``[lo, hi]`` as text with 4 significant digits (``n/a`` for NaN bounds); ``unreliable`` adds
    ``unreliable (n < 5)`` (an interval over fewer than :data:`MIN_CASES_FOR_CI` cases)."""
    lo, hi = ci
    if lo is None or hi is None or lo != lo or hi != hi:  # NaN or null
        return "n/a"
    mark = f" unreliable (n < {MIN_CASES_FOR_CI})" if unreliable else ""
    return f"[{lo:.4g}, {hi:.4g}]{mark}"


def entry_ci_text(entry: dict) -> str:
    """:func:`ci_text` of a statistics entry of summary.json (its ``ci95`` and ``ci_unreliable``)."""
    return ci_text(entry["ci95"], bool(entry.get("ci_unreliable")))


def any_unreliable(entries: Sequence[dict]) -> bool:
    """Whether any of these statistics entries has ``ci_unreliable`` set."""
    return any(e.get("ci_unreliable") for e in entries)
