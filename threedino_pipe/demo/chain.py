"""``3dino demo``: the whole chain on bundled real scans (nilearn's MNI152), CPU-sized.

Builds a grey/white-matter dataset from the MNI152 template (``Dataset990_MNITissue``), then runs
every stage with the ``tiny`` preset, exactly as the CLI would: plan (which verifies first),
preprocess, the bundled pretrained backbone (or, with ``--pretrain-here``, a brief pretrain and
adapt-highres), ``finetune --pct 25 --head adapter`` per seed with that backbone frozen and with
``--backbone none`` on the same subset, predict on the held-out cases (``imagesTs``) with each
model, evaluate each, ``evaluate --compare`` per seed, the table over seeds, ``visualize`` the
pretrained backbone and the ``none`` run's (trained from scratch) on a held-out scan, and the
demo report.

Everything lands under ``--out``::

    raw/ preprocessed/ results/         the usual THREEDINO_* folders
    predictions/{pretrained,none}/seedS/          predict outputs
    evaluation/{pretrained,none,compare}/seedS/   evaluate outputs; evaluation/seeds.csv over seeds
    visualize/{pretrained,none}/        3dino visualize of each backbone on the first held-out scan
    report.html                         one self-contained page (figures in report_figures/ too)
    timings.json                        wall time of each stage of the last invocation
    demo.json                           the demo's options (a rerun with other options refuses)

Rerunning with the same options reuses finished stages: training runs report "finished
already", predict runs with ``--continue``, evaluation and the report are redone (seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import (
    BundledBackboneRecord,
    DatasetJson,
    DemoRecord,
    DemoTimings,
    EvaluationSummary,
    StageTime,
)
from threedino_pipe.demo.layout import DATASET_ID, PRESET, SIDES, DemoLayout
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.openmp import passive_openmp

PCT = 25.0
SEED = 0
HEAD = "adapter"  # both sides: the comparison differs only in the backbone's initialisation


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
    #: in 200; 1e-3 gave both sides their best validation Dice of the rates tried (docs/demo.md)
    finetune_lr: float = 1e-3

    @property
    def seeds(self) -> list[int]:
        return list(range(self.num_seeds))


FULL = DemoSize(train_cases=12, test_cases=4, pretrain_iters=24, highres_iters=8, finetune_iters=200, num_seeds=3)
QUICK = DemoSize(train_cases=6, test_cases=2, pretrain_iters=6, highres_iters=2, finetune_iters=20, num_seeds=1)


def _check_options(layout: DemoLayout, options: dict) -> None:
    """Record the demo's options in ``demo.json``; refuse a folder written with other options."""
    path = DemoRecord.in_folder(layout.out)
    if path.is_file():
        try:
            old = DemoRecord.read(path)
        except UserError:
            old = DemoRecord(options={})
        if old.options != options:
            was = "--quick" if old.made_quick() else "without --quick"
            raise UserError(f"this folder holds a demo run with other options (made {was}, or by another "
                            "version)", file=path,
                            fix="pass another --out folder, or delete this one to start over")
        return
    if layout.out.is_dir() and any(layout.out.iterdir()):
        raise UserError("the demo folder exists and is not a demo folder (no demo.json)", file=layout.out,
                        fix="pass an empty or new --out folder")
    DemoRecord(options=options).write(path)


class StageClock:
    """Runs the demo's stages in order, prints each command and its wall time, keeps ``timings.json``."""

    def __init__(self, path: Path, console: Console, quick: bool, total: int) -> None:
        self.path, self.console, self.total = path, console, total
        self.record = DemoTimings(quick=quick, cpu_count=os.cpu_count(), load_average_start=list(os.getloadavg()))
        self.start = time.perf_counter()

    def __call__(self, name: str, command: str, work: Callable[[], object]) -> object:
        index = len(self.record.stages) + 1
        self.console.print(f"[bold]demo [{index}/{self.total}][/] {name}: [cyan]{command}[/]")
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.record.stages.append(StageTime(stage=name, command=command, seconds=round(seconds, 2)))
        self.record.total_seconds = round(time.perf_counter() - self.start, 2)
        self.record.load_average_end = list(os.getloadavg())
        self.record.write(self.path)
        self.console.print(f"[bold]demo [{index}/{self.total}][/] {name} took {seconds:.1f} s")
        return result


def _exit_ok(code: int, what: str, file: Path) -> None:
    if code != 0:
        raise UserError(f"{what} did not succeed for every case", file=file,
                        fix="read the listed failures, fix the cause and rerun `3dino demo` with the same options")


def bundled_backbone() -> tuple[Path, BundledBackboneRecord]:
    """The shipped backbone file and its provenance record, the file's checksum verified.

    Raises:
        UserError: the file or its record is missing, or the file's SHA-256 is not the recorded one.
    """
    from threedino_pipe.demo.bundled_backbone import BACKBONE, RECORD
    from threedino_pipe.models.backbone_choice import file_sha256

    fix = ("reinstall the package, rebuild the backbone with `make demo-backbone` (about an hour on 2 cores), or "
           "run `3dino demo --pretrain-here` to pretrain briefly inside the demo")
    for path in (BACKBONE, RECORD):
        if not path.is_file():
            raise UserError("the demo's bundled backbone is missing", file=path, fix=fix)
    record = BundledBackboneRecord.read(RECORD)
    if file_sha256(BACKBONE, digits=64) != record.sha256:
        raise UserError(f"the bundled backbone's SHA-256 is not the one its record {RECORD.name} states (the file "
                        "was changed or damaged)", file=BACKBONE, fix=fix)
    return BACKBONE, record


class Stages:
    """The demo's stage functions on one layout and size (each is what its command line runs)."""

    def __init__(self, layout: DemoLayout, size: DemoSize, clock: StageClock) -> None:
        from threedino_pipe.stages import adapt_highres, evaluate, finetune, predict, pretrain, visualize

        self.layout, self.size, self.clock = layout, size, clock
        self.adapt_highres, self.evaluate, self.finetune = adapt_highres, evaluate, finetune
        self.predict, self.pretrain, self.visualize = predict, pretrain, visualize
        self.d = str(DATASET_ID)
        self.runs: dict[str, dict[int, Path]] = {side: {} for side in SIDES}

    def pretrain_here(self) -> Path:
        """The brief pretrain and adapt-highres of ``--pretrain-here``; returns the adapt-highres run."""
        layout, size, d = self.layout, self.size, self.d
        self.clock("pretrain", f"3dino pretrain -d {d} --iters {size.pretrain_iters} --batch-size "
                   f"{size.pretrain_batch} --snapshot-every 0",
                   lambda: self.pretrain.run([d], iters=size.pretrain_iters, batch_size=size.pretrain_batch,
                                             snapshot_every=0, save_every=max(1, size.pretrain_iters // 2)))
        self.clock("adapt-highres", f"3dino adapt-highres --from {layout.pretrain_run} --iters {size.highres_iters} "
                   f"--batch-size {size.highres_batch} --snapshot-every 0",
                   lambda: self.adapt_highres.run(layout.pretrain_run, iters=size.highres_iters,
                                                  batch_size=size.highres_batch, snapshot_every=0,
                                                  save_every=max(1, size.highres_iters // 2)))
        return layout.highres_run

    def finetune_all(self, pretrained: Path) -> None:
        """``finetune --pct 25`` for every seed, with the pretrained backbone and with ``none``."""
        size, d = self.size, self.d
        val_every = max(1, size.finetune_iters // 2)
        for seed in size.seeds:
            for side, backbone in zip(SIDES, (str(pretrained), "none"), strict=True):
                def train(backbone: str = backbone, side: str = side, seed: int = seed) -> None:
                    self.runs[side][seed] = self.finetune.run(
                        d, pct=PCT, backbone=backbone, head=HEAD, iters=size.finetune_iters,
                        batch_size=size.finetune_batch, lr=size.finetune_lr, seed=seed, val_every=val_every,
                        save_every=val_every)

                self.clock(f"finetune ({side}, seed {seed})", f"3dino finetune -d {d} --pct {PCT:g} --backbone "
                           f"{backbone} --head {HEAD} --iters {size.finetune_iters} --batch-size "
                           f"{size.finetune_batch} --lr {size.finetune_lr:g} --val-every {val_every} --seed {seed}", train)

    def predict_and_evaluate(self) -> None:
        """Predict the held-out cases with every finetune run, evaluate each, compare the sides per seed."""
        layout, d = self.layout, self.d
        images, labels = layout.raw / "imagesTs", layout.raw / "labelsTs"
        for seed in self.size.seeds:
            for side in SIDES:
                run, target = self.runs[side][seed], layout.predictions(side, seed)
                self.clock(f"predict ({side}, seed {seed})", f"3dino predict -i {images} -o {target} -m {run} "
                           "--continue",
                           lambda run=run, target=target: _exit_ok(self.predict.run(images, target, [run], resume=True),
                                                                   "predict", target / "failures.csv"))
                target = layout.evaluation(side, seed)
                self.clock(f"evaluate ({side}, seed {seed})", f"3dino evaluate -r {labels} -p "
                           f"{layout.predictions(side, seed)} -d {d} -o {target}",
                           lambda side=side, seed=seed, target=target: _exit_ok(
                               self.evaluate.run(labels, layout.predictions(side, seed), dataset=d, output=target),
                               "evaluate", EvaluationSummary.in_folder(target)))
            compare_dir = layout.evaluation("compare", seed)
            sides = [str(layout.evaluation(side, seed)) for side in SIDES]
            self.clock(f"evaluate --compare (seed {seed})", f"3dino evaluate --compare {' '.join(sides)} -r {labels} "
                       f"-d {d} --names {','.join(SIDES)} -o {compare_dir}",
                       lambda sides=sides, compare_dir=compare_dir: _exit_ok(
                           self.evaluate.run(labels, compare=sides, names=list(SIDES), dataset=d, output=compare_dir),
                           "evaluate --compare", EvaluationSummary.in_folder(compare_dir)))

    def visualize_backbones(self, pretrained: Path) -> None:
        """``visualize`` the pretrained backbone and the backbone the seed-0 ``none`` run trained."""
        models = {"pretrained": pretrained, "none": self.runs["none"][0]}
        for side in SIDES:
            target = self.layout.visualize(side)
            self.clock(f"visualize ({side})", f"3dino visualize -m {models[side]} -i {self.layout.visualized_scan} "
                       f"-o {target}",
                       lambda side=side, target=target: self.visualize.run(models[side], self.layout.visualized_scan,
                                                                           target))


def stage_count(size: DemoSize, pretrain_here: bool) -> int:
    """Stages the demo runs: dataset, plan, preprocess, the backbone's (1 or 2), 2 finetunes, 2 predicts,
    2 evaluates and a compare per seed, the seeds table, 2 visualizes and the report."""
    return 3 + (2 if pretrain_here else 1) + 7 * size.num_seeds + 4


def run(out: Path, quick: bool = False, pretrain_here: bool = False) -> Path:
    """Build the MNI example dataset under ``out`` and run the whole chain on it; returns report.html.

    Args:
        out: folder for the demo's raw, preprocessed and results data, predictions, evaluations
            and report.
        quick: the smallest run (fewer cases and iterations, one finetune seed; for CI).
        pretrain_here: pretrain and adapt-highres briefly inside the demo instead of using the
            bundled backbone (docs/demo.md).
    """
    layout = DemoLayout(Path(out).resolve())
    size = QUICK if quick else FULL
    bundled = None if pretrain_here else bundled_backbone()
    backbone_option = "pretrain-here" if pretrain_here else f"bundled {bundled[1].sha256[:16]}"
    _check_options(layout, {"quick": quick, "head": HEAD, "backbone": backbone_option, **asdict(size)})
    passive_openmp()  # as `3dino` does; for callers of this function from Python
    console = Console(stderr=True, soft_wrap=True)
    from threedino_pipe.demo import report as demo_report
    from threedino_pipe.demo.examples import build_mni_dataset
    from threedino_pipe.demo.seeds import write_seed_table
    from threedino_pipe.stages import plan, preprocess

    for name in ("raw", "preprocessed", "results"):
        os.environ[f"THREEDINO_{name.upper()}"] = str(layout.out / name)
    clock = StageClock(layout.timings, console, quick, total=stage_count(size, pretrain_here))
    stages = Stages(layout, size, clock)
    d = str(DATASET_ID)

    def build() -> None:
        if not DatasetJson.in_folder(layout.raw).is_file():
            build_mni_dataset(layout.out / "raw", DATASET_ID, size.train_cases, num_test=size.test_cases)

    clock("dataset", f"{size.train_cases} training + {size.test_cases} held-out cases from the MNI152 template "
          f"-> {layout.raw}", build)
    clock("plan", f"3dino plan -d {d} --preset {PRESET}", lambda: plan.run(d, preset=PRESET, num_processes=2))
    clock("preprocess", f"3dino preprocess -d {d}", lambda: preprocess.run(d, num_processes=2))
    if bundled is None:
        pretrained = stages.pretrain_here()
    else:
        pretrained = bundled[0]
        clock("backbone", f"the bundled backbone {pretrained.name} (SHA-256 {bundled[1].sha256[:16]}..., "
              f"{bundled[1].iterations} iterations of `3dino pretrain`; docs/demo.md)", lambda: None)
    stages.finetune_all(pretrained)
    stages.predict_and_evaluate()
    seeds = clock("seeds", f"mean Dice per seed -> {layout.seeds_summary}",
                  lambda: write_seed_table(layout, size.seeds))
    stages.visualize_backbones(pretrained)
    backbone = demo_report.BackboneInfo(path=pretrained, record=None if bundled is None else bundled[1])
    clock("report", f"demo report -> {layout.report}",
          lambda: demo_report.write(layout, stages.runs, quick=quick, timings=clock.record, backbone=backbone))
    stdout = Console(width=None if Console().is_terminal else 120)
    stdout.print(demo_report.terminal_table(layout.evaluation("compare", 0)))
    stdout.print(demo_report.seeds_terminal_table(seeds))
    stdout.print(f"total {clock.record.total_seconds:.0f} s (stage times in {layout.timings})")
    stdout.print(f"report: {layout.report}")
    return layout.report
