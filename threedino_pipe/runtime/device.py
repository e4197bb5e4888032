"""The device a command runs on, and its peak memory."""

from __future__ import annotations

import resource

import torch

from threedino_pipe.runtime.errors import UserError


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: the first GPU when one is present, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        UserError: an unknown device name, or a GPU asked for where none is available.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device {requested!r}", fix="pass --device auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} but no CUDA GPU is available", fix="pass --device cpu (or auto)")
    return device


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: allocated on a GPU, resident (max RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
