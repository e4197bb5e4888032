"""Typed artifacts: every kind refuses a malformed file naming the file, the field and the command to rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threedino_pipe.artifacts import ModelCard, Plans, RunRecord
from threedino_pipe.runtime.errors import UserError

VOLUME = {"scheme": "volume_percentile", "lower_pct": 0.05, "upper_pct": 99.95, "range": [-1, 1], "clip": True}
PRETRAIN = {"resample": False, "spacing": None, "normalization": [VOLUME], "crop": "foreground_after_normalization",
            "global_crop": 96, "local_crop": 48, "num_local_crops": 8, "min_axis": 24, "preset": "tiny",
            "batch_size": 4, "reasons": {"global_crop": "METHOD"}}
FINETUNE = {"resample": True, "spacing": [1.0, 1.0, 1.0],
            "normalization": [{"scheme": "dataset_percentile", "lower": -1000.0, "upper": 1500.0, "lower_pct": 0.5,
                               "upper_pct": 99.5, "range": [-1, 1], "clip": True}],
            "crop": "nonzero", "image_interpolation": "bspline3", "label_interpolation": "linear_per_class",
            "patch_size": [64, 64, 64], "batch_size": 2, "preset": "tiny", "median_shape": [64, 64, 64],
            "reasons": {"patch_size": "112^3 clipped"}}
PLANS = {"kind": "plans", "schema_version": 1, "version": "0.1.0", "dataset": "Dataset990_X", "task": "segmentation",
         "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "regions_class_order": None,
         "class_names": [], "memory_target_gb": 8.0, "options": {}, "transpose": [0, 1, 2],
         "decisions": {"transpose": "isotropic"},
         "configurations": {"pretrain": PRETRAIN, "pretrain_highres": {**PRETRAIN, "global_crop": 112},
                            "finetune": FINETUNE}}
MODEL = {"kind": "model", "schema_version": 1, "version": "0.1.0", "task": "segmentation", "dataset": "Dataset990_X",
         "plans": PLANS, "configuration": "finetune", "channel_names": {"0": "CT"},
         "labels": {"background": 0, "organ": 1}, "regions_class_order": None, "class_names": [], "head": "unetr",
         "model_args": {"head": "unetr"}, "backbone": {"tag": "none", "source": "none", "sha256": None,
                                                       "frozen": False, "preset": None},
         "in_channels": 1, "num_outputs": 2, "output": "softmax", "patch_size": [64, 64, 64],
         "weights": "checkpoint_best.pt", "fold": 0, "pct": 25.0, "seed": 0, "best_iteration": 10,
         "best_metric": {"name": "dice", "value": 0.5}}
RUN = {"kind": "run", "schema_version": 1, "version": "0.1.0", "stage": "pretrain", "options": {"iters": 10},
       "volatile": ["num_workers"], "plans": {"Dataset990_X": {"patch_size": [64, 64, 64]}}, "decisions": {}}
KINDS = [(Plans, PLANS, "3dino plan"), (ModelCard, MODEL, "3dino finetune"), (RunRecord, RUN, "the training command")]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("cls", "good", "writer"), KINDS, ids=[k[0].__name__ for k in KINDS])
def test_valid_artifact_round_trips_byte_for_byte(tmp_path, cls, good, writer):
    artifact = cls.read(_write(tmp_path / "a.json", good))
    artifact.write(tmp_path / "b.json")
    again = json.loads((tmp_path / "b.json").read_text())
    expected = json.loads(json.dumps(good))
    if cls is ModelCard:
        expected["backbone"]["family"] = "vit3d"  # the default of a field added for backbone families
    assert again == expected


@pytest.mark.parametrize(("cls", "good", "writer"), KINDS, ids=[k[0].__name__ for k in KINDS])
def test_missing_field_wrong_type_and_future_version_name_file_and_field(tmp_path, cls, good, writer):
    missing = {k: v for k, v in good.items() if k != "options" and k != "task"}
    field = "options" if "options" in good else "task"
    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "missing.json", missing))
    assert err.value.file.endswith("missing.json") and f"`{field}` is missing" in err.value.problem
    assert writer in err.value.fix

    wrong = json.loads(json.dumps(good))
    if cls is Plans:
        wrong["configurations"]["finetune"]["patch_size"] = "64x64x64"
        where = "configurations.finetune.patch_size"
    elif cls is ModelCard:
        wrong["num_outputs"] = "two"
        where = "num_outputs"
    else:
        wrong["volatile"] = 3
        where = "volatile"
    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "wrong.json", wrong))
    assert f"`{where}` is invalid" in err.value.problem and err.value.file.endswith("wrong.json")

    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "future.json", {**good, "schema_version": 7}))
    assert "schema_version 7" in err.value.problem and "newer threedino-pipe" in err.value.problem
    with pytest.raises(UserError, match="not a"):
        cls.read(_write(tmp_path / "other.json", {**good, "kind": "splits"}))


def test_model_card_outputs_must_agree_with_labels(tmp_path):
    with pytest.raises(UserError, match="num_outputs 3 but labels declare 2"):
        ModelCard.read(_write(tmp_path / "model.json", {**MODEL, "num_outputs": 3}))


def test_plans_dependencies_leave_out_reasons_and_checksum_tracks_stored_fields():
    plans = Plans.model_validate(PLANS)
    edited = json.loads(json.dumps(PLANS))
    edited["configurations"]["finetune"]["reasons"]["patch_size"] = "edited by hand"
    edited["decisions"]["transpose"] = "edited too"
    edited = Plans.model_validate(edited)
    assert plans.dependencies("finetune") == edited.dependencies("finetune")
    assert plans.stored_checksum("finetune") == edited.stored_checksum("finetune")
    assert "reasons" not in plans.dependencies("finetune")
    batch = json.loads(json.dumps(PLANS))
    batch["configurations"]["finetune"]["batch_size"] = 8  # a training option, not stored bytes
    assert Plans.model_validate(batch).stored_checksum("finetune") == plans.stored_checksum("finetune")
    spacing = json.loads(json.dumps(PLANS))
    spacing["configurations"]["finetune"]["spacing"] = [2.0, 1.0, 1.0]
    assert Plans.model_validate(spacing).stored_checksum("finetune") != plans.stored_checksum("finetune")
