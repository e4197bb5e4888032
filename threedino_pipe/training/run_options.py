"""The fields every pretraining method's run config shares (3DINO, SimMIM, Tang et al.)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class PretrainRunOptions:
    """Base of the SSL, SimMIM and Tang run configs (keyword-only fields).

    What the run trains on: the pooled ``datasets`` (folder names), the plans' ``configuration``, the backbone
    ``preset``, ``iters``, ``batch_size`` volumes per rank, the ``global_crop`` edge and the ``min_axis`` a
    volume needs (voxels). How it is carried out (may differ between a run and its resumption, ``VOLATILE``):
    ``save_every``, ``snapshot_every``, ``log_every`` and ``probe_every`` in iterations (0: never).
    """

    datasets: list[str]
    configuration: str
    preset: str
    iters: int
    batch_size: int
    global_crop: int
    min_axis: int
    num_workers: int = 0
    save_every: int = 100
    snapshot_every: int = 0
    log_every: int = 1
    grad_checkpointing: bool = False
    probe_every: int = 0

    # run.json options left out when a resumed run is compared with its record (CLI-only ones included)
    VOLATILE: ClassVar[tuple[str, ...]] = ("num_workers", "save_every", "snapshot_every", "log_every",
                                           "grad_checkpointing", "stop_after", "device", "probe_every")

    def options(self) -> dict[str, Any]:
        """Every field, JSON-able (what run.json and the checkpoints record)."""
        return asdict(self)
