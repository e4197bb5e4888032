"""``3dino verify``: check a raw dataset and report every problem at once (docs/verify.md).

Prints a table of every problem (:func:`threedino_pipe.raw_data.verification.check_dataset`) and
a one-line summary; writes nothing.
"""

from __future__ import annotations

import sys

from threedino_pipe.raw_data.verification import check_dataset, print_report
from threedino_pipe.runtime import paths


def run(dataset: str, *, allow_nan: bool = False, num_processes: int = 2) -> int:
    """The ``3dino verify`` command: report every problem of a raw dataset.

    Returns:
        1 if any error was found, else 0 (warnings do not fail).
    """
    for note in paths.describe_defaults():  # first: it explains a "no dataset" error too
        print(f"note: {note}", file=sys.stderr)
    folder = paths.resolve_dataset(dataset)
    _, cases, problems = check_dataset(folder, allow_nan=allow_nan, num_processes=num_processes)
    print_report(folder, len(cases), problems)
    return 1 if any(p.is_error for p in problems) else 0
