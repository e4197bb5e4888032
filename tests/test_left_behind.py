"""What a test session leaves in the temporary folder: nothing when it passes, a bounded amount when it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

INNER = '''
import pytest

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")

def test_writes_3_mb(tmp_path, shared):
    (tmp_path / "big.bin").write_bytes(bytes(2_000_000))
    (shared / "big.bin").write_bytes(bytes(1_000_000))
    assert FAIL is False

FAIL = {fail}
'''


def _inner_session(tmp_path, fail: bool, workers: list[str]) -> tuple[subprocess.CompletedProcess, list]:
    """Run a one-test pytest session with this repository's pytest settings and conftest, a bound of 2 MB
    (``workers``: pytest-xdist's options, as `make test` passes them, or none)."""
    folder = tmp_path / ("failing" if fail else "passing")
    folder.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "test_inner.py").write_text(INNER.format(fail=fail))
    root = tmp_path / f"root_{folder.name}"
    root.mkdir()
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root), "THREEDINO_TEST_LEFT_BEHIND_MB": "2"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                             str(REPO / "pyproject.toml"), "--rootdir", str(folder), *workers,
                             str(folder / "test_inner.py")],
                            capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    left = [Path(top) / name for top, _, names in os.walk(root) for name in names if not name.endswith(".lock")]
    return result, left


@pytest.mark.parametrize("workers", [[], ["-n", "1", "--dist", "loadfile"]], ids=["one process", "xdist"])
def test_a_passed_session_leaves_nothing_and_a_failed_one_is_held_to_the_bound(tmp_path, workers):
    passed, left = _inner_session(tmp_path, fail=False, workers=workers)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert left == [], left  # tmp_path_retention_policy = "failed": the test's and the session's folders are gone

    failed, left = _inner_session(tmp_path, fail=True, workers=workers)
    assert failed.returncode == 1
    assert {p.name for p in left} == {"big.bin"} and len(left) == 2  # the failed test's folder and the module's
    assert "this test session leaves 3 MB in " in failed.stdout and "more than the bound of 2 MB" in failed.stdout
    assert "test_writes_3_mb0 2 MB" in failed.stdout and "shared0 1 MB" in failed.stdout, failed.stdout
