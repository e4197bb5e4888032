"""Benchmark: seconds a fresh Python process takes to import torch, MONAI and SimpleITK, as every `3dino` command
that trains or predicts does, with and without threedino_pipe's lean MONAI import (``runtime.lean_monai``).

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/import_time.py [--repeats 5] [--out FILE] [--quick]

Variants, each a fresh ``python -c`` process, rounds alternating between them (the same load on each):

- ``monai as installed``: ``import torch, monai, SimpleITK``; with transformers installed, MONAI's package
  import loads transformers' BERT (``monai.networks.nets.transchex``);
- ``threedino_pipe first``: ``import threedino_pipe`` before them, as the `3dino` command imports them;
- ``transformers absent``: transformers made unimportable (``sys.modules["transformers"] = None``), the
  figure of an install without the ``natural`` extra.

Reports the median and minimum wall seconds of each over ``--repeats`` rounds, the saving, and whether
transformers is installed at all (without it the first two variants are the same). Writes the JSON to
``--out`` (default ``benchmarks/results/<UTC date>/import_time.json``). ``--quick``: one round.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import dated_result_path, invocation, machine_info, write_json

VARIANTS = {
    "monai as installed": "import torch, monai, SimpleITK",
    "threedino_pipe first": "import threedino_pipe, torch, monai, SimpleITK",
    "transformers absent": "import sys; sys.modules['transformers'] = None; import torch, monai, SimpleITK",
}


def time_once(code: str) -> float:
    """Wall seconds of one fresh ``python -c code`` process (a failure stops the benchmark)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each round times every variant once")
    p.add_argument("--quick", action="store_true", help="one round: checks that the script runs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.out is None:
        args.out = dated_result_path("import_time", args.quick)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    time_once(VARIANTS["threedino_pipe first"])  # warm the file cache and the .pyc files, not timed
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            seconds[name].append(time_once(code))
    summary = {name: {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                      "all_s": [round(v, 3) for v in values]} for name, values in seconds.items()}
    saving = summary["monai as installed"]["median_s"] - summary["threedino_pipe first"]["median_s"]
    result = {"command": invocation(argv), "machine": machine_info(),
              "transformers_installed": importlib.util.find_spec("transformers") is not None,
              "settings": {"repeats": args.repeats}, "variants": VARIANTS, "seconds": summary,
              "saving_median_s": round(saving, 3)}
    for name, row in summary.items():
        print(f"{name:22s} median {row['median_s']:.2f} s, min {row['min_s']:.2f} s")
    print(f"saving per process (medians): {saving:.2f} s")
    write_json(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
