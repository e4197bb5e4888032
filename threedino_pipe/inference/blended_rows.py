"""Sliding-window probabilities read row block by row block, without a whole-case accumulator.

The windows and weights are MONAI's (``sliding_window_inference``): its window grid
(``monai.data.utils.dense_patch_slices`` with the interval ``int(patch * (1 - overlap))``, at least 1,
the whole axis where the window spans it, the last window flush with the end) and its gaussian
importance map (``monai.data.utils.compute_importance_map``, sigma 0.125 of the window). What differs
is where the blended sum lives: windows run in MONAI's order (start along axis 0 slowest) only as
far as the reader needs (rows before the next row of windows' start are final), and the weighted
sum is a float32 buffer of rows on the device the windows run on, holding the current row of
windows (``patch[0]`` rows) and the final rows the reader has not passed yet (at most its largest
read block). Rows are divided by the summed weights as they are read.

With a :class:`~threedino_pipe.inference.air_windows.WindowSkip`, windows that hold only air
outside the body are not run: their gaussian weight is added with pure background (nothing added
to the blended channels), in the same order as the windows that run.

For a 512 x 512 x 400 case with 13 blended channels, 112^3 windows and 43-row read blocks that
is 1.9 GB (buffer and weights), instead of a whole-case accumulator (2.5 GB in float16 for MONAI's,
plus its weight map; ``docs/benchmarks.md``, "Predict").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch import Tensor

if TYPE_CHECKING:
    from threedino_pipe.inference.air_windows import WindowSkip

RESERVE_ROWS = 8  # spare rows of the running sum beyond a row of windows and the first read block
SIGMA_SCALE = 0.125  # gaussian blending of the sliding window (predict and finetune's validation)


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

    Reading is forward only: asking for rows from ``lo`` lets the rows before ``lo`` go.

    Args:
        source: ``[C, X+, Y+, Z+]`` case, at least ``patch`` along every axis (padded if need be), on any device.
        region: the slices of the case within ``source`` (the padding is cropped from the output).
        patch: window size in voxels (``source``'s axis order).
        channels: ``K``, the number of channels ``predict`` returns.
        predict: ``[B, C, *patch]`` windows (on ``device``) -> ``[B, K, *patch]`` probabilities.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per ``predict`` call.
        device: where windows are predicted and blended; rows are read as float32 CPU tensors.
        skip: which windows need not run (air outside the body), or None: every window runs.
    """

    def __init__(self, source: Tensor, region: Sequence[slice], patch: Sequence[int], channels: int,
                 predict: Callable[[Tensor], Tensor], *, overlap: float = 0.5, batch_size: int = 1,
                 device: torch.device | str = "cpu", skip: WindowSkip | None = None) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.source, self.predict, self.batch_size = source, predict, max(1, int(batch_size))
        self.skip = skip
        self.patch = tuple(int(p) for p in patch)
        self.padded = tuple(int(n) for n in source.shape[1:])
        self.region = [slice(*r.indices(n)[:2]) for r, n in zip(region, self.padded, strict=True)]
        self.device = torch.device(device)
        if any(n < p for n, p in zip(self.padded, self.patch, strict=True)):
            raise ValueError(f"source {self.padded} is smaller than the window {self.patch}")
        self.shape = (int(channels), *(r.stop - r.start for r in self.region))
        self.starts = window_starts(self.padded, self.patch, overlap)
        self.weight = compute_importance_map(self.patch, mode="gaussian", sigma_scale=SIGMA_SCALE, device=self.device)
        self.total: Tensor | None = None  # [K, capacity, Y+, Z+]: padded rows base .. base + capacity - 1
        self.weights: Tensor | None = None  # [capacity, Y+, Z+]
        self.base = 0
        self.next_window = 0
        self.read_from = 0  # padded row: the reader has passed the rows before it
        self.peak_rows = 0  # rows of the running sum (for tests and benchmarks)

    def rows(self, lo: int, hi: int, channel: int | None = None) -> Tensor:
        if not 0 <= lo < hi <= self.shape[1]:
            raise ValueError(f"rows [{lo}, {hi}) outside [0, {self.shape[1]})")
        offset = self.region[0].start
        if lo + offset < self.read_from:
            raise ValueError(f"rows from {lo} asked for after rows from {self.read_from - offset} "
                             "(reading is forward only)")
        self.read_from = lo + offset
        self._reserve(hi - lo)
        while self._final_until() < hi + offset:
            self._next_batch()
        rows = slice(lo + offset - self.base, hi + offset - self.base)
        inplane = (self.region[1], self.region[2])
        total = self.total[(slice(None) if channel is None else channel, rows, *inplane)]
        return (total / self.weights[(rows, *inplane)]).cpu()

    def _final_until(self) -> int:
        """Padded rows before this one have every window added (the next row of windows starts there)."""
        return self.starts[self.next_window][0] if self.next_window < len(self.starts) else self.padded[0]

    def _reserve(self, read_rows: int) -> None:
        """Size the running sum for a row of windows plus ``read_rows`` read rows (allocated on first read)."""
        needed = min(self.padded[0], self.patch[0] + read_rows)
        if self.total is not None and self.total.shape[1] >= needed:
            return
        capacity = min(self.padded[0], needed + RESERVE_ROWS)
        total = torch.zeros((self.shape[0], capacity, *self.padded[1:]), device=self.device)
        weights = torch.zeros((capacity, *self.padded[1:]), device=self.device)
        if self.total is not None:  # a larger read block than before: move the rows held over
            held = min(self.total.shape[1], capacity)
            total[:, :held], weights[:held] = self.total[:, :held], self.weights[:held]
        self.total, self.weights = total, weights
        self.peak_rows = max(self.peak_rows, capacity)

    @torch.inference_mode()
    def _next_batch(self) -> None:
        batch = self._collect()
        runs = [start for start, decision in batch if decision != "skip"]
        probabilities = iter(())
        if runs:
            windows = torch.stack([self.source[(slice(None), *self._slices(start))] for start in runs])
            probabilities = iter(self.predict(windows.to(self.device, non_blocking=True)))
        for start, decision in batch:  # in window order, skipped ones included: the sums' order is the full one
            self._make_room(start[0])
            rows = slice(start[0] - self.base, start[0] - self.base + self.patch[0])
            inplane = self._slices(start)[1:]
            if decision != "skip":  # a skipped window adds pure background: 0 in every blended channel
                window = next(probabilities).float()
                if decision == "probe":
                    self.skip.probed(window)
                self.total[(slice(None), rows, *inplane)].addcmul_(window, self.weight)
            self.weights[(rows, *inplane)].add_(self.weight)
        self.next_window += len(batch)
        if self.next_window == len(self.starts):
            self.source = None  # every window read: the case can go (the rows may still be read)

    def _collect(self) -> list[tuple[tuple[int, ...], str]]:
        """The next windows and what to do with each (``run``, ``skip``, ``probe``): up to ``batch_size``
        that run, ending after a probe (its answer decides the windows after it)."""
        batch, runs, capacity = [], 0, self.total.shape[1]
        for start in self.starts[self.next_window:]:
            if batch and start[0] + self.patch[0] - min(start[0], self.read_from) > capacity:
                break  # a later row of windows that would not fit beside the rows not yet read: next batch
            if runs == self.batch_size:
                break
            decision = "run" if self.skip is None else self.skip.decide(start, self._case_box(start))
            batch.append((start, decision))
            runs += decision != "skip"
            if decision == "probe":
                break
        return batch

    def _case_box(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The window at ``start`` (padded coordinates) in case coordinates, clipped to the case."""
        return tuple(slice(max(s - r.start, 0), min(s + p - r.start, r.stop - r.start))
                     for s, p, r in zip(start, self.patch, self.region, strict=True))

    def _slices(self, start: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))

    def _make_room(self, row: int) -> None:
        """Make the running sum hold padded rows ``row .. row + patch[0] - 1``, dropping rows the reader passed."""
        capacity = self.total.shape[1]
        if row + self.patch[0] - self.base <= capacity:
            return
        shift = min(row, self.read_from) - self.base
        if row + self.patch[0] - (self.base + shift) > capacity:
            raise RuntimeError("running sum too small for a row of windows and the rows not yet read")
        for r in range(capacity - shift):  # in place, row by row towards 0: no row is overwritten before it moves
            self.total[:, r].copy_(self.total[:, r + shift])
            self.weights[r].copy_(self.weights[r + shift])
        self.total[:, capacity - shift:] = 0
        self.weights[capacity - shift:] = 0
        self.base += shift


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
    """The whole ``[K, X, Y, Z]`` (float16, CPU) of a row source, read in blocks of rows (whole-case
    probabilities take half the memory in float16)."""
    out = torch.empty(source.shape, dtype=torch.float16)
    for lo in range(0, source.shape[1], rows_per_block):
        hi = min(source.shape[1], lo + rows_per_block)
        out[:, lo:hi] = source.rows(lo, hi)
    return out
