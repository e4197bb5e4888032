"""``--emit-slurm FILE``: a SLURM job-array script, one study cell per array task (``--cells K/N``)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from threedino_pipe.runtime import paths
from threedino_pipe.runtime.atomic_files import atomic_path


def script(study_args: list[str], num_cells: int, job_name: str, gpus: int = 1) -> str:
    """The script's text: ``#SBATCH --array=1-N``, ``gpus`` GPUs and 4 CPUs per GPU per task, the THREEDINO_*
    folders of this machine, then task K runs ``3dino study ... --cells K/N`` with this Python (the same
    installation on the cluster's shared disk); with ``--gpus-per-cell`` among ``study_args`` the study runs
    each cell's finetune under ``torchrun --standalone --nproc-per-node G``."""
    command = [sys.executable, "-m", "threedino_pipe.cli", "study", *study_args]
    folders = {"THREEDINO_RAW": paths.raw_root(), "THREEDINO_PREPROCESSED": paths.preprocessed_root(),
               "THREEDINO_RESULTS": paths.results_root()}
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array=1-{num_cells}",
             "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={4 * gpus}", f"#SBATCH --gres=gpu:{gpus}",
             "# one study cell per array task; when every task has ended, aggregate with:",
             f"#   {shlex.join(command)} --collect", "set -euo pipefail",
             *[f"export {name}={shlex.quote(str(Path(value).resolve()))}" for name, value in folders.items()],
             ': "${SLURM_ARRAY_TASK_ID:?run this script with sbatch (or set SLURM_ARRAY_TASK_ID)}"',
             f"exec {shlex.join(command)} --cells \"${{SLURM_ARRAY_TASK_ID}}/{num_cells}\""]
    return "\n".join(lines) + "\n"


def write_script(path: Path, study_args: list[str], num_cells: int, job_name: str, gpus: int = 1) -> Path:
    """Write the script atomically, executable; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(script(study_args, num_cells, job_name, gpus))
        os.chmod(tmp, 0o755)
    return path
