"""Typed artifacts: every kind refuses a malformed file naming the file, the field and the command to rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from threedino_pipe.artifacts import (
    ARTIFACTS,
    BundledBackboneRecord,
    CaseProperties,
    CaseQc,
    DatasetJson,
    DemoRecord,
    DemoTimings,
    EmbedRecord,
    EvaluationSummary,
    Fingerprint,
    JournalLine,
    ModelCard,
    Plans,
    PredictArgs,
    PredictLogLine,
    ProbeValidation,
    RunRecord,
    SegmentationValidation,
    Splits,
    StudyCell,
    StudyKeys,
    StudyRecord,
    Subset,
    VisualizeRecord,
)
from threedino_pipe.artifacts.schema_docs import with_tables
from threedino_pipe.runtime.errors import UserError

VOLUME = {"scheme": "volume_percentile", "lower_pct": 0.05, "upper_pct": 99.95, "range": [-1, 1], "clip": True}
PRETRAIN = {"resample": False, "spacing": None, "normalization": [VOLUME], "crop": "foreground_after_normalization",
            "global_crop": 96, "local_crop": 48, "num_local_crops": 8, "min_axis": 24, "preset": "tiny",
            "batch_size": 4, "reasons": {"global_crop": "docs/method.md"}}
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
HEAD = {"schema_version": 1, "version": "0.1.0"}
STATS = {"p0.05": 1.0, "p0.5": 2.0, "p50": 5.0, "p99.5": 9.0, "p99.95": 9.5, "mean": 5.0, "std": 2.0, "min": 0.0,
         "max": 10.0}
FINGERPRINT = {"kind": "fingerprint", **HEAD, "dataset": "Dataset990_X", "task": "segmentation", "num_cases": 1,
               "cases": {"c0": {"spacing": [1.0, 1.0, 3.0], "shape": [64, 64, 20], "shape_after_crop": [60, 60, 20],
                                "orientation": "LPS", "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
                                "origin": [0.0, 0.0, 0.0]}},
               "channels": {"0": {"name": "CT", "modality_guess": "CT", "modality_reason": "channel name 'CT'",
                                  "foreground": STATS, "num_samples": 100}},
               "median_spacing": [1.0, 1.0, 3.0], "median_shape": [64.0, 64.0, 20.0], "cross_slice_axis": 2,
               "anisotropic": True}
CASE = {"kind": "case", **HEAD, "case_id": "c0", "configuration": "finetune",
        "source_files": ["imagesTr/c0_0000.nii.gz"],
        "original_geometry": {"size": [64, 64, 20], "spacing": [1.0, 1.0, 3.0], "origin": [0.0, 0.0, 0.0],
                              "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
        "transpose": [0, 1, 2], "crop_box": [[2, 62], [2, 62], [0, 20]], "shape_after_crop": [60, 60, 20],
        "spacing": [1.0, 1.0, 1.0], "shape": [60, 60, 60],
        "normalization": [{"scheme": "volume_percentile", "lower": -3.0, "upper": 900.0, "nan_replaced": 0}],
        "class_locations": {"1": [[30, 30, 30]]}, "class_label": None, "plans_checksum": "0123456789abcdef"}
SPLITS = {"kind": "splits", **HEAD, "seed": 12345, "test": [],
          "folds": [{"train": ["a", "b"], "val": ["c"], "subset_order": {"0": ["b", "a"]},
                     "subsets": {"0": {"50": ["b"], "100": ["a", "b"]}}}]}
SUBSET = {"kind": "subset", **HEAD, "dataset": "Dataset990_X", "fold": 0, "seed": 0, "pct": 50.0, "ids": ["b"],
          "val_ids": ["c"]}
SCORE = {"iteration": 10, "mean_dice": 0.5, "per_class": {"organ": 0.5}, "per_case": {"c": {"organ": 0.5}}}
SEG_VALIDATION = {"kind": "validation", **HEAD, "metric": "dice", "classes": ["organ"], "val_cases": ["c"],
                  "iterations_done": 10, "iters": 20, "finished": False, "best": SCORE, "latest": SCORE,
                  "history": [{"iteration": 10, "mean_dice": 0.5, "per_class": {"organ": 0.5}}]}
PROBE_VALIDATION = {"kind": "validation", **HEAD, "task": "classification", "head": "probe", "iteration": 100,
                    "num_cases": 4, "best": {"lr": 0.01, "layers": 4, "avgpool": True},
                    "metrics": {"auc": {"macro": 0.75}}, "selection": "highest macro AUC"}
IDENTITY = {"source": "/runs/a", "model_json_sha256": "ab" * 32, "weights_sha256": "cd" * 32,
            "dataset": "Dataset990_X", "task": "segmentation", "head": "unetr", "fold": 0, "pct": 25.0, "seed": 0}
PREDICT_ARGS = {"kind": "predict_args", **HEAD, "models": [IDENTITY], "input": "/scans", "output": "/out",
                "num_cases": 3, "world_size": 1,
                "options": {"overlap": 0.5, "tta": False, "window_batch_size": 1, "save_probabilities": False,
                            "precision": "fp32", "precision_requested": "auto", "device": "auto", "device_used": "cpu",
                            "num_workers": 1, "continue": False, "checkpoint": "best",
                            "output_formats": ["nifti", "dicom-seg"], "series_rules": ["MR=t1"], "min_slices": 10,
                            "qc": True, "qc_min_confidence": 0.7,
                            "keep_patient_names": False, "skip": True,
                            "coarse": False}}
CASE_QC = {"kind": "case_qc", **HEAD, "case_id": "39684a91631ceb9d", "weights_checksum": "cd" * 32,
           "spacing_mm": [0.8, 0.8, 3.0], "series_ranks": [2],
           "structures": [{"name": "organ", "label_values": [1], "voxels": 1000, "volume_ml": 1.92, "components": 2,
                           "border_share": 0.05, "mean_confidence": 0.91}], "thumbnail": "39684a91631ceb9d.png"}
PREDICT_LOG = {"kind": "predict_log_line", **HEAD, "case_id": "39684a91631ceb9d", "series_uids": {"CT": "1.2.3.4"},
               "series_fallbacks": [{"channel": "CT", "series_uid": "1.2.3.5", "rank": 2, "read_instead": "1.2.3.4",
                                     "reason": "study 1.2.3, series 1.2.3.5: cannot decode the pixel data"}],
               "files": {}, "models": [IDENTITY], "options": PREDICT_ARGS["options"],
               "started": "2026-12-06T18:00:00.000+00:00", "ended": "2026-12-06T18:00:09.500+00:00",
               "outcome": "predicted",
               "outputs": [{"file": "39684a91631ceb9d.nii.gz", "output_format": "nifti"},
                           {"file": "39684a91631ceb9d_seg.dcm", "output_format": "dicom-seg",
                            "sop_instance_uid": "2.25.1"}],
               "sends": [{"to": "PACS@127.0.0.1:4242", "sop_instance_uid": "2.25.1",
                          "time": "2026-12-06T18:00:10.000+00:00"}],
               "windows": {"total": 567, "skipped": 64, "skip_off": "", "coarse_windows": 70,
                           "coarse_skipped": 300, "coarse_off": ""}}
STUDY_KEYS = {"kind": "study_keys", **HEAD, "salt": "0123456789abcdef0123456789abcdef",
              "studies": {"39684a91631ceb9d": {"study_uid": "1.2.3"}}}
JOURNAL_LINE = {"kind": "journal_line", **HEAD, "t": "2026-12-06T20:01:02.345+00:00", "event": "predicted",
                "study": "39684a91631ceb9d", "cycle": 1, "outcome": "ok", "series_uids": {"0": "1.2.3.4"},
                "outputs": [{"kind": "dicom-seg", "file": "results/39684a91631ceb9d/39684a91631ceb9d_seg.dcm",
                             "sop": "2.25.1"}]}
SUMMARY = {"kind": "evaluation_summary", **HEAD, "mode": "evaluate", "task": "segmentation", "reference": "/ref",
           "prediction": "/pred", "dataset": None, "options": {"seed": 0, "num_bootstrap": 10, "confidence": 0.95},
           "labels": {"organ": [1]},
           "cases": {"reference": 2, "evaluated": 1, "missing": [],
                     "failed": [{"case_id": "b", "file": "/pred/b.nii.gz", "problem": "truncated"}], "ignored": []},
           "metrics": {"dice": {"organ": {"mean": 0.5, "median": 0.5, "ci95": [0.4, 0.6], "n": 1, "n_nan": 0}}},
           "mean_over_labels": {"dice": {"mean": 0.5, "median": 0.5, "ci95": [0.4, 0.6], "n": 1, "n_nan": 0,
                                         "ci_unreliable": True}},
           "files": {"per_case": "per_case.csv", "figures": ["metrics_per_label.png"], "report": "report.html"}}
RECIPE = {"configuration": "finetune", "transpose": [0, 1, 2], "resample": True, "spacing": [1.0, 1.0, 1.0],
          "normalization": [VOLUME], "crop": "nonzero", "image_interpolation": "bspline3",
          "label_interpolation": "linear_per_class", "label_values": [0, 1]}
SOURCE = {"kind": "backbone checkpoint", "source": "/runs/pretrain/backbone.pt", "sha256": "0123456789abcdef",
          "preset": "tiny"}
EMBED = {"kind": "embed_args", **HEAD, "model": SOURCE, "input": "/scans", "cases": 2, "layers": 4, "avgpool": True,
         "blocks": [8, 9, 10, 11], "channels": 1, "embed_dim": 192, "columns": 960, "configuration": "embed",
         "view_size": [96, 96, 96], "preprocessing": RECIPE, "transpose": [0, 1, 2], "device": "cpu"}
VISUALIZE = {"kind": "visualize_args", **HEAD, "model": SOURCE, "scan": "/scans/a.nii.gz", "channel": 0,
             "configuration": "embed", "preprocessing": RECIPE, "transpose": [0, 1, 2],
             "options": {"size": 192, "threshold": 0.0, "rgb_pca": "foreground", "per_head": False},
             "preprocessed_shape": [60, 60, 20], "network_input_shape": [192, 192, 64], "patch_grid": [12, 12, 4],
             "backbone": {"embed_dim": 192}, "pca": {"explained_variance_component1": 0.3,
                                                    "explained_variance_rgb": [0.2, 0.1, 0.05], "sign_flipped": False,
                                                    "border_mean_component1": -0.5, "foreground_patches": 100,
                                                    "patches": 576, "foreground_voxel_fraction": 0.2},
             "attention": {"heads": 3, "png_scale": [[0.5, 2.0]]}, "pngs": {"pca_rgb": "pca_rgb.png"},
             "niftis": {"attention": "attention.nii.gz"}, "device": "cpu", "seconds": 1.5}
DEMO = {"kind": "demo", **HEAD, "options": {"quick": True}}
TIMINGS = {"kind": "demo_timings", **HEAD, "quick": True, "cpu_count": 2, "load_average_start": [1.0, 1.0, 1.0],
           "stages": [{"stage": "plan", "command": "3dino plan -d 990", "seconds": 1.0}], "total_seconds": 1.0,
           "load_average_end": [1.0, 1.0, 1.0]}
BUNDLED = {"kind": "bundled_backbone", **HEAD, "file": "backbone_tiny_mni.pt", "sha256": "0" * 64,
           "commands": ["3dino pretrain -d 989 --iters 6000"], "pretraining_data": "48 MNI152 resamplings",
           "iterations": 6000, "wall_seconds": 3600.0, "machine": "x86_64, 2 cores", "made": "2026-12-06",
           "recipe_name": "auto", "deviations": {"peak_lr": "why"}, "final_signals": {"cls_rank": 9.0},
           "probe_curve": {"0": 0.8, "6000": 0.85}, "curves": "backbone_tiny_mni_curves.png"}
CELL_SPEC = {"cell": "none__pct50__fold0__seed0", "entry": "none", "label": "none", "backbone": "none", "head": None,
             "pct": 50.0, "seed": 0, "fold": 0}
STUDY = {"kind": "study", **HEAD, "dataset": "Dataset990_X", "name": "main", "options": {"iters": 2},
         "reference": "none", "task": "segmentation", "test_source": "splits_test", "selection_biased": False,
         "test_cases": ["c7"],
         "cells": [CELL_SPEC]}
STUDY_CELL = {"kind": "study_cell", **HEAD, "spec": CELL_SPEC, "outcome": "failed", "run_folder": None,
              "wall_seconds": 1.5, "error": "backbone.pt: not a checkpoint", "commands": ["3dino finetune -d 990"]}
# (class, a valid file, a required field, (path to a field, a value of the wrong type)); writer from the class
KINDS = [
    (Plans, PLANS, "task", (["configurations", "finetune", "patch_size"], "64x64x64")),
    (ModelCard, MODEL, "task", (["num_outputs"], "two")),
    (RunRecord, RUN, "options", (["volatile"], 3)),
    (Fingerprint, FINGERPRINT, "cases", (["channels", "0", "foreground", "p0.5"], "low")),
    (CaseProperties, CASE, "plans_checksum", (["crop_box"], [[0, 1]])),
    (Splits, SPLITS, "folds", (["folds", 0, "train"], "a,b")),
    (Subset, SUBSET, "ids", (["pct"], "half")),
    (SegmentationValidation, SEG_VALIDATION, "iters", (["best", "mean_dice"], "good")),
    (ProbeValidation, PROBE_VALIDATION, "metrics", (["best", "layers"], "four")),
    (PredictArgs, PREDICT_ARGS, "models", (["options", "continue"], "maybe")),
    (StudyKeys, STUDY_KEYS, "salt", (["studies", "39684a91631ceb9d", "study_uid"], 3)),
    (JournalLine, JOURNAL_LINE, "event", (["outputs", 0, "sop"], 3)),
    (CaseQc, CASE_QC, "structures", (["structures", 0, "voxels"], "many")),
    (PredictLogLine, PREDICT_LOG, "outcome", (["outputs", 1, "sop_instance_uid"], ["2.25.1"])),
    (EvaluationSummary, SUMMARY, "cases", (["cases", "failed", 0, "file"], 3)),
    (EmbedRecord, EMBED, "model", (["preprocessing", "resample"], "sometimes")),
    (VisualizeRecord, VISUALIZE, "pca", (["pca", "patches"], "many")),
    (DemoRecord, DEMO, "options", (["options"], ["quick"])),
    (DemoTimings, TIMINGS, "quick", (["stages", 0, "seconds"], "long")),
    (BundledBackboneRecord, BUNDLED, "sha256", (["iterations"], "many")),
    (StudyRecord, STUDY, "cells", (["cells", 0, "pct"], "half")),
    (StudyCell, STUDY_CELL, "outcome", (["spec", "seed"], "first")),
]
IDS = [k[0].__name__ for k in KINDS]

def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_every_artifact_kind_is_tested():
    assert {k[0] for k in KINDS} | {DatasetJson} == set(ARTIFACTS)


@pytest.mark.parametrize(("cls", "good", "required", "wrong"), KINDS, ids=IDS)
def test_valid_artifact_round_trips(tmp_path, cls, good, required, wrong):
    artifact = cls.read(_write(tmp_path / "a.json", good))
    artifact.write(tmp_path / "b.json")
    again = json.loads((tmp_path / "b.json").read_text())
    expected = json.loads(json.dumps(good))
    if cls is ModelCard:
        expected["backbone"]["family"] = "vit3d"  # the default of a field added for backbone families
        expected["backbone"]["method"] = None  # added with pretraining methods: unknown in older cards
    assert again == expected
    assert cls.read(tmp_path / "b.json") == artifact


@pytest.mark.parametrize(("cls", "good", "required", "wrong"), KINDS, ids=IDS)
def test_missing_field_wrong_type_and_future_version_name_file_and_field(tmp_path, cls, good, required, wrong):
    writer = cls.WRITER.split(" -d")[0]
    missing = {k: v for k, v in good.items() if k != required}
    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "missing.json", missing))
    assert err.value.file.endswith("missing.json") and f"`{required}` is missing" in err.value.problem
    assert writer in err.value.fix

    path, value = wrong
    bad = json.loads(json.dumps(good))
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "wrong.json", bad))
    where = ".".join(str(p) for p in path)
    assert f"`{where}` is invalid" in err.value.problem and err.value.file.endswith("wrong.json")
    assert writer in err.value.fix

    with pytest.raises(UserError) as err:
        cls.read(_write(tmp_path / "future.json", {**good, "schema_version": 7}))
    assert "schema_version 7" in err.value.problem and "newer threedino-pipe" in err.value.problem
    assert err.value.file.endswith("future.json") and "update threedino-pipe" in err.value.fix
    with pytest.raises(UserError, match="not a"):
        cls.read(_write(tmp_path / "other.json", {**good, "kind": "something_else"}))


@pytest.mark.parametrize(("content", "field"), [
    ({"labels": {"background": 0}, "file_ending": ".nii.gz"}, "'channel_names' is missing"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0}}, "'file_ending' is missing"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz", "numTraining": "3"},
     "'numTraining' is invalid"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1.5}, "file_ending": ".nii.gz"},
     "'labels.organ' is invalid"),
])
def test_malformed_dataset_json_names_the_file_and_the_field(tmp_path, content, field):
    """dataset.json has no schema version (nnU-Net's format); its fix says how to write the field."""
    _write(tmp_path / "dataset.json", content)
    with pytest.raises(UserError) as err:
        DatasetJson.read(tmp_path)
    assert err.value.file.endswith("dataset.json") and field in err.value.problem and err.value.fix


def test_dataset_json_keeps_nnunet_fields_and_writes_nnunet_names(tmp_path):
    content = {"name": "Liver", "description": "CT", "modality": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
               "numTraining": 3, "file_ending": ".nii.gz", "licence": "CC-BY"}
    spec = DatasetJson.read(_write(tmp_path / "dataset.json", content).parent)
    assert spec.channel_names == {0: "CT"} and spec.num_training == 3 and spec.task == "segmentation"
    spec.write(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["numTraining"] == 3 and again["channel_names"] == {"0": "CT"} and again["licence"] == "CC-BY"


def test_schema_docs_field_tables_are_generated_from_the_models():
    """docs/schemas.md's field tables equal the generated ones (rerun
    `python -m threedino_pipe.artifacts.schema_docs docs/schemas.md` after changing a model)."""
    text = (REPO / "docs" / "schemas.md").read_text()
    assert with_tables(text) == text
    assert "| `patch_size` | list[int] | required, 3 values |" in text


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


def test_predict_log_lines_are_appended_whole_and_read_back(tmp_path):
    path = tmp_path / "predict_log.jsonl"
    line = PredictLogLine.model_validate(PREDICT_LOG)
    line.append(path)
    failed = line.model_copy(update={"case_id": "other", "outcome": "failed", "error": "no usable MR series",
                                     "outputs": []})
    failed.append(path)
    with path.open("a") as fh:
        fh.write('{"kind": "predict_log_line", "case": "cut sh')  # a crash inside a write: never whole
    assert [(x.case_id, x.outcome) for x in PredictLogLine.read_lines(path)] == [("39684a91631ceb9d", "predicted"),
                                                                               ("other", "failed")]
    line.append(path)  # starts on a line of its own after the cut one
    text = path.read_text().splitlines()
    assert len(text) == 4 and text[2].endswith("cut sh") and text[3].startswith('{"kind":"predict_log_line"')
    with pytest.raises(UserError, match="line 3 is not JSON"):
        PredictLogLine.read_lines(path)
    for rank in range(2):
        line.append(PredictLogLine.rank_part(tmp_path / "ranks", rank, 2))
    assert PredictLogLine.merge_parts(tmp_path / "ranks", 2) == 2
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["predict_log.jsonl"]


@pytest.mark.parametrize(("rules", "message"), [
    ({"CT": "soft(|std"}, "'series_rules' of channel 'CT': the pattern 'soft(|std' does not compile"),
    ({"T2": "t2"}, "'series_rules' names channel 'T2', which 'channel_names' does not have"),
])
def test_series_rules_of_dataset_json_are_checked(tmp_path, rules, message):
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
            "series_rules": rules}
    _write(tmp_path / "dataset.json", spec)
    with pytest.raises(UserError) as err:
        DatasetJson.read(tmp_path)
    assert message in err.value.problem and err.value.file.endswith("dataset.json")
    assert '"series_rules": {"CT": "soft|std"}' in err.value.fix
    spec["series_rules"] = {"0": "soft|std"}  # a channel by its index is fine too
    _write(tmp_path / "dataset.json", spec)
    assert DatasetJson.read(tmp_path).series_rules == {"0": "soft|std"}
    model = {**MODEL, "series_rules": rules}
    with pytest.raises(UserError) as err:
        ModelCard.read(_write(tmp_path / "model.json", model))
    assert message in err.value.problem and err.value.file.endswith("model.json")
