"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors, state dicts and plain Python values (no pickled objects), so
a file from elsewhere never runs code. Writes are atomic.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _check_zip_crc(path: Path) -> None:
    """Raise if a member of a zip-format checkpoint fails its CRC32 (torch.load does not check)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0:  # writer did not record a checksum
                    continue
                with zf.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise UserError(f"checkpoint is corrupted ({exc})", file=path,
                        fix="download or copy the file again; it does not match its own checksums") from None


def read_checkpoint(path: str | Path, fix: str = "check the path") -> Any:
    """Load a ``.pt`` / ``.pth`` file safely: CRC check of the zip members, ``weights_only=True``, CPU tensors.

    A missing path, a folder, a truncated or corrupted file, or a pickle holding arbitrary Python
    objects is a :class:`UserError` naming the file; ``fix`` is what the message tells the user to do
    about an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("checkpoint file not found", file=path, fix=fix)
    if path.is_dir():
        raise UserError("is a folder, not a checkpoint file", file=path,
                        fix="pass the weights file itself (for a pretrain run folder: its backbone.pt)")
    if zipfile.is_zipfile(path):
        _check_zip_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise UserError("holds Python objects besides tensors and plain containers; refusing to unpickle it",
                            file=path, fix="re-save just the state dict: torch.save(model.state_dict(), ...)") from None
        raise _unreadable(path, exc, fix) from None
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError, UnicodeDecodeError, ...
        raise _unreadable(path, exc, fix) from None


def _unreadable(path: Path, exc: Exception, fix: str) -> UserError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(f"cannot be read as a PyTorch checkpoint (truncated, corrupted or not a .pt file): "
                     f"{type(exc).__name__}: {first}", file=path, fix=fix)


def load_checkpoint(path: str | Path, rerun: str = "the training command") -> dict[str, Any]:
    """A training checkpoint of ours (:func:`read_checkpoint`); a missing or corrupt one names ``rerun``."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", file=path, fix=f"rerun {rerun}")
    state = read_checkpoint(path, fix=f"the file is truncated, corrupt or not a threedino-pipe checkpoint; rerun "
                                       f"{rerun} with --restart")
    if not isinstance(state, dict):
        raise UserError(f"holds a {type(state).__name__}, not a threedino-pipe checkpoint", file=path,
                        fix=f"rerun {rerun} with --restart")
    return state


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
