"""Sliding-window probabilities handed over row block by row block, without a whole-case accumulator.

The windows and weights are MONAI's (``sliding_window_inference``): its window grid
(``monai.data.utils.dense_patch_slices`` with the interval ``int(patch * (1 - overlap))``, at least 1,
the whole axis where the window spans it, the last window flush with the end) and its gaussian
importance map (``monai.data.utils.compute_importance_map``, sigma 0.125 of the window). What differs
is where the blended sum lives: windows run in MONAI's order (start along axis 0 slowest), and the
weighted sum covers only the rows of the current row of windows (``patch[0]`` rows, float32, on the
device the windows run on). Once the next row of windows starts at row ``s``, the rows before ``s``
are final: they are divided by the summed weights, cropped to the case and kept (float16, CPU)
until the reader has passed them.

For a 512 x 512 x 400 case with 13 stored channels and 112^3 windows that is 1.2 GB of running sum
plus about 0.5 GB of finished rows, instead of a 2.5 GB float16 accumulator of the whole case
(``docs/benchmarks.md``, "Predict").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch import Tensor

SIGMA_SCALE = 0.125  # gaussian blending of predict and of finetune's validation window (inference/sliding_window.py)


def window_starts(size: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start voxel of every window over ``size`` (each axis >= ``patch``), in MONAI's order and grid."""
    interval = [int(p) if int(p) == int(n) else max(int(int(p) * (1 - overlap)), 1)
                for n, p in zip(size, patch, strict=True)]
    return [tuple(int(s.start) for s in window) for window in dense_patch_slices(list(size), list(patch), interval)]


class RowSource:
    """Probabilities ``[K, X, Y, Z]`` readable a block of rows (axis 0) at a time.

    ``source[c]`` is channel ``c`` as an object with ``shape`` (``X, Y, Z``) and ``[rows, ...]``
    indexing (a slice along axis 0 first), which is how ``inference/geometry`` reads channels.
    """

    shape: tuple[int, ...]

    def rows(self, lo: int, hi: int, channel: int | None = None) -> Tensor:
        """Rows ``[lo, hi)`` of every channel (``[K, hi - lo, Y, Z]``) or of one (``[hi - lo, Y, Z]``)."""
        raise NotImplementedError

    def __getitem__(self, channel: int) -> RowChannel:
        return RowChannel(self, int(channel))


class RowChannel:
    """One channel of a :class:`RowSource`: ``[lo:hi, ...]`` reads its rows ``lo..hi-1``."""

    def __init__(self, source: RowSource, channel: int) -> None:
        self.source, self.channel = source, channel
        self.shape = tuple(source.shape[1:])

    def __getitem__(self, index: tuple) -> Tensor:
        first, *rest = index if isinstance(index, tuple) else (index,)
        lo, hi, step = first.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read in order, step 1")
        return self.source.rows(lo, hi, self.channel)[(slice(None), *rest)]


class BlendedRows(RowSource):
    """Gaussian-blended window probabilities of one case, computed as rows are asked for.

    Reading is forward only: asking for rows from ``lo`` drops the finished rows before ``lo``.

    Args:
        source: ``[C, X+, Y+, Z+]`` case, at least ``patch`` along every axis (padded if need be), on any device.
        region: the slices of the case within ``source`` (the padding is cropped from the output).
        patch: window size in voxels (``source``'s axis order).
        channels: ``K``, the number of channels ``predict`` returns.
        predict: ``[B, C, *patch]`` windows (on ``device``) -> ``[B, K, *patch]`` probabilities.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per ``predict`` call.
        device: where windows are predicted and blended; finished rows are kept on the CPU (float16).
    """

    def __init__(self, source: Tensor, region: Sequence[slice], patch: Sequence[int], channels: int,
                 predict: Callable[[Tensor], Tensor], *, overlap: float = 0.5, batch_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.source, self.predict, self.batch_size = source, predict, max(1, int(batch_size))
        self.patch = tuple(int(p) for p in patch)
        self.region = [slice(*r.indices(n)[:2]) for r, n in zip(region, source.shape[1:], strict=True)]
        self.device = torch.device(device)
        padded = tuple(int(n) for n in source.shape[1:])
        if any(n < p for n, p in zip(padded, self.patch, strict=True)):
            raise ValueError(f"source {padded} is smaller than the window {self.patch}")
        self.shape = (int(channels), *(r.stop - r.start for r in self.region))
        self.starts = window_starts(padded, self.patch, overlap)
        self.weight = compute_importance_map(self.patch, mode="gaussian", sigma_scale=SIGMA_SCALE, device=self.device)
        self.total = torch.zeros((int(channels), self.patch[0], *padded[1:]), device=self.device)
        self.weights = torch.zeros((self.patch[0], *padded[1:]), device=self.device)
        self.base = 0  # padded row of total[:, 0]
        self.next_window = 0
        self.finished: list[tuple[int, int, Tensor]] = []  # (lo, hi, [K, hi - lo, Y, Z]) in case rows
        self.finished_to = 0  # case rows < finished_to are final
        self.read_from = 0  # the lowest row a reader may still ask for
        self.peak_rows = 0  # most finished rows held at once (a read block plus at most 2 windows' rows)

    def rows(self, lo: int, hi: int, channel: int | None = None) -> Tensor:
        if not 0 <= lo < hi <= self.shape[1]:
            raise ValueError(f"rows [{lo}, {hi}) outside [0, {self.shape[1]})")
        if lo < self.read_from:
            raise ValueError(f"rows from {lo} asked for after rows from {self.read_from} (reading is forward only)")
        self.read_from = lo
        self.finished = [block for block in self.finished if block[1] > lo]
        while self.finished_to < hi:
            self._next_batch()
        pick = slice(None) if channel is None else channel
        pieces = [block[pick][..., max(lo, a) - a:min(hi, b) - a, :, :] for a, b, block in self.finished
                  if a < hi and b > lo]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-3)

    @torch.inference_mode()
    def _next_batch(self) -> None:
        batch = self.starts[self.next_window:self.next_window + self.batch_size]
        windows = torch.stack([self.source[(slice(None), *self._slices(start))] for start in batch])
        probabilities = self.predict(windows.to(self.device, non_blocking=True))
        for start, window in zip(batch, probabilities, strict=True):
            self._move_to(start[0])
            rows = slice(start[0] - self.base, start[0] - self.base + self.patch[0])
            inplane = self._slices(start)[1:]
            self.total[(slice(None), rows, *inplane)].addcmul_(window.float(), self.weight)
            self.weights[(rows, *inplane)].add_(self.weight)
        self.next_window += len(batch)
        if self.next_window == len(self.starts):
            self._finish(self.source.shape[1] - self.base)

    def _slices(self, start: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))

    def _move_to(self, row: int) -> None:
        """Make ``row`` the first row of the running sum, finishing the rows before it."""
        shift = row - self.base
        if shift <= 0:
            return
        self._finish(shift)
        keep = self.patch[0] - shift
        if keep > 0:
            self.total[:, :keep] = self.total[:, shift:].clone()
            self.weights[:keep] = self.weights[shift:].clone()
        self.total[:, max(keep, 0):] = 0
        self.weights[max(keep, 0):] = 0
        self.base = row

    def _finish(self, count: int) -> None:
        """Hand over the first ``count`` rows of the running sum (those in the case region)."""
        region = self.region
        lo, hi = max(self.base, region[0].start), min(self.base + count, region[0].stop)
        if lo < hi:
            rows = slice(lo - self.base, hi - self.base)
            block = self.total[(slice(None), rows, region[1], region[2])]
            block = block / self.weights[(rows, region[1], region[2])]
            a, b = lo - region[0].start, hi - region[0].start
            self.finished.append((a, b, block.to("cpu", torch.float16)))
            self.finished_to = b
            self.peak_rows = max(self.peak_rows, b - self.finished[0][0])
        if self.base + count >= region[0].stop:
            self.finished_to = self.shape[1]


class WeightedRows(RowSource):
    """Weighted sum of row sources of one case (models with different window sizes), float32."""

    def __init__(self, parts: Sequence[tuple[RowSource, float]]) -> None:
        self.parts = list(parts)
        self.shape = tuple(self.parts[0][0].shape)

    def rows(self, lo: int, hi: int, channel: int | None = None) -> Tensor:
        total = None
        for source, weight in self.parts:
            block = source.rows(lo, hi, channel).float()
            total = block.mul_(weight) if total is None else total.add_(block, alpha=weight)
        return total


def materialise(source: RowSource, rows_per_block: int = 16) -> Tensor:
    """The whole ``[K, X, Y, Z]`` (float16, CPU) of a row source, read in blocks of rows."""
    out = torch.empty(source.shape, dtype=torch.float16)
    for lo in range(0, source.shape[1], rows_per_block):
        hi = min(source.shape[1], lo + rows_per_block)
        out[:, lo:hi] = source.rows(lo, hi)
    return out
