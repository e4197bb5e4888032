"""``3dino demo``: the whole chain on bundled real scans (nilearn's MNI152), CPU-sized.

Builds a grey/white-matter dataset from the MNI152 template (``Dataset990_MNITissue``), then runs
every stage with the ``tiny`` preset, exactly as the CLI would: plan (which verifies first),
preprocess, a brief pretrain and adapt-highres, ``finetune --pct 25`` twice on the same subset
(pretrained backbone = the adapt-highres run, and ``--backbone none``), predict on the held-out
cases (``imagesTs``) with each model, evaluate each, ``evaluate --compare``, ``visualize`` the
pretrained backbone and the ``none`` run's (trained from scratch) on a held-out scan, and the
demo report.

Everything lands under ``--out``::

    raw/ preprocessed/ results/         the usual THREEDINO_* folders
    predictions/{pretrained,none}/      predict outputs
    evaluation/{pretrained,none,compare}/
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

from threedino_pipe.artifacts import DatasetJson, DemoRecord, DemoTimings, EvaluationSummary, StageTime
from threedino_pipe.demo.layout import DATASET_ID, PRESET, SIDES, DemoLayout
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.openmp import passive_openmp

PCT = 25.0
SEED = 0
HEAD = "adapter"  # both sides: the comparison differs only in the backbone's initialisation


@dataclass(frozen=True)
class DemoSize:
    """Case and iteration counts of one demo size (chosen for 2 CPU cores, docs/demo.md)."""

    train_cases: int
    test_cases: int
    pretrain_iters: int
    highres_iters: int
    finetune_iters: int
    pretrain_batch: int = 4
    highres_batch: int = 2
    finetune_batch: int = 2


FULL = DemoSize(train_cases=12, test_cases=4, pretrain_iters=24, highres_iters=8, finetune_iters=100)
QUICK = DemoSize(train_cases=6, test_cases=2, pretrain_iters=6, highres_iters=2, finetune_iters=20)


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


def run(out: Path, quick: bool = False) -> Path:
    """Build the MNI example dataset under ``out`` and run the whole chain on it; returns report.html.

    Args:
        out: folder for the demo's raw, preprocessed and results data, predictions, evaluations
            and report.
        quick: the smallest run (fewer cases and iterations, for CI).
    """
    layout = DemoLayout(Path(out).resolve())
    size = QUICK if quick else FULL
    _check_options(layout, {"quick": quick, "head": HEAD, **asdict(size)})  # before any slow import
    passive_openmp()  # as `3dino` does; for callers of this function from Python
    console = Console(stderr=True, soft_wrap=True)
    from threedino_pipe.demo import report as demo_report
    from threedino_pipe.demo.examples import build_mni_dataset
    from threedino_pipe.stages import adapt_highres, evaluate, finetune, plan, predict, preprocess, pretrain, visualize

    for name in ("raw", "preprocessed", "results"):
        os.environ[f"THREEDINO_{name.upper()}"] = str(layout.out / name)
    clock = StageClock(layout.timings, console, quick, total=15)
    d = str(DATASET_ID)

    def build() -> None:
        if not DatasetJson.in_folder(layout.raw).is_file():
            build_mni_dataset(layout.out / "raw", DATASET_ID, size.train_cases, num_test=size.test_cases)

    clock("dataset", f"{size.train_cases} training + {size.test_cases} held-out cases from the MNI152 template "
          f"-> {layout.raw}", build)
    clock("plan", f"3dino plan -d {d} --preset {PRESET}", lambda: plan.run(d, preset=PRESET, num_processes=2))
    clock("preprocess", f"3dino preprocess -d {d}", lambda: preprocess.run(d, num_processes=2))
    clock("pretrain", f"3dino pretrain -d {d} --iters {size.pretrain_iters} --batch-size {size.pretrain_batch} "
          "--snapshot-every 0",
          lambda: pretrain.run([d], iters=size.pretrain_iters, batch_size=size.pretrain_batch, snapshot_every=0,
                               save_every=max(1, size.pretrain_iters // 2)))
    clock("adapt-highres", f"3dino adapt-highres --from {layout.pretrain_run} --iters {size.highres_iters} "
          f"--batch-size {size.highres_batch} --snapshot-every 0",
          lambda: adapt_highres.run(layout.pretrain_run, iters=size.highres_iters, batch_size=size.highres_batch,
                                    snapshot_every=0, save_every=max(1, size.highres_iters // 2)))
    runs: dict[str, Path] = {}
    for side, backbone in zip(SIDES, (str(layout.highres_run), "none"), strict=True):
        val_every = max(1, size.finetune_iters // 2)

        def train(backbone: str = backbone, side: str = side, val_every: int = val_every) -> None:
            runs[side] = finetune.run(d, pct=PCT, backbone=backbone, head=HEAD, iters=size.finetune_iters,
                                      batch_size=size.finetune_batch, seed=SEED, val_every=val_every,
                                      save_every=val_every)

        clock(f"finetune ({side})", f"3dino finetune -d {d} --pct {PCT:g} --backbone {backbone} --head {HEAD} --iters "
              f"{size.finetune_iters} --batch-size {size.finetune_batch} --val-every {val_every} --seed {SEED}", train)
    images, labels = layout.raw / "imagesTs", layout.raw / "labelsTs"
    for side in SIDES:
        target = layout.predictions(side)
        clock(f"predict ({side})", f"3dino predict -i {images} -o {target} -m {runs[side]} --continue",
              lambda side=side, target=target: _exit_ok(predict.run(images, target, [runs[side]], resume=True),
                                                        "predict", target / "failures.csv"))
    for side in SIDES:
        target = layout.evaluation(side)
        clock(f"evaluate ({side})", f"3dino evaluate -r {labels} -p {layout.predictions(side)} -d {d} -o {target}",
              lambda side=side, target=target: _exit_ok(
                  evaluate.run(labels, layout.predictions(side), dataset=d, output=target), "evaluate",
                  EvaluationSummary.in_folder(target)))
    compare_dir = layout.evaluation("compare")
    sides = [str(layout.evaluation(side)) for side in SIDES]
    clock("evaluate --compare", f"3dino evaluate --compare {' '.join(sides)} -r {labels} -d {d} --names "
          f"{','.join(SIDES)} -o {compare_dir}",
          lambda: _exit_ok(evaluate.run(labels, compare=sides, names=list(SIDES), dataset=d, output=compare_dir),
                           "evaluate --compare", EvaluationSummary.in_folder(compare_dir)))
    models = {"pretrained": layout.highres_run, "none": runs["none"]}  # the pretrained backbone itself
    for side in SIDES:
        target = layout.visualize(side)
        clock(f"visualize ({side})", f"3dino visualize -m {models[side]} -i {layout.visualized_scan} -o {target}",
              lambda side=side, target=target: visualize.run(models[side], layout.visualized_scan, target))
    clock("report", f"demo report -> {layout.report}",
          lambda: demo_report.write(layout, runs, quick=quick, timings=clock.record))
    stdout = Console(width=None if Console().is_terminal else 120)
    stdout.print(demo_report.terminal_table(compare_dir))
    stdout.print(f"total {clock.record.total_seconds:.0f} s (stage times in {layout.timings})")
    stdout.print(f"report: {layout.report}")
    return layout.report
