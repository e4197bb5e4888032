"""OpenMP waiting policy of the ``3dino`` process (set before torch loads libgomp)."""

from __future__ import annotations

import os
import sys


def passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user set it.

    With torch's default (spinning) threads, a CPU process that shares its cores with data-loading
    workers or other jobs waits on descheduled threads at every parallel region: on the 2-core
    development machine at load average 4-9, 8 ``tiny`` pretraining iterations took 99-137 s
    with spinning and 46-51 s with passive waiting (docs/benchmarks.md). libgomp reads the variable
    once, when torch is first imported, so this acts only before that.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
