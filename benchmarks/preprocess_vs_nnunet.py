"""Benchmark: our ``plan`` + ``preprocess -c finetune`` against nnU-Net v2's ``plan_and_preprocess -c 3d_fullres``.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/preprocess_vs_nnunet.py [--repeats 2] [-np 2] [--profile]

Steps:

1. Make nnU-Net's own virtual environment (``benchmarks/.venv-nnunet``) when it is missing:
   torch==2.13.0 first, then nnunetv2 with a constraints file pinning torch (otherwise pip would
   replace the CPU torch by a CUDA build). nnunetv2 never goes into the project's environment.
2. Build one raw dataset in nnU-Net's layout (which is ours): ``--num-cases`` generated CT-like
   cases of ``--shape`` voxels, anisotropic ``--spacing`` (mm, i,j,k) scaled per case by a factor
   in [1 - jitter, 1 + jitter] so every case is resampled.
3. Untimed warm-up: nnU-Net's planning alone (``--no_pp``) gives its 3d_fullres target spacing
   (nnUNetPlans.json, transposed z,y,x order), converted to our i,j,k order and passed to our
   ``plan --target-spacing`` so both tools resample to the same grid; our ``plan`` runs once too.
4. Timed runs, alternating (ours, nnU-Net, ours, nnU-Net, ...), each into fresh output folders,
   with the same number of processes: ours = ``3dino plan -np P --target-spacing ...`` then
   ``3dino preprocess -c finetune -np P``; nnU-Net = ``nnUNetv2_plan_and_preprocess -c 3d_fullres
   -np P -npfp P --verify_dataset_integrity`` (our plan verifies the dataset too). Wall time of the
   whole command pair and peak memory of the whole process tree (see ``common.py``).
5. Quality: per case, both preprocessed images brought back to raw i,j,k axis order must have the
   same shape and a Pearson correlation >= 0.99 (normalisations differ, correlation ignores that).
6. ``--profile``: our preprocess once more in one process (``-np 1``) under cProfile; the
   functions taking the most time go into the JSON.

Prints a table and writes every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blosc2
import numpy as np
import SimpleITK as sitk
from common import MIB, format_table, machine_info, median, run_measured, write_json
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
TIME_TARGET = 0.5
MEMORY_TARGET = 0.5
PEARSON_TARGET = 0.99


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes, the same for both tools")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per tool (alternating)")
    p.add_argument("--content", choices=("phantom", "ellipsoids"), default="phantom",
                   help="phantom: CT-like anatomy (this script); ellipsoids: threedino_pipe's build_synthetic_dataset "
                        "(one ellipsoid in white noise)")
    p.add_argument("--num-cases", type=int, default=16)
    p.add_argument("--shape", default="160,160,128", help="voxels per case, i,j,k")
    p.add_argument("--spacing", default="0.8,0.8,2.5", help="base spacing in mm, i,j,k")
    p.add_argument("--spacing-jitter", type=float, default=0.15, help="per-case spacing factor in [1-j, 1+j]")
    p.add_argument("--oblique", action="store_true", help="oblique direction matrices (neither tool reorients)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-id", type=int, default=950)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--nnunet-venv", type=Path, default=REPO / "benchmarks" / ".venv-nnunet")
    p.add_argument("--interval", type=float, default=0.05, help="memory sampling interval in seconds")
    p.add_argument("--profile", action="store_true", help="profile our preprocess (-np 1) with cProfile")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "preprocess_vs_nnunet.json")
    return p.parse_args(argv)


def triple(text: str, kind=float) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3:
        raise SystemExit(f"expected three comma-separated values, got {text!r}")
    return values


# --------------------------------------------------------------------------- dataset

PHANTOM_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spine": 3, "aorta": 4, "lung": 5, "lesion": 6}


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid (centre and radii in mm)."""
    total = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return total <= 1.0


def ct_phantom_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like ``X x Y x Z`` volume (int16 HU) and its labels, laid out in mm so any spacing shows the same anatomy.

    Body (fat rim around soft tissue) whose cross-section varies along z, two lungs, liver with a
    lesion, two kidneys, spine (cortical bone around marrow) and aorta, positions and sizes drawn
    per case; smooth tissue texture, the scanner's blur (in-plane 0.6 mm, across slices the slice
    profile, FWHM = slice spacing) and in-plane correlated noise of about 10 HU.
    """
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    fov = np.array(shape) * np.array(spacing)

    def j(scale: float = 0.08) -> float:
        return float(rng.uniform(1 - scale, 1 + scale))

    zn = z / (fov[2] / 2)  # -1 (feet) .. 1 (head)
    waist = 1 + 0.08 * np.sin(2.5 * zn + rng.uniform(0, 6.28))
    a, b, c = 0.42 * fov[0] * j(), 0.34 * fov[1] * j(), fov[2] / 2  # body half-axes in mm
    body = (x / (a * waist)) ** 2 + (y / (b * waist)) ** 2 <= 1
    inner = (x / (a * waist - 8 * j(0.2))) ** 2 + (y / (b * waist - 8 * j(0.2))) ** 2 <= 1
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = 35.0  # muscle and soft tissue
    label = np.zeros(shape, np.uint8)
    grid = (x, y, z)
    organs = [  # (label, HU, centre mm, half-axes mm)
        (5, -850.0, (-0.45 * a, 0.05 * b, 0.55 * c * j()), (0.35 * a, 0.55 * b, 0.4 * c)),
        (5, -850.0, (0.45 * a, 0.05 * b, 0.55 * c * j()), (0.33 * a, 0.55 * b, 0.38 * c)),
        (1, 60.0, (-0.3 * a * j(), 0.0, 0.0), (0.5 * a * j(), 0.55 * b * j(), 0.22 * c * j())),
        (2, 150.0, (-0.45 * a, 0.45 * b, -0.3 * c * j()), (12 * j(), 9 * j(), 0.1 * c * j())),
        (2, 150.0, (0.45 * a, 0.45 * b, -0.3 * c * j()), (12 * j(), 9 * j(), 0.1 * c * j())),
    ]
    for value, intensity, centre, radii in organs:
        mask = _ellipsoid(grid, centre, radii) & inner
        hu[mask] = intensity
        label[mask] = value
    lesion = _ellipsoid(grid, (-0.3 * a + rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-20, 20)),
                        (rng.uniform(6, 12), rng.uniform(6, 12), rng.uniform(8, 16))) & (label == 1)
    hu[lesion] = 110.0
    label[lesion] = 6
    spine_x, spine_y = rng.uniform(-3, 3), 0.5 * b
    radial = np.sqrt((x - spine_x) ** 2 + (y - spine_y) ** 2 * np.ones_like(z))
    hu[radial <= 11] = 700.0
    hu[radial <= 8] = 250.0
    label[radial <= 11] = 3
    aorta = np.sqrt((x - spine_x - 14) ** 2 + (y - spine_y + 16) ** 2 * np.ones_like(z)) <= 8 * j()
    hu[aorta & (zn < 0.6)] = 200.0
    label[aorta & (zn < 0.6)] = 4
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.0 / np.array(spacing))
    hu += np.where(body, 8.0 / max(float(texture.std()), 1e-6), 0.0).astype(np.float32) * texture
    hu = ndimage.gaussian_filter(hu, (0.6 / spacing[0], 0.6 / spacing[1], 1 / 2.355))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.7, 0.7, 0.0))
    hu += noise * (10.0 / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def build_ct_phantom_dataset(raw_root: Path, dataset_id: int, num_cases: int, shape: tuple[int, int, int],
                             spacing: tuple[float, float, float], spacing_jitter: float, oblique: bool, seed: int,
                             name: str = "CTPhantom") -> Path:
    """Write ``raw_root/Dataset{id}_{name}`` (nnU-Net v2 layout) of :func:`ct_phantom_case` cases.

    Each case's spacing (mm, i,j,k) is ``spacing`` scaled per axis by a factor in [1 - jitter, 1 + jitter].
    """
    from threedino_pipe.demo.examples import oblique_direction
    from threedino_pipe.raw_data.image_io import Geometry, from_array

    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_cases):
        case_spacing = tuple(float(s * rng.uniform(1 - spacing_jitter, 1 + spacing_jitter)) for s in spacing)
        geometry = Geometry(size=shape, spacing=case_spacing, origin=tuple(rng.uniform(-100, 100, 3).round(3).tolist()),
                            direction=oblique_direction(20.0) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1))
        image, label = ct_phantom_case(shape, case_spacing, rng)
        case = f"phantom_{index:03d}"
        sitk.WriteImage(from_array(image, geometry), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(from_array(label, geometry), str(folder / "labelsTr" / f"{case}.nii.gz"))
    spec = {"name": folder.name, "channel_names": {"0": "CT"}, "labels": PHANTOM_LABELS, "numTraining": num_cases,
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------- environments

def ensure_nnunet_venv(venv: Path) -> Path:
    """The venv's ``bin`` folder, creating the venv (torch pinned, then nnunetv2) when it lacks nnU-Net."""
    bin_dir = venv / "bin"
    if (bin_dir / "nnUNetv2_plan_and_preprocess").exists():
        return bin_dir
    print(f"creating nnU-Net's virtual environment {venv} (torch pinned to {TORCH_PIN})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + ["-c", str(constraints), "nnunetv2"], check=True)
    return bin_dir


def versions(python: str, packages: list[str]) -> dict:
    """Installed versions of ``packages`` in the environment of ``python``."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n"
            "    try:\n        return m.version(p)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            f"print(json.dumps({{p: v(p) for p in {packages!r}}}))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def ours_command() -> list[str]:
    """Our CLI: the console script beside this interpreter, else ``python -m threedino_pipe.cli``."""
    script = Path(sys.executable).parent / "3dino"
    return [str(script)] if script.exists() else [sys.executable, "-m", "threedino_pipe.cli"]


def clean_env(**folders: Path) -> dict:
    """This process's environment without either tool's folder variables, plus ``folders``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THREEDINO_", "nnUNet_"))}
    env.update({k: str(v) for k, v in folders.items()})
    return env


# --------------------------------------------------------------------------- runs

def ours_env(raw: Path, run: Path) -> dict:
    return clean_env(THREEDINO_RAW=raw, THREEDINO_PREPROCESSED=run / "preprocessed",
                     THREEDINO_RESULTS=run / "results")


def nnunet_env(raw: Path, run: Path) -> dict:
    return clean_env(nnUNet_raw=raw, nnUNet_preprocessed=run / "preprocessed", nnUNet_results=run / "results")


def ours_commands(dataset_id: int, nproc: int, spacing_ijk: list[float]) -> list[list[str]]:
    cli = ours_command()
    spacing = ",".join(repr(float(s)) for s in spacing_ijk)
    return [cli + ["plan", "-d", str(dataset_id), "-np", str(nproc), "--target-spacing", spacing],
            cli + ["preprocess", "-d", str(dataset_id), "-c", "finetune", "-np", str(nproc)]]


def nnunet_commands(bin_dir: Path, dataset_id: int, nproc: int) -> list[list[str]]:
    return [[str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
             "-np", str(nproc), "-npfp", str(nproc), "--verify_dataset_integrity"]]


def run_tool(tool: str, commands: list[list[str]], env: dict, interval: float) -> dict:
    """Run ``commands`` one after the other; wall time is their sum, peak memory their maximum."""
    stages = []
    load = list(os.getloadavg())
    for command in commands:
        m = run_measured(command, env=env, interval=interval)
        if m.returncode != 0:
            print(m.output_tail, file=sys.stderr)
            raise SystemExit(f"{tool}: `{shlex.join(command)}` failed with exit status {m.returncode}")
        stages.append(m.to_dict())
    for stage in stages:
        stage["output_tail"] = stage["output_tail"][-1500:]
    return {"tool": tool, "load_average_before": load, "wall_s": sum(s["wall_s"] for s in stages),
            "peak_rss": max(s["peak_rss"] for s in stages), "peak_pss": max(s["peak_pss"] for s in stages),
            "stages": stages}


def nnunet_spacing_ijk(plans_file: Path) -> tuple[list[float], dict]:
    """nnU-Net's 3d_fullres spacing in our raw i,j,k order, and the plans.

    nnU-Net's arrays are SimpleITK's numpy order (z, y, x) = our (k, j, i); its configuration
    spacing is given after ``transpose_forward``: ``spacing_t[a] = spacing_zyx[transpose_forward[a]]``.
    """
    plans = json.loads(plans_file.read_text())
    transpose = plans["transpose_forward"]
    spacing_t = plans["configurations"]["3d_fullres"]["spacing"]
    spacing_zyx = [0.0] * 3
    for a, axis in enumerate(transpose):
        spacing_zyx[axis] = float(spacing_t[a])
    return spacing_zyx[::-1], plans


# --------------------------------------------------------------------------- quality

def load_ours(folder: Path, case: str, plans: dict) -> np.ndarray:
    """Our finetune image ``C x X x Y x Z`` back in raw i,j,k order (undoing plans ``transpose``)."""
    array = blosc2.open(str(folder / f"{case}.b2nd"))[:]
    transpose = [int(a) for a in plans.get("transpose", [0, 1, 2])]
    return array.transpose(0, *(int(a) + 1 for a in np.argsort(transpose)))


def load_nnunet(folder: Path, case: str, plans: dict) -> np.ndarray:
    """nnU-Net's 3d_fullres image ``C x ...`` back in our raw i,j,k order.

    Stored axis ``a`` is z,y,x axis ``transpose_forward[a]``, i.e. i,j,k axis ``2 - transpose_forward[a]``.
    """
    stored = [folder / f"{case}.b2nd", folder / f"{case}.npy", folder / f"{case}.npz"]
    path = next((p for p in stored if p.exists()), None)
    if path is None:
        raise SystemExit(f"nnU-Net wrote no array for {case} in {folder}")
    if path.suffix == ".b2nd":
        array = blosc2.open(str(path))[:]
    elif path.suffix == ".npy":
        array = np.load(path)
    else:
        array = np.load(path)["data"]
    to_ijk = [2 - int(a) for a in plans["transpose_forward"]]
    return array.transpose(0, *(int(a) + 1 for a in np.argsort(to_ijk)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def compare(ours_pre: Path, nnunet_pre: Path, dataset: str, cases: list[str]) -> dict:
    """Per case: shapes in i,j,k order (equal?) and the Pearson correlation of every channel."""
    our_plans = json.loads((ours_pre / dataset / "plans.json").read_text())
    nn_plans = json.loads((nnunet_pre / dataset / "nnUNetPlans.json").read_text())
    rows = []
    for case in cases:
        ours = load_ours(ours_pre / dataset / "finetune", case, our_plans)
        theirs = load_nnunet(nnunet_pre / dataset / "nnUNetPlans_3d_fullres", case, nn_plans)
        same = ours.shape == theirs.shape
        r = [pearson(ours[c], theirs[c]) for c in range(ours.shape[0])] if same else None
        rows.append({"case": case, "shape_ours": list(ours.shape[1:]), "shape_nnunet": list(theirs.shape[1:]),
                     "same_shape": same, "pearson": r})
    correlations = [v for row in rows if row["pearson"] for v in row["pearson"]]
    return {"cases": rows, "all_same_shape": all(row["same_shape"] for row in rows),
            "min_pearson": min(correlations) if correlations else None,
            "median_pearson": median(correlations) if correlations else None,
            "spacing_ours_ijk": our_plans["configurations"]["finetune"]["spacing"],
            "transpose_ours": our_plans.get("transpose"),
            "transpose_forward_nnunet": nn_plans["transpose_forward"]}


# --------------------------------------------------------------------------- profile

def profile_ours(raw: Path, work: Path, dataset_id: int, spacing_ijk: list[float], top: int = 30) -> dict:
    """Our plan and preprocess, each in one process (``-np 1``) under cProfile, into a fresh folder.

    With one process every case runs in the profiled process (no pool), so the figures cover the
    whole work; SimpleITK keeps its own threads.
    """
    run = work / "profile"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    report = {}
    for stage, command in zip(("plan", "preprocess"), ours_commands(dataset_id, 1, spacing_ijk), strict=True):
        stats_file = run / f"{stage}.prof"
        args = command[command.index("plan" if stage == "plan" else "preprocess"):]
        profiled = [sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", "threedino_pipe.cli", *args]
        start = time.perf_counter()
        subprocess.run(profiled, env=ours_env(raw, run), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        entry = {"command": shlex.join(profiled), "wall_s": time.perf_counter() - start}
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(str(stats_file), stream=text).sort_stats(key).print_stats(top)
            entry[f"top_by_{key}"] = text.getvalue().splitlines()
        report[stage] = entry
        print(f"profiled our {stage} (-np 1): {entry['wall_s']:.1f} s", flush=True)
    return report


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    nproc = args.num_processes
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="preprocess_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch folder: {work}", flush=True)
    bin_dir = ensure_nnunet_venv(args.nnunet_venv)

    raw = work / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    start = time.perf_counter()
    shape, spacing = triple(args.shape, int), triple(args.spacing)
    if args.content == "phantom":
        folder = build_ct_phantom_dataset(raw, args.dataset_id, args.num_cases, shape, spacing, args.spacing_jitter,
                                          args.oblique, args.seed)
    else:
        from threedino_pipe.demo.examples import build_synthetic_dataset
        folder = build_synthetic_dataset(raw, args.dataset_id, num_cases=args.num_cases, shape=shape, spacing=spacing,
                                         spacing_jitter=args.spacing_jitter, oblique=args.oblique, seed=args.seed,
                                         name="Ellipsoids")
    dataset = folder.name
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTr").glob("*_0000.nii.gz"))
    print(f"built {dataset}: {len(cases)} cases in {time.perf_counter() - start:.1f} s", flush=True)

    # Warm-up (untimed): nnU-Net's planning gives the target spacing; our plan checks it is accepted.
    warm = work / "warmup_nnunet"
    shutil.rmtree(warm, ignore_errors=True)
    m = run_measured([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(args.dataset_id), "--no_pp",
                      "-npfp", str(nproc)], env=nnunet_env(raw, warm), interval=args.interval)
    if m.returncode != 0:
        print(m.output_tail, file=sys.stderr)
        raise SystemExit("nnU-Net's planning (warm-up) failed")
    spacing_ijk, _ = nnunet_spacing_ijk(warm / "preprocessed" / dataset / "nnUNetPlans.json")
    print(f"nnU-Net 3d_fullres spacing (i,j,k mm): {[round(s, 4) for s in spacing_ijk]}", flush=True)
    warm_ours = work / "warmup_ours"
    shutil.rmtree(warm_ours, ignore_errors=True)
    run_tool("ours", ours_commands(args.dataset_id, nproc, spacing_ijk)[:1], ours_env(raw, warm_ours), args.interval)

    runs = []
    last = {}
    for repeat in range(args.repeats):
        for tool in ("ours", "nnunet"):
            run = work / f"{tool}_{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            if tool == "ours":
                result = run_tool(tool, ours_commands(args.dataset_id, nproc, spacing_ijk), ours_env(raw, run),
                                  args.interval)
            else:
                result = run_tool(tool, nnunet_commands(bin_dir, args.dataset_id, nproc), nnunet_env(raw, run),
                                  args.interval)
            result["repeat"] = repeat
            runs.append(result)
            print(f"run {repeat} {tool:>6}: {result['wall_s']:7.1f} s, peak RSS {result['peak_rss'] / MIB:7.0f} MiB,"
                  f" peak PSS {result['peak_pss'] / MIB:7.0f} MiB", flush=True)
            if tool in last:
                shutil.rmtree(last[tool], ignore_errors=True)
            last[tool] = run

    quality = compare(last["ours"] / "preprocessed", last["nnunet"] / "preprocessed", dataset, cases)

    summary = {}
    for tool in ("ours", "nnunet"):
        mine = [r for r in runs if r["tool"] == tool]
        summary[tool] = {key: median([r[key] for r in mine]) for key in ("wall_s", "peak_rss", "peak_pss")}
        summary[tool]["stages_wall_s"] = [median([r["stages"][i]["wall_s"] for r in mine])
                                          for i in range(len(mine[0]["stages"]))]
    ratios = {key: summary["ours"][key] / summary["nnunet"][key] for key in ("wall_s", "peak_rss", "peak_pss")}
    pairs = [[r for r in runs if r["repeat"] == repeat] for repeat in range(args.repeats)]
    ratios["wall_s_per_repeat"] = [ours["wall_s"] / theirs["wall_s"] for ours, theirs in pairs]
    targets = {"wall_time": ratios["wall_s"] <= TIME_TARGET, "peak_memory_rss": ratios["peak_rss"] <= MEMORY_TARGET,
               "same_shapes": quality["all_same_shape"],
               "pearson": quality["min_pearson"] is not None and quality["min_pearson"] >= PEARSON_TARGET}

    profile = profile_ours(raw, work, args.dataset_id, spacing_ijk) if args.profile else None

    rows = [[tool, summary[tool]["wall_s"], f"{summary[tool]['peak_rss'] / MIB:.0f}",
             f"{summary[tool]['peak_pss'] / MIB:.0f}"] for tool in ("ours", "nnunet")]
    rows.append(["ours/nnU-Net", ratios["wall_s"], f"{ratios['peak_rss']:.3f}", f"{ratios['peak_pss']:.3f}"])
    print()
    print(format_table(["tool", "wall s (median)", "peak RSS MiB", "peak PSS MiB"], rows))
    print(f"\nwall-time ratio per repeat (ours/nnU-Net, alternating runs): "
          f"{[round(r, 3) for r in ratios['wall_s_per_repeat']]}")
    print(f"our stages (plan, preprocess) median wall s: {[round(s, 1) for s in summary['ours']['stages_wall_s']]}")
    print(f"quality: same shapes {quality['all_same_shape']}, Pearson min {quality['min_pearson']}, "
          f"median {quality['median_pearson']}")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))

    ours_versions = versions(sys.executable, ["threedino-pipe", "torch", "numpy", "SimpleITK", "blosc2", "scipy",
                                              "monai"])
    nnunet_versions = versions(str(bin_dir / "python"), ["nnunetv2", "torch", "numpy", "SimpleITK", "blosc2",
                                                         "scipy", "acvl-utils", "batchgenerators"])
    report = {
        "benchmark": "preprocess_vs_nnunet",
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "cwd": os.getcwd(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "versions": {"ours": ours_versions, "ours_git_commit": git_commit(), "nnunet_env": nnunet_versions},
        "settings": {"num_processes": nproc, "repeats": args.repeats, "num_cases": args.num_cases,
                     "shape_ijk": triple(args.shape, int), "spacing_ijk_mm": triple(args.spacing),
                     "spacing_jitter": args.spacing_jitter, "content": args.content, "oblique": args.oblique,
                     "seed": args.seed,
                     "memory_sampling_interval_s": args.interval, "dataset": dataset,
                     "target_spacing_ijk_mm": spacing_ijk,
                     "commands_ours": [shlex.join(c) for c in ours_commands(args.dataset_id, nproc, spacing_ijk)],
                     "commands_nnunet": [shlex.join(c) for c in nnunet_commands(bin_dir, args.dataset_id, nproc)]},
        "summary": summary, "ratios_ours_over_nnunet": ratios, "targets": targets,
        "target_values": {"wall_time_ratio_max": TIME_TARGET, "peak_memory_ratio_max": MEMORY_TARGET,
                          "pearson_min": PEARSON_TARGET},
        "quality": quality, "runs": runs, "profile": profile,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if not args.keep and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
