"""``3dino demo``: the whole chain on bundled real scans (nilearn's MNI152), CPU-sized.

Builds a grey/white-matter dataset from the MNI152 template (``Dataset990_MNITissue``), then runs
every stage with the ``tiny`` preset, exactly as the CLI would: plan (which verifies first),
preprocess, the bundled pretrained backbone (or, with ``--pretrain-here``, a brief pretrain and
adapt-highres), the comparison as one ``3dino study`` (:mod:`threedino_pipe.demo.comparison`: finetune
``--pct 25 --head adapter`` per seed with that backbone frozen and with ``--backbone none``, predict and
evaluate on the held-out cases, the study's statistics, figure and report), the table over seeds,
``visualize`` the pretrained backbone and the ``none`` run's (trained from scratch) on a held-out scan, and
the demo report.

Everything lands under ``--out``::

    raw/ preprocessed/ results/         the usual THREEDINO_* folders
    results/Dataset990_MNITissue/study__demo/   the study: cells/, cells.csv, per_case.csv, summary.csv,
                                        tests.csv, label_efficiency.png/svg, report.html
    evaluation/seeds.csv                mean Dice per seed and side over the study's per_case.csv
    visualize/{pretrained,none}/        3dino visualize of each backbone on the first held-out scan
    report.html                         one self-contained page (figures in report_figures/ too)
    timings.json                        wall time of each stage of the last invocation
    demo.json                           the demo's options (a rerun with other options refuses)

Rerunning with the same options reuses finished stages: the study's done cells are skipped (their
runs, predictions and evaluations untouched); its tables, the seeds table, visualisations and the
report are redone (seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import (
    BundledBackboneRecord,
    DatasetJson,
    DemoRecord,
    DemoTimings,
    StageTime,
)
from threedino_pipe.demo.comparison import HEAD, DemoCells, run_study, study_command
from threedino_pipe.demo.layout import DATASET_ID, FULL, LAYOUT_VERSION, PRESET, QUICK, SIDES, DemoLayout, DemoSize
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.openmp import passive_openmp
from threedino_pipe.runtime.progress import stderr_console


def _check_options(layout: DemoLayout, options: dict) -> None:
    """Record the demo's options in ``demo.json``; refuse a folder of another layout or other options.

    Raises:
        UserError: the folder was written by an older demo (another layout), with other options, or is not a
            demo folder.
    """
    path = DemoRecord.in_folder(layout.out)
    if path.is_file():
        try:
            old = DemoRecord.read(path)
        except UserError:
            old = DemoRecord(options={})
        if old.options.get("layout") != options["layout"]:
            raise UserError("this folder was written by an older `3dino demo` whose folder layout differs (its "
                            "comparison did not run through `3dino study`)", file=path,
                            fix="pass a fresh --out folder (or delete this one to start over)")
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
        self.layout, self.size, self.clock = layout, size, clock
        self.d = str(DATASET_ID)

    def pretrain_here(self) -> Path:
        """The brief pretrain and adapt-highres of ``--pretrain-here``; returns the adapt-highres run."""
        from threedino_pipe.stages import adapt_highres, pretrain

        layout, size, d = self.layout, self.size, self.d
        self.clock("pretrain", f"3dino pretrain -d {d} --iters {size.pretrain_iters} --batch-size "
                   f"{size.pretrain_batch} --snapshot-every 0",
                   lambda: pretrain.run([d], iters=size.pretrain_iters, batch_size=size.pretrain_batch,
                                        snapshot_every=0, save_every=max(1, size.pretrain_iters // 2)))
        self.clock("adapt-highres", f"3dino adapt-highres --from {layout.pretrain_run} --iters {size.highres_iters} "
                   f"--batch-size {size.highres_batch} --snapshot-every 0",
                   lambda: adapt_highres.run(layout.pretrain_run, iters=size.highres_iters,
                                             batch_size=size.highres_batch, snapshot_every=0,
                                             save_every=max(1, size.highres_iters // 2)))
        return layout.highres_run

    def study(self, pretrained: Path) -> DemoCells:
        """The comparison as one ``3dino study`` (each cell: finetune, predict, evaluate; its own output prints a
        line per cell); returns its cells by side and seed."""
        return self.clock("study", study_command(pretrained, self.size),
                          lambda: run_study(self.layout, pretrained, self.size))

    def visualize_backbones(self, pretrained: Path, cells: DemoCells) -> None:
        """``visualize`` the pretrained backbone and the backbone the seed-0 ``none`` run trained (its run folder
        from the study's cells.csv)."""
        from threedino_pipe.stages import visualize

        models = {"pretrained": pretrained, "none": cells.runs["none"][0]}
        for side in SIDES:
            target = self.layout.visualize(side)
            self.clock(f"visualize ({side})", f"3dino visualize -m {models[side]} -i {self.layout.visualized_scan} "
                       f"-o {target}",
                       lambda side=side, target=target: visualize.run(models[side], self.layout.visualized_scan,
                                                                      target))


def stage_count(pretrain_here: bool) -> int:
    """Stages the demo runs: dataset, plan, preprocess, the backbone's (1 or 2), the study, the seeds table,
    2 visualizes and the report."""
    return 3 + (2 if pretrain_here else 1) + 5


def run(out: Path, quick: bool = False, pretrain_here: bool = False) -> Path:
    """Build the MNI example dataset under ``out`` and run the whole chain on it; returns report.html.

    Args:
        out: folder for the demo's raw, preprocessed and results data (the study among them), seeds table,
            visualisations and report.
        quick: the smallest run (fewer cases and iterations, one finetune seed; for CI).
        pretrain_here: pretrain and adapt-highres briefly inside the demo instead of using the
            bundled backbone (docs/demo.md).
    """
    layout = DemoLayout(Path(out).resolve())
    size = QUICK if quick else FULL
    bundled = None if pretrain_here else bundled_backbone()
    backbone_option = "pretrain-here" if pretrain_here else f"bundled {bundled[1].sha256[:16]}"
    _check_options(layout, {"layout": LAYOUT_VERSION, "quick": quick, "head": HEAD, "backbone": backbone_option,
                            **asdict(size)})
    passive_openmp()  # as `3dino` does; for callers of this function from Python
    console = stderr_console()
    from threedino_pipe.demo import report as demo_report
    from threedino_pipe.demo.examples import build_mni_dataset
    from threedino_pipe.demo.seeds import write_seed_table
    from threedino_pipe.stages import plan, preprocess

    for name in ("raw", "preprocessed", "results"):
        os.environ[f"THREEDINO_{name.upper()}"] = str(layout.out / name)
    clock = StageClock(layout.timings, console, quick, total=stage_count(pretrain_here))
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
    cells = stages.study(pretrained)
    seeds = clock("seeds", f"mean Dice per seed from {layout.study.out('per_case.csv')} -> {layout.seeds_summary}",
                  lambda: write_seed_table(layout, cells.names))
    stages.visualize_backbones(pretrained, cells)
    backbone = demo_report.BackboneInfo(path=pretrained, record=None if bundled is None else bundled[1])
    clock("report", f"demo report -> {layout.report}",
          lambda: demo_report.write(layout, cells, seeds, quick=quick, timings=clock.record, backbone=backbone))
    stdout = Console(width=None if Console().is_terminal else 120)
    stdout.print(demo_report.study_terminal_table(layout))
    stdout.print(demo_report.seeds_terminal_table(seeds))
    stdout.print(f"total {clock.record.total_seconds:.0f} s (stage times in {layout.timings})")
    stdout.print(f"study report: {layout.study.out('report.html')}")
    stdout.print(f"report: {layout.report}")
    return layout.report
