"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors, state dicts and plain Python values (no pickled objects), so
a file from elsewhere never runs code. Writes are atomic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threedino_pipe.errors import UserError
from threedino_pipe.jsonio import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, rerun: str = "the training command") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a corrupt or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", file=path, fix=f"rerun {rerun}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise UserError(f"cannot load the checkpoint ({type(exc).__name__}: {str(exc)[:120]})", file=path,
                        fix=f"the file is truncated, corrupt or not a threedino-pipe checkpoint; rerun {rerun} "
                        "with --restart") from None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    npk = state["numpy"]
    np.random.set_state(("MT19937", npk["keys"].numpy().astype(np.uint32), npk["pos"], npk["has_gauss"],
                         npk["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_state(rank: int, world_size: int) -> Any:
    """RNG state of every rank as a list (rank 0 writes the checkpoint), or this process's alone.

    Every rank must call it: it gathers across the process group.
    """
    state = rng_state()
    if world_size == 1:
        return state
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def restore_rng_state(saved: Any, rank: int) -> None:
    """Restore this rank's entry of :func:`gathered_rng_state` (a list under torchrun)."""
    set_rng_state(saved[rank] if isinstance(saved, list) else saved)
