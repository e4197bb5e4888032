"""Shared fixtures: example raw datasets and an isolated folder environment per test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from threedino_pipe.runtime.openmp import passive_openmp

# pytest-xdist's workers share the cores: each, and every command it starts, runs cores / workers OpenMP threads
# (torch reads OMP_NUM_THREADS when it loads; 2 threads per worker on 2 cores only made them take turns)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
passive_openmp()  # as the `3dino` command does, before anything loads torch (docs/cli.md)
# pytest-xdist's workers set COLUMNS=80 and LINES=24: commands under test print as into a batch log, as they do
# in a one-process session (a test that needs a width sets COLUMNS itself)
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

from threedino_pipe.demo.examples import build_mni_dataset, build_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREEDINO = [sys.executable, "-m", "threedino_pipe.cli"]


def pytest_collection_modifyitems(config, items):
    """Fail fast: unit tests first, end-to-end (``e2e``) tests last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


#: test files that share an expensive session fixture of this file, kept in one pytest-xdist worker (each worker
#: builds the session fixtures its own tests use): SSL runs and transformers folders, the finetuned small-body model
SHARED_FIXTURE_FILES = {name: group for group, names in {
    "ssl_runs": ("test_simmim.py", "test_tang.py", "test_swin.py", "test_natural_backbone.py"),
    "small_body_model": ("test_window_skip.py", "test_coarse_pass.py"),
}.items() for name in names}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not loaded
def pytest_xdist_make_scheduler(config, log):
    """With ``--dist loadfile`` (`make test`), each file is one unit of work as usual, except that the files of
    one SHARED_FIXTURE_FILES group form a single unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_FIXTURE_FILES.get(Path(path).name, path)

    return SharedFixtureFileScheduling(config, log)


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
def mni_raw(tmp_path_factory) -> Iterator[Path]:
    """A read-only real-scan raw dataset (8 MNI152 resamplings, grey/white matter labels)."""
    root = tmp_path_factory.mktemp("mni_raw")
    build_mni_dataset(root, 990, 8, seed=0, num_test=2)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # also when tests failed: it is remade in seconds


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Iterator[Path]:
    """A read-only generated dataset: 0.8 x 0.8 x 3 mm (jittered), oblique direction."""
    root = tmp_path_factory.mktemp("synthetic_raw")
    build_synthetic_dataset(root, 991, 6, spacing_jitter=0.1, seed=1)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def finetune_and_predict_from(run: Path, results: Path, mni_raw: Path, tmp_path: Path, env: dict,
                               name: str) -> tuple[Path, Path]:
    """Finetune a linear head (2 iterations, tiny) on dataset 990 from the pretrain ``run`` into run ``name``,
    then predict one training scan with it; returns (the finetune run folder, the scan). Asserts both worked."""
    done = run_3dino("finetune", "-d", "990", "--preset", "tiny", "--pct", "50", "--num-workers", "0", "--precision",
                     "fp32", "--no-progress", "--head", "linear", "--iters", "2", "--val-every", "2", "--batch-size",
                     "1", "--backbone", str(run), "--run", name, env=env)
    assert done.returncode == 0, done.stderr
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((mni_raw / "Dataset990_MNITissue" / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(source, scans / source.name)
    out = tmp_path / "out"
    folder = results / "Dataset990_MNITissue" / name
    predicted = run_3dino("predict", "-i", str(scans), "-o", str(out), "-m", str(folder), "--device", "cpu",
                          "--no-progress", env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert (out / source.name.replace("_0000", "")).is_file()
    return folder, source


def run_3dino(*args: str, env: dict | None = None, cwd: Path | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``3dino`` command in a subprocess; returns the completed process (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*THREEDINO, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def invoke_3dino(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``3dino`` in this process (typer's CliRunner), for refusals and dry runs, where a subprocess would spend
    most of its seconds importing torch; the fields of :func:`run_3dino`'s result. A user error is printed as
    ``3dino`` prints it (``error: ...`` on stderr) with its exit code."""
    from typer.testing import CliRunner

    from threedino_pipe.cli import app
    from threedino_pipe.runtime.errors import UserError

    result = CliRunner().invoke(app, list(args), env=env, terminal_width=400)
    stderr, code = result.stderr, result.exit_code
    if isinstance(result.exception, UserError):
        stderr, code = f"{stderr}error: {result.exception.render()}\n", result.exception.exit_code
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["3dino", *args], code, result.stdout, stderr)


def finetune_briefly(dataset_id: int, env: dict, *, patch: str, iters: int, batch_size: int, lr: float,
                     head: str = "unetr") -> None:
    """The real ``plan`` (tiny preset, ``--patch-size patch``), ``preprocess`` and a short ``finetune`` (no
    backbone, fp32, validation at the end) of a generated dataset under ``env``'s THREEDINO_* folders."""
    for args in (("plan", "-d", str(dataset_id), "--preset", "tiny", "--patch-size", patch),
                 ("preprocess", "-d", str(dataset_id), "-np", "1"),
                 ("finetune", "-d", str(dataset_id), "--pct", "100", "--backbone", "none", "--head", head,
                  "--iters", str(iters), "--val-every", str(iters), "--batch-size", str(batch_size), "--lr", str(lr),
                  "--precision", "fp32", "--num-workers", "0", "--no-progress")):
        done = run_3dino(*args, env=env)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="session")
def mni_preprocessed(mni_raw, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The MNI dataset planned and preprocessed once (real CLI); returns THREEDINO_* env for it.

    Read-only for tests: each test sets its own THREEDINO_RESULTS.
    """
    pre = tmp_path_factory.mktemp("mni_preprocessed")
    env = {"THREEDINO_RAW": str(mni_raw), "THREEDINO_PREPROCESSED": str(pre)}
    for args in (("plan", "-d", "990"), ("preprocess", "-d", "990")):
        result = run_3dino(*args, env=env)
        assert result.returncode == 0, result.stderr
    yield env
    shutil.rmtree(pre, ignore_errors=True)


@pytest.fixture(scope="session")
def dicom_studies(tmp_path_factory):
    """Read-only DICOM studies written from real MNI152 resamplings, as a PACS export holds them.

    Returns ``(root, studies)``: ``studies`` maps ``mr``, ``ct``, ``multiframe``, ``compressed`` to
    :class:`threedino_pipe.demo.dicom_examples.ExampleStudy` (folder, identity, series UIDs, source volumes).
    """
    from threedino_pipe.demo.dicom_examples import build_example_studies
    root = tmp_path_factory.mktemp("dicom_studies")
    yield root, build_example_studies(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dicom_broken(tmp_path_factory):
    """Read-only broken DICOM corpus (one study per kind of bad input); ``(root, studies)``."""
    from threedino_pipe.demo.dicom_examples import build_broken_corpus
    root = tmp_path_factory.mktemp("dicom_broken")
    yield root, build_broken_corpus(root)
    shutil.rmtree(root, ignore_errors=True)


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


#: fresh crops of the tissue classification dataset for a held-out check (fixture ``tissue``)
HELD_OUT = 40


@pytest.fixture(scope="session")
def tissue(tmp_path_factory) -> Iterator[dict]:
    """19 MNI crops (grey- vs white-matter dominated) planned and preprocessed by the real CLI, a
    random tiny backbone file, and 40 fresh crops with their classes for a held-out check (the
    classification dataset of the probe tests, shared by every test of a classification backbone)."""
    import SimpleITK as sitk
    import torch
    from tissue_classification import build_tissue_dataset, tissue_cases

    from threedino_pipe.models.presets import build_backbone
    from threedino_pipe.models.weight_files import save_backbone
    root = tmp_path_factory.mktemp("tissue")
    env = {"THREEDINO_RAW": str(root / "raw"), "THREEDINO_PREPROCESSED": str(root / "preprocessed"),
           "THREEDINO_RESULTS": str(root / "results")}
    build_tissue_dataset(root / "raw", 995, 19, seed=0)
    for args in (("plan", "-d", "995"), ("preprocess", "-d", "995", "-c", "finetune")):
        result = run_3dino(*args, env=env)
        assert result.returncode == 0, result.stderr
    held_out = root / "held_out"
    held_out.mkdir()
    classes = {}
    for index, (image, cls) in enumerate(tissue_cases(HELD_OUT, seed=100)):
        sitk.WriteImage(image, str(held_out / f"fresh_{index:03d}_0000.nii.gz"))
        classes[f"fresh_{index:03d}"] = cls
    torch.manual_seed(0)
    save_backbone(build_backbone("tiny"), root / "tiny_random.pt", preset="tiny")
    yield {"root": root, "env": env, "backbone": root / "tiny_random.pt", "held_out": held_out, "classes": classes}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): small
    tensor work only loses to threading, the more so on a loaded 2-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: what one test session may leave under pytest's temporary folder, in MB: a passed session leaves nothing
#: (pyproject.toml: tmp_path_retention_policy = "failed"); a failed test keeps its tmp_path, and then the
#: module fixtures' folders stay too (the session fixtures above remove theirs); DEVELOPERS.md, "Tests"
LEFT_BEHIND_LIMIT_MB = float(os.environ.get("THREEDINO_TEST_LEFT_BEHIND_MB", "300"))


def folder_megabytes(folder: Path) -> float:
    """Bytes of the files under ``folder`` (links not followed), in MB."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total / 1e6


@pytest.hookimpl(trylast=True)  # after pytest's own clean-up of the temporary folders
def pytest_sessionfinish(session, exitstatus):
    """Fail the session when what it leaves under the temporary folder exceeds LEFT_BEHIND_LIMIT_MB."""
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: the controller checks the whole folder, its workers' included
    factory = getattr(session.config, "_tmp_path_factory", None)  # what the tmp_path_factory fixture returns
    folder = getattr(factory, "_basetemp", None)  # set once a test asked for a temporary folder
    if folder is None or not folder.is_dir() or session.config.option.basetemp:
        return  # nothing left, or a --basetemp the user chose to keep
    left = folder_megabytes(folder)
    if left <= LEFT_BEHIND_LIMIT_MB:
        return
    tops = [p for p in folder.iterdir() if p.is_dir()]
    tops = [q for p in tops for q in (p.iterdir() if p.name.startswith("popen-gw") else [p]) if q.is_dir()]
    largest = sorted(((folder_megabytes(p), p.name) for p in tops), reverse=True)[:8]
    listed = ", ".join(f"{name} {mb:.0f} MB" for mb, name in largest)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = (f"this test session leaves {left:.0f} MB in {folder}, more than the bound of {LEFT_BEHIND_LIMIT_MB:g} "
            f"MB (tests/conftest.py LEFT_BEHIND_LIMIT_MB); largest: {listed}")
    if reporter is not None:
        reporter.write_line(text, red=True)
    else:
        print(text, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ----- a briefly finetuned segmentation model of small CT-like bodies (window skipping, coarse pass) -----
def small_body_ct_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 x 24 CT-like case (HU): a small body in a corner of the field, with an organ; labels 1
    (body), 2 (organ)."""
    shape = (64, 64, 24)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    centre = np.array([-16.0, -16.0, 0.0]) + rng.uniform(-2, 2, 3) * [1, 1, 0]
    body = (((grid - centre) / [7.0, 6.0, 5.0]) ** 2).sum(-1) <= 1
    organ = body & ((((grid - centre - [2, 0, 0]) / [3.0, 3.0, 3.0]) ** 2).sum(-1) <= 1)
    hu = np.where(body, 40.0, -1000.0) + 200.0 * organ + rng.normal(0, 10, shape)
    return hu.astype(np.float32), (body.astype(np.uint8) + organ.astype(np.uint8))


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A generated CT-like dataset, planned with 32 x 32 x 16 windows, and a unetr model finetuned on it
    briefly; (the run folder, the folder of a test scan, THREEDINO_* env). Shared by the window-skipping and
    coarse-pass tests."""
    from threedino_pipe.artifacts import DatasetJson
    from threedino_pipe.raw_data.image_io import Geometry, write_image

    root = tmp_path_factory.mktemp("window_skip")
    raw = root / "raw" / "Dataset994_SmallBodies"
    rng = np.random.default_rng(11)
    geo = Geometry(size=(64, 64, 24), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                   direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for index in range(5):
        hu, label = small_body_ct_case(rng)
        write_image(hu, geo, raw / "imagesTr" / f"small_{index:03d}_0000.nii.gz")
        write_image(label, geo, raw / "labelsTr" / f"small_{index:03d}.nii.gz")
    DatasetJson.from_data({"name": raw.name, "channel_names": {"0": "CT"}, "numTraining": 5,
                           "labels": {"background": 0, "body": 1, "organ": 2}, "file_ending": ".nii.gz"},
                          raw / DatasetJson.FILE).write(raw / DatasetJson.FILE)
    hu, label = small_body_ct_case(rng)
    write_image(hu, geo, root / "scan" / "test_0000.nii.gz")
    env = {"THREEDINO_RAW": str(root / "raw"), "THREEDINO_PREPROCESSED": str(root / "pre"),
           "THREEDINO_RESULTS": str(root / "results")}
    finetune_briefly(994, env, patch="32,32,16", iters=40, batch_size=2, lr=0.003)
    run = next((root / "results" / "Dataset994_SmallBodies").glob("finetune__unetr__*"))
    yield run, root / "scan", env
    shutil.rmtree(root, ignore_errors=True)


# ----- one tiny run per pretraining baseline and tiny natural-image models, shared by several modules -----
SIMMIM = ("pretrain", "-d", "990", "--method", "simmim", "--preset", "tiny", "--iters", "20", "--batch-size", "2",
          "--num-workers", "0", "--precision", "fp32", "--no-progress", "--snapshot-every", "0", "--probe-every", "0")
TANG = ("pretrain", "-d", "990", "--method", "tang", "--preset", "tiny", "--batch-size", "2", "--num-workers", "0",
        "--precision", "fp32", "--no-progress", "--snapshot-every", "0", "--probe-every", "0")
#: tiny natural-image models (transformers' Dinov2Model and DINOv3ViTModel), random weights
HF_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "image_size": 32}
HF_KINDS = {"dinov2": ("Dinov2Config", "Dinov2Model", {"patch_size": 8}),
            "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", {"patch_size": 4, "num_register_tokens": 2})}
HF_MEAN, HF_STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


# ----- the real command: one shared run (plus its split twin) -------------------------------------------------
@pytest.fixture(scope="session")
def simmim_runs(mni_preprocessed, tmp_path_factory) -> Iterator[dict]:
    """A tiny SimMIM run of 20 iterations under its default name, and the same run in two invocations
    (``--stop-after 8``, then the same command). Read-only for the tests."""
    results = tmp_path_factory.mktemp("simmim_results")
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(results), "PYTHONPATH": str(REPO)}
    whole = run_3dino(*SIMMIM, env=env)
    assert whole.returncode == 0, whole.stderr
    first = run_3dino(*SIMMIM, "--run", "split", "--stop-after", "8", env=env)
    assert first.returncode == 0, first.stderr
    second = run_3dino(*SIMMIM, "--run", "split", env=env)
    assert second.returncode == 0, second.stderr
    yield {"env": env, "results": results, "run": results / "pretrain" / "tiny__simmim__990",
           "split": results / "pretrain" / "split", "stderr": (whole.stderr, first.stderr, second.stderr)}
    shutil.rmtree(results, ignore_errors=True)


# ----- the real command: one tiny run per encoder (plus the ViT run's split twin) ---------------------------------
@pytest.fixture(scope="session")
def tang_runs(mni_preprocessed, tmp_path_factory) -> Iterator[dict]:
    """A tiny ViT run of 20 iterations and the same run in two invocations (``--stop-after 8``, then again), and
    a Swin run of 1 iteration, under their default names. Read-only for the tests."""
    results = tmp_path_factory.mktemp("tang_results")
    env = {**mni_preprocessed, "THREEDINO_RESULTS": str(results), "PYTHONPATH": str(REPO)}
    outcomes = [run_3dino(*TANG, "--iters", "20", env=env),
                run_3dino(*TANG, "--iters", "20", "--run", "split", "--stop-after", "8", env=env),
                run_3dino(*TANG, "--iters", "20", "--run", "split", env=env),
                run_3dino(*TANG, "--iters", "1", "--arch", "swin", env=env)]
    for outcome in outcomes:
        assert outcome.returncode == 0, outcome.stderr
    runs = results / "pretrain"
    yield {"env": env, "results": results, "vit": runs / "tiny__tang-vit__990", "split": runs / "split",
           "swin": runs / "tiny__tang-swin__990", "stderr": [o.stderr for o in outcomes]}
    shutil.rmtree(results, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """``save_pretrained`` folders of a tiny random Dinov2Model and DINOv3ViTModel (the latter with a
    preprocessor_config.json of its own mean and std)."""
    transformers = pytest.importorskip("transformers")
    import torch

    root = tmp_path_factory.mktemp("hf_models")
    folders = {}
    for method, (config_name, model_name, extra) in HF_KINDS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**HF_TINY, **extra)
        getattr(transformers, model_name)(config).save_pretrained(root / method)
        folders[method] = root / method
    preprocessor = {"image_mean": HF_MEAN, "image_std": HF_STD}
    (folders["dinov3"] / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    yield folders
    shutil.rmtree(root, ignore_errors=True)
