"""Shared fixtures: example raw datasets and an isolated folder environment per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from threedino_pipe.runtime.openmp import passive_openmp

passive_openmp()  # as the `3dino` command does, before anything loads torch (docs/cli.md)

from threedino_pipe.demo.examples import build_mni_dataset, build_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREEDINO = [sys.executable, "-m", "threedino_pipe.cli"]


def pytest_collection_modifyitems(config, items):
    """Fail fast: unit tests first, end-to-end (``e2e``) tests last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture
def folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fresh raw/preprocessed/results folders, exported as THREEDINO_* for this test."""
    out = {name: tmp_path / name for name in ("raw", "preprocessed", "results")}
    for name, path in out.items():
        path.mkdir()
        monkeypatch.setenv(f"THREEDINO_{name.upper()}", str(path))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    return out


@pytest.fixture(scope="session")
def mni_raw(tmp_path_factory) -> Path:
    """A read-only real-scan raw dataset (8 MNI152 resamplings, grey/white matter labels)."""
    root = tmp_path_factory.mktemp("mni_raw")
    build_mni_dataset(root, 990, 8, seed=0, num_test=2)
    return root


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A read-only generated dataset: 0.8 x 0.8 x 3 mm (jittered), oblique direction."""
    root = tmp_path_factory.mktemp("synthetic_raw")
    build_synthetic_dataset(root, 991, 6, spacing_jitter=0.1, seed=1)
    return root


def run_3dino(*args: str, env: dict | None = None, cwd: Path | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``3dino`` command in a subprocess; returns the completed process (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*THREEDINO, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def mni_preprocessed(mni_raw, tmp_path_factory) -> dict[str, str]:
    """The MNI dataset planned and preprocessed once (real CLI); returns THREEDINO_* env for it.

    Read-only for tests: each test sets its own THREEDINO_RESULTS.
    """
    pre = tmp_path_factory.mktemp("mni_preprocessed")
    env = {"THREEDINO_RAW": str(mni_raw), "THREEDINO_PREPROCESSED": str(pre)}
    for args in (("plan", "-d", "990"), ("preprocess", "-d", "990")):
        result = run_3dino(*args, env=env)
        assert result.returncode == 0, result.stderr
    return env


@pytest.fixture(scope="session")
def dicom_studies(tmp_path_factory):
    """Read-only DICOM studies written from real MNI152 resamplings, as a PACS export holds them.

    Returns ``(root, studies)``: ``studies`` maps ``mr``, ``ct``, ``multiframe``, ``compressed`` to
    :class:`threedino_pipe.demo.dicom_examples.ExampleStudy` (folder, identity, series UIDs, source volumes).
    """
    from threedino_pipe.demo.dicom_examples import build_example_studies
    root = tmp_path_factory.mktemp("dicom_studies")
    return root, build_example_studies(root)


@pytest.fixture(scope="session")
def dicom_broken(tmp_path_factory):
    """Read-only broken DICOM corpus (one study per kind of bad input); ``(root, studies)``."""
    from threedino_pipe.demo.dicom_examples import build_broken_corpus
    root = tmp_path_factory.mktemp("dicom_broken")
    return root, build_broken_corpus(root)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc (Debian package) on free 127.0.0.1 ports, from a configuration in a temporary folder.

    Skips when Orthanc is not installed (`.ci/run` installs it); stopped at the end of the session.
    """
    from dicom_fixtures import orthanc_binary, start_orthanc
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()
