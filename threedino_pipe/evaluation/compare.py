"""``3dino evaluate --compare A B``: two models (sides), each one or more runs, side by side.

A run is a prediction folder (evaluated here against the reference) or the output folder of an
earlier ``3dino evaluate`` (its ``per_case.csv`` is reused). Segmentation: per case and label
the metric averaged over a side's runs, then a paired Wilcoxon signed-rank test over the cases
evaluated in every run. Classification: each run's metric, then Welch's t-test across runs
(the paper's 5 runs per model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from threedino_pipe.artifacts import DatasetJson, EvaluationSummary
from threedino_pipe.artifacts.evaluation_summary import CaseCounts, RunIssues, SideInfo, SummaryFiles, SummaryOptions
from threedino_pipe.evaluation import plots, report
from threedino_pipe.evaluation.classification import ClassificationResult, evaluate_csv
from threedino_pipe.evaluation.evaluated_files import dataset_labels, list_label_images
from threedino_pipe.evaluation.outputs import PER_CASE_FILE, is_result_folder, write_outputs
from threedino_pipe.evaluation.segmentation import (
    COLUMNS,
    SegmentationResult,
    evaluate_folder,
    fill_absent_labels,
    with_near_empty_flags,
)
from threedino_pipe.evaluation.statistics import (
    paired_wilcoxon,
    summarize,
    t_interval,
    welch_ttest,
    wilcoxon_min_p,
)
from threedino_pipe.evaluation.summary import NEAR_EMPTY_COLUMN, SEGMENTATION_METRICS, classification_metrics_summary
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)
SIDE_KEYS = ("a", "b")
BAR_METRICS = (("accuracy", "all", "accuracy"), ("f1", "macro", "F1 macro"), ("auc", "macro", "AUC macro"))


@dataclass
class Side:
    """One side of a comparison: ``key`` ("a" or "b"), display ``name`` and its run folders."""

    key: str
    name: str
    runs: list[Path]


def _default_name(runs: list[Path]) -> str:
    first = runs[0].resolve()
    name = first.parent.name if first.name == "evaluation" or first.is_file() else first.name
    if len(runs) == 1:
        return name
    return f"{name} +{len(runs) - 1} run" + ("s" if len(runs) > 2 else "")


def parse_sides(compare: Sequence[str], names: Sequence[str] | None) -> list[Side]:
    """Two sides from ``--compare A B`` (each a comma-separated list of folders) and ``--names``.

    Raises:
        UserError: not exactly two sides, a folder that does not exist, or not two names.
    """
    if len(compare) != 2:
        raise UserError(f"--compare takes exactly two sides, got {len(compare)}",
                        fix="pass --compare A B, where A and B are folders or comma-separated lists of folders")
    sides = []
    for key, entry in zip(SIDE_KEYS, compare, strict=True):
        runs = [Path(p.strip()) for p in str(entry).split(",") if p.strip()]
        if not runs:
            raise UserError(f"side {key.upper()} of --compare names no folder", fix="pass at least one folder")
        for run in runs:
            if not run.exists():
                raise UserError(f"side {key.upper()}: run not found", file=run, fix="check the path")
        sides.append(Side(key=key, name="", runs=runs))
    if names is not None:
        if len(names) != 2 or not all(n.strip() for n in names):
            raise UserError(f"--names needs two names, got {list(names)}", fix="pass e.g. --names 3DINO,scratch")
        for side, name in zip(sides, names, strict=True):
            side.name = name.strip()
    else:
        for side in sides:
            side.name = _default_name(side.runs)
        if sides[0].name == sides[1].name:
            sides[0].name, sides[1].name = "A", "B"
    return sides


def _check_result(path: Path, task: str, reference: Path) -> EvaluationSummary:
    summary = EvaluationSummary.read(EvaluationSummary.in_folder(path))
    if summary.mode != "evaluate" or summary.task != task:
        raise UserError(f"this is a {summary.task} {summary.mode} result, not a {task} evaluation",
                        file=EvaluationSummary.in_folder(path), fix="compare prediction folders or `3dino evaluate` "
                        "outputs of the same task")
    if summary.reference and Path(summary.reference) != reference.resolve():
        log.warning("warning: %s was evaluated against %s, not %s", path, summary.reference, reference)
    return summary


def _load_segmentation_run(path: Path, reference: Path, references: dict[str, Path],
                           labels: dict[str, tuple[int, ...]] | None, num_processes: int) -> SegmentationResult:
    if not is_result_folder(path):
        return evaluate_folder(reference, path, labels, num_processes=num_processes, references=references)
    summary = _check_result(path, "segmentation", reference)
    per_case = with_near_empty_flags(pd.read_csv(path / PER_CASE_FILE,
                                                 dtype={"case_id": str, "label": str, "label_values": str}))
    missing = [c for c in COLUMNS if c not in per_case.columns]
    if missing:
        raise UserError(f"per_case.csv lacks column(s) {', '.join(missing)}", file=path / PER_CASE_FILE,
                        fix="rerun `3dino evaluate` for this run")
    cases = summary.cases
    return SegmentationResult(per_case=per_case[COLUMNS], evaluated=list(dict.fromkeys(per_case["case_id"])),
                              labels={k: tuple(v) for k, v in (summary.labels or {}).items()},
                              missing=list(cases.missing or []), failed=list(cases.failed or []),
                              ignored=list(cases.ignored or []))


def _entry(a: np.ndarray, b: np.ndarray, seed: int, num_bootstrap: int,
           near_empty: tuple[int, int] | None = None) -> dict:
    """Both sides' statistics, the paired difference (B - A) and the Wilcoxon test of one metric/label;
    ``near_empty``: each side's count of cases with an HD95 on a near-empty mask (HD95 entries)."""
    out = {"a": summarize(a, num_resamples=num_bootstrap, seed=seed),
           "b": summarize(b, num_resamples=num_bootstrap, seed=seed),
           "difference": summarize(b - a, num_resamples=num_bootstrap, seed=seed),
           **paired_wilcoxon(a, b)}
    if near_empty is not None:
        out["a"]["n_near_empty"], out["b"]["n_near_empty"] = near_empty
    return out


def _run_issues(side: Side, run: Path, result: SegmentationResult | ClassificationResult) -> RunIssues:
    return RunIssues(side=side.key, run=str(run.resolve()), missing=list(result.missing),
                     failed=list(getattr(result, "failed", [])), ignored=list(result.ignored))


def _sides_info(sides: list[Side]) -> dict[str, SideInfo]:
    return {s.key: SideInfo(name=s.name, runs=[str(r.resolve()) for r in s.runs]) for s in sides}



def _bar_values(entries: list[dict], side: str) -> list[tuple[float, float, float]]:
    return [(e[side]["mean"], *e[side]["ci95"]) for e in entries]


def segmentation_comparison_table(comparisons: dict, mean_over_labels: dict, names: dict[str, str]) -> pd.DataFrame:
    """One row per metric and label (and the mean over labels): each side's mean with 95 % CI, B - A, Wilcoxon p.

    Args:
        comparisons, mean_over_labels: as in a segmentation comparison's ``summary.json``.
        names: display name of side ``"a"`` and ``"b"``.
    """
    rows = []
    for metric in SEGMENTATION_METRICS:
        for name, e in [*comparisons[metric].items(), ("mean over labels", mean_over_labels[metric])]:
            near_empty = [e[k].get("n_near_empty") for k in SIDE_KEYS]
            rows.append({"metric": metric, "label": name, f"{names['a']} mean": e["a"]["mean"],
                         f"{names['a']} 95% CI": report.entry_ci_text(e["a"]), f"{names['b']} mean": e["b"]["mean"],
                         f"{names['b']} 95% CI": report.entry_ci_text(e["b"]),
                         "difference (B-A)": e["difference"]["mean"], "Wilcoxon p": e["p_value"],
                         "smallest possible p": e.get("min_p_value"), "pairs": e["n_pairs"],
                         "HD95 near-empty A/B": "" if None in near_empty else f"{near_empty[0]}/{near_empty[1]}"})
    return pd.DataFrame(rows)


def compare_segmentation(reference: Path, sides: list[Side], spec: DatasetJson | None, dataset: str | None, *,
                         seed: int, num_bootstrap: int, num_processes: int) -> tuple[EvaluationSummary, dict, bool]:
    """(summary, outputs for :func:`write_outputs`, whether any run had missing or failed cases)."""
    references = list_label_images(reference, "reference folder")
    labels = dataset_labels(spec) if spec is not None else None
    runs = {s.key: [_load_segmentation_run(r, reference, references, labels, num_processes) for r in s.runs]
            for s in sides}
    if labels is None:
        merged = {k: v for results in runs.values() for r in results for k, v in r.labels.items()}
        labels = dict(sorted(merged.items(), key=lambda item: list(item[1])))
    evaluated = [set(r.evaluated) for results in runs.values() for r in results]
    paired = sorted(set.intersection(*evaluated))
    unpaired = sorted(set(references) - set(paired))
    if not paired:
        raise UserError("no case was evaluated in every run of both sides", file=reference,
                        fix="check that the prediction folders hold the same cases")
    side_tables = {}
    for key, results in runs.items():
        tables = [fill_absent_labels(r.per_case[r.per_case["case_id"].isin(paired)
                                                & r.per_case["label"].isin(list(labels))], labels, paired)
                  for r in results]
        grouped = pd.concat(tables).groupby(["case_id", "label"], sort=False)
        side_tables[key] = grouped[list(SEGMENTATION_METRICS)].mean().assign(
            **{NEAR_EMPTY_COLUMN: grouped[NEAR_EMPTY_COLUMN].any()})  # flagged in any run of the side
    index = pd.MultiIndex.from_tuples([(c, name) for c in paired for name in labels], names=["case_id", "label"])
    table = pd.DataFrame(index=index)
    for metric in (*SEGMENTATION_METRICS, NEAR_EMPTY_COLUMN):
        for key in SIDE_KEYS:
            table[f"{metric}_{key}"] = side_tables[key][metric].reindex(index)
    table = table.reset_index()
    flags = {k: table[f"{NEAR_EMPTY_COLUMN}_{k}"].astype(bool) & table[f"hd95_mm_{k}"].notna() for k in SIDE_KEYS}
    comparisons: dict[str, dict] = {}
    mean_over_labels: dict[str, dict] = {}
    for metric in SEGMENTATION_METRICS:
        comparisons[metric] = {}
        for name in labels:
            rows = table[table["label"] == name]
            counts = tuple(int(flags[k][rows.index].sum()) for k in SIDE_KEYS) if metric == "hd95_mm" else None
            comparisons[metric][name] = _entry(rows[f"{metric}_a"].to_numpy(), rows[f"{metric}_b"].to_numpy(),
                                               seed, num_bootstrap, counts)
        means = table.groupby("case_id", sort=False)[[f"{metric}_a", f"{metric}_b"]].mean()
        counts = tuple(int(flags[k].groupby(table["case_id"]).any().sum()) for k in SIDE_KEYS) \
            if metric == "hd95_mm" else None
        mean_over_labels[metric] = _entry(means[f"{metric}_a"].to_numpy(), means[f"{metric}_b"].to_numpy(),
                                          seed, num_bootstrap, counts)
    issues = [_run_issues(s, r, res) for s in sides for r, res in zip(s.runs, runs[s.key], strict=True)]
    summary = EvaluationSummary(
        mode="compare", task="segmentation", reference=str(reference.resolve()), dataset=dataset,
        options=SummaryOptions(seed=seed, num_bootstrap=num_bootstrap), sides=_sides_info(sides),
        labels={k: list(v) for k, v in labels.items()},
        cases=CaseCounts(reference=len(references), paired=len(paired), unpaired=unpaired, runs=issues),
        comparisons=comparisons, mean_over_labels=mean_over_labels)
    names = {s.key: s.name for s in sides}
    figures = {}
    for metric, file, ylabel in (("dice", "compare_dice.png", "Dice"), ("hd95_mm", "compare_hd95.png", "HD95 (mm)")):
        entries = [*comparisons[metric].values(), mean_over_labels[metric]]
        figures[file] = plots.comparison_barplot(
            [*labels, "mean"], {names[k]: _bar_values(entries, k) for k in SIDE_KEYS}, ylabel=ylabel,
            title=f"{ylabel}: mean and 95 % CI over {len(paired)} cases (Wilcoxon p; with {len(paired)} pairs "
                  f"p >= {wilcoxon_min_p(len(paired)):.3g})",
            p_values=[e["p_value"] for e in entries])
    warnings = [f"case '{c}' is not evaluated in every run; left out of the comparison" for c in unpaired]
    entries = [e for table_ in (*comparisons.values(), mean_over_labels) for e in table_.values()]
    side_entries = [e[k] for e in entries for k in (*SIDE_KEYS, "difference")]
    notes = [report.wilcoxon_floor_note(len(paired), wilcoxon_min_p(len(paired))),
             *report.segmentation_notes(side_entries, sum(e.get("n_near_empty", 0) for e in side_entries))]
    html = report.render(f"Comparison: {names['a']} vs {names['b']}", _report_info(reference, sides, seed,
                                                                                    num_bootstrap, len(paired)),
                         [("Paired comparison per label (Wilcoxon signed-rank over cases)",
                           segmentation_comparison_table(comparisons, mean_over_labels, names))],
                         [(f"{ylabel} per label, mean with 95 % bootstrap CI", figures[f])
                          for f, ylabel in (("compare_dice.png", "Dice"), ("compare_hd95.png", "HD95 (mm)"))],
                         warnings, notes=notes)
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, figures=list(figures), report="report.html")
    failed = any(i.missing or i.failed for i in issues)
    return summary, {"tables": {PER_CASE_FILE: table}, "figures": figures, "report": html, "summary": summary}, failed


def _report_info(reference: Path, sides: list[Side], seed: int, num_bootstrap: int, n: int) -> list:
    info = [("reference", str(reference))]
    info += [(f"side {s.key.upper()}: {s.name}", ", ".join(str(r) for r in s.runs)) for s in sides]
    info += [("cases compared", str(n)),
             ("bootstrap", f"{num_bootstrap} resamples over cases, seed {seed}, 95 % percentile CI")]
    return info


def _load_classification_run(path: Path, reference: Path, class_names: list[str] | None) -> ClassificationResult:
    if is_result_folder(path):
        _check_result(path, "classification", reference)
        path = path / PER_CASE_FILE  # per_case.csv holds the predictions.csv columns
    return evaluate_csv(reference, path, class_names)


def _flat_metrics(result: ClassificationResult) -> dict[tuple[str, str], float]:
    return {(m, k): v for m, entries in result.metrics().items() for k, v in entries.items()}


def compare_classification(reference: Path, sides: list[Side], spec: DatasetJson | None, dataset: str | None, *,
                           seed: int, num_bootstrap: int) -> tuple[EvaluationSummary, dict, bool]:
    """(summary, outputs for :func:`write_outputs`, whether any run had missing cases)."""
    class_names = spec.class_names if spec is not None else None
    runs = {s.key: [_load_classification_run(r, reference, class_names) for r in s.runs] for s in sides}
    first = runs["a"][0].class_names
    for s in sides:
        for run, result in zip(s.runs, runs[s.key], strict=True):
            if result.class_names != first:
                raise UserError(f"classes {result.class_names} differ from {first} of the first run", file=run,
                                fix="compare runs of the same classification task (or pass -d)")
    values = {key: [_flat_metrics(r) for r in results] for key, results in runs.items()}
    comparisons: dict[str, dict] = {}
    for metric, key in values["a"][0]:
        sides_entry = {}
        for side in SIDE_KEYS:
            run_values = [v[(metric, key)] for v in values[side]]
            finite = [v for v in run_values if v == v]
            sides_entry[side] = {"runs": run_values, "mean": float(np.mean(finite)) if finite else float("nan")}
            if len(run_values) >= 2:
                sides_entry[side].update(ci95=t_interval(run_values), ci_method="t_across_runs")
            else:
                single = classification_metrics_summary(runs[side][0], seed=seed,
                                                        num_resamples=num_bootstrap)[metric][key]
                sides_entry[side].update(ci95=single["ci95"], ci_method="bootstrap_over_cases",
                                         ci_unreliable=single["ci_unreliable"])
            sides_entry[side]["n_runs"] = len(run_values)
        comparisons.setdefault(metric, {})[key] = {
            **sides_entry, "difference": sides_entry["b"]["mean"] - sides_entry["a"]["mean"],
            **welch_ttest(sides_entry["a"]["runs"], sides_entry["b"]["runs"])}
    per_run = []
    per_case = []
    for s in sides:
        for run, result, flat in zip(s.runs, runs[s.key], values[s.key], strict=True):
            per_run.append({"side": s.key, "side_name": s.name, "run": str(run), "n_cases": len(result.case_ids),
                            **{f"{m}_{k}" if k != "all" else m: v for (m, k), v in flat.items()}})
            per_case.append(result.per_case.assign(side=s.key, run=str(run)))
    per_case_table = pd.concat(per_case, ignore_index=True)
    per_case_table = per_case_table[["side", "run", *[c for c in per_case_table.columns if c not in ("side", "run")]]]
    issues = [_run_issues(s, r, res) for s in sides for r, res in zip(s.runs, runs[s.key], strict=True)]
    summary = EvaluationSummary(
        mode="compare", task="classification", reference=str(reference.resolve()), dataset=dataset,
        options=SummaryOptions(seed=seed, num_bootstrap=num_bootstrap), sides=_sides_info(sides), classes=first,
        cases=CaseCounts(runs=issues), comparisons=comparisons)
    names = {s.key: s.name for s in sides}
    entries = [comparisons[m][k] for m, k, _ in BAR_METRICS]
    figures = {"comparison.png": plots.comparison_barplot(
        [title for _, _, title in BAR_METRICS], {names[k]: _bar_values(entries, k) for k in SIDE_KEYS},
        ylabel="value", title="Mean over runs with 95 % CI (Welch's t-test p)",
        p_values=[e["p_value"] for e in entries])}
    rows = [{"metric": m, "class": k, f"{names['a']} mean": e["a"]["mean"],
             f"{names['a']} 95% CI": report.entry_ci_text(e["a"]), f"{names['b']} mean": e["b"]["mean"],
             f"{names['b']} 95% CI": report.entry_ci_text(e["b"]), "difference (B-A)": e["difference"],
             "Welch p": e["p_value"], "runs A/B": f"{e['n_a']}/{e['n_b']}"}
            for m, entries_ in comparisons.items() for k, e in entries_.items()]
    notes = sorted({e["note"] for entries_ in comparisons.values() for e in entries_.values() if e["note"]})
    html = report.render(f"Comparison: {names['a']} vs {names['b']}",
                         _report_info(reference, sides, seed, num_bootstrap, len(runs["a"][0].case_ids)),
                         [("Metrics across runs (Welch's t-test)", pd.DataFrame(rows)),
                          ("Per run", pd.DataFrame(per_run))],
                         [("Accuracy, F1 and AUC (macro): mean over runs with 95 % CI", figures["comparison.png"])],
                         notes, notes=[report.UNRELIABLE_CI_NOTE] if report.any_unreliable(
                             [e[k] for entries_ in comparisons.values() for e in entries_.values() for k in SIDE_KEYS])
                         else [])
    summary.files = SummaryFiles(per_case=PER_CASE_FILE, per_run="per_run.csv", figures=list(figures),
                                 report="report.html")
    failed = any(i.missing for i in issues)
    return summary, {"tables": {PER_CASE_FILE: per_case_table, "per_run.csv": pd.DataFrame(per_run)},
                     "figures": figures, "report": html, "summary": summary}, failed


def write_comparison(reference: Path, compare: Sequence[str], *, task: str, spec: DatasetJson | None,
                     dataset: str | None, names: Sequence[str] | None, output: Path | None, seed: int,
                     num_bootstrap: int, num_processes: int) -> int:
    """Compare two sides and write the outputs; returns the exit code (1 if a run had missing/failed cases)."""
    sides = parse_sides(compare, names)
    if task == "segmentation":
        summary, outputs, failed = compare_segmentation(reference, sides, spec, dataset, seed=seed,
                                                        num_bootstrap=num_bootstrap, num_processes=num_processes)
    else:
        summary, outputs, failed = compare_classification(reference, sides, spec, dataset, seed=seed,
                                                          num_bootstrap=num_bootstrap)
    out_dir = output if output is not None else Path.cwd() / "evaluation_compare"
    write_outputs(out_dir, **outputs)
    for metric, entries in summary.comparisons.items():
        for key, e in entries.items():
            a, b = e["a"]["mean"], e["b"]["mean"]
            floor = e.get("min_p_value")
            log.info("%s %s: %s %.4f vs %s %.4f, %s p=%s%s", metric, key, sides[0].name, a, sides[1].name, b,
                     e["test"], "n/a" if e["p_value"] != e["p_value"] else f"{e['p_value']:.4g}",
                     f" (smallest possible with {e['n_pairs']} pairs: {floor:.3g})" if floor == floor and
                     floor is not None else "")
    log.info("wrote %s", out_dir)
    if failed:
        log.error("error: some runs have missing or failed cases (listed in %s)", EvaluationSummary.in_folder(out_dir))
        return 1
    return 0
