"""``3dino demo``: refuses folders it did not make or made with other options (before any work), checks
the bundled backbone, and summarises the comparison over finetune seeds.

The demo itself runs end to end in CI (``.ci/run``: ``3dino demo --quick``); its report is checked
in a browser by ``tests/test_report_browser.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_3dino
from scipy import stats

from threedino_pipe.demo.chain import bundled_backbone as bundled_backbone_and_record
from threedino_pipe.demo.examples import build_mni_dataset
from threedino_pipe.demo.layout import DATASET_ID, SIDES, DemoLayout
from threedino_pipe.demo.seeds import write_seed_table
from threedino_pipe.models.backbone_choice import resolve_backbone
from threedino_pipe.raw_data.image_io import read_image, write_image
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import evaluate


def test_demo_refuses_a_folder_made_with_other_options(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"kind": "demo", "schema_version": 1, "options": {"quick": True}}))
    result = run_3dino("demo", "--out", str(tmp_path), "--no-progress")
    assert result.returncode != 0
    assert "demo.json" in result.stderr and "other options" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]  # nothing written


def test_demo_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_3dino("demo", "--quick", "--out", str(tmp_path), "--no-progress")
    assert result.returncode != 0
    assert "not a demo folder" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_seed_table_gives_each_seeds_mean_dice_and_the_t_interval_of_the_difference(tmp_path, monkeypatch):
    layout = DemoLayout(tmp_path)
    monkeypatch.setenv("THREEDINO_RAW", str(tmp_path / "raw"))
    build_mni_dataset(tmp_path / "raw", DATASET_ID, 2, num_test=2, max_size=32)
    labels = layout.raw / "labelsTs"
    for seed in (0, 1, 2):
        for side, shift in zip(SIDES, (seed, 2), strict=True):  # pretrained: shifted by 0, 1, 2 voxels; none: 2
            for reference in sorted(labels.glob("*.nii.gz")):
                label, geometry = read_image(reference)
                write_image(np.roll(label, shift, axis=0), geometry, layout.predictions(side, seed) / reference.name)
            assert evaluate.run(labels, layout.predictions(side, seed), dataset=str(DATASET_ID),
                                output=layout.evaluation(side, seed), num_bootstrap=20, num_processes=1) == 0
    table = write_seed_table(layout, [0, 1, 2])
    assert list(table["seed"]) == ["0", "1", "2", "mean over seeds"]
    assert table.loc[0, "pretrained"] == pytest.approx(1.0)  # a prediction equal to the reference
    assert table.loc[2, "difference"] == pytest.approx(0.0)  # the same shift on both sides
    differences = table["difference"].to_numpy()[:3]
    assert differences[0] > differences[1] > 0
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


@pytest.mark.e2e
def test_quick_demo_with_pretrain_here_runs_every_stage_and_says_so(tmp_path):
    """`--pretrain-here` pretrains and adapts inside the demo; the report and demo.json say which backbone was
    used, and the folder then refuses a run with the bundled backbone (other options)."""
    out = tmp_path / "demo"
    result = run_3dino("demo", "--quick", "--pretrain-here", "--out", str(out), "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = DemoLayout(out)
    assert (layout.pretrain_run / "backbone.pt").is_file() and (layout.highres_run / "backbone.pt").is_file()
    report = layout.report.read_text()
    assert "pretrained inside this demo (--pretrain-here)" in report and "expect the `none` side to win" in report
    seeds = pd.read_csv(layout.seeds_summary)
    assert list(seeds["seed"].astype(str)) == ["0", "mean over seeds"]
    assert 0.0 <= seeds["pretrained"].iloc[0] <= 1.0 and 0.0 <= seeds["none"].iloc[0] <= 1.0
    assert json.loads((out / "demo.json").read_text())["options"]["backbone"] == "pretrain-here"
    refused = run_3dino("demo", "--quick", "--out", str(out), "--no-progress")
    assert refused.returncode != 0 and "other options" in refused.stderr and "Traceback" not in refused.stderr
