"""One predictor: finetune's validation scores the labels ``3dino predict`` writes for the same case and weights.

A generated dataset whose cases all have the planned spacing, so a case needs no resampling:
the preprocessed grid is the input grid (cropped), and ``predict``'s label image restricted to the
crop box must equal, voxel for voxel, the label map validation scored (same overlap, fp32), and
``validation.json``'s Dice must be the Dice of that label image against the case's label file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import finetune_briefly, run_3dino

from threedino_pipe.artifacts import CaseProperties, ModelCard, RunRecord, SegmentationValidation
from threedino_pipe.demo.examples import build_synthetic_dataset
from threedino_pipe.evaluation.segmentation_metrics import dice
from threedino_pipe.inference.air_windows import AirRule
from threedino_pipe.models.segmentation import build_segmentation_model
from threedino_pipe.preprocessing.arrays import open_array
from threedino_pipe.raw_data.image_io import read_image
from threedino_pipe.training.segmentation_trainer import SegRunConfig, case_labels

pytestmark = pytest.mark.e2e
DATASET = "Dataset993_Ellipsoids"


def test_validation_scores_the_labels_predict_writes(tmp_path):
    raw = tmp_path / "raw"
    build_synthetic_dataset(raw, 993, 6, shape=(56, 56, 16), spacing=(0.8, 0.8, 3.0), seed=3)
    env = {"THREEDINO_RAW": str(raw), "THREEDINO_PREPROCESSED": str(tmp_path / "pre"),
           "THREEDINO_RESULTS": str(tmp_path / "results")}
    # 32-voxel windows over 56 voxels: starts 0, 16, 24 at overlap 0.5 (0 and 24 at overlap 0), so the overlap counts
    finetune_briefly(993, env, patch="32,32,16", iters=8, batch_size=1, lr=0.001)
    run = tmp_path / "results" / DATASET / "finetune__unetr__none__pct100__fold0__seed0"
    validation = SegmentationValidation.read(SegmentationValidation.in_folder(run))
    case = sorted(validation.best.per_case)[0]
    finetune = tmp_path / "pre" / DATASET / "finetune"
    properties = CaseProperties.read(CaseProperties.path(finetune, case))
    assert properties.shape == properties.shape_after_crop and properties.transpose == [0, 1, 2]
    assert properties.spacing == pytest.approx(properties.original_spacing_transposed())  # no resampling

    out = tmp_path / "predicted"
    done = run_3dino("predict", "-i", str(raw / DATASET / "imagesTr" / f"{case}_0000.nii.gz"), "-o", str(out),
                     "-m", str(run), "--precision", "fp32", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    written = read_image(out / f"{case}.nii.gz")[0]

    card = ModelCard.read(ModelCard.in_folder(run))
    network = build_segmentation_model(**card.model_args)
    network.load_state_dict(torch.load(run / card.weights, weights_only=True)["model"])
    options = RunRecord.read(RunRecord.in_folder(run)).options
    config = SegRunConfig(**{k: v for k, v in options.items() if k in SegRunConfig.__dataclass_fields__})
    scored = case_labels(network.eval(), open_array(finetune / f"{case}.b2nd")[:], config, card.output_values(),
                         torch.device("cpu"), AirRule.of(properties))
    box = tuple(slice(lo, hi) for lo, hi in properties.crop_box)
    np.testing.assert_array_equal(written[box], scored)
    outside = np.ones(written.shape, bool)
    outside[box] = False
    assert not written[outside].any()
    assert len(np.unique(scored)) >= 2, "a constant label map would make the comparison weak"

    reference = read_image(raw / DATASET / "labelsTr" / f"{case}.nii.gz")[0]
    for name, value in (("body", 1), ("lesion", 2)):
        assert validation.best.per_case[case][name] == pytest.approx(dice(reference == value, written == value),
                                                                     abs=1e-6), name
