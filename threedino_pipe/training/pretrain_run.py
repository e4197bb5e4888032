"""The common end of ``pretrain`` and ``adapt-highres``: open (or resume) the run folder and train its method."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from threedino_pipe.artifacts import RunRecord
from threedino_pipe.runtime.distributed import DistInfo
from threedino_pipe.training.run_setup import open_run
from threedino_pipe.training.simmim_trainer import SimMIMRunConfig, train_simmim
from threedino_pipe.training.ssl_setup import finished_already
from threedino_pipe.training.ssl_trainer import SSLRunConfig, train_ssl
from threedino_pipe.training.tang_trainer import TangRunConfig, train_tang


def train_run(folder: Path, record: RunRecord, run_config: SSLRunConfig | SimMIMRunConfig | TangRunConfig,
              dataset_folders: list[Path],
              dist: DistInfo, console: Console, *, restart: bool, stop_after: int | None,
              announce: Callable[[bool], str], init_state: dict | None = None) -> Path:
    """Create or check ``folder`` against ``record``, then train (or resume) 3DINO, SimMIM or Tang et al.,
    as ``run_config`` is.

    ``announce(resume)`` is the line rank 0 prints before training; ``init_state`` the network state(s) a
    new run starts from (adapt-highres; ignored on a resume). Returns ``folder``, at once when it is finished.
    """
    resume = open_run(folder, record, restart=restart, dist=dist)
    if finished_already(folder, resume, stop_after, console):
        return folder
    if dist.is_main:
        console.print(announce(resume))
    train = (train_tang if isinstance(run_config, TangRunConfig) else
             train_simmim if isinstance(run_config, SimMIMRunConfig) else train_ssl)
    return train(run_config, folder, dataset_folders, dist, resume=resume, stop_after=stop_after,
                 init_state=None if resume else init_state)
