"""Multi-crop pretraining batches from pooled preprocessed datasets (batchgenerators workers).

Reads ``<preprocessed>/<DatasetNNN_Name>/<configuration>/<case>.b2nd`` (float32 ``C x X x Y x Z``,
cross-slice axis last) and ``<case>.json`` (kind ``case``). Crops read only their box.

Determinism and resume: batch number ``n`` is a pure function of ``(seed, n)`` and the pooled
dataset: its volumes, boxes and augmentation seeds all come from ``numpy.random.default_rng([seed,
n])``. With ``num_workers=W > 0`` worker ``w`` makes batches ``w, w + W, w + 2W, ...`` and
batchgenerators' ``MultiThreadedAugmenter`` hands them out round-robin, so the stream of batches is
the same for every W (including 0). ``state_dict()`` records how many batches the caller has
consumed; batches prefetched by workers but not consumed are simply made again after
``load_state_dict()``, so resuming is exact for any W. (``deterministic=False`` uses the
``NonDetMultiThreadedAugmenter``: faster when batches vary in cost, but the order is not fixed and a
resume is only statistically equivalent.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch

from threedino_pipe.artifacts import CaseProperties
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.paths import dataset_id
from threedino_pipe.training_data.batch_stream import BatchStream, IndexedBatchLoader
from threedino_pipe.training_data.multicrop import MultiCropper

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainItem:
    """One sample: a preprocessed volume (all channels, or one channel when channels are split)."""

    dataset: str
    case_id: str
    array_path: Path
    shape: tuple[int, int, int]          # X, Y, Z voxels (case JSON ``shape``)
    spacing: tuple[float, float, float]  # mm, same axis order
    channel: int | None                  # None: all channels (or the only one)

    @property
    def name(self) -> str:
        """``Dataset/case`` (``Dataset/case:c<k>`` for channel k of a split multi-channel case)."""
        base = f"{self.dataset}/{self.case_id}"
        return base if self.channel is None else f"{base}:c{self.channel}"


class _ChannelView:
    """One channel of a ``C x X x Y x Z`` array seen as ``1 x X x Y x Z``; slicing reads only that channel."""

    def __init__(self, array: Any, channel: int) -> None:
        self.array, self.channel = array, channel
        self.shape = (1, *array.shape[1:])

    def __getitem__(self, key: tuple) -> Any:
        return self.array[(slice(self.channel, self.channel + 1), *key[1:])]


def _rerun(folder: Path, configuration: str) -> str:
    number = dataset_id(folder.name)
    return f"3dino preprocess -d {number if number is not None else folder.name} -c {configuration}"


class PretrainDataset:
    """The cases of several preprocessed datasets, pooled, filtered by their smallest axis.

    Args:
        folders: preprocessed dataset folders (``<preprocessed>/DatasetNNN_Name``).
        configuration: subfolder to read (``pretrain`` or ``pretrain_highres``).
        min_axis: volumes whose smallest axis (case JSON ``shape``, voxels) is not above this are skipped
            (docs/method.md, Data: volumes kept have min axis > 24 voxels; > 48 for adapt-highres).
        split_channels: True (default): each channel of a multi-channel case is its own
            single-channel sample (the 3DINO backbone takes one channel, and datasets with
            different channel counts can be pooled). False: samples keep all channels, which
            must then agree across the pool.

    Attributes:
        items: the kept samples (sorted by dataset then case, then channel).
        skipped: ``(dataset, case_id, shape)`` of the volumes below ``min_axis``.
        channels: channels per sample (1 when split).

    Raises:
        UserError: a missing configuration folder, a case without metadata, metadata that does
            not match its array, mixed channel counts without splitting, or no volume left.
    """

    def __init__(self, folders: list[Path], configuration: str = "pretrain", min_axis: int = 24, *,
                 split_channels: bool = True) -> None:
        self.folders = [Path(f) for f in folders]
        self.configuration, self.min_axis, self.split_channels = configuration, int(min_axis), split_channels
        self.items: list[PretrainItem] = []
        self.skipped: list[tuple[str, str, tuple[int, ...]]] = []
        channel_counts: dict[int, str] = {}
        if not self.folders:
            raise UserError("no preprocessed dataset given for pretraining", fix="pass one or more ids, e.g. -d 501")
        for folder in self.folders:
            for item, channels in self._scan(folder):
                channel_counts.setdefault(channels, item.dataset)
                self.items.append(item)
        if not split_channels and len(channel_counts) > 1:
            listing = ", ".join(f"{c} in {d}" for c, d in sorted(channel_counts.items()))
            raise UserError(f"the pooled datasets have different channel counts ({listing})",
                            fix="pool datasets with the same channels, or split channels into separate samples")
        self.channels = 1 if split_channels else next(iter(channel_counts), 1)
        if not self.items:
            rerun = _rerun(self.folders[0], self.configuration)
            lower = (f"`3dino plan -d {self.folders[0].name} --highres-min-axis N`, then `{rerun}`"
                     if self.configuration == "pretrain_highres" else "plans.json min_axis")
            raise UserError(f"no volume left to pretrain on: all {len(self.skipped)} volumes have an axis of at most "
                            f"min_axis={self.min_axis} voxels", file=self.folders[0],
                            fix=f"add larger volumes, or lower the minimum axis size ({lower})")

    def _scan(self, folder: Path) -> list[tuple[PretrainItem, int]]:
        config_dir = folder / self.configuration
        rerun = _rerun(folder, self.configuration)
        if not config_dir.is_dir():
            raise UserError(f"no preprocessed '{self.configuration}' data", file=config_dir, fix=f"run `{rerun}`")
        arrays = sorted(p for p in config_dir.glob("*.b2nd")
                        if not p.name.startswith(".") and not p.name.endswith("_seg.b2nd"))
        if not arrays:
            raise UserError(f"no preprocessed case (*.b2nd) in the '{self.configuration}' folder", file=config_dir,
                            fix=f"run `{rerun}`")
        found, skipped = [], 0
        for array_path in arrays:
            case_id = array_path.name[: -len(".b2nd")]
            meta_path = CaseProperties.path(config_dir, case_id)
            if not meta_path.is_file():
                raise UserError("preprocessed array without its case metadata (an interrupted preprocess?)",
                                file=meta_path, fix=f"run `{rerun}` again (it resumes)")
            meta = CaseProperties.read(meta_path, rerun=rerun)
            shape = tuple(meta.shape)
            if min(shape) <= self.min_axis:
                self.skipped.append((folder.name, case_id, shape))
                skipped += 1
                continue
            try:
                array = blosc2.open(str(array_path), mode="r")
            except Exception as exc:  # blosc2 raises several types for damaged files
                raise UserError(f"cannot open the preprocessed array ({exc})", file=array_path,
                                fix=f"delete it and run `{rerun}`") from None
            if len(array.shape) != 4 or tuple(array.shape[1:]) != shape:
                raise UserError(f"array shape {tuple(array.shape)} does not match the case metadata shape "
                                f"C x {list(shape)}", file=array_path, fix=f"delete it and run `{rerun}`")
            spacing = tuple(float(s) for s in meta.spacing)
            channels = int(array.shape[0])
            per_channel = range(channels) if self.split_channels and channels > 1 else [None]
            for channel in per_channel:
                item = PretrainItem(folder.name, case_id, array_path, shape, spacing, channel)
                found.append((item, 1 if self.split_channels else channels))
        logger.info("%s/%s: %d volumes kept, %d skipped (smallest axis of at most %d voxels)", folder.name,
                    self.configuration, len(arrays) - skipped, skipped, self.min_axis)
        return found

    def __len__(self) -> int:
        return len(self.items)

    def open(self, index: int) -> Any:
        """The array of sample ``index``: a blosc2 array (or channel view) ``C x X x Y x Z``; nothing is read yet."""
        item = self.items[index]
        array = blosc2.open(str(item.array_path), mode="r")
        return array if item.channel is None else _ChannelView(array, item.channel)

    def summary(self) -> str:
        """One line: samples kept, volumes skipped, and the rule."""
        return (f"{len(self.items)} samples from {len(self.folders)} dataset(s) ({self.configuration}); "
                f"{len(self.skipped)} volumes skipped with an axis of at most {self.min_axis} voxels")


def make_batch(dataset: PretrainDataset, cropper: MultiCropper, seed: int, index: int,
               batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """This rank's share of batch number ``index`` of the stream for ``seed`` (numpy, crop-major order).

    The global batch holds ``batch_size * world_size`` samples drawn uniformly over the pooled
    samples (without replacement when there are enough); rank r makes positions
    ``r*batch_size .. (r+1)*batch_size - 1``, each from its own generator ``[seed, index, position]``,
    so the union over ranks equals the batch one process makes with ``batch_size * world_size``.
    """
    total = batch_size * world_size
    picks = np.random.default_rng([int(seed), int(index)]).choice(len(dataset), size=total,
                                                                  replace=len(dataset) < total)
    positions = range(rank * batch_size, (rank + 1) * batch_size)
    picks = [picks[j] for j in positions]
    views = [cropper(dataset.open(int(i)), np.random.default_rng([int(seed), int(index), j]))
             for i, j in zip(picks, positions, strict=True)]
    # crop-major: [crop 0 of images 0..B-1, crop 1 of images 0..B-1, ...]
    global_crops = torch.stack([v["global"] for v in views], dim=1).flatten(0, 1)
    local_crops = torch.stack([v["local"] for v in views], dim=1).flatten(0, 1)
    return {"global_crops": global_crops.numpy(), "local_crops": local_crops.numpy(),
            "case_ids": [dataset.items[int(i)].name for i in picks], "batch_index": int(index)}


class _MultiCropDataLoader(IndexedBatchLoader):
    """batchgenerators loader: in worker ``w`` of ``W`` it makes batches ``start + w + k*W`` (k = 0, 1, ...)."""

    def __init__(self, dataset: PretrainDataset, cropper: MultiCropper, batch_size: int, seed: int,
                 num_workers: int, start: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, batch_size, seed, num_workers, start, rank, world_size)
        self.cropper = cropper

    def make(self, index: int) -> dict[str, Any]:
        return make_batch(self._data, self.cropper, self.seed, index, self.batch_size, self.rank, self.world_size)


class PretrainLoader(BatchStream):
    """Endless iterator of multi-crop batches; see :func:`make_pretrain_loader`."""

    size_key = "num_samples"
    stream_name = "data stream"
    resume_fix = "resume with the same datasets and options, or start a new run"

    def __init__(self, dataset: PretrainDataset, cropper: MultiCropper, batch_size: int, num_workers: int,
                 seed: int, *, deterministic: bool = True, num_cached_per_worker: int = 2,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, batch_size, num_workers, seed, deterministic=deterministic,
                         num_cached_per_worker=num_cached_per_worker, rank=rank, world_size=world_size)
        self.dataset, self.cropper = dataset, cropper

    def _loader(self, start: int) -> _MultiCropDataLoader:
        return _MultiCropDataLoader(self.dataset, self.cropper, self.batch_size, self.seed, self.num_workers,
                                    start=start, rank=self.rank, world_size=self.world_size)

    def _convert(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"global_crops": torch.from_numpy(batch["global_crops"]),
                "local_crops": torch.from_numpy(batch["local_crops"]),
                "case_ids": list(batch["case_ids"]), "batch_index": batch["batch_index"]}


def make_pretrain_loader(dataset: PretrainDataset, batch_size: int, num_workers: int, seed: int,
                         global_size: int = 96, local_size: int = 48, n_local: int = 8, *,
                         augment: bool = True, deterministic: bool = True, num_cached_per_worker: int = 2,
                         rank: int = 0, world_size: int = 1, **crop_options: Any) -> PretrainLoader:
    """An endless iterator of multi-crop batches of ``batch_size`` samples B.

    Each batch is a dict:
        ``global_crops``: float32 ``[2B, C, g, g, g]``, crop-major: rows 0..B-1 are the first global
            crop of images 0..B-1, rows B..2B-1 their second global crop (row ``k*B + b`` = crop k of image b).
        ``local_crops``: float32 ``[n_local*B, C, l, l, l]``, crop-major likewise (row ``j*B + b``).
        ``case_ids``: the B sample names (``Dataset/case``, ``:c<k>`` for a split channel).
        ``batch_index``: position of the batch in the stream.

    Args:
        num_workers: 0 = in-process (batchgenerators' SingleThreadedAugmenter); W > 0 = W worker
            processes (MultiThreadedAugmenter, order-preserving; NonDet... with ``deterministic=False``).
        seed: the stream's seed; the same seed gives the same batches for every ``num_workers``.
        rank, world_size: under torchrun each rank makes its own share of the global batch
            (``batch_size`` per rank; see :func:`make_batch`).
        crop_options: scale/ratio overrides passed to :class:`MultiCropper`.
    """
    cropper = MultiCropper(global_size, local_size, n_local, augment=augment, **crop_options)
    return PretrainLoader(dataset, cropper, batch_size, num_workers, seed, deterministic=deterministic,
                          num_cached_per_worker=num_cached_per_worker, rank=rank, world_size=world_size)
