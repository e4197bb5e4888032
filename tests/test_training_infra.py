"""Run folders (resume or refuse), weights_only checkpoints with RNG state, CSV logs and curves."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from threedino_pipe.artifacts import RunRecord, open_run_folder
from threedino_pipe.runtime.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from threedino_pipe.runtime.csv_log import CsvLog
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.visualization.curves import plot_curves


def test_rerun_resumes_and_different_options_refuse(tmp_path):
    run = tmp_path / "run"
    options = {"iters": 10, "preset": "tiny", "stop_after": 5}

    def record(**changes):
        return RunRecord(options={**options, **changes}, volatile=["stop_after"],
                         plans={"Dataset990_X": {"patch_size": [64, 64, 64]}})

    assert open_run_folder(run, record()) is False
    (run / "checkpoint_latest.pt").write_bytes(b"x")
    assert open_run_folder(run, record(stop_after=None)) is True
    with pytest.raises(UserError) as err:
        open_run_folder(run, record(iters=20))
    text = err.value.render()
    assert "options.iters: 10 -> 20" in text and "--restart" in text and "--run" in text
    with pytest.raises(UserError) as err:
        open_run_folder(run, record().model_copy(update={"plans": {"Dataset990_X": {"patch_size": [48, 64, 64]}}}))
    assert "plans.Dataset990_X.patch_size: [64, 64, 64] -> [48, 64, 64]" in err.value.render()
    assert open_run_folder(run, record(iters=20), restart=True) is False
    assert not (run / "checkpoint_latest.pt").exists()


def test_a_run_made_before_an_option_existed_resumes_with_the_value_it_used(tmp_path):
    """run.json files written before --augment-device hold no augment_device: those runs augmented with MONAI."""
    run = tmp_path / "run"
    RunRecord(options={"iters": 10}, plans={}).write(run / RunRecord.FILE)
    (run / "checkpoint_latest.pt").write_bytes(b"x")
    assert open_run_folder(run, RunRecord(options={"iters": 10, "augment_device": "cpu-monai"}, plans={})) is True
    with pytest.raises(UserError) as err:
        open_run_folder(run, RunRecord(options={"iters": 10, "augment_device": "torch"}, plans={}))
    assert "options.augment_device: 'cpu-monai' -> 'torch'" in err.value.render()


def test_checkpoint_round_trip_with_rng_state_is_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"model": torch.nn.Linear(3, 2).state_dict(), "iteration": 7, "rng": rng_state()},
                    tmp_path / "ck.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = load_checkpoint(tmp_path / "ck.pt")  # weights_only=True inside
    assert state["iteration"] == 7
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    save_checkpoint({"w": torch.ones(1000)}, tmp_path / "ck.pt")
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "ck.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "ck.pt")
    assert "ck.pt" in err.value.render()


def test_csv_log_truncates_to_resumed_iteration_and_plots(tmp_path):
    log = CsvLog(tmp_path / "log.csv")
    for it in range(1, 7):
        log.write({"iteration": it, "loss": 1.0 / it, "lr": 0.1})
    resumed = CsvLog(tmp_path / "log.csv", resume_iteration=4)
    resumed.write({"iteration": 5, "loss": 0.5, "lr": 0.1})
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,lr" and len(lines) == 6 and lines[-1].startswith("5,0.5")
    png = plot_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
