"""Row-by-row blending of sliding windows (inference/blended_rows.py) against MONAI's sliding_window_inference."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from threedino_pipe.inference.blended_rows import (
    RESERVE_ROWS,
    SIGMA_SCALE,
    BlendedRows,
    WeightedRows,
    materialise,
    window_starts,
)


def _softmax_net(channels_in: int, channels_out: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(channels_in, channels_out, 3, padding=1)
    return torch.nn.Sequential(conv, torch.nn.Softmax(dim=1)).eval()


def _monai(image: torch.Tensor, net: torch.nn.Module, patch, overlap: float) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(image[None], patch, 1, net, overlap=overlap, mode="gaussian",
                                        sigma_scale=SIGMA_SCALE)[0]


@pytest.mark.parametrize(("size", "patch", "overlap", "batch"), [
    ((37, 30, 26), (16, 12, 10), 0.5, 1),
    ((37, 30, 26), (16, 12, 10), 0.75, 3),
    ((33, 24, 20), (16, 12, 20), 0.0, 2),  # no overlap; the window spans the last axis
    ((16, 25, 21), (16, 8, 8), 0.6, 4),  # one row of windows
    ((40, 20, 20), (8, 8, 8), 0.5, 20),  # batches span rows of windows
])
def test_blended_rows_equal_monai_sliding_window(size, patch, overlap, batch):
    torch.manual_seed(0)
    image = torch.randn(2, *size)
    net = _softmax_net(2, 4, seed=1)
    expected = _monai(image, net, patch, overlap)
    calls = []

    def predict(windows: torch.Tensor) -> torch.Tensor:
        calls.append(len(windows))
        return net(windows)

    rows = BlendedRows(image, [slice(None)] * 3, patch, 4, predict, overlap=overlap, batch_size=batch)
    got = materialise(rows, rows_per_block=5)
    assert got.dtype == torch.float16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=0)  # float16 result of [0, 1] values
    assert sum(calls) == len(window_starts(size, patch, overlap)) and max(calls) <= batch
    assert rows.peak_rows == min(size[0], patch[0] + 5 + RESERVE_ROWS)  # a row of windows, a read block, spare


def test_padding_is_cropped_and_rows_are_released_as_read():
    """A case padded along axis 0 and 2 (as predict pads cases smaller than a window): the output
    is the case region of the padded blend, and finished rows never cover the whole case."""
    torch.manual_seed(2)
    padded = torch.randn(1, 60, 20, 16)
    region = [slice(3, 57), slice(0, 20), slice(2, 14)]
    net = _softmax_net(1, 3, seed=4)
    expected = _monai(padded, net, (16, 16, 16), 0.5)[:, 3:57, :, 2:14]
    rows = BlendedRows(padded, region, (16, 16, 16), 3, net, overlap=0.5)
    assert rows.shape == (3, 54, 20, 12)
    for lo in range(0, 54, 6):  # the order geometry.labels_on_crop reads in: rows, one channel at a time
        for c in range(3):
            torch.testing.assert_close(rows[c][lo:lo + 6, :, :], expected[c, lo:lo + 6], atol=1e-5, rtol=0)
    assert rows.peak_rows == 16 + 6 + RESERVE_ROWS < 54
    with pytest.raises(ValueError, match="forward only"):
        rows.rows(10, 12)


def test_weighted_rows_average_two_window_sizes():
    torch.manual_seed(3)
    image = torch.randn(1, 40, 24, 24)
    net = _softmax_net(1, 2, seed=5)
    a = BlendedRows(image, [slice(None)] * 3, (16, 16, 16), 2, net, overlap=0.5)
    b = BlendedRows(image, [slice(None)] * 3, (24, 12, 24), 2, net, overlap=0.5)
    expected = 0.25 * _monai(image, net, (16, 16, 16), 0.5) + 0.75 * _monai(image, net, (24, 12, 24), 0.5)
    got = materialise(WeightedRows([(a, 0.25), (b, 0.75)]))
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=0)


def test_a_source_smaller_than_the_window_is_refused():
    with pytest.raises(ValueError, match="smaller than the window"):
        BlendedRows(torch.zeros(1, 10, 20, 20), [slice(None)] * 3, (16, 16, 16), 2, lambda w: w, overlap=0.5)


def test_a_larger_read_block_grows_the_running_sum_without_losing_rows():
    torch.manual_seed(6)
    image = torch.randn(1, 50, 18, 18)
    net = _softmax_net(1, 2, seed=7)
    expected = _monai(image, net, (12, 12, 12), 0.5)
    rows = BlendedRows(image, [slice(None)] * 3, (12, 12, 12), 2, net, overlap=0.5, batch_size=5)
    got = [rows.rows(0, 2), rows.rows(1, 3), rows.rows(3, 20), rows.rows(20, 50)]  # overlapping, then larger
    torch.testing.assert_close(torch.cat([got[0], got[1][:, 1:], got[2], got[3]], dim=1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1][:, 0], expected[:, 1], atol=1e-5, rtol=0)
    assert rows.peak_rows == min(50, 12 + 30 + RESERVE_ROWS)
