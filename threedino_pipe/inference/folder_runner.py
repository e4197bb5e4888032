"""The folder runner: every case in turn, the next one read ahead, failures logged, nothing redone.

- **Read-ahead**: ``num_workers`` background threads read and preprocess the next cases while the
  current one is predicted (0: read in the main thread). At most ``num_workers`` prepared cases
  wait besides the current one.
- **Failures**: a case that cannot be read, preprocessed or predicted is written to
  ``failures.csv`` (``case,file,error``) at once and the batch goes on.
- **Resume** (``--continue``): a case whose output already exists is skipped; outputs are
  written atomically, so an existing file is complete. Classification: a case already in
  ``predictions.csv``.
- **torchrun**: rank ``r`` of ``W`` takes cases ``r, r + W, ...``; each rank writes its own
  ``failures_rank<r>.csv`` (and ``predictions_rank<r>.csv``), which rank 0 merges at the end.
"""

from __future__ import annotations

import csv
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from threedino_pipe.inference.input_cases import InputCase
from threedino_pipe.runtime import progress
from threedino_pipe.runtime.atomic_files import atomic_path
from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)

FAILURES = "failures.csv"
PREDICTIONS = "predictions.csv"
FAILURE_COLUMNS = ("case", "file", "error")


@dataclass(frozen=True)
class Failure:
    """A case that could not be predicted: its id, the file concerned and the reason."""

    case: str
    file: str
    error: str


def failure_of(case: InputCase, exc: BaseException) -> Failure:
    """The failures.csv row of an exception raised while handling ``case``."""
    fallback = case.label or str(case.files[0])
    if isinstance(exc, UserError):
        return Failure(case.case_id, exc.file or fallback, exc.problem)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Failure(case.case_id, fallback, f"{type(exc).__name__}: {message}"[:500])


def part_path(output_dir: Path, name: str, rank: int, world_size: int) -> Path:
    """``output_dir/name`` for one process, else ``output_dir/<stem>_rank<r>.csv``."""
    if world_size == 1:
        return Path(output_dir) / name
    return Path(output_dir) / f"{Path(name).stem}_rank{rank}.csv"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write a CSV file (header first) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file; ([], []) when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return [], []
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return (rows[0], rows[1:]) if rows else ([], [])


def write_failures(path: Path, failures: Sequence[Failure]) -> None:
    write_csv(path, FAILURE_COLUMNS, [(f.case, f.file, f.error) for f in failures])


def merge_parts(output_dir: Path, name: str, world_size: int, key_column: int | None = None) -> list[list[str]]:
    """Merge the rank parts of ``name`` (and, with ``key_column``, the rows already in ``name``; later
    rows win per key) into ``name``, remove the parts; returns the merged rows."""
    output_dir = Path(output_dir)
    header, rows = [], []
    if key_column is not None:
        header, rows = read_csv_rows(output_dir / name)
    for rank in range(world_size):
        part = part_path(output_dir, name, rank, world_size)
        part_header, part_rows = read_csv_rows(part)
        header = header or part_header
        rows.extend(part_rows)
    if key_column is not None:
        rows = list({row[key_column]: row for row in rows}.values())
        rows.sort(key=lambda row: row[key_column])
    if header:
        write_csv(output_dir / name, header, rows)
    if world_size > 1:
        for rank in range(world_size):
            part_path(output_dir, name, rank, world_size).unlink(missing_ok=True)
    return rows


def shard(cases: Sequence[InputCase], rank: int, world_size: int) -> list[InputCase]:
    """Rank ``rank``'s cases: ``rank, rank + world_size, ...``."""
    return list(cases[rank::world_size])


def prefetched(cases: Sequence[InputCase], prepare: Callable[[InputCase], object], num_workers: int
               ) -> Iterator[tuple[InputCase, object, BaseException | None]]:
    """Yield ``(case, prepared or None, exception or None)`` in order, preparing up to ``num_workers`` ahead."""
    if num_workers <= 0:
        for case in cases:
            try:
                yield case, prepare(case), None
            except Exception as exc:  # noqa: BLE001 - any failure of one case is logged, the batch goes on
                yield case, None, exc
        return
    remaining = iter(cases)
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="threedino-read")
    try:
        pending = deque((case, pool.submit(prepare, case)) for case in itertools.islice(remaining, num_workers))
        while pending:
            case, future = pending.popleft()
            try:
                prepared, error = future.result(), None
            except Exception as exc:  # noqa: BLE001
                prepared, error = None, exc
            following = next(remaining, None)
            if following is not None:  # start reading the next case before predicting this one
                pending.append((following, pool.submit(prepare, following)))
            yield case, prepared, error
            del prepared
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class BatchOutcome:
    """What a batch did: cases predicted and failures, with per-case results."""

    results: list
    failures: list[Failure]


def run_cases(cases: Sequence[InputCase], *, prepare: Callable[[InputCase], object],
              predict: Callable[[object], object], failures_path: Path, num_workers: int = 1,
              on_result: Callable[[object], None] | None = None,
              failed_before: Sequence[Failure] = (),
              on_case: Callable[[InputCase, object | None, Failure | None], None] | None = None) -> BatchOutcome:
    """Prepare (read ahead) and predict every case; log each failure to ``failures_path`` and go on.

    ``failures_path`` is (re)written at the start (header, and ``failed_before``: inputs that failed
    before reading, e.g. DICOM studies without usable series) and after every failure. ``on_case``
    is called after each case with its result or its failure.
    """
    failures: list[Failure] = list(failed_before)
    results = []
    write_failures(failures_path, failures)
    bar = progress.make_progress()
    with bar:
        task = bar.add_task("predict", total=len(cases))
        for case, prepared, error in prefetched(cases, prepare, num_workers):
            start = time.perf_counter()
            if error is None:
                try:
                    result = predict(prepared)
                except Exception as exc:  # noqa: BLE001 - a failing case must not stop the batch
                    error = exc
                else:
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
            del prepared
            seconds = time.perf_counter() - start
            if error is not None:
                failure = failure_of(case, error)
                failures.append(failure)
                write_failures(failures_path, failures)
                log.warning("%s failed: %s: %s", case.case_id, failure.file, failure.error)
                log.debug("traceback of %s", case.case_id, exc_info=error)
                if on_case is not None:
                    on_case(case, None, failure)
            else:
                timings = getattr(results[-1], "seconds", {})
                detail = ", ".join(f"{k.replace('_', '+')} {v:.1f} s" for k, v in timings.items())
                line = f"{case.case_id}: done in {seconds:.1f} s ({detail})"
                bar.console.print(line) if progress.enabled() else log.info(line)
                if on_case is not None:
                    on_case(case, results[-1], None)
            bar.update(task, advance=1, description=f"predict (last: {case.case_id}, {seconds:.1f} s)")
    return BatchOutcome(results, failures)
