"""Where the demo's files go (docs/demo.md): the dataset, the runs, predictions, evaluations and report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import DemoTimings

DATASET_ID = 990
DATASET_NAME = "Dataset990_MNITissue"
PRESET = "tiny"
SIDES = ("pretrained", "none")


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo's files go under ``out``."""

    out: Path

    @property
    def raw(self) -> Path:
        return self.out / "raw" / DATASET_NAME

    @property
    def pretrain_run(self) -> Path:
        return self.out / "results" / "pretrain" / f"{PRESET}__{DATASET_ID}"

    @property
    def highres_run(self) -> Path:
        return self.pretrain_run.parent / f"{self.pretrain_run.name}__highres"

    def predictions(self, side: str, seed: int) -> Path:
        return self.out / "predictions" / side / f"seed{seed}"

    def evaluation(self, side: str, seed: int) -> Path:
        """``evaluate`` output of one side and finetune seed; side ``compare`` is the paired comparison."""
        return self.out / "evaluation" / side / f"seed{seed}"

    @property
    def seeds_summary(self) -> Path:
        """Mean Dice per side and finetune seed, and the difference's mean and 95 % CI over seeds."""
        return self.out / "evaluation" / "seeds.csv"

    def visualize(self, side: str) -> Path:
        return self.out / "visualize" / side

    @property
    def visualized_scan(self) -> Path:
        """The held-out scan whose backbone maps the report shows (the first of imagesTs)."""
        return min((self.raw / "imagesTs").glob("*_0000.nii.gz"))

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    @property
    def timings(self) -> Path:
        return DemoTimings.in_folder(self.out)
