"""Where the demo's files go (docs/demo.md), and the demo's sizes: the dataset, the runs, the study and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import DemoTimings
from threedino_pipe.study.layout import StudyLayout

DATASET_ID = 990
DATASET_NAME = "Dataset990_MNITissue"
PRESET = "tiny"
SIDES = ("pretrained", "none")
STUDY_NAME = "demo"  # the comparison is `3dino study --name demo`
#: the demo folder's layout; demo.json records it and a folder of another layout is refused (a fresh --out)
LAYOUT_VERSION = 2  # 2: the comparison runs through `3dino study` (1: its own predict/evaluate folders)


@dataclass(frozen=True)
class DemoSize:
    """Case, iteration and seed counts of one demo size (chosen for 2 CPU cores, docs/demo.md)."""

    train_cases: int
    test_cases: int
    pretrain_iters: int  # --pretrain-here only
    highres_iters: int  # --pretrain-here only
    finetune_iters: int
    num_seeds: int  # finetune seeds 0 .. num_seeds - 1, each on both sides
    pretrain_batch: int = 4
    highres_batch: int = 2
    finetune_batch: int = 2
    #: both sides' AdamW peak rate: finetune's default (1e-4, the paper's for 30,000 iterations) learns little
    #: in 200; validation Dice rises to a plateau from 1e-2 on, whose smallest rate this is (docs/demo.md)
    finetune_lr: float = 1e-2

    @property
    def seeds(self) -> list[int]:
        return list(range(self.num_seeds))

    @property
    def val_every(self) -> int:
        """Finetune validates twice: half-way and at the end."""
        return max(1, self.finetune_iters // 2)


FULL = DemoSize(train_cases=12, test_cases=4, pretrain_iters=24, highres_iters=8, finetune_iters=200, num_seeds=3)
QUICK = DemoSize(train_cases=6, test_cases=2, pretrain_iters=6, highres_iters=2, finetune_iters=20, num_seeds=1)


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

    @property
    def study(self) -> StudyLayout:
        """The comparison's ``3dino study`` folder (``results/Dataset990_MNITissue/study__demo``)."""
        return StudyLayout.of(self.out / "results" / DATASET_NAME, STUDY_NAME)

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
