"""One writer per target: a second command refuses at once naming the holder; a killed holder's lock is taken over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from collisions import assert_refused, listing, race
from conftest import THREEDINO, run_3dino

from threedino_pipe.demo.examples import build_mni_dataset
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


def test_lock_dir_holds_the_lock_files_of_targets_elsewhere(tmp_path, monkeypatch):
    """THREEDINO_LOCK_DIR (a node-local folder where the shared file system has no locks): the lock files go
    there, one pair per target path, and a second holder is still refused."""
    locks = tmp_path / "locks"
    target, namesake = tmp_path / "a" / "run", tmp_path / "b" / "run"
    env = {**os.environ, "THREEDINO_LOCK_DIR": str(locks)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("THREEDINO_LOCK_DIR", str(locks))
        with pytest.raises(UserError, match=f"process {holder.pid} on "):
            TargetLock(target, "run folder").acquire()
        with TargetLock(namesake, "run folder"):  # the same name in another folder is another target
            assert len(list(locks.glob("run-*.3dino.lock"))) == 2
        assert set(locks.iterdir()) == {*lock_paths(target), lock_paths(namesake)[0]}  # its holder file is gone
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_file_system_without_locks_is_refused_naming_the_lock_dir(tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers flock() with ENOSYS (simulated here: no such file system on this
    machine); the command must refuse, not fall back to a lock a killed process would leave behind."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(UserError) as err:
        TargetLock(tmp_path / "out", "output folder").acquire()
    text = err.value.render()
    assert "does not support file locks" in text and "THREEDINO_LOCK_DIR" in text and "-o flock" in text
    assert str(lock_paths(tmp_path / "out")[0]) in text


@pytest.mark.e2e
def test_two_pretrain_commands_into_one_run_folder(mni_preprocessed, tmp_path):
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    args = ("pretrain", "-d", "990", "--preset", "tiny", "--batch-size", "1", "--num-workers", "0", "--precision",
            "fp32", "--iters", "400", "--save-every", "1", "--snapshot-every", "0", "--probe-every", "0", "--run",
            "shared", "--no-progress")
    first = subprocess.Popen([*THREEDINO, *args], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "results" / "pretrain" / "shared" / "checkpoint_latest.pt"
    try:
        _wait_for(latest.is_file)  # the first command holds the folder and is training
        first.send_signal(signal.SIGSTOP)  # frozen, still holding the folder: what changes now is the second's doing
        folder = latest.parent
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
        second = run_3dino(*args, env=env)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert f"process {first.pid} on" in second.stderr and "pretrain" in second.stderr
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before  # refused, nothing written
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        again = run_3dino(*args, "--stop-after", "1", env=env)  # takes the lock over and resumes
        assert again.returncode == 0, again.stderr
        assert "resuming" in again.stderr
    finally:
        first.kill()
        first.wait()


def _not_lock_files(files: dict) -> dict:
    return {name: data for name, data in files.items() if ".3dino." not in name}


def _bytes(folder: Path) -> dict[str, bytes]:
    return _not_lock_files({name: (folder / name).read_bytes() for name in listing(folder)})


@pytest.mark.e2e
def test_two_preprocess_commands_on_one_dataset(tmp_path):
    """16 cases; the loser refuses before reading a case and deletes nothing; after kill -9 of the winner a
    rerun takes the lock over and writes what an uninterrupted run writes, byte for byte."""
    build_mni_dataset(tmp_path / "raw", 993, 16, seed=0, max_size=32)
    roots = {name: tmp_path / name for name in ("reference", "raced")}
    env = {name: {"THREEDINO_RAW": str(tmp_path / "raw"), "THREEDINO_PREPROCESSED": str(root)}
           for name, root in roots.items()}
    planned = run_3dino("plan", "-d", "993", env=env["reference"])
    assert planned.returncode == 0, planned.stderr
    dataset = next(roots["reference"].glob("Dataset993_*"))
    shutil.copytree(dataset, roots["raced"] / dataset.name)
    reference = run_3dino("preprocess", "-d", "993", "-np", "1", env=env["reference"])
    assert reference.returncode == 0, reference.stderr
    expected = _bytes(roots["reference"])
    # finetune and pretrain; pretrain_highres is skipped (no 32-voxel case passes its 48-voxel minimum axis)
    assert sum(name.endswith(".b2nd") and "_seg" not in name for name in expected) == 2 * 16

    target = roots["raced"] / dataset.name
    raced = race(["preprocess", "-d", "993", "-np", "1"], env["raced"], target, watched=target,
                 started=lambda: any(p.suffix in (".json", ".b2nd") for p in target.glob("*/*")))
    try:
        assert_refused(raced, "preprocessed dataset", target)
        assert "to preprocess" not in raced.loser.stderr and "removed" not in raced.loser.stderr  # read no case
        assert listing(target) == raced.files_at_stop  # deleted (and wrote) nothing, the winner's partials included
    finally:
        raced.kill_winner()
    assert len([n for n in raced.files_at_stop if n.count("/") == 1]) < 2 * 16 * 2, "the winner had finished"

    again = run_3dino("preprocess", "-d", "993", "-np", "1", env=env["raced"])
    assert again.returncode == 0, again.stderr
    resumed = _bytes(roots["raced"])
    assert not [name for name in resumed if ".partial" in name]
    assert sorted(resumed) == sorted(expected)
    for name, data in expected.items():
        assert resumed[name] == data, f"{name} differs from the uninterrupted run"
    assert not lock_paths(target)[1].exists(), "the holder's description is removed when the lock is given back"


@pytest.mark.e2e
def test_two_finetune_commands_into_one_run_folder(mni_preprocessed, tmp_path):
    """Started together: the loser refuses within 2 s naming the holder and writes nothing; after kill -9 of the
    winner (stopped once it saved a checkpoint) a rerun takes the lock over and resumes from that checkpoint."""
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(tmp_path / "results")}
    args = ["finetune", "-d", "990", "--preset", "tiny", "--pct", "50", "--num-workers", "0", "--precision", "fp32",
            "--no-progress", "--backbone", "none", "--head", "linear", "--iters", "400", "--val-every", "400",
            "--save-every", "1"]
    folder = tmp_path / "results" / "Dataset990_MNITissue" / "finetune__linear__none__pct50__fold0__seed0"
    latest = folder / "checkpoint_latest.pt"
    raced = race(args, env, folder, started=latest.is_file, watched=tmp_path / "results")
    try:
        assert_refused(raced, "run folder", folder)
        assert "finetune run" not in raced.loser.stderr
        assert listing(tmp_path / "results") == raced.files_at_stop  # the loser wrote nothing
    finally:
        raced.kill_winner()
    again = run_3dino(*args, "--stop-after", "1", env=env)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "at iteration " in again.stderr


@pytest.mark.e2e
def test_plan_does_not_rewrite_the_plans_while_preprocess_holds_the_dataset(tmp_path):
    """`plan` takes the preprocessed folder's lock for its writes: refused, naming the holder, nothing written."""
    build_mni_dataset(tmp_path / "raw", 997, 4, seed=2, max_size=32)
    pre = tmp_path / "pre" / "Dataset997_MNITissue"
    env = {"THREEDINO_RAW": str(tmp_path / "raw"), "THREEDINO_PREPROCESSED": str(tmp_path / "pre"),
           "THREEDINO_RESULTS": str(tmp_path / "results")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(pre)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_3dino("plan", "-d", "997", env=env)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert f"another 3dino command is writing this preprocessed dataset: process {holder.pid} on" in refused.stderr
        assert not pre.exists() or not any(pre.iterdir())
    finally:
        holder.kill()
        holder.wait()
    assert run_3dino("plan", "-d", "997", env=env).returncode == 0
    assert (pre / "plans.json").is_file()
