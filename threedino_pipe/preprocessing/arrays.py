"""Preprocessed arrays on disk: blosc2 ``.b2nd`` files chunked for fast random crops.

Layout: images ``C x X x Y x Z`` float32, labels ``1 x X x Y x Z`` (uint8 or int16). Chunks and
blocks hold one channel. Chunk = half the crop/patch size per spatial axis (clipped to the
array), so a random crop touches at most 3 chunks per axis and little outside the crop is
read; block = the chunk halved along its longest axis until it fits in 32 KiB (about a core's
L1 cache), since blosc2 decompresses only the blocks a slice needs.

Compression is single-threaded: blosc2 with several threads writes blocks in a varying order,
so the bytes of a file would differ from run to run (checked with blosc2 4.14).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import blosc2  # noqa: E402
import numpy as np  # noqa: E402

from threedino_pipe.runtime.atomic_files import atomic_path  # noqa: E402

BLOCK_BYTES = 32 * 1024


def chunks_and_blocks(shape: Sequence[int], crop: Sequence[int], itemsize: int) -> tuple[tuple, tuple]:
    """blosc2 ``chunks`` and ``blocks`` for a ``C x X x Y x Z`` array read in ``crop``-sized pieces.

    Args:
        shape: the array shape, channels first.
        crop: the spatial crop or patch size the loader reads (voxels, 3 values).
        itemsize: bytes per voxel.
    """
    spatial = shape[1:]
    chunk = [max(1, min(int(n), -(-int(c) // 2))) for n, c in zip(spatial, crop, strict=True)]
    block = list(chunk)
    while int(np.prod(block)) * itemsize > BLOCK_BYTES and max(block) > 1:
        axis = int(np.argmax(block))
        block[axis] = -(-block[axis] // 2)
    return (1, *chunk), (1, *block)


def write_array(path: str | Path, array: np.ndarray, crop: Sequence[int]) -> None:
    """Write ``array`` (``C x X x Y x Z``) to ``path`` (``.b2nd``) atomically and deterministically."""
    array = np.ascontiguousarray(array)
    chunks, blocks = chunks_and_blocks(array.shape, crop, array.itemsize)
    cparams = blosc2.CParams(codec=blosc2.Codec.LZ4, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    with atomic_path(path) as tmp:
        tmp.unlink()
        blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def open_array(path: str | Path) -> blosc2.NDArray:
    """Open a ``.b2nd`` file read-only; slice it (``arr[:, x0:x1, ...]``) to get numpy arrays."""
    return blosc2.open(str(path), mode="r")
