"""One writer per target: a second command refuses at once naming the holder; a killed holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import THREEDINO, run_3dino

from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.locks import TargetLock, lock_paths

HOLD = """
import sys, time
from threedino_pipe.runtime.locks import TargetLock
lock = TargetLock(sys.argv[1], "run folder").acquire()  # kept: a collected lock is released
print("held", flush=True)
time.sleep(60)
"""


def _wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_second_holder_is_refused_with_the_first_named_and_a_killed_holder_is_replaced(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tick = time.monotonic()
        with pytest.raises(UserError) as err:
            TargetLock(target, "run folder").acquire()
        assert time.monotonic() - tick < 2.0
        text = err.value.render()
        assert f"process {holder.pid} on " in text and "another 3dino command is writing this run folder" in text
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with TargetLock(target, "run folder") as lock:  # the system released the dead process's lock
            assert str(os.getpid()) in lock.holder_path.read_text()
        assert all(p.parent == tmp_path and p.name.startswith(".run.") for p in lock_paths(target))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.e2e
def test_two_pretrain_commands_into_one_run_folder(mni_preprocessed, tmp_path):
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    args = ("pretrain", "-d", "990", "--preset", "tiny", "--batch-size", "1", "--num-workers", "0", "--precision",
            "fp32", "--iters", "400", "--save-every", "1", "--probe-every", "0", "--run", "shared", "--no-progress")
    first = subprocess.Popen([*THREEDINO, *args], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "results" / "pretrain" / "shared" / "checkpoint_latest.pt"
    try:
        _wait_for(latest.is_file)  # the first command holds the folder and is training
        tick = time.monotonic()
        second = run_3dino(*args, env=env)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert f"process {first.pid} on" in second.stderr and "pretrain" in second.stderr
        assert time.monotonic() - tick < 30  # refused before any training (the import of torch takes seconds)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        again = run_3dino(*args, "--stop-after", "1", env=env)  # takes the lock over and resumes
        assert again.returncode == 0, again.stderr
        assert "resuming" in again.stderr
    finally:
        first.kill()
        first.wait()
