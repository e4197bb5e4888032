"""The one training loop under SSL pretraining, adapt-highres and segmentation finetuning.

The loop owns what every run does the same way: resume from ``checkpoint_latest.pt`` (the
task's state, the data stream and every RNG, so a resumed run is bitwise the uninterrupted one),
the iteration count and ``--stop-after``, ``log.csv`` rows, the progress bar on a terminal and
plain progress lines otherwise, the checkpoint cadence (latest, kept snapshots, final) and
``curves.png``. What differs between methods is a :class:`TrainingTask`: one optimisation step,
its state, and what happens after a step and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from threedino_pipe.runtime import progress
from threedino_pipe.runtime.checkpoints import gathered_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from threedino_pipe.runtime.csv_log import CsvLog
from threedino_pipe.runtime.distributed import DistInfo, barrier
from threedino_pipe.visualization.curves import Panel, plot_curves

logger = logging.getLogger(__name__)
LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
PROGRESS_SECONDS = 60.0  # without a terminal: a progress line this often (THREEDINO_PROGRESS_SECONDS overrides)


class TrainingTask(Protocol):
    """The method-specific part of a run (SSL, segmentation): everything the loop does not own."""

    def step(self, iteration: int) -> dict[str, Any]:
        """One optimisation step at 0-based ``iteration``; returns its ``log.csv`` values."""

    def after_step(self, iteration: int, row: dict[str, Any], say: Callable[[str], None]) -> bool:
        """Work after 1-based ``iteration`` (validation, warnings); may add to ``row``; True forces a checkpoint.

        ``say`` prints a line for the user (above the progress bar, or as a log line).
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume bitwise (models, optimiser, scaler, data stream, histories); no RNG."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values."""

    def status(self, row: dict[str, Any]) -> str:
        """A short summary of ``row`` for the progress line (e.g. ``loss 3.21 entropy 0.93``)."""

    def on_save(self, folder: Path, iteration: int) -> None:
        """Rank 0, after each checkpoint_latest.pt: the task's own files (validation.json, ...)."""

    def finish(self, folder: Path, iteration: int) -> None:
        """Rank 0, once the last iteration is done: final artifacts (backbone.pt, ...)."""

    def close(self) -> None:
        """Release data workers."""


@dataclass
class LoopSettings:
    """How often the loop logs and saves (iterations), and what it names and plots.

    ``snapshot_every`` 0 keeps no ``checkpoint_<iteration>.pt``; ``final_checkpoint`` writes
    ``checkpoint_final.pt`` when the run completes; ``curves`` are the panels of curves.png (log
    columns, or ``(title, columns)`` groups drawn in one panel).
    """

    iters: int
    save_every: int
    checkpoint_format: str
    config: dict[str, Any]
    curves: list[Panel] = field(default_factory=list)
    snapshot_every: int = 0
    log_every: int = 1
    final_checkpoint: bool = False
    stop_after: int | None = None


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   clip: Callable[[], Any] | None = None) -> None:
    """Backward pass and optimiser step, through the fp16 ``scaler`` when there is one.

    ``clip`` runs between backward and step on unscaled gradients (per-part gradient clipping).
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip is not None:
        clip()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def check_finite(values: Iterable[float], iteration: int, terms: dict[str, Any]) -> None:
    """Raise ``FloatingPointError`` naming the iteration when a loss value is NaN or infinite."""
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite loss at iteration {iteration}: {terms}")


class TrainingLoop:
    """Runs a :class:`TrainingTask` into a run folder (see the module docstring)."""

    def __init__(self, task: TrainingTask, folder: Path, dist: DistInfo, settings: LoopSettings) -> None:
        self.task, self.folder, self.dist, self.settings = task, Path(folder), dist, settings

    def _state(self, iteration: int) -> dict[str, Any]:
        """The whole checkpoint at ``iteration``; every rank must call it (it gathers the RNG states)."""
        return {"format": self.settings.checkpoint_format, "iteration": iteration, "config": self.settings.config,
                **self.task.state_dict(), "rng": gathered_rng_state(self.dist.rank, self.dist.world_size)}

    def resume(self) -> int:
        """Load ``checkpoint_latest.pt`` into the task and restore the RNGs; returns the iteration reached."""
        state = load_checkpoint(self.folder / LATEST, rerun="the same command with --restart")
        self.task.load_state_dict(state)
        restore_rng_state(state["rng"], self.dist.rank)
        start = int(state["iteration"])
        if self.dist.is_main:
            logger.info("resuming %s at iteration %d of %d", self.folder.name, start, self.settings.iters)
        return start

    def run(self, *, resume: bool) -> int:
        """Train from the start or from the latest checkpoint to ``iters`` (or ``stop_after`` more); returns
        the iteration reached."""
        settings, dist = self.settings, self.dist
        start = self.resume() if resume else 0
        end = settings.iters if settings.stop_after is None else min(settings.iters, start + settings.stop_after)
        log = CsvLog(self.folder / "log.csv", resume_iteration=start if resume else None) if dist.is_main else None
        heartbeat = Heartbeat(self.folder.name, settings.iters, start) \
            if dist.is_main and not progress.enabled() else None
        try:
            with progress.make_progress() as bar, heartbeat or contextlib.nullcontext():
                bar_task = bar.add_task(self.folder.name, total=settings.iters, completed=start, status="")
                say = bar.console.print if progress.enabled() else logger.info
                for it in range(start, end):
                    tick = time.perf_counter()
                    row = {"iteration": it + 1, **self.task.step(it)}
                    row["seconds"] = time.perf_counter() - tick
                    iteration = it + 1
                    save_now = self.task.after_step(iteration, row, say)
                    if log is not None and (iteration % settings.log_every == 0 or iteration == end):
                        log.write(row)
                    status = self.task.status(row)
                    bar.update(bar_task, completed=iteration, status=status)
                    if heartbeat is not None:
                        heartbeat.update(iteration, status)
                    if save_now or iteration % settings.save_every == 0 or iteration == end:
                        self._save(iteration)
            if end == settings.iters:
                self._finish(end)
        finally:
            self.task.close()
        return end

    def _save(self, iteration: int) -> None:
        state = self._state(iteration)
        if self.dist.is_main:
            save_checkpoint(state, self.folder / LATEST)
            if self.settings.snapshot_every and iteration % self.settings.snapshot_every == 0:
                save_checkpoint(state, self.folder / f"checkpoint_{iteration}.pt")
            self.task.on_save(self.folder, iteration)
            plot_curves(self.folder / "log.csv", self.folder / "curves.png", columns=self.settings.curves or None,
                        title=self.folder.name)
        barrier()

    def _finish(self, iteration: int) -> None:
        state = self._state(iteration) if self.settings.final_checkpoint else None
        if self.dist.is_main:
            if state is not None:
                save_checkpoint(state, self.folder / FINAL)
            self.task.finish(self.folder, iteration)
        barrier()


class Heartbeat:
    """Plain progress lines for batch logs (SLURM, nohup, CI), from a thread: every ``interval`` seconds
    whether or not a step has finished (a step can take minutes under load), and once at the end.

    Each line: run name, iteration reached, seconds per iteration, ETA, the task's status (losses,
    signals) of the last finished step, and how long the current step has been running.
    """

    def __init__(self, name: str, total: int, start: int, interval: float | None = None) -> None:
        self.name, self.total, self.start = name, total, start
        self.interval = interval if interval is not None else \
            float(os.environ.get("THREEDINO_PROGRESS_SECONDS", PROGRESS_SECONDS))
        self.iteration, self.status = start, "starting"
        self.began = self.step_began = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="threedino-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None and self.iteration > self.start:
            self._print(final=True)

    def update(self, iteration: int, status: str) -> None:
        with self.lock:
            self.iteration, self.status, self.step_began = iteration, status, time.monotonic()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self._print(final=False)

    def _print(self, *, final: bool) -> None:
        with self.lock:
            iteration, status, step_began = self.iteration, self.status, self.step_began
        now = time.monotonic()
        done = iteration - self.start
        rate = (now - self.began) / done if done else math.nan
        eta = _duration(rate * (self.total - iteration)) if done else "unknown"
        running = "" if final else f", current step running {now - step_began:.0f} s"
        logger.info("%s: iteration %d/%d (%s s/it, ETA %s%s) %s", self.name, iteration, self.total,
                    "?" if not done else f"{rate:.2f}", eta, running, status)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
