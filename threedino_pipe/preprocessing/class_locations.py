"""Seeded voxel samples per label value, for foreground oversampling during finetuning."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

MAX_PER_CLASS = 10_000


def case_seed(*parts: str) -> int:
    """A stable 63-bit seed from strings (e.g. case id and configuration), the same in every process."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_class_locations(seg: np.ndarray, classes: Iterable[int], seed: int,
                           max_per_class: int = MAX_PER_CLASS) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` random voxel coordinates ``[x, y, z]`` of each label value.

    Args:
        seg: ``X x Y x Z`` integer labels (the stored array's grid).
        classes: the foreground label values; each gets a key, empty when absent.
        seed: fixes the draw.

    Returns:
        ``{"<value>": [[x, y, z], ...]}``, coordinates in ascending (x, y, z) order.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for value in sorted(int(c) for c in classes):
        where = np.argwhere(seg == value)
        if len(where) > max_per_class:
            keep = np.sort(rng.choice(len(where), size=max_per_class, replace=False))
            where = where[keep]
        out[str(value)] = where.astype(int).tolist()
    return out
