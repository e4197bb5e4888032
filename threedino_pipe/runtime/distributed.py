"""torch.distributed set-up for runs launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from threedino_pipe.runtime.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", *, backend: str | None = None,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun set up (if any) and choose this process's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``cuda`` without an index takes the GPU
            ``LOCAL_RANK`` (modulo the GPUs present).
        backend: the process group's backend; default NCCL on a GPU, gloo on the CPU (``predict``,
            which only waits at barriers, asks for gloo everywhere).
        timeout: how long a collective waits (default: PyTorch's).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        index = local_rank % max(1, torch.cuda.device_count()) if dev.index is None else dev.index
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                **({"timeout": timeout} if timeout is not None else {}))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
