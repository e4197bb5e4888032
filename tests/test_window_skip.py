"""Skipping sliding windows of air outside the body (inference/air_windows.py, docs/predict.md "Skipping air").

Synthetic preprocessed cases (normalised intensities, at most 64^3) with small structures at the
image border, in corners, and just outside the body mask (dark, within the margin): no window that
holds foreground or any voxel above the air threshold is skipped, the skipped ones hold only air,
and with networks whose output is a fixed function of the intensities (background in air) the
blended probabilities and labels with skipping equal those without. The command-level test runs
``3dino predict`` with and without ``--no-skip`` on a briefly finetuned model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_3dino
from test_predict import one_thread  # noqa: F401 - the fixture: one torch thread

from threedino_pipe.artifacts import PredictLogLine
from threedino_pipe.inference import geometry
from threedino_pipe.inference.air_windows import (
    AirRule,
    WindowCounts,
    WindowSkip,
    air_thresholds,
    all_background,
    body_mask,
    margin_voxels,
)
from threedino_pipe.inference.blended_rows import BlendedRows, materialise, window_starts
from threedino_pipe.inference.predictor import EnsembleProbabilities, InferenceOptions, blended_probabilities
from threedino_pipe.raw_data.image_io import read_image

SHAPE = (64, 56, 48)
PATCH = (16, 16, 16)
SPACING = (2.0, 2.0, 2.0)  # the 10 mm margin is 5 voxels


def synthetic_case(noisy_air: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``1 x 64 x 56 x 48`` normalised case and its labels: a body ellipsoid (1) holding a bright
    organ, and small structures (2): on a face of the field, in two corners, and one as dark as air
    3 voxels outside the body's surface (inside the margin)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"), -1)
    body = (((grid / np.array([7.0, 6.0, 6.0])) ** 2).sum(-1) <= 1)
    air = np.clip(rng.normal(-0.9, 0.03, SHAPE), -1, None) if noisy_air else np.full(SHAPE, -1.0)
    image = np.where(body, 0.2 + rng.normal(0, 0.05, SHAPE), air).astype(np.float32)
    label = body.astype(np.uint8)
    organ = ((((grid - [2, 0, 0]) / 3.0) ** 2).sum(-1) <= 1)
    image[organ] = 0.8
    for box in [(slice(0, 2), slice(26, 29), slice(22, 25)),  # on the face x = 0
                (slice(0, 2), slice(0, 2), slice(0, 2)),  # corners
                (slice(61, 64), slice(53, 56), slice(45, 48))]:
        image[box], label[box] = 0.5, 2
    surface_x = int(np.ceil((SHAPE[0] - 1) / 2 + 7))  # first voxel beyond the body along +x on the centre line
    dark = (slice(surface_x + 3, surface_x + 5), slice(27, 29), slice(23, 25))
    image[dark], label[dark] = -1.0, 2  # as dark as air: only the margin keeps its windows
    return image[None], label


class IntensityNet(torch.nn.Module):
    """Fixed 3-class logits from the 3x3x3 mean intensity (replicate padding): background below -0.8,
    class 1 up to 0.5, class 2 above; softmax of the logits is exactly 0/1 in air."""

    def __init__(self, output: str = "softmax") -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(x[:, :1], [1] * 6, mode="replicate"), 3, 1)
        first = 2000.0 * (mean + 0.8)
        second = first + 2000.0 * (mean - 0.5)
        if self.output == "sigmoid":  # two regions: above -0.8, above 0.5
            return torch.cat([first, 2000.0 * (mean - 0.5)], 1)
        return torch.cat([torch.zeros_like(first), first, second], 1)


def _blended(image: np.ndarray, rule: AirRule | None, net: torch.nn.Module, output: str, *, skip: bool,
             batch: int = 1) -> tuple[torch.Tensor, WindowCounts]:
    counts = WindowCounts()
    options = InferenceOptions(overlap=0.5, window_batch_size=batch, skip=skip)
    channels = 3 if output == "softmax" else 2
    scores = blended_probabilities(torch.from_numpy(image), [(net, PATCH)], output, channels, options,
                                   torch.device("cpu"), air=rule, counts=counts)
    return scores, counts


def _skipped_windows(image: np.ndarray, rule: AirRule, net: torch.nn.Module,
                     margin_mm: float = 10.0) -> tuple[WindowSkip, int]:
    """The skip decisions of a whole blend (``WindowSkip.skipped``) and the windows the network ran."""
    ran = []
    ensemble = EnsembleProbabilities([net], "softmax", False, "fp32", drop_background=True)

    def predict(windows: torch.Tensor) -> torch.Tensor:
        ran.append(len(windows))
        return ensemble(windows)

    skip = WindowSkip(body_mask(image, rule, margin_mm=margin_mm), lambda p: all_background(p, "softmax"))
    source = torch.from_numpy(image)
    materialise(BlendedRows(source, [slice(None)] * 3, PATCH, 2, predict, overlap=0.5, skip=skip))
    return skip, sum(ran)


@pytest.mark.parametrize(("scheme", "noisy_air"), [("dataset_percentile", False), ("volume_percentile", True)])
def test_no_window_holding_foreground_or_body_is_skipped(scheme, noisy_air):
    image, label = synthetic_case(noisy_air)
    rule = AirRule((scheme,), SPACING)
    low, threshold = air_thresholds(image[0], scheme)
    assert -1.0 <= low <= threshold < 0.0
    if noisy_air:  # the background (-0.9, spread 0.03) lies below both
        assert low > -0.9 + 2 * 0.03 and threshold > -0.9 + 5 * 0.03
    skip, ran = _skipped_windows(image, rule, IntensityNet())
    starts = window_starts(SHAPE, PATCH, 0.5)
    assert len(skip.skipped) >= 10, "too few skipped windows to test anything"
    assert ran == len(starts) - len(skip.skipped) and skip.state == "on"
    skipped = set(skip.skipped)
    for start in starts:
        box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        holds = bool(label[box].any()) or bool((image[0][box] > threshold).any())
        if start in skipped:
            assert not holds, f"window at {start} holds foreground or body but was skipped"
    # the dark structure just outside the body (as dark as air) is within the margin: its windows all ran
    dark = np.argwhere((label == 2) & (image[0] == -1.0))
    assert len(dark) and all(not any(all(s <= v < s + p for v, s, p in zip(voxel, start, PATCH, strict=True))
                                     for start in skipped) for voxel in dark)
    assert margin_voxels(SPACING) == (5, 5, 5)


@pytest.mark.parametrize(("output", "batch", "noisy_air"), [("softmax", 1, False), ("softmax", 3, True),
                                                            ("sigmoid", 2, False)])
def test_labels_with_skipping_equal_the_full_computation(output, batch, noisy_air):
    image, label = synthetic_case(noisy_air, seed=1)
    rule = AirRule(("volume_percentile" if noisy_air else "dataset_percentile",), SPACING)
    net = IntensityNet(output).eval()
    full, full_counts = _blended(image, rule, net, output, skip=False, batch=batch)
    fast, counts = _blended(image, rule, net, output, skip=True, batch=batch)
    assert counts.total == full_counts.total == len(window_starts(SHAPE, PATCH, 0.5))
    assert counts.skipped >= 10 and full_counts.skipped == 0 and counts.note == ""
    assert torch.equal(full.stored, fast.stored)  # probabilities equal, bit for bit
    values = [0, 1, 2] if output == "softmax" else [1, 2]
    full_labels = geometry.labels_on_grid(full, output=output, values=values)
    fast_labels = geometry.labels_on_grid(fast, output=output, values=values)
    np.testing.assert_array_equal(full_labels, fast_labels)
    assert (full_labels[label == 2] > 0).mean() > 0.5  # the small structures are found, not lost


def test_nothing_is_skipped_when_the_body_fills_the_field():
    rng = np.random.default_rng(3)
    image = (0.2 + rng.normal(0, 0.05, (1, *SHAPE))).astype(np.float32)
    image[0, 20:30, 20:30, 20:30] = -1.0  # a pocket of air inside: enclosed, never skipped
    for scheme in ("dataset_percentile", "volume_percentile"):
        mask = body_mask(image, AirRule((scheme,), SPACING))
        assert not mask.trusted and "faces" in mask.reason
        _, counts = _blended(image, AirRule((scheme,), SPACING), IntensityNet(), "softmax", skip=True)
        assert counts.skipped == 0 and "faces" in counts.note


def test_untrusted_masks_skip_nothing():
    image, _ = synthetic_case(False)
    assert "no air rule" in body_mask(image, AirRule(("zscore",), SPACING)).reason  # an unknown normalisation
    blank = np.full((1, *SHAPE), -1.0, np.float32)
    assert "no voxel" in body_mask(blank, AirRule(("dataset_percentile",), SPACING)).reason
    _, counts = _blended(blank, AirRule(("volume_percentile",), SPACING), IntensityNet(), "softmax", skip=True)
    assert counts.skipped == 0 and counts.note


def test_enclosed_air_is_not_skipped():
    """A hollow body (the walls of a box around a cavity of air that holds windows beyond the margin):
    the cavity is filled as body, so no window in it is skipped, while the air outside the box is."""
    image = np.full((1, 64, 64, 64), -1.0, np.float32)
    image[0, 4:44, 4:44, 4:44] = 0.3
    image[0, 8:40, 8:40, 8:40] = -1.0  # the cavity: 32 voxels of air per axis
    skip, _ = _skipped_windows(image, AirRule(("dataset_percentile",), SPACING), IntensityNet(), margin_mm=0.0)
    assert skip.skipped and skip.state == "on"
    inside = (16, 16, 16)  # a window of the cavity farther than the (2-voxel) margin from its walls
    assert (image[0, 16:32, 16:32, 16:32] == -1).all() and inside not in skip.skipped
    assert all(max(start) >= 44 for start in skip.skipped)  # only windows reaching outside the box


def test_the_probe_turns_skipping_off_for_a_network_that_sees_foreground_in_air():
    class Everywhere(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1]), torch.zeros_like(x[:, :1])], 1)

    image, _ = synthetic_case(False)
    rule = AirRule(("dataset_percentile",), SPACING)
    full, _ = _blended(image, rule, Everywhere(), "softmax", skip=False)
    fast, counts = _blended(image, rule, Everywhere(), "softmax", skip=True)
    assert counts.skipped == 0 and "probe" in counts.note
    assert torch.equal(full.stored, fast.stored)


# ------------------------------------------- the command, the finetuned model of tests/conftest.py (``finetuned``)


def predict_sides(finetuned, tmp_path, sides: dict[str, tuple[str, ...]]) -> tuple[dict, dict, dict]:
    """``3dino predict`` of the test scan with the finetuned model, once per side (its extra options): each
    side's label image, ``predict_log.jsonl`` lines and stderr."""
    run, scan, env = finetuned
    labels, lines, logs = {}, {}, {}
    for name, extra in sides.items():
        out = tmp_path / name
        done = run_3dino("predict", "-i", str(scan), "-o", str(out), "-m", str(run), "--precision", "fp32",
                         "--no-qc", "--no-progress", *extra, env=env)
        assert done.returncode == 0, done.stderr
        labels[name] = read_image(out / "test.nii.gz")[0]
        lines[name] = PredictLogLine.read_lines(out / PredictLogLine.FILE)
        logs[name] = done.stderr
    return labels, lines, logs


def assert_same_labels(a: np.ndarray, b: np.ndarray, values=(1, 2)) -> None:
    """Dice >= 0.99 per structure (each predicted), and equal label images."""
    for value in values:
        x, y = a == value, b == value
        assert x.any(), f"structure {value} not predicted: the comparison would be empty"
        dice = 2.0 * (x & y).sum() / (x.sum() + y.sum())
        assert dice >= 0.99, (value, dice)
    assert np.array_equal(a, b)  # equal is expected: only the window set changed


@pytest.mark.e2e
def test_predict_with_and_without_skipping_agree(finetuned, tmp_path):
    labels, lines, _ = predict_sides(finetuned, tmp_path, {"skip": (), "full": ("--no-skip",)})
    skip, full = lines["skip"][0], lines["full"][0]
    assert skip.options.skip and not full.options.skip
    assert skip.windows.total == full.windows.total > 0 and full.windows.skipped == 0
    # the model predicts background in air after brief finetuning; if the probe found otherwise, say so
    assert skip.windows.skipped > 0, skip.windows.skip_off
    assert_same_labels(labels["skip"], labels["full"])
