"""One cell of a study: the ordinary ``finetune``, ``predict`` and ``evaluate`` of a backbone entry at one pct,
seed and fold; its ``cell.json`` records how it ended (a failure is recorded, never raised)."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.artifacts import EvaluationSummary, ModelCard, StudyCell
from threedino_pipe.artifacts.study import StudyCellSpec
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.study import cell_finetune
from threedino_pipe.study.layout import StudyLayout
from threedino_pipe.study.test_cases import TestCases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellOptions:
    """What every cell's finetune gets besides its entry, pct, seed and fold."""

    dataset: str
    iters: int | None
    num_workers: int
    device: str
    gpus: int | None = None  # --gpus-per-cell: finetune under torchrun with this many processes (None: in-process)
    batch_size: int | None = None  # --batch-size, --lr, --val-every: None is finetune's default
    lr: float | None = None
    val_every: int | None = None

    @property
    def settings(self) -> dict:
        """The study's finetune settings that are given (:data:`~threedino_pipe.study.cell_finetune.SETTINGS`)."""
        values = {name: getattr(self, name) for name in cell_finetune.SETTINGS}
        return {name: value for name, value in values.items() if value is not None}


def commands(spec: StudyCellSpec, options: CellOptions, tests: TestCases, layout: StudyLayout,
             run_folder: str | None) -> list[str]:
    """The three commands a user would type for this cell (the run folder as finetune named it)."""
    run = run_folder or "<run folder>"
    launcher = (f"torchrun --standalone --nproc-per-node {options.gpus} -m threedino_pipe.cli finetune"
                if options.gpus else "3dino finetune")
    finetune = " ".join([f"{launcher} -d {options.dataset} --pct {spec.pct:g} --fold {spec.fold} --seed {spec.seed} "
                         f"--backbone {spec.backbone}" + (f" --head {spec.head}" if spec.head else ""),
                         *cell_finetune.settings_flags(options.settings)])
    return [finetune,
            f"3dino predict -i {tests.input} -o {layout.predictions(spec.cell)} -m {run} --continue --no-qc",
            f"3dino evaluate -r {tests.reference} -p {layout.predictions(spec.cell)} -d {options.dataset} "
            f"-o {layout.evaluation(spec.cell)} -np 1"]


def is_done(layout: StudyLayout, cell: str) -> bool:
    """A cell is done when its record says so and its evaluation and finetune run are still there."""
    path = layout.cell_record(cell)
    if not path.is_file():
        return False
    record = StudyCell.read(path)
    return (record.outcome == "done" and EvaluationSummary.in_folder(layout.evaluation(cell)).is_file()
            and record.run_folder is not None and ModelCard.in_folder(record.run_folder).is_file())


def _stages(spec: StudyCellSpec, options: CellOptions, tests: TestCases, layout: StudyLayout,
            ran: list[str]) -> None:
    """finetune, predict, evaluate; the run folder is appended to ``ran`` as soon as finetune returns."""
    from threedino_pipe.stages import evaluate, finetune, predict

    if options.gpus:
        ran.append(_torchrun_finetune(spec, options, layout.cell(spec.cell)))
    else:
        ran.append(str(finetune.run(**cell_finetune.finetune_arguments(spec, options.dataset, options.settings,
                                                                      options.num_workers, options.device),
                                    beside=True)))
    predictions = layout.predictions(spec.cell)
    if predict.run(tests.input, predictions, [Path(ran[0])], resume=True, qc=False,
                   device=options.device) != 0:
        raise UserError("predict failed for some test cases", file=predictions / "failures.csv",
                        fix="read failures.csv, fix the cause and rerun the study")
    evaluation = layout.evaluation(spec.cell)
    if evaluate.run(tests.reference, predictions, dataset=options.dataset, output=evaluation, num_processes=1) != 0:
        raise UserError("evaluate found missing or failed cases", file=EvaluationSummary.in_folder(evaluation),
                        fix="read the listed cases in summary.json, fix the cause and rerun the study")


def _torchrun_finetune(spec: StudyCellSpec, options: CellOptions, cell: Path) -> str:
    """The cell's finetune under ``torchrun --standalone --nproc-per-node G``; returns its run folder.

    Raises:
        UserError: the finetune refused or failed (its last output lines in the message).
    """
    cell.mkdir(parents=True, exist_ok=True)
    folder_file = cell / "run_folder.txt"
    folder_file.unlink(missing_ok=True)
    gpus = options.gpus
    done = subprocess.run(cell_finetune.command(gpus, spec, options.dataset, options.settings, options.num_workers,
                                                options.device, folder_file), capture_output=True, text=True)
    if done.returncode != 0 or not folder_file.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise UserError(f"the cell's finetune under torchrun ({gpus} processes) exited with {done.returncode}:\n"
                        f"{tail}", fix="read the error above, fix its cause and rerun the study")
    return folder_file.read_text().strip()


def run_cell(spec: StudyCellSpec, options: CellOptions, tests: TestCases, layout: StudyLayout) -> StudyCell:
    """Run one cell and write its ``cell.json``; any error is recorded (status ``failed``), not raised."""
    start = time.perf_counter()
    ran: list[str] = []
    error = None
    try:
        _stages(spec, options, tests, layout, ran)
    except UserError as exc:
        error = exc.render()
    except Exception as exc:  # noqa: BLE001 - a cell's failure of any kind is recorded and the study goes on
        log.debug("cell %s failed", spec.cell, exc_info=True)
        error = f"{type(exc).__name__}: {exc}"
    record = StudyCell(spec=spec, outcome="failed" if error else "done", run_folder=ran[0] if ran else None,
                       wall_seconds=round(time.perf_counter() - start, 2), error=error,
                       commands=commands(spec, options, tests, layout, ran[0] if ran else None))
    layout.cell(spec.cell).mkdir(parents=True, exist_ok=True)
    record.write(layout.cell_record(spec.cell))
    return record
