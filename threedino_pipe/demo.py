"""``3dino demo``: the chain on bundled real scans (nilearn's MNI152), CPU-sized.

For now: build the example dataset, then verify, plan and preprocess it. Later stages join
as they are built.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console


def run(out: Path, quick: bool = False) -> None:
    """Build the MNI example dataset under ``out`` and run the stages built so far on it.

    Args:
        out: folder for raw, preprocessed and results data of the demo.
        quick: fewer cases (for CI).
    """
    from threedino_pipe.dataset import verify
    from threedino_pipe.dataset.examples import build_mni_dataset
    from threedino_pipe.planning import plan
    from threedino_pipe.preprocessing import preprocess

    console = Console(stderr=True)
    out = Path(out).resolve()
    for name in ("raw", "preprocessed", "results"):
        os.environ[f"THREEDINO_{name.upper()}"] = str(out / name)
    num_cases = 6 if quick else 12
    folder = out / "raw" / "Dataset990_MNITissue"
    if not (folder / "dataset.json").is_file():
        console.print(f"[bold]demo[/]: building {num_cases} cases from the MNI152 template in {folder}")
        build_mni_dataset(out / "raw", 990, num_cases, num_test=2)
    console.print("[bold]demo[/]: 3dino verify -d 990")
    if verify.run("990", allow_nan=False, num_processes=2) != 0:
        raise SystemExit(1)
    console.print("[bold]demo[/]: 3dino plan -d 990")
    plan.run("990", num_processes=2)
    console.print("[bold]demo[/]: 3dino preprocess -d 990")
    preprocess.run("990", num_processes=2)
    console.print(f"[bold green]demo done[/]: preprocessed data in {out / 'preprocessed' / folder.name}")
