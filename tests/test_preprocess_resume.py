"""A `3dino preprocess` killed mid-run (SIGKILL) and rerun gives byte-identical files to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import THREEDINO, run_3dino

pytestmark = pytest.mark.e2e

VOLUME = {"scheme": "volume_percentile", "lower_pct": 0.05, "upper_pct": 99.95, "range": [-1, 1], "clip": True}


def mni_plans(name: str) -> dict:
    """plans.json per docs/schemas.md for the MNI example dataset (pretrain + finetune)."""
    finetune_norm = {"scheme": "volume_percentile", "lower_pct": 0.5, "upper_pct": 99.5, "range": [-1, 1],
                     "clip": True}
    return {
        "kind": "plans", "schema_version": 1, "version": "0.1.0", "dataset": name, "task": "segmentation",
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
        "regions_class_order": None, "class_names": [], "memory_target_gb": 8.0, "options": {},
        "transpose": [0, 1, 2], "decisions": {},
        "configurations": {
            "pretrain": {"resample": False, "spacing": None, "normalization": [VOLUME],
                         "crop": "foreground_after_normalization", "global_crop": 96, "local_crop": 48,
                         "num_local_crops": 8, "min_axis": 24, "preset": "tiny", "batch_size": 2, "reasons": {}},
            "finetune": {"resample": True, "spacing": [2.5, 2.5, 3.0], "normalization": [finetune_norm],
                         "crop": "nonzero", "image_interpolation": "bspline3",
                         "label_interpolation": "linear_per_class", "patch_size": [64, 64, 64], "batch_size": 2,
                         "preset": "tiny", "median_shape": [64, 64, 64], "reasons": {}},
        },
    }


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the lock files beside the dataset folder (docs/cli.md, one command per target)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".3dino." not in p.name}


def case_jsons(folder: Path, partial: bool = False) -> list[Path]:
    """Case JSONs under their final names (and temporary ones being written, with ``partial``)."""
    found = [p for cfg in ("pretrain", "finetune") for p in (folder / cfg).glob("*.json")]
    return [p for p in found if partial or ".partial" not in p.name]


def test_kill_and_rerun_is_byte_identical_to_uninterrupted_run(mni_raw, tmp_path):
    raw = next(mni_raw.glob("Dataset990_*"))
    outs = {}
    for name in ("reference", "killed"):
        outs[name] = tmp_path / name
        (outs[name] / raw.name).mkdir(parents=True)
        (outs[name] / raw.name / "plans.json").write_text(json.dumps(mni_plans(raw.name), indent=2))
    env = {"THREEDINO_RAW": str(mni_raw), "THREEDINO_RESULTS": str(tmp_path / "results")}

    result = run_3dino("preprocess", "-d", "990", "-np", "1", env={**env, "THREEDINO_PREPROCESSED":
                                                                   str(outs["reference"])})
    assert result.returncode == 0, result.stderr
    reference = files(outs["reference"])
    assert len([k for k in reference if k.endswith(".json") and "/" in k and k.count("/") == 2]) == 16

    killed = outs["killed"] / raw.name
    proc = subprocess.Popen([*THREEDINO, "preprocess", "-d", "990", "-np", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, **env, "THREEDINO_PREPROCESSED": str(outs["killed"])})
    deadline = time.monotonic() + 120
    while not case_jsons(killed, partial=True) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    partial = files(outs["killed"])
    assert len(case_jsons(killed)) < 16, "the kill did not interrupt the run"
    assert "Dataset990_MNITissue/splits.json" not in partial
    for name, data in partial.items():  # whatever has its final name is complete
        if ".partial" not in name:
            assert data == reference[name], name

    result = run_3dino("preprocess", "-d", "990", "-np", "2", env={**env, "THREEDINO_PREPROCESSED":
                                                                   str(outs["killed"])})
    assert result.returncode == 0, result.stderr
    resumed = files(outs["killed"])
    assert not [name for name in resumed if ".partial" in name or Path(name).name.startswith(".")]
    assert sorted(resumed) == sorted(reference)
    for name in reference:
        assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run"
