"""Multi-crop views, MONAI augmentation pipelines and the pooled pretraining loader on real blosc2 files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch
from monai.transforms import (
    OneOf,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSharpen,
    RandGaussianSmooth,
    RandGibbsNoise,
    RandHistogramShift,
    RandRotate90,
)

from threedino_pipe.runtime.errors import UserError
from threedino_pipe.training_data.augmentations import global_transform_1, global_transform_2, local_transform
from threedino_pipe.training_data.crops import crop_and_resize
from threedino_pipe.training_data.multicrop import MultiCropper
from threedino_pipe.training_data.pretrain_loader import PretrainDataset, make_pretrain_loader


def write_case(config_dir: Path, case_id: str, array: np.ndarray, configuration: str = "pretrain",
               spacing=(1.0, 1.0, 2.5)) -> None:
    """A preprocessed case as `preprocess` writes it: `<case>.b2nd` (C x X x Y x Z float32) + `<case>.json`."""
    config_dir.mkdir(parents=True, exist_ok=True)
    shape = list(array.shape[1:])
    blosc2.asarray(np.ascontiguousarray(array, dtype=np.float32), urlpath=str(config_dir / f"{case_id}.b2nd"),
                   mode="w", chunks=(1, *[min(s, 16) for s in shape]), blocks=(1, *[min(s, 8) for s in shape]))
    meta = {"kind": "case", "schema_version": 1, "version": "0.1.0", "case_id": case_id,
            "configuration": configuration, "source_files": [f"imagesTr/{case_id}_0000.nii.gz"],
            "original_geometry": {"size": shape, "spacing": list(spacing), "origin": [0.0, 0.0, 0.0],
                                  "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
            "transpose": [0, 1, 2], "crop_box": [[0, s] for s in shape], "shape_after_crop": shape,
            "spacing": list(spacing), "shape": shape,
            "normalization": [{"scheme": "volume_percentile", "lower": 0.0, "upper": 1.0, "nan_replaced": 0}
                              for _ in range(array.shape[0])],
            "class_locations": {}, "class_label": None, "plans_checksum": "0" * 16}
    (config_dir / f"{case_id}.json").write_text(json.dumps(meta))


@pytest.fixture
def pooled(tmp_path) -> list[Path]:
    """Two preprocessed datasets; each case is constant (value = a per-case code) so crops are traceable.

    Dataset801: 3 kept cases + 1 with a 20-voxel axis; Dataset802: 1 kept two-channel case + 1 too small.
    """
    a, b = tmp_path / "Dataset801_A", tmp_path / "Dataset802_B"
    write_case(a / "pretrain", "a0", np.full((1, 32, 30, 25), 0.1))
    write_case(a / "pretrain", "a1", np.full((1, 28, 32, 26), 0.2))
    write_case(a / "pretrain", "a2", np.full((1, 40, 36, 25), 0.3))
    write_case(a / "pretrain", "a_small", np.full((1, 40, 40, 20), 0.9))
    write_case(b / "pretrain", "b0", np.stack([np.full((30, 30, 28), 0.4), np.full((30, 30, 28), 0.5)]))
    write_case(b / "pretrain", "b_small", np.full((1, 23, 50, 50), 0.9))
    return [a, b]


CODES = {"Dataset801_A/a0": 0.1, "Dataset801_A/a1": 0.2, "Dataset801_A/a2": 0.3,
         "Dataset802_B/b0:c0": 0.4, "Dataset802_B/b0:c1": 0.5}


# ---------------------------------------------------------------- augmentations and multi-crop


def _probs(compose) -> list:
    return [(type(t).__name__, t.prob if hasattr(t, "prob") else None) for t in compose.transforms]


def test_augmentation_pipelines_follow_the_method():
    for compose in (global_transform_1(), global_transform_2(), local_transform()):
        ts = compose.transforms
        assert [type(t) for t in ts[:6]] == [RandFlip] * 3 + [RandRotate90] * 3
        assert [t.prob for t in ts[:6]] == [0.3] * 6
        assert [t.flipper.spatial_axis for t in ts[:3]] == [0, 1, 2]
        assert [t.spatial_axes for t in ts[3:6]] == [(0, 1), (0, 2), (1, 2)]
        intensity = ts[6]
        assert isinstance(intensity, OneOf)
        assert [type(t) for t in intensity.transforms] == [RandAdjustContrast, RandGaussianNoise, RandHistogramShift]
        assert [t.prob for t in intensity.transforms] == [0.8] * 3
        assert intensity.transforms[0].gamma == (0.5, 2.0) and intensity.transforms[1].std == 0.002
    g1, g2, loc = global_transform_1().transforms, global_transform_2().transforms, local_transform().transforms
    assert [(type(t), t.prob) for t in g1[7].transforms] == [(RandGaussianSmooth, 1.0), (RandGaussianSharpen, 1.0)]
    assert [(type(t), t.prob) for t in g2[7].transforms] == [(RandGaussianSmooth, 0.1), (RandGaussianSharpen, 0.1)]
    assert type(g2[8]) is RandGibbsNoise and g2[8].prob == 0.2 and len(g2) == 9 and len(g1) == 8
    assert type(loc[7]) is RandGaussianSmooth and loc[7].prob == 0.5 and len(loc) == 8


def test_augmentations_are_seeded_and_change_the_crop():
    x = torch.linspace(-1, 1, 24 ** 3).reshape(1, 24, 24, 24)
    outs = []
    for seed in (3, 3, 4):
        t = global_transform_1()
        t.set_random_state(seed=seed)
        outs.append(torch.as_tensor(t(x.clone())))
    assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], x)  # blur or sharpen is always applied to the first global crop


def test_intensity_prob_sets_the_intensity_step_of_both_implementations():
    """``--intensity-prob``: the MONAI members' probability; 0 leaves intensities untouched in MONAI and torch."""
    from threedino_pipe.training_data.augment_params import AugmentParams
    from threedino_pipe.training_data.torch_augmentations import intensity

    for make in (global_transform_1, global_transform_2, local_transform):
        assert [t.prob for t in make(0.25).transforms[6].transforms] == [0.25] * 3
    x = torch.linspace(-1, 1, 16 ** 3).reshape(1, 16, 16, 16)
    changed = 0
    for seed in range(12):
        kept, drawn = make_step(0.0, seed), make_step(1.0, seed)
        assert torch.equal(torch.as_tensor(kept(x.clone())), x)
        changed += not torch.equal(torch.as_tensor(drawn(x.clone())), x)
    assert changed >= 10  # p 1: every crop changes (but a histogram shift that happens to draw ~identity)
    batch = torch.rand(6, 1, 8, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(intensity(batch.clone(), g, AugmentParams(intensity_prob=0.0)), batch)
    assert not torch.equal(intensity(batch.clone(), g, AugmentParams(intensity_prob=1.0)), batch)
    cropper = MultiCropper(global_size=12, local_size=8, n_local=2, intensity_prob=0.0)
    assert [t.prob for t in cropper.transforms[2].transforms[6].transforms] == [0.0] * 3


def make_step(prob: float, seed: int):
    """The intensity step alone (the OneOf of the pipelines), seeded."""
    step = local_transform(prob).transforms[6]
    step.set_random_state(seed=seed)
    return step


def test_multicropper_shapes_determinism_and_boxes():
    volume = torch.rand(2, 40, 36, 20) * 2 - 1
    cropper = MultiCropper(global_size=24, local_size=12, n_local=3)
    views = cropper(volume, np.random.default_rng(5))
    assert views["global"].shape == (2, 2, 24, 24, 24) and views["local"].shape == (3, 2, 12, 12, 12)
    assert views["global"].dtype == torch.float32 and type(views["global"]) is torch.Tensor
    again = cropper(volume, np.random.default_rng(5))
    other = cropper(volume, np.random.default_rng(6))
    assert all(torch.equal(views[k], again[k]) for k in views)
    assert not torch.equal(views["global"], other["global"])
    # without augmentation the views are exactly the resized boxes drawn from the same generator
    plain = MultiCropper(global_size=24, local_size=12, n_local=3, augment=False)
    views = plain(volume, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    expected = [crop_and_resize(volume, plain.global_crop.draw(volume.shape[1:], rng), 24) for _ in range(2)]
    expected_local = [crop_and_resize(volume, plain.local_crop.draw(volume.shape[1:], rng), 12) for _ in range(3)]
    assert torch.equal(views["global"], torch.stack(expected))
    assert torch.equal(views["local"], torch.stack(expected_local))


# ---------------------------------------------------------------- pooled dataset


def test_dataset_pools_datasets_splits_channels_and_skips_small_volumes(pooled, caplog):
    with caplog.at_level(logging.INFO, logger="threedino_pipe.training_data.pretrain_loader"):
        ds = PretrainDataset(pooled, "pretrain", min_axis=24)
    assert sorted(item.name for item in ds.items) == sorted(CODES)
    assert sorted((d, c) for d, c, _ in ds.skipped) == [("Dataset801_A", "a_small"), ("Dataset802_B", "b_small")]
    assert "Dataset801_A/pretrain: 3 volumes kept, 1 skipped" in caplog.text
    assert "Dataset802_B/pretrain: 1 volumes kept, 1 skipped" in caplog.text
    assert ds.channels == 1 and len(ds) == 5
    item = next(i for i in ds.items if i.name == "Dataset802_B/b0:c1")
    assert item.shape == (30, 30, 28) and item.spacing == (1.0, 1.0, 2.5)
    assert ds.open(ds.items.index(item))[:, 0:2, 0:2, 0:2].shape == (1, 2, 2, 2)
    assert float(ds.open(ds.items.index(item))[:, 0:2, 0:2, 0:2].mean()) == pytest.approx(0.5)
    # a lower threshold keeps everything; a higher one keeps less
    assert len(PretrainDataset(pooled, min_axis=19)) == 7
    assert len(PretrainDataset(pooled, min_axis=25)) == 3  # a1 (26) and b0's two channels (28)


def test_dataset_errors_name_the_file_and_the_fix(pooled, tmp_path):
    with pytest.raises(UserError, match="different channel counts"):
        PretrainDataset(pooled, split_channels=False)
    with pytest.raises(UserError, match="no volume left") as err:
        PretrainDataset(pooled, min_axis=64)
    assert "min_axis" in str(err.value)
    with pytest.raises(UserError, match="3dino preprocess -d 801 -c pretrain_highres"):
        PretrainDataset(pooled, "pretrain_highres")
    (pooled[0] / "pretrain" / "a1.json").unlink()
    with pytest.raises(UserError, match="a1.json") as err:
        PretrainDataset(pooled)
    assert "3dino preprocess -d 801" in str(err.value)
    broken = tmp_path / "Dataset803_C"
    write_case(broken / "pretrain", "c0", np.zeros((1, 30, 30, 30)))
    meta = broken / "pretrain" / "c0.json"
    meta.write_text(meta.read_text().replace('"shape": [30, 30, 30]', '"shape": [30, 30, 31]'))
    with pytest.raises(UserError, match="does not match the case metadata"):
        PretrainDataset([broken])


# ---------------------------------------------------------------- loader


def _take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return (a["case_ids"] == b["case_ids"] and torch.equal(a["global_crops"], b["global_crops"])
            and torch.equal(a["local_crops"], b["local_crops"]))


def test_loader_shapes_and_crop_major_order(pooled):
    ds = PretrainDataset(pooled)
    loader = make_pretrain_loader(ds, batch_size=3, num_workers=0, seed=1, global_size=16, local_size=8,
                                  n_local=2, augment=False)
    for batch in _take(loader, 3):
        assert batch["global_crops"].shape == (6, 1, 16, 16, 16) and batch["global_crops"].dtype == torch.float32
        assert batch["local_crops"].shape == (6, 1, 8, 8, 8) and len(batch["case_ids"]) == 3
        assert len(set(batch["case_ids"])) == 3  # no repeats within a batch while there are enough samples
        codes = torch.tensor([CODES[c] for c in batch["case_ids"]])
        # row k*B + b is crop k of image b (constant volumes: every voxel carries the image's code)
        assert torch.allclose(batch["global_crops"].amax(dim=(1, 2, 3, 4)), codes.repeat(2))
        assert torch.allclose(batch["local_crops"].amin(dim=(1, 2, 3, 4)), codes.repeat(2))
    assert loader.state_dict()["batches_drawn"] == 3


def test_loader_is_deterministic_and_resumes_exactly(pooled):
    ds = PretrainDataset(pooled)
    options = dict(batch_size=2, num_workers=0, global_size=16, local_size=8, n_local=2)
    reference = _take(make_pretrain_loader(ds, seed=11, **options), 4)
    again = _take(make_pretrain_loader(ds, seed=11, **options), 4)
    assert all(_same(x, y) for x, y in zip(reference, again, strict=True))
    assert not _same(reference[0], next(make_pretrain_loader(ds, seed=12, **options)))
    first = make_pretrain_loader(ds, seed=11, **options)
    _take(first, 2)
    state = first.state_dict()
    resumed = make_pretrain_loader(ds, seed=11, **options)
    resumed.load_state_dict(state)
    assert all(_same(x, y) for x, y in zip(reference[2:], _take(resumed, 2), strict=True))
    with pytest.raises(UserError, match="seed"):
        make_pretrain_loader(ds, seed=5, **options).load_state_dict(state)


def test_loader_with_two_workers_gives_the_in_process_stream_and_resumes(pooled):
    ds = PretrainDataset(pooled)
    options = dict(batch_size=2, global_size=16, local_size=8, n_local=2, seed=3)
    reference = _take(make_pretrain_loader(ds, num_workers=0, **options), 5)
    with make_pretrain_loader(ds, num_workers=2, **options) as loader:
        batches = _take(loader, 3)
        state = loader.state_dict()
    assert [b["batch_index"] for b in batches] == [0, 1, 2]
    assert all(_same(x, y) for x, y in zip(reference[:3], batches, strict=True))
    with make_pretrain_loader(ds, num_workers=2, **options) as loader:
        loader.load_state_dict(state)
        assert all(_same(x, y) for x, y in zip(reference[3:], _take(loader, 2), strict=True))
