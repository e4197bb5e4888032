"""``3dino study`` through the real command (issue 17): a 2 backbones x 2 pct x 2 seeds study on real scans
planned with a test list, its outputs and report in chromium, reuse, one cell recomputed, shares + --collect,
the SLURM task body, a cell failing at run time, and the refusals.

The dataset is the shared MNI152 scans (``mni_raw``) without their imagesTs, planned with ``--test-fraction``;
the pretrained backbone is the demo's bundled one; every finetune runs 2 iterations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import THREEDINO, invoke_3dino, run_3dino

from threedino_pipe.artifacts import Plans, RunRecord, Splits, StudyCell, StudyRecord
from threedino_pipe.demo.bundled_backbone import BACKBONE
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.study import slurm
from threedino_pipe.study.cells import parse_entry

pytestmark = pytest.mark.e2e
DATASET = "Dataset990_MNITissue"
COMMON = ("--pct", "50", "100", "--seeds", "0", "1", "--iters", "2", "--num-workers", "0", "--no-progress")
OUTPUTS = ("cells.csv", "per_case.csv", "summary.csv", "tests.csv", "labels_needed.csv", "label_efficiency.png",
           "label_efficiency.svg", "report.html", "study.json")
SAME = ("per_case.csv", "summary.csv", "tests.csv", "labels_needed.csv")


@pytest.fixture(scope="module")
def study_env(mni_raw, tmp_path_factory) -> dict[str, str]:
    """The MNI scans without imagesTs (links to the shared fixture's files), planned with --test-fraction 0.25
    (2 of 8 cases held out) and preprocessed; a results folder shared by the module's tests."""
    root = tmp_path_factory.mktemp("study")
    raw = root / "raw" / DATASET
    raw.mkdir(parents=True)
    for name in ("imagesTr", "labelsTr", "dataset.json"):
        os.symlink(mni_raw / DATASET / name, raw / name)
    env = {"THREEDINO_RAW": str(root / "raw"), "THREEDINO_PREPROCESSED": str(root / "pre"),
           "THREEDINO_RESULTS": str(root / "results")}
    for args in (("plan", "-d", "990", "--preset", "tiny", "--test-fraction", "0.25", "-np", "1"),
                 ("preprocess", "-d", "990", "-np", "1")):
        done = run_3dino(*args, env=env)
        assert done.returncode == 0, done.stderr
    yield env
    shutil.rmtree(root, ignore_errors=True)


def _study(env: dict, *args: str, backbone: Path = BACKBONE) -> subprocess.CompletedProcess:
    return run_3dino("study", "-d", "990", "--backbones", str(backbone), "none", *COMMON, *args, env=env, timeout=900)


def _study_here(env: dict, *args: str) -> subprocess.CompletedProcess:
    """A dry run or a refusal of the same study, in this process (nothing is trained)."""
    return invoke_3dino("study", "-d", "990", "--backbones", str(BACKBONE), "none", *COMMON, *args, env=env)


def _mtimes(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def full_study(study_env) -> Path:
    done = _study(study_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(study_env["THREEDINO_RESULTS"]) / DATASET / "study__main"


def test_an_entry_takes_any_head_finetune_takes_and_an_unknown_one_is_named(tmp_path):
    """Swin Random (none:swinunetr) and Swin Transfer (RUN:swinunetr) as well as the ViT heads and the probe."""
    run = tmp_path / "tiny__tang-swin__990"
    run.mkdir()
    for text, backbone, head in (("none:swinunetr", "none", "swinunetr"), (f"{run}:swinunetr", str(run), "swinunetr"),
                                 (f"{run}:adapter", str(run), "adapter"), ("none", "none", None),
                                 ("none:probe", "none", "probe")):
        entry = parse_entry(text)
        assert (entry.backbone, entry.head) == (backbone, head), text
    assert parse_entry(f"{run}:swinunetr").label == "tiny__tang-swin__990:swinunetr"
    with pytest.raises(UserError, match="unknown head 'segformer'") as err:
        parse_entry("none:segformer")
    assert "swinunetr" in err.value.fix and "adapter" in err.value.fix


def test_study_writes_every_output_on_the_test_list(full_study):
    for name in OUTPUTS:
        assert (full_study / name).is_file(), name
    cells = pd.read_csv(full_study / "cells.csv")
    assert len(cells) == 8 and (cells["status"] == "done").all()
    assert sorted(set(cells["backbone"])) == ["backbone_tiny_mni", "none"]
    assert cells["run_folder"].map(lambda p: (Path(p) / "checkpoint_best.pt").is_file()).all()
    per_case = pd.read_csv(full_study / "per_case.csv")
    assert set(per_case["case_id"]) == {"mni_003", "mni_004"}  # splits.json's test list, never trained on
    assert len(per_case) == 8 * 2 * 2 and per_case["dice"].between(0, 1).all()
    summary = pd.read_csv(full_study / "summary.csv")
    assert {"mean", "median", "ci95_lo", "ci95_hi"} <= set(summary.columns)
    assert len(summary[(summary["metric"] == "dice") & (summary["label"] == "mean_over_labels")]) == 4
    tests = pd.read_csv(full_study / "tests.csv")
    assert set(tests["backbone"]) == {"backbone_tiny_mni"} and set(tests["reference"]) == {"none"}
    assert {"p_value", "p_holm", "rank_biserial"} <= set(tests.columns)
    needed = pd.read_csv(full_study / "labels_needed.csv")
    assert set(needed["status"]) <= {"interpolated", "at_or_below", "not_reached"}
    svg = (full_study / "label_efficiency.svg").read_text()
    for entry in ("backbone_tiny_mni", "none"):  # the legend names both lines
        assert f"<!-- {entry} -->" in svg
    report = (full_study / "report.html").read_text()
    assert "3dino finetune -d" in report and "3dino predict -i" in report and "3dino evaluate -r" in report


def test_study_report_renders_in_chromium(full_study, tmp_path):
    from test_report_browser import CHROMIUM, _open_in_chromium
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    images = _open_in_chromium(full_study / "report.html", tmp_path / "shot.png")
    assert len(images) == 1 and all(i["complete"] and i["width"] > 0 for i in images), images


def test_rerun_recomputes_nothing_and_a_deleted_cell_only_itself(full_study, study_env):
    cells = pd.read_csv(full_study / "cells.csv")
    runs = [Path(p) for p in cells["run_folder"]]
    before = _mtimes(*runs, full_study / "cells")
    done = _study(study_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _mtimes(*runs, full_study / "cells") == before
    assert done.stderr.count("done already") == 8
    gone = cells["cell"][3]
    shutil.rmtree(full_study / "cells" / gone)
    done = _study(study_env)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _mtimes(*runs, full_study / "cells")
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(f"/cells/{gone}/" in p for p in changed)  # the runs and the other cells: untouched
    assert done.stderr.count("done already") == 7
    listed = _study_here(study_env, "--dry-run")
    assert listed.returncode == 0 and listed.stderr.count("  done  ~") == 8
    other = _study_here(study_env, "--name", "longer", "--iters", "4", "--lr", "0.002", "--dry-run")  # from log.csv
    assert other.returncode == 0 and other.stderr.count("to run  ~") == 8 and "iteration time" in other.stderr
    assert "every cell's finetune options: --iters 4 --lr 0.002 (" in other.stderr
    assert not (full_study.parent / "study__longer").exists()


def test_shares_then_collect_equal_the_full_run_and_the_slurm_task_runs_a_share(full_study, study_env, tmp_path):
    for share in ("1/2", "2/2"):
        done = _study(study_env, "--name", "shares", "--cells", share)
        assert done.returncode == 0, done.stderr[-3000:]
    shares = full_study.parent / "study__shares"
    assert not (shares / "summary.csv").exists()  # a share only runs its cells
    done = _study(study_env, "--name", "shares", "--collect")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in SAME:
        assert (shares / name).read_bytes() == (full_study / name).read_bytes(), name
    script = tmp_path / "study.sbatch"  # with finetune settings of its own: they reach the cell's run
    settings = ("--batch-size", "1", "--lr", "0.002", "--val-every", "1")
    assert _study_here(study_env, "--name", "slurm", *settings, "--emit-slurm", str(script)).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=1-8" in text and '--cells "${SLURM_ARRAY_TASK_ID}/8"' in text
    assert "--iters 2 --batch-size 1 --lr 0.002 --val-every 1" in text
    task = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"},
                          capture_output=True, text=True, timeout=600)
    assert task.returncode == 0, task.stderr[-3000:]
    ran = sorted(p.parent.name for p in (full_study.parent / "study__slurm" / "cells").glob("*/cell.json"))
    full_cell = pd.read_csv(full_study / "cells.csv").iloc[2]
    assert ran == [full_cell["cell"]]  # task 3 of 8: the third cell only
    record = StudyCell.read(full_study.parent / "study__slurm" / "cells" / ran[0] / "cell.json")
    assert record.commands[0].endswith("--iters 2 --batch-size 1 --lr 0.002 --val-every 1")
    assert StudyRecord.read(full_study.parent / "study__slurm" / "study.json").options["lr"] == 0.002
    run = RunRecord.read(Path(record.run_folder) / "run.json").options
    assert (run["batch_size"], run["lr"], run["val_every"], run["iters"]) == (1, 0.002, 1, 2)
    assert record.run_folder == full_cell["run_folder"] + "__2"  # not the full study's run: beside it


def test_slurm_tasks_with_several_gpus_run_the_cells_finetune_under_torchrun(full_study, study_env, tmp_path):
    text = slurm.script(["-d", "990", "--gpus-per-cell", "2"], 8, "study__gpus", gpus=2)
    assert "#SBATCH --gres=gpu:2" in text and "#SBATCH --cpus-per-task=8" in text and "#SBATCH --array=1-8" in text
    script = tmp_path / "one_gpu.sbatch"  # G = 1 runs on this CPU: torchrun --standalone with one gloo process
    emitted = _study_here(study_env, "--name", "torchrun", "--gpus-per-cell", "1", "--emit-slurm", str(script))
    assert emitted.returncode == 0, emitted.stderr
    text = script.read_text()
    assert "#SBATCH --gres=gpu:1" in text and '--gpus-per-cell 1 --cells "${SLURM_ARRAY_TASK_ID}/8"' in text
    task = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"},
                          capture_output=True, text=True, timeout=600)
    assert task.returncode == 0, task.stderr[-3000:]
    cell = pd.read_csv(full_study / "cells.csv").iloc[2]
    record = json.loads((full_study.parent / "study__torchrun" / "cells" / cell["cell"] / "cell.json").read_text())
    assert record["outcome"] == "done"
    assert record["commands"][0].startswith("torchrun --standalone --nproc-per-node 1 -m threedino_pipe.cli finetune")
    assert record["run_folder"] == cell["run_folder"]  # one process under torchrun: the full study's run, reused


def test_a_cell_failing_at_run_time_is_recorded_and_the_others_finish(full_study, study_env, tmp_path):
    backbone = tmp_path / "copy_tiny.pt"
    shutil.copy(BACKBONE, backbone)
    args = [*THREEDINO, "study", "-d", "990", "--backbones", str(backbone), "none", "--pct", "100", "--seeds", "0",
            "1", "--iters", "2", "--num-workers", "0", "--no-progress", "--name", "failing"]
    first = full_study.parent / "study__failing" / "cells" / "copy_tiny__pct100__fold0__seed0" / "cell.json"
    process = subprocess.Popen(args, env={**os.environ, **study_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        backbone.write_bytes(b"not a checkpoint")  # corrupted after the study started: cell 3 loads it
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == 1, stderr[-3000:]
    cells = pd.read_csv(full_study.parent / "study__failing" / "cells.csv").set_index("cell")
    assert cells.loc["copy_tiny__pct100__fold0__seed1", "status"] == "failed"
    assert str(backbone) in cells.loc["copy_tiny__pct100__fold0__seed1", "error"]
    assert (cells.drop(index="copy_tiny__pct100__fold0__seed1")["status"] == "done").all()
    assert "copy_tiny__pct100__fold0__seed1: failed" in (full_study.parent / "study__failing" / "report.html"
                                                          ).read_text()


def test_no_test_list_is_refused_and_on_validation_or_imagests_are_used(study_env, mni_preprocessed, tmp_path):
    env = {**study_env, "THREEDINO_PREPROCESSED": str(tmp_path / "pre"), "THREEDINO_RESULTS": str(tmp_path / "r")}
    planned, pre = Path(study_env["THREEDINO_PREPROCESSED"]) / DATASET, tmp_path / "pre" / DATASET
    pre.mkdir(parents=True)
    shutil.copy(Plans.in_folder(planned), Plans.in_folder(pre))
    splits = Splits.read(Splits.in_folder(planned))
    splits.test = []  # as `plan` leaves a dataset of fewer than 20 cases without --test-fraction
    splits.write(Splits.in_folder(pre))
    os.symlink(planned / "finetune", pre / "finetune")  # the same arrays: the runs of the full study are reused
    done = _study_here(env, "--dry-run")
    assert done.returncode == 2 and "--test-fraction" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()
    done = _study_here(env, "--dry-run", "--on-validation")
    assert done.returncode == 0 and "(validation)" in done.stderr
    on_validation = {**env, "THREEDINO_RESULTS": study_env["THREEDINO_RESULTS"]}
    done = run_3dino("study", "-d", "990", "--backbones", str(BACKBONE), "none", "--pct", "100", "--seeds", "0",
                     "--iters", "2", "--num-workers", "0", "--no-progress", "--on-validation", "--name", "val",
                     env=on_validation, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(study_env["THREEDINO_RESULTS"]) / DATASET / "study__val"
    assert set(pd.read_csv(folder / "per_case.csv")["case_id"]) == set(splits.folds[0].val)
    for name in ("summary.csv", "tests.csv", "labels_needed.csv"):
        assert pd.read_csv(folder / name)["selection_biased"].all(), name
    assert "Selection-biased" in (folder / "report.html").read_text()
    done = _study_here({**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "r2")}, "--dry-run")
    assert done.returncode == 0 and "(imagesTs)" in done.stderr and "to run" in done.stderr
    done = _study_here(study_env, "--reference", "nothing", "--dry-run")
    assert done.returncode == 2 and "--reference nothing" in done.stderr
    done = _study_here(study_env, "--lr", "0", "--dry-run")
    assert done.returncode == 2 and "--lr 0 is out of range" in done.stderr and "Traceback" not in done.stderr
