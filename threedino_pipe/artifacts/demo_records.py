"""The demo's own records (docs/demo.md): ``demo.json`` (its options) and ``timings.json`` (stage times)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from threedino_pipe.artifacts.base import Artifact, Record


class DemoRecord(Artifact):
    """``demo.json``: the options a demo folder was made with (a rerun with other options refuses)."""

    KIND = "demo"
    SCHEMA_VERSION = 1
    WRITER = "3dino demo"
    FILE = "demo.json"

    options: dict[str, Any]

    def made_quick(self) -> bool:
        """True when the folder was made by ``3dino demo --quick``."""
        return bool(self.options.get("quick"))


class StageTime(Record):
    """One stage of the demo: its name, the command it ran and its wall time (s)."""

    stage: str
    command: str
    seconds: float = Field(ge=0.0)


class DemoTimings(Artifact):
    """``timings.json``: wall time (s) of each stage of the last invocation, the machine's load average."""

    KIND = "demo_timings"
    SCHEMA_VERSION = 1
    WRITER = "3dino demo"
    FILE = "timings.json"

    quick: bool
    cpu_count: int | None
    load_average_start: list[float]
    stages: list[StageTime] = []
    total_seconds: float = 0.0
    load_average_end: list[float] | None = None

    OMIT_WHEN_NONE = ("load_average_end",)


class BundledBackboneRecord(Artifact):
    """``backbone_tiny_mni.json``: how the demo's bundled backbone was made (docs/demo.md).

    ``commands`` reproduce it (``make demo-backbone``); ``wall_seconds`` is the sum of the pretrain
    invocations' wall times on ``machine``; ``recipe_name`` is the run's recipe (``auto``) and
    ``deviations`` its deviations from the paper with their reasons (from the run's run.json);
    ``final_signals`` the learning signals of the run's last logged iteration (docs/pretrain.md);
    ``probe_curve`` the patch probe's balanced accuracy by iteration (``"0"``: the network at
    initialisation); ``curves`` the run's curves.png shipped beside it; ``sha256`` checks the
    shipped file.
    """

    KIND = "bundled_backbone"
    SCHEMA_VERSION = 1
    WRITER = "make demo-backbone"
    FILE = "backbone_tiny_mni.json"

    file: str
    sha256: str = Field(min_length=64, max_length=64)
    commands: list[str]
    pretraining_data: str
    iterations: int = Field(gt=0)
    wall_seconds: float = Field(ge=0.0)
    machine: str
    made: str
    recipe_name: str
    deviations: dict[str, str] = Field(default_factory=dict)
    final_signals: dict[str, float] = Field(default_factory=dict)
    probe_curve: dict[str, float] = Field(default_factory=dict)
    curves: str | None = None

    OMIT_WHEN_NONE = ("curves",)
