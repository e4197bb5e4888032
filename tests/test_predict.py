"""End-to-end tests of `3dino predict` and `3dino export --format zip` on real files.

The model is a real `linear`-head segmentation network (tiny preset, random weights) saved in the
finetune run-folder format (model.json with the plans `3dino plan` computes for a generated
dataset, checkpoint_best.pt); inputs are NIfTI files with anisotropic spacing, oblique
directions, shifted origins and zero borders (so preprocessing crops), a truncated file, and a
real MNI152 scan written as a DICOM series.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, run_3dino
from typer.testing import CliRunner

from threedino_pipe.artifacts import RunRecord
from threedino_pipe.cli import app
from threedino_pipe.demo.examples import mni_images, oblique_direction
from threedino_pipe.planning.fingerprint import compute_fingerprint
from threedino_pipe.planning.planner import make_plans
from threedino_pipe.raw_data.image_io import Geometry, from_array, read_image
from threedino_pipe.raw_data.verification import check_dataset
from threedino_pipe.runtime.atomic_files import read_json, write_json
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.stages import predict
from threedino_pipe.stages.plan import parse_options

pytestmark = pytest.mark.e2e

_spec = importlib.util.spec_from_file_location("make_broken_corpus", REPO / "tests" / "data" / "make_broken_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

LABELS = {"background": 0, "body": 1, "lesion": 2}


def body_scan(rng: np.random.Generator, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An ``X x Y x Z`` MR-like body (label 1) with a lesion (label 2), zero outside the body."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(float)
    centre = np.array(size) / 2 + rng.uniform(-1, 1, 3)
    radii = np.array(size) * rng.uniform(0.3, 0.4, 3)
    body = (((grid - centre) / radii) ** 2).sum(-1) <= 1
    lesion = body & ((((grid - centre) / (radii * 0.4)) ** 2).sum(-1) <= 1)
    image = np.where(body, 400.0 + 300.0 * lesion + rng.normal(0, 25, size), 0.0).astype(np.float32)
    return image, body.astype(np.uint8) + lesion.astype(np.uint8)


def scan_geometry(rng: np.random.Generator, size: tuple[int, int, int]) -> Geometry:
    """Anisotropic (cross-slice axis j), oblique, with an origin far from 0."""
    spacing = tuple(float(s) for s in np.array([0.9, 3.0, 0.8]) * rng.uniform(0.9, 1.1, 3))
    return Geometry(size=size, spacing=spacing, origin=tuple(rng.uniform(-150, 150, 3).round(4).tolist()),
                    direction=oblique_direction(float(rng.uniform(10, 30))))


def write_scan(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(from_array(array, geometry), str(path))


def save_run(folder: Path, plans: dict, *, seed: int, task: str = "segmentation") -> Path:
    """A finetune run folder (model.json + checkpoint_best.pt) of a random tiny network."""
    torch.manual_seed(seed)
    patch = plans["configurations"]["finetune"]["patch_size"]
    if task == "segmentation":
        from threedino_pipe.models.segmentation import build_segmentation_model
        net = build_segmentation_model("linear", "tiny", 1, 3)
        extra = {"labels": LABELS, "class_names": [], "num_outputs": 3, "output": "softmax", "head": "linear"}
    else:
        from threedino_pipe.models.classification import build_probe
        net = build_probe("tiny", 1, 2, 1, True)
        extra = {"labels": {}, "class_names": ["benign", "malignant"], "num_outputs": 2, "output": "softmax",
                 "head": "probe"}
        plans = {**plans, "task": "classification", "labels": {}, "class_names": extra["class_names"]}
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict()}, folder / "checkpoint_best.pt")
    write_json(folder / "model.json", {
        "kind": "model", "schema_version": 1, "version": "0.1.0", "task": task, "dataset": plans["dataset"],
        "plans": plans, "configuration": "finetune", "channel_names": plans["channel_names"],
        "regions_class_order": None, "model_args": net.model_args(),
        "backbone": {"tag": "none", "source": "none", "sha256": None, "frozen": True}, "in_channels": 1,
        "patch_size": patch, "weights": "checkpoint_best.pt", "fold": 0, "pct": 100.0, "seed": seed,
        "best_iteration": 0, "best_metric": None, **extra})
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads make these tiny networks 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """Plans of a generated dataset, two runs (different weights), 5 input scans (the 4th truncated)."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(7)
    raw = root / "raw" / "Dataset995_Bodies"
    for index in range(3):
        size = (40, 12, 36)
        image, label = body_scan(rng, size)
        geo = scan_geometry(rng, size)
        write_scan(image, geo, raw / "imagesTr" / f"body_{index:03d}_0000.nii.gz")
        write_scan(label, geo, raw / "labelsTr" / f"body_{index:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": 3,
                                                  "file_ending": ".nii.gz"}))
    spec, cases, _ = check_dataset(raw, num_processes=1)
    options = parse_options(preset="tiny", norm=None, target_spacing=None, patch_size="32,16,32", batch_size=None,
                            memory_gb=8.0, allow_nan=False)
    plans = make_plans(compute_fingerprint(raw, spec, cases, 1), spec, options).to_data()
    assert plans["transpose"] == [0, 2, 1] and plans["configurations"]["finetune"]["patch_size"] == [32, 32, 16]
    scans = root / "scans"
    for index in range(5):
        size = tuple(int(n) for n in rng.integers([34, 10, 30], [46, 14, 40]))
        write_scan(body_scan(rng, size)[0], scan_geometry(rng, size), scans / f"patient-{index:04d}.nii.gz")
    truncated = scans / "patient-0003.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return {"root": root, "run_a": save_run(root / "run_a", plans, seed=0),
            "run_b": save_run(root / "run_b", plans, seed=1), "scans": scans}


@pytest.fixture(scope="module")
def first_batch(project) -> tuple:
    out = project["root"] / "out_a"
    proc = run_3dino("predict", "-i", str(project["scans"]), "-o", str(out), "-m", str(project["run_a"]),
                     "--no-progress", env={"OMP_NUM_THREADS": "1"})
    return proc, out


GOOD = ["patient-0000", "patient-0001", "patient-0002", "patient-0004"]


def _assert_same_geometry(a: Geometry, b: Geometry) -> None:
    assert a.size == b.size
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6, err_msg=name)


def test_batch_with_a_truncated_file(first_batch, project):
    proc, out = first_batch
    assert proc.returncode == 1, proc.stderr
    outputs = sorted(p.name for p in out.glob("*.nii.gz"))
    assert outputs == [f"{case}.nii.gz" for case in GOOD]
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "case,file,error" and len(failures) == 2
    case, file, error = failures[1].split(",", 2)
    assert case == "patient-0003" and file.endswith("patient-0003.nii.gz") and "truncated" in error
    assert "patient-0003 failed" in proc.stderr and "1 case(s) failed" in proc.stderr
    for case in GOOD:  # the input's exact size, spacing, origin and direction; labels only
        labels, geo = read_image(out / f"{case}.nii.gz")
        _assert_same_geometry(geo, read_image(project["scans"] / f"{case}.nii.gz")[1])
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    args = read_json(out / "predict_args.json")
    assert args["kind"] == "predict_args" and args["options"]["overlap"] == 0.5
    model = args["models"][0]
    assert model["source"] == str(project["run_a"].resolve()) and len(model["weights_sha256"]) == 64
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".qc"], "no temporary file is left behind"
    assert sorted(p.name for p in (out / ".qc").iterdir()) == sorted(f"{c}{e}" for c in GOOD for e in (".json", ".png"))


def test_torchrun_two_ranks_write_what_one_process_writes(first_batch, project, tmp_path):
    """The one torchrun set-up (runtime.distributed, gloo barriers): rank r predicts cases r, r + 2, ...; rank 0
    merges the failures; the labels equal one process's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "-m", "threedino_pipe.cli", "predict", "-i",
                          str(project["scans"]), "-o", str(out), "-m", str(project["run_a"]), "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                         timeout=600)
    assert ddp.returncode != 0 and "patient-0003 failed" in ddp.stderr, ddp.stderr[-3000:]  # one case fails
    assert not [line for line in ddp.stderr.splitlines() if "File" in line and "threedino_pipe" in line], \
        "a traceback through our code (torchrun prints its own when a rank exits 1)"
    assert (out / "failures.csv").read_text() == (first_batch[1] / "failures.csv").read_text()
    assert sorted(p.name for p in out.iterdir() if "rank" in p.name) == []  # the parts were merged
    for case in GOOD:
        np.testing.assert_array_equal(read_image(out / f"{case}.nii.gz")[0],
                                      read_image(first_batch[1] / f"{case}.nii.gz")[0])
    assert read_json(out / "predict_args.json")["world_size"] == 2
    assert (out / "qc.csv").read_text() == (first_batch[1] / "qc.csv").read_text()  # rank 0 reads every rank's QC


def test_two_predict_commands_into_one_output_folder(first_batch, project, tmp_path):
    """The loser refuses within 2 s naming the holder, before it loads a model; after kill -9 of the winner (stopped
    once its first label file exists) a rerun with --continue takes the lock over and writes the same files."""
    from collisions import assert_refused, listing, race

    out = tmp_path / "out"
    args = ["predict", "-i", str(project["scans"]), "-o", str(out), "-m", str(project["run_a"]), "--no-progress"]
    raced = race(args, {"OMP_NUM_THREADS": "1"}, out, started=lambda: any(out.glob("patient-*.nii.gz")),
                 watched=tmp_path)
    try:
        assert_refused(raced, "output folder", out)
        assert "case(s)" not in raced.loser.stderr and "patient-" not in raced.loser.stderr
        assert listing(tmp_path) == raced.files_at_stop  # the loser wrote nothing
    finally:
        raced.kill_winner()
    again = run_3dino(*args, "--continue", env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 1 and "patient-0003 failed" in again.stderr  # the truncated input, as before
    assert "5 case(s); 0 already" not in again.stderr and "already predicted (--continue)" in again.stderr
    for case in GOOD:
        name = f"{case}.nii.gz"
        assert (out / name).read_bytes() == (first_batch[1] / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first_batch[1].iterdir())


def test_continue_predicts_only_what_is_missing(first_batch, project, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(first_batch[1], out)
    (out / "patient-0001.nii.gz").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    with caplog.at_level(logging.INFO):
        assert predict.run(project["scans"], out, [project["run_a"]], resume=True) == 1  # the truncated file fails
    assert "5 case(s); 3 already predicted (--continue), predicting 2" in caplog.text
    assert "patient-0001: done" in caplog.text and "patient-0000: done" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz") if p.name in before} == before
    np.testing.assert_array_equal(read_image(out / "patient-0001.nii.gz")[0],
                                  read_image(first_batch[1] / "patient-0001.nii.gz")[0])
    assert len((out / "failures.csv").read_text().splitlines()) == 2  # this run's failures only


def test_continue_refuses_a_folder_written_by_another_model(first_batch, project, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_batch[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="written by another model") as err:
        predict.run(project["scans"], out, [project["run_b"]], resume=True)
    assert "new output folder" in err.value.render()
    with pytest.raises(UserError, match="--overlap 0.75 into a folder predicted with --overlap 0.5"):
        predict.run(project["scans"], out, [project["run_a"]], resume=True, overlap=0.75)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_model_zip_in_a_fresh_directory_gives_the_same_outputs(first_batch, project, tmp_path, monkeypatch):
    """`3dino export --format zip`, then `3dino predict -m model.zip` elsewhere (the CLI, in-process)."""
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    result = CliRunner().invoke(app, ["export", str(project["run_a"]), "-o", str(fresh / "model.zip"),
                                      "--format", "zip"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(fresh / "model.zip") as archive:
        assert sorted(archive.namelist()) == ["checkpoint_best.pt", "model.json"]
    shutil.copytree(project["scans"], fresh / "scans")
    monkeypatch.chdir(fresh)
    result = CliRunner().invoke(app, ["predict", "-i", "scans", "-o", "out", "-m", "model.zip", "--no-progress"])
    assert result.exit_code == 1, result.output  # the truncated scan
    for case in GOOD:
        mine, geo = read_image(fresh / "out" / f"{case}.nii.gz")
        reference, ref_geo = read_image(first_batch[1] / f"{case}.nii.gz")
        np.testing.assert_array_equal(mine, reference)
        assert geo == ref_geo
    zipped = read_json(fresh / "out" / "predict_args.json")["models"][0]
    original = read_json(first_batch[1] / "predict_args.json")["models"][0]
    assert zipped["weights_sha256"] == original["weights_sha256"]
    assert zipped["source"] == str((fresh / "model.zip").resolve())
    assert not list(Path("/tmp").glob("threedino-model-*")), "the unpacked model is removed"


def test_zip_with_an_escaping_member_is_refused_by_predict(project, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.write(project["run_a"] / "model.json", "model.json")
        archive.write(project["run_a"] / "checkpoint_best.pt", "checkpoint_best.pt")
        archive.writestr("../evil", "payload")
    with pytest.raises(UserError, match="refused to unpack: the member '../evil'"):
        predict.run(project["scans"], tmp_path / "out", [evil])
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("evil")) and not Path("/tmp/evil").exists()


def test_numbered_channel_groups_are_refused_by_a_one_channel_model(project, tmp_path):
    """case_0000 + case_0001 form one complete 2-channel group: a 1-channel model refuses, listing it (issue 13.1)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for index in range(2):
        shutil.copy(project["scans"] / "patient-0000.nii.gz", scans / f"case_{index:04d}.nii.gz")
    shutil.copy(project["scans"] / "patient-0001.nii.gz", scans / "other_0000.nii.gz")
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(scans), "-o", str(out), "-m", str(project["run_a"]), "--no-progress",
                     "--device", "cpu", timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "channel groups of 1 or 2 channel(s)" in proc.stderr and "the model takes 1 channel(s)" in proc.stderr
    assert "case 'case': 2 channel(s) (case_0000.nii.gz, case_0001.nii.gz)" in proc.stderr, proc.stderr
    assert "case 'other': 1 channel(s) (other_0000.nii.gz)" in proc.stderr
    assert str(scans) in proc.stderr and "case_0001_0000.nii.gz" in proc.stderr  # the folder and a working fix
    assert not out.exists()
    shutil.move(scans / "case_0001.nii.gz", scans / "case_0001_0000.nii.gz")  # the fix the message gives
    shutil.move(scans / "case_0000.nii.gz", scans / "case_0000_0000.nii.gz")
    result = CliRunner().invoke(app, ["predict", "-i", str(scans), "-o", str(out), "-m", str(project["run_a"]),
                                      "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_0000.nii.gz", "case_0001.nii.gz", "other.nii.gz"]


def _predict_side_corpus(project: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Broken predict calls: name -> (options after -i/-o, texts stderr must hold)."""
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("no model here")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(project["run_a"] / "model.json", no_weights / "model.json")
    return {
        "model folder without model.json": (["-m", str(not_a_run)], [str(not_a_run), "model.json"]),
        "model folder without weights": (["-m", str(no_weights)], [str(no_weights), "checkpoint_best.pt"]),
        "model that does not exist": (["-m", str(tmp_path / "missing")], [str(tmp_path / "missing")]),
        "unknown checkpoint name": (["-m", str(project["run_a"]), "--checkpoint", "latest"],
                                    ["--checkpoint", "best", "final"]),
    }


@pytest.mark.parametrize("name", ["model folder without model.json", "model folder without weights",
                                  "model that does not exist", "unknown checkpoint name"])
def test_predict_side_corpus_is_refused_naming_the_fault(project, tmp_path, name):
    """Each broken predict call: exit != 0, the file or option named, no traceback, nothing written."""
    options, texts = _predict_side_corpus(project, tmp_path)[name]
    out = tmp_path / "out"
    proc = run_3dino("predict", "-i", str(project["scans"]), "-o", str(out), *options, "--no-progress",
                     "--device", "cpu", env={"COLUMNS": "200"}, timeout=300)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    flat = " ".join(proc.stderr.split())
    for text in texts:
        assert text in flat, (text, proc.stderr)
    assert not out.exists()


def test_dicom_series_predicts_into_nifti_with_the_series_geometry(project, tmp_path, caplog):
    """A real MNI152 scan (an oblique, anisotropic part of it) written as a DICOM series."""
    t1, _ = mni_images()
    geo = scan_geometry(np.random.default_rng(3), (40, 12, 36))
    centre = np.asarray(t1.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t1.GetSize()]))
    origin = centre - np.asarray(geo.direction).reshape(3, 3) @ ((np.array(geo.size) - 1) / 2 * geo.spacing)
    geo = Geometry(geo.size, geo.spacing, tuple(origin.round(3).tolist()), geo.direction)
    image = sitk.Resample(t1, from_array(np.zeros(geo.size, np.float32), geo), sitk.Transform(), sitk.sitkLinear)
    series = tmp_path / "in" / "mni_scan"
    corpus.write_dicom_series(sitk.GetArrayFromImage(image).transpose(2, 1, 0).round(), series, "2.25.4242",
                              spacing=geo.spacing, origin=geo.origin, direction=geo.direction)
    series_array, series_geo = read_image(series)
    assert series_geo.size == geo.size
    with caplog.at_level(logging.INFO):
        assert predict.run(tmp_path / "in", tmp_path / "out", [project["run_a"]], num_workers=0) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".qc", "failures.csv", "mni_scan.nii.gz",
                                                                   "predict_args.json", "predict_log.jsonl", "qc.csv",
                                                                   "qc_report.html"]
    labels, out_geo = read_image(tmp_path / "out" / "mni_scan.nii.gz")
    assert labels.shape == series_array.shape
    assert out_geo.size == series_geo.size
    # NIfTI stores geometry in float32: equal to the series' geometry within float32 rounding
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(out_geo, name), getattr(series_geo, name), rtol=0, atol=2e-5)


def test_itk_warning_on_a_dicom_series_with_a_gap_is_our_warning_naming_the_series(project, tmp_path):
    """ITK reads a series with a missing slice and only warns (on stderr, naming a file of its build folder):
    `3dino predict` prints that as its own warning naming the series folder."""
    image, _ = body_scan(np.random.default_rng(11), (24, 20, 12))
    series = tmp_path / "in" / "gap_scan"
    corpus.write_dicom_series(image, series, "2.25.4343", skip_slices=(6,))
    result = run_3dino("predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(project["run_a"]),
                       "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "WARNING: In" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert f"warning: {series}: Non uniform sampling or missing slices detected" in result.stderr, result.stderr


def test_folds_are_averaged_and_probabilities_saved(project, tmp_path):
    scans = tmp_path / "in"
    scans.mkdir()
    shutil.copy(project["scans"] / "patient-0000.nii.gz", scans / "p.nii.gz")
    probs = {}
    run_a, run_b = project["run_a"], project["run_b"]
    for name, runs in (("a", [run_a]), ("b", [run_b]), ("ab", [run_a, run_b])):
        assert predict.run(scans, tmp_path / name, runs, save_probabilities=True, num_workers=0) == 0
        with np.load(tmp_path / name / "p_probabilities.npz") as saved:
            probs[name] = saved["probabilities"].astype(np.float32)
            assert saved["names"].tolist() == ["background", "body", "lesion"]
        labels, _ = read_image(tmp_path / name / "p.nii.gz")
        assert (labels == probs[name].argmax(0)).mean() > 0.99  # float16 rounding may break near-ties
    geo = read_image(scans / "p.nii.gz")[1]
    assert probs["ab"].shape == (3, *geo.size)
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, atol=3e-3)
    assert np.abs(probs["a"] - probs["b"]).max() > 0.05, "the two runs must differ for this test to mean anything"
    # without probabilities the windows are blended row block by row block while the labels are restored
    assert predict.run(scans, tmp_path / "streamed", [run_a, run_b], num_workers=0) == 0
    assert not (tmp_path / "streamed" / "p_probabilities.npz").exists()
    np.testing.assert_array_equal(read_image(tmp_path / "streamed" / "p.nii.gz")[0],
                                  read_image(tmp_path / "ab" / "p.nii.gz")[0])


def test_tta_makes_the_prediction_flip_equivariant(project, tmp_path):
    """With all 8 flips averaged, predicting a scan flipped along i gives the flipped probabilities."""
    array, geo = read_image(project["scans"] / "patient-0001.nii.gz")
    for name, data in (("orig", array), ("flip", array[::-1])):
        write_scan(np.ascontiguousarray(data), geo, tmp_path / name / f"{name}.nii.gz")
    probs = {}
    for tta in (True, False):
        for name in ("orig", "flip"):
            out = tmp_path / f"{name}_{tta}"
            assert predict.run(tmp_path / name, out, [project["run_a"]], tta=tta, save_probabilities=True,
                               num_workers=0) == 0
            with np.load(out / f"{name}_probabilities.npz") as saved:
                probs[name, tta] = saved["probabilities"].astype(np.float32)
    np.testing.assert_allclose(probs["flip", True][:, ::-1], probs["orig", True], atol=3e-3)
    assert np.abs(probs["flip", False][:, ::-1] - probs["orig", False]).max() > 0.02


def test_classification_writes_predictions_csv(project, tmp_path):
    from threedino_pipe.evaluation.evaluated_files import read_predictions
    plans = read_json(project["run_a"] / "model.json")["plans"]
    run = save_run(tmp_path / "probe", plans, seed=3, task="classification")
    out = tmp_path / "out"
    assert predict.run(project["scans"], out, [run], num_workers=0) == 1  # the truncated scan fails
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "case_id,predicted_class,prob_benign,prob_malignant" and len(rows) == 5
    parsed = read_predictions(out / "predictions.csv", ["benign", "malignant"])
    assert list(parsed.case_ids) == GOOD
    np.testing.assert_allclose(parsed.probs.sum(1), 1.0, atol=1e-5)
    assert "patient-0003" in (out / "failures.csv").read_text()
    assert not (out / "qc.csv").exists() and not (out / ".qc").exists()  # QC is for segmentation models
    before = (out / "predictions.csv").read_text()
    assert predict.run(project["scans"], out, [run], resume=True, num_workers=0) == 1
    assert (out / "predictions.csv").read_text() == before


def _copy_run(source: Path, target: Path, **card) -> Path:
    """A copy of a run folder with model.json fields replaced (fold, pct, ...)."""
    shutil.copytree(source, target)
    model = read_json(target / "model.json")
    write_json(target / "model.json", {**model, **card})
    return target


def _labels(folder: Path) -> np.ndarray:
    return read_image(folder / "p.nii.gz")[0]


def test_folds_by_number_and_checkpoint_best_or_final(project, tmp_path, monkeypatch):
    """nnU-Net's `-d 995 -f 0 1` picks the dataset's finetune runs of those folds; `--checkpoint final` the
    last iteration's weights, in run folders and in model zips."""
    scans = tmp_path / "in"
    scans.mkdir()
    shutil.copy(project["scans"] / "patient-0000.nii.gz", scans / "p.nii.gz")
    results = tmp_path / "results" / "Dataset995_Bodies"
    fold0 = _copy_run(project["run_a"], results / "finetune__linear__none__pct100__fold0__seed0")
    fold1 = _copy_run(project["run_b"], results / "finetune__linear__none__pct100__fold1__seed1", fold=1)
    monkeypatch.setenv("THREEDINO_RESULTS", str(tmp_path / "results"))
    runner = CliRunner()

    def predict_cli(*args: str):
        return runner.invoke(app, ["predict", "-i", str(scans), "--no-progress", "--num-workers", "0", *args])

    assert predict.run(scans, tmp_path / "by_m", [fold0, fold1], num_workers=0) == 0
    result = predict_cli("-o", str(tmp_path / "by_f"), "-d", "995", "-f", "0", "1")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(_labels(tmp_path / "by_f"), _labels(tmp_path / "by_m"))
    sources = [m["source"] for m in read_json(tmp_path / "by_f" / "predict_args.json")["models"]]
    assert sources == [str(fold0.resolve()), str(fold1.resolve())]

    # a second run of fold 1 (other --pct): ambiguous, listed; --pct narrows; -f without -d is refused
    _copy_run(project["run_b"], results / "finetune__linear__none__pct50__fold1__seed1", fold=1, pct=50.0)
    ambiguous = predict_cli("-o", str(tmp_path / "ambiguous"), "-d", "995", "-f", "0", "1")
    assert ambiguous.exit_code != 0 and isinstance(ambiguous.exception, UserError)
    message = ambiguous.exception.render()
    assert "fold 1 has 2 finetune runs" in message and "finetune__linear__none__pct50__fold1__seed1" in message
    assert "--pct" in message and "-m" in message and not (tmp_path / "ambiguous").exists()
    narrowed = predict_cli("-o", str(tmp_path / "narrowed"), "-d", "995", "-f", "0", "1", "--pct", "100")
    assert narrowed.exit_code == 0, narrowed.output
    np.testing.assert_array_equal(_labels(tmp_path / "narrowed"), _labels(tmp_path / "by_m"))
    for args, text in ((("-f", "0"), "pass -d DATASET"), (("-d", "995", "-f", "3"), "no finetune run of fold 3"),
                       (("-d", "995"), "needs -f"), (("-m", str(fold0), "-f", "0"), "either -m")):
        refused = predict_cli("-o", str(tmp_path / "refused"), *args)
        assert refused.exit_code != 0 and text in refused.exception.render(), (args, refused.output)
    assert not (tmp_path / "refused").exists()

    # --checkpoint final: refused while the run has no checkpoint_final.pt, then its weights are used
    final = predict_cli("-o", str(tmp_path / "final"), "-m", str(fold0), "--checkpoint", "final")
    assert final.exit_code != 0 and "has no checkpoint_final.pt" in final.exception.render()
    assert "--checkpoint best" in final.exception.render() and not (tmp_path / "final").exists()
    shutil.copy(fold1 / "checkpoint_best.pt", fold0 / "checkpoint_final.pt")  # other weights than fold0's best
    assert predict.run(scans, tmp_path / "b", [fold1], num_workers=0) == 0
    final = predict_cli("-o", str(tmp_path / "final"), "-m", str(fold0), "--checkpoint", "final")
    assert final.exit_code == 0, final.output
    np.testing.assert_array_equal(_labels(tmp_path / "final"), _labels(tmp_path / "b"))
    args = read_json(tmp_path / "final" / "predict_args.json")
    assert args["options"]["checkpoint"] == "final"
    assert args["models"][0]["weights_sha256"] == read_json(tmp_path / "b" / "predict_args.json")["models"][0][
        "weights_sha256"]

    # the format of `export` follows the run: a finetune run -> a model zip, with the chosen weights
    zipped = tmp_path / "final.zip"
    result = runner.invoke(app, ["export", str(fold0), "-o", str(zipped), "--checkpoint", "final"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(zipped) as archive:
        assert sorted(archive.namelist()) == ["checkpoint_final.pt", "model.json"]
    best_of_zip = predict_cli("-o", str(tmp_path / "zip_best"), "-m", str(zipped))
    assert best_of_zip.exit_code != 0 and "holds no checkpoint_best.pt" in best_of_zip.exception.render()
    final_of_zip = predict_cli("-o", str(tmp_path / "zip_final"), "-m", str(zipped), "--checkpoint", "final")
    assert final_of_zip.exit_code == 0, final_of_zip.output
    np.testing.assert_array_equal(_labels(tmp_path / "zip_final"), _labels(tmp_path / "b"))
    # embed has no --checkpoint: it takes the weights the zip holds (here the final ones, = fold 1's best)
    for model, name in ((zipped, "zip.csv"), (fold1, "fold1.csv")):
        result = runner.invoke(app, ["embed", "-m", str(model), "-i", str(scans), "-o", str(tmp_path / name),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "zip.csv").read_text() == (tmp_path / "fold1.csv").read_text()


def test_export_chooses_the_format_from_the_run_and_refuses_contradictions(project, tmp_path):
    """`3dino export RUN -o model.zip` on a finetune run needs no --format; contradictions are refused (subprocess:
    exit code, message, nothing written)."""
    run = project["run_a"]
    plain = run_3dino("export", str(run), "-o", str(tmp_path / "model.zip"))
    assert plain.returncode == 0, plain.stderr
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        assert sorted(archive.namelist()) == ["checkpoint_best.pt", "model.json"]
    refused = run_3dino("export", str(run), "-o", str(tmp_path / "a.pth"))  # the real command: exit code, no traceback
    assert refused.returncode != 0 and "must end in .zip" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "a.pth").exists()
    for folder, args, text in ((run, (str(tmp_path / "b.zip"), "--format", "3dino"), "no DINO/iBOT teacher"),
                               (run, (str(tmp_path / "c.zip"), "--checkpoint", "last"), "unknown --checkpoint"),
                               (tmp_path, (str(tmp_path / "d.zip"),), "not a run folder (no model.json or run.json)")):
        refused = CliRunner().invoke(app, ["export", str(folder), "-o", *args])  # in-process: the same refusal
        assert isinstance(refused.exception, UserError) and text in refused.exception.render(), refused.output
        assert not Path(args[0]).exists()
    pretrain_run = tmp_path / "pretrain" / "small__995"  # the kind comes from run.json before any checkpoint is read
    pretrain_run.mkdir(parents=True)
    RunRecord(stage="pretrain", options={}).write(RunRecord.in_folder(pretrain_run))
    for args, text in ((("e.zip",), "not as a model zip, but the output name ends in .zip"),
                       (("f.pth", "--format", "zip"), "no model.json and head"),
                       (("g.pth", "--checkpoint", "final"), "--checkpoint chooses a finetune run's"),
                       (("h.pth",), "the pretrain run has no checkpoint yet")):  # h: the teacher format, chosen
        refused = CliRunner().invoke(app, ["export", str(pretrain_run), "-o", str(tmp_path / args[0]), *args[1:]])
        assert isinstance(refused.exception, UserError) and text in refused.exception.render(), refused.output
        assert not (tmp_path / args[0]).exists()
