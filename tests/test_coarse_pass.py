"""The coarse pass of predict (inference/coarse_windows.py, docs/predict.md "Coarse pass").

Synthetic preprocessed cases (normalised intensities, 64 x 56 x 48) with a large body that the
network calls background and small structures (4 voxels per axis: two coarse voxels, the size the
coarse pass is documented to see): inside the body far from the organ, on a face of the field, in two
corners, and just outside the body: no window that holds a structure or a voxel the full
computation labels as foreground is skipped by the coarse mask, the windows skipped are exactly those
whose box misses the mask (and are not air), and the labels equal the full computation's. The
command-level test runs ``3dino predict --coarse`` and ``--no-coarse`` on the briefly finetuned model of
tests/conftest.py (``finetuned``), shared with tests/test_window_skip.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_predict import one_thread  # noqa: F401 - the fixture: one torch thread
from test_window_skip import assert_same_labels, predict_sides

from threedino_pipe.inference import geometry
from threedino_pipe.inference.air_windows import AirRule, WindowCounts, WindowSkip, all_background, body_mask
from threedino_pipe.inference.blended_rows import BlendedRows, materialise, window_starts
from threedino_pipe.inference.coarse_windows import (
    EMPTY_NOTE,
    PROBE_NOTE,
    CombinedSkip,
    coarse_mask,
    downsample,
    margin_voxels,
)
from threedino_pipe.inference.predictor import (
    EnsembleProbabilities,
    InferenceOptions,
    blended_probabilities,
    coarse_pass,
)

SHAPE = (64, 56, 48)
PATCH = (16, 16, 16)
SPACING = (2.0, 2.0, 2.0)  # the 10 mm margin is 3 coarse voxels (4 mm each)
RULE = AirRule(("dataset_percentile",), SPACING)
STRUCTURES = {  # small structures (4 voxels per axis, 2 coarse voxels, most off the coarse grid; intensity 0.55)
    "in the body": (slice(15, 19), slice(35, 39), slice(13, 17)),
    "on a face": (slice(0, 4), slice(27, 31), slice(21, 25)),
    "corner 0": (slice(0, 4), slice(0, 4), slice(0, 4)),
    "corner 1": (slice(60, 64), slice(52, 56), slice(44, 48)),
    "outside the body": (slice(29, 33), slice(49, 53), slice(21, 25)),
}


def coarse_case(seed: int = 0, structures: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A ``1 x 64 x 56 x 48`` case (air -1, a body ellipsoid about 0.2 with noise, an organ 0.8) and its
    labels (1: the small structures, 2: the organ)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"), -1)
    body = ((grid / np.array([24.0, 20.0, 16.0])) ** 2).sum(-1) <= 1
    image = np.where(body, 0.2 + rng.normal(0, 0.03, SHAPE), -1.0).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    organ = ((((grid - [6, -6, 0]) / 4.0) ** 2).sum(-1) <= 1)
    image[organ], label[organ] = 0.8, 2
    for box in STRUCTURES.values() if structures else ():
        image[box], label[box] = 0.55, 1
    assert not body[STRUCTURES["outside the body"]].any()
    return image[None], label


class StructureNet(torch.nn.Module):
    """Voxelwise logits, not certain (scale 30): background below 0.4, class 1 from 0.4 to 0.65, class 2
    above; the body (0.2) and air are background, with probabilities of foreground about 0.002 in the body."""

    def __init__(self, output: str = "softmax") -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        first = 30.0 * (v - 0.4)
        if self.output == "sigmoid":  # two regions: above 0.4, above 0.65
            return torch.cat([first, 30.0 * (v - 0.65)], 1)
        return torch.cat([torch.zeros_like(v), first, first + 30.0 * (v - 0.65)], 1)


def _blended(image: np.ndarray, net: torch.nn.Module, output: str, *, skip: bool, coarse: bool,
             batch: int = 1) -> tuple[geometry.Channels, WindowCounts]:
    counts = WindowCounts()
    options = InferenceOptions(overlap=0.5, window_batch_size=batch, skip=skip, coarse=coarse)
    scores = blended_probabilities(torch.from_numpy(image), [(net, PATCH)], output, 3 if output == "softmax" else 2,
                                   options, torch.device("cpu"), air=RULE, counts=counts)
    return scores, counts


def _labels(scores: geometry.Channels, output: str) -> np.ndarray:
    return geometry.labels_on_grid(scores, output=output, values=[0, 1, 2] if output == "softmax" else [1, 2])


def _box(start) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))


def test_downsample_takes_block_means():
    data = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(1, 5, 4, 3)
    small = downsample(data, 2)
    assert small.shape == (1, 3, 2, 2)
    assert small[0, 0, 0, 0] == data[0, :2, :2, :2].mean()
    assert small[0, 2, 1, 1] == data[0, 4:, 2:, 2:].mean()  # the last voxels repeated: the mean of those there
    assert margin_voxels(SPACING) == (3, 3, 3)


def test_no_window_holding_foreground_is_dropped():
    image, label = coarse_case()
    net = StructureNet().eval()
    counts = WindowCounts()
    mask = coarse_pass(torch.from_numpy(image), [(net, PATCH)], "softmax", 3, InferenceOptions(coarse=True),
                       torch.device("cpu"), RULE, counts)
    assert mask.trusted and counts.coarse.total > 0
    full, _ = _blended(image, net, "softmax", skip=False, coarse=False)
    full_labels = _labels(full, "softmax")
    for name, box in STRUCTURES.items():  # the full computation finds every structure
        assert (full_labels[box] == 1).all(), name
    air = body_mask(image, RULE)
    starts = window_starts(SHAPE, PATCH, 0.5)
    dropped = [s for s in starts if air.holds_body(_box(s)) and not mask.holds_body(_box(s))]
    assert len(dropped) >= 10, "too few windows dropped by the coarse mask to test anything"
    for start in dropped:
        assert not full_labels[_box(start)].any(), f"window at {start} holds foreground but was dropped"
        assert not label[_box(start)].any(), f"window at {start} holds a structure but was dropped"
    fast, fast_counts = _blended(image, net, "softmax", skip=True, coarse=True)
    # every dropped window but the probe (the first of them, run to check it is background) was skipped
    assert fast_counts.coarse.skipped == len(dropped) - 1 and fast_counts.coarse.note == ""
    assert fast_counts.skipped == sum(not air.holds_body(_box(s)) for s in starts)


@pytest.mark.parametrize(("output", "batch"), [("softmax", 1), ("softmax", 3), ("sigmoid", 2)])
def test_labels_with_the_coarse_pass_equal_the_full_computation(output, batch):
    image, label = coarse_case(seed=1)
    net = StructureNet(output).eval()
    full, full_counts = _blended(image, net, output, skip=False, coarse=False, batch=batch)
    fast, counts = _blended(image, net, output, skip=True, coarse=True, batch=batch)
    assert counts.total == full_counts.total == len(window_starts(SHAPE, PATCH, 0.5))
    assert counts.coarse.skipped >= 10 and full_counts.coarse is None
    ran = counts.total - counts.skipped - counts.coarse.skipped
    assert ran + counts.coarse.total < counts.total  # fewer windows in all, the coarse pass's included
    full_labels, fast_labels = _labels(full, output), _labels(fast, output)
    np.testing.assert_array_equal(full_labels, fast_labels)
    for value in (1, 2):  # Dice per structure (equal labels: 1)
        a, b = fast_labels == value, full_labels == value
        assert a.any() and 2.0 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99


def test_an_empty_coarse_pass_is_not_trusted():
    image, _ = coarse_case(structures=False)
    image[0][image[0] > 0.4] = 0.2  # no organ either: nothing for the coarse pass to find
    full, _ = _blended(image, StructureNet(), "softmax", skip=True, coarse=False)
    fast, counts = _blended(image, StructureNet(), "softmax", skip=True, coarse=True)
    assert counts.coarse.skipped == 0 and counts.coarse.note == EMPTY_NOTE
    assert torch.equal(full.stored, fast.stored)


def test_the_probe_turns_the_coarse_mask_off_when_a_skipped_window_holds_foreground():
    """A coarse mask that found only the far corner (as a coarse pass that missed everything else would): the
    first window it would skip (at the origin) is run, holds the structure of the first corner in the full
    network, and nothing is skipped by it."""
    image, _ = coarse_case(seed=2)
    found = np.zeros(tuple(-(-n // 2) for n in SHAPE), bool)
    found[-1, -1, -1] = True
    ensemble = EnsembleProbabilities([StructureNet()], "softmax", False, "fp32", drop_background=True)

    def background(p: torch.Tensor) -> bool:
        return all_background(p, "softmax")

    counts = WindowCounts(coarse=WindowCounts())
    rule = CombinedSkip(WindowSkip(body_mask(image, RULE), background, counts),
                        WindowSkip(coarse_mask(found, SPACING), background, counts.coarse, probe_note=PROBE_NOTE))
    rows = BlendedRows(torch.from_numpy(image), [slice(None)] * 3, PATCH, 2, ensemble, overlap=0.5, skip=rule)
    fast = materialise(rows)
    full = materialise(BlendedRows(torch.from_numpy(image), [slice(None)] * 3, PATCH, 2, ensemble, overlap=0.5))
    assert counts.coarse.skipped == 0 and counts.coarse.note == PROBE_NOTE and rule.coarse.state == "off"
    np.testing.assert_array_equal(_labels(geometry.Channels(full, True), "softmax"),
                                  _labels(geometry.Channels(fast, True), "softmax"))


@pytest.mark.e2e
def test_predict_with_and_without_the_coarse_pass_agree(finetuned, tmp_path):  # noqa: F811 - the fixture
    labels, lines, logs = predict_sides(finetuned, tmp_path, {"coarse": ("--coarse",), "full": ("--no-coarse",)})
    coarse, full = lines["coarse"][0], lines["full"][0]
    assert coarse.options.coarse and not full.options.coarse
    assert coarse.windows.total == full.windows.total > 0 and full.windows.coarse_windows is None
    assert coarse.windows.coarse_windows > 0 and coarse.windows.coarse_skipped is not None
    assert coarse.windows.coarse_off is not None
    assert "coarse pass:" in logs["coarse"] and "coarse pass:" not in logs["full"]
    assert_same_labels(labels["coarse"], labels["full"])
