"""``3dino demo``: refuses folders it did not make, made with other options or by an older demo (before any
work), checks the bundled backbone, runs its comparison as `3dino study` and summarises it over finetune seeds.

The demo itself runs end to end in CI (``.ci/run``: ``3dino demo --quick``); its report is checked
in a browser by ``tests/test_report_browser.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_3dino
from scipy import stats
from typer.testing import CliRunner

from threedino_pipe.cli import app
from threedino_pipe.demo.chain import bundled_backbone as bundled_backbone_and_record
from threedino_pipe.demo.layout import LAYOUT_VERSION, SIDES, DemoLayout
from threedino_pipe.demo.seeds import write_seed_table
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.runtime.errors import UserError


def test_demo_refuses_a_folder_made_with_other_options_or_by_an_older_demo(tmp_path):
    demo_json = {"kind": "demo", "schema_version": 1, "options": {"layout": LAYOUT_VERSION, "quick": True}}
    (tmp_path / "demo.json").write_text(json.dumps(demo_json))
    result = run_3dino("demo", "--out", str(tmp_path), "--no-progress")
    assert result.returncode != 0
    assert "demo.json" in result.stderr and "other options" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]  # nothing written
    del demo_json["options"]["layout"]  # as a demo before `3dino study` ran its comparison wrote it
    (tmp_path / "demo.json").write_text(json.dumps(demo_json))
    refused = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--no-progress"])  # in-process
    assert isinstance(refused.exception, UserError), refused.output
    assert "older `3dino demo`" in refused.exception.render() and "fresh --out" in refused.exception.render()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]


def test_demo_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--no-progress"])  # in-process
    assert isinstance(refused.exception, UserError), refused.output
    assert "not a demo folder" in refused.exception.render()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_seed_table_gives_each_seeds_mean_dice_and_the_t_interval_of_the_difference(tmp_path):
    """From a study per_case.csv: per seed and side the mean over cases of each case's mean Dice over labels."""
    names = {"pretrained": "backbone_tiny_mni:adapter", "none": "none:adapter"}
    dice = {"pretrained": [0.9, 0.8, 0.7], "none": [0.7, 0.7, 0.7]}  # per seed; case 2 gets dice - 0.2
    rows = [{"backbone": names[side], "pct": 25.0, "seed": seed, "fold": 0, "case_id": case, "label": label,
             "dice": dice[side][seed] - 0.2 * (case == "mni_002") + (0.05 if label == "grey" else -0.05),
             "hd95_mm": 1.0}
            for side in SIDES for seed in (0, 1, 2) for case in ("mni_001", "mni_002") for label in ("grey", "white")]
    layout = DemoLayout(tmp_path)
    layout.study.folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(layout.study.out("per_case.csv"), index=False)
    table = write_seed_table(layout, names)
    assert list(table["seed"]) == ["0", "1", "2", "mean over seeds"]
    assert table.loc[0, "pretrained"] == pytest.approx(0.8) and table.loc[0, "none"] == pytest.approx(0.6)
    assert table.loc[2, "difference"] == pytest.approx(0.0)  # the same Dice on both sides
    differences = table["difference"].to_numpy()[:3].astype(float)
    assert differences == pytest.approx([0.2, 0.1, 0.0])
    lo, hi = stats.t.interval(0.95, 2, loc=differences.mean(), scale=stats.sem(differences))
    assert table.loc[3, "difference"] == pytest.approx(differences.mean())
    assert table.loc[3, "ci95"] == f"[{lo:+.4f}, {hi:+.4f}]"
    written = pd.read_csv(layout.seeds_summary)
    assert written["difference"].iloc[3] == pytest.approx(differences.mean(), abs=1e-4)


def test_a_damaged_bundled_backbone_is_refused_with_the_fix(tmp_path, monkeypatch):
    from threedino_pipe.demo import bundled_backbone

    damaged = tmp_path / "backbone_tiny_mni.pt"
    data = bytearray(bundled_backbone.BACKBONE.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(bundled_backbone, "BACKBONE", damaged)
    with pytest.raises(UserError) as caught:
        bundled_backbone_and_record()
    assert "SHA-256" in str(caught.value) and "--pretrain-here" in caught.value.fix
    monkeypatch.setattr(bundled_backbone, "BACKBONE", tmp_path / "missing.pt")
    with pytest.raises(UserError, match="missing"):
        bundled_backbone_and_record()


def test_the_bundled_backbone_is_a_tiny_vit_its_record_describes():
    path, record = bundled_backbone_and_record()
    choice = resolve_backbone(str(path), path.parent, expect="tiny")
    assert choice.pretrained and choice.tag == "backbone_tiny_mni"
    assert path.stat().st_size < 8 * 2**20  # a few MB in the package
    assert record.iterations >= 1000 and record.recipe_name == "auto" and "layerscale_init" in record.deviations
    assert (path.parent / record.curves).is_file()
    # the run learnt input-dependent features: the teacher's CLS varies across inputs, its patch probe beats
    # the same network at initialisation (docs/demo.md)
    assert record.final_signals["teacher_cls_std"] > 0.1 and record.final_signals["cls_rank"] > 5
    assert record.probe_curve[str(record.iterations)] > record.probe_curve["0"] + 0.02


def _seeds_from_per_case(per_case: pd.DataFrame, names: dict[str, str]) -> dict[str, list[float]]:
    """Each side's mean Dice per seed, computed here from the study's per_case.csv (mean over labels per case,
    then over cases)."""
    return {side: [per_case[(per_case["backbone"] == name) & (per_case["seed"] == seed)]
                   .groupby("case_id")["dice"].mean().mean() for seed in sorted(set(per_case["seed"]))]
            for side, name in names.items()}


@pytest.mark.e2e
def test_quick_demo_with_pretrain_here_runs_every_stage_and_says_so(tmp_path):
    """`--pretrain-here` pretrains and adapts inside the demo; the comparison is the demo's `3dino study` (its
    outputs exist and seeds.csv is computed from its per_case.csv); the report and demo.json say which backbone
    was used; a rerun with the same options reuses the study's cells; the folder then refuses a run with the
    bundled backbone (other options)."""
    out = tmp_path / "demo"
    result = run_3dino("demo", "--quick", "--pretrain-here", "--out", str(out), "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = DemoLayout(out)
    assert (layout.pretrain_run / "backbone.pt").is_file() and (layout.highres_run / "backbone.pt").is_file()
    report = layout.report.read_text()
    assert "pretrained inside this demo (--pretrain-here)" in report and "expect the `none` side to win" in report
    assert "3dino study -d 990 --backbones" in result.stderr and "--name demo" in result.stderr
    for name in ("cells.csv", "per_case.csv", "summary.csv", "tests.csv", "label_efficiency.png", "report.html"):
        assert layout.study.out(name).is_file(), name
    cells = pd.read_csv(layout.study.out("cells.csv"))
    assert len(cells) == 2 and (cells["status"] == "done").all()
    assert sorted(cells["backbone"]) == ["none:adapter", "tiny__990__highres:adapter"]
    per_case = pd.read_csv(layout.study.out("per_case.csv"))
    assert set(per_case["case_id"]) == {p.name[: -len(".nii.gz")] for p in (layout.raw / "labelsTs").iterdir()}
    seeds = pd.read_csv(layout.seeds_summary)
    assert list(seeds["seed"].astype(str)) == ["0", "mean over seeds"]
    expected = _seeds_from_per_case(per_case, {"pretrained": "tiny__990__highres:adapter", "none": "none:adapter"})
    for side in SIDES:
        assert 0.0 <= seeds[side].iloc[0] <= 1.0
        assert seeds[side].iloc[0] == pytest.approx(expected[side][0], abs=1e-4)
    assert json.loads((out / "demo.json").read_text())["options"]["backbone"] == "pretrain-here"
    runs = [Path(p) for p in cells["run_folder"]]
    before = {str(p): p.stat().st_mtime_ns for folder in (*runs, layout.study.folder / "cells")
              for p in folder.rglob("*") if p.is_file()}
    again = run_3dino("demo", "--quick", "--pretrain-here", "--out", str(out), "--no-progress", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already") == 2  # the study's cells: nothing trained, predicted or evaluated
    assert {p: Path(p).stat().st_mtime_ns for p in before} == before
    refused = run_3dino("demo", "--quick", "--out", str(out), "--no-progress")
    assert refused.returncode != 0 and "other options" in refused.stderr and "Traceback" not in refused.stderr
