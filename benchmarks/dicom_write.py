"""Issue 14's writer benchmark: DICOM SEG and RTSTRUCT of a 512 x 512 x 300 CT with 14 labels, time and memory.

Inputs (generated once into ``--work-dir``, reused while the sizes are the same): a CT of
``--size`` x ``--size`` x ``--slices`` voxels (0.8 x 0.8 x 1.5 mm, HU, int16 stored) written as a
classic single-frame DICOM series, and a label map of ``--labels`` structures of plausible shapes
(:func:`label_map`): solid organs (ellipsoids, some of two overlapping lobes), a hollow organ (a
shell: rings with a hole on each slice), tubular vessels winding along the slices, a group of small
lymph-node-like spheres (many separate contours) and an organ cut by the image border.

Each writer runs ``--repeats`` times, each in a fresh process that first reads the series back
(:func:`threedino_pipe.dicom.volume.read_series`) and loads the label map, then writes:

- wall seconds of the write alone;
- extra memory: the peak resident set size during the write, sampled every 20 ms, minus the RSS
  with the inputs loaded; and, as a cross-check that misses no short spike, ``ru_maxrss`` (the
  kernel's high-water mark) after the write minus that RSS, when the write raised the mark (else
  the mark before the write bounds the write's peak from above).

Targets: each writer <= 30 s and <= 1.5 GiB extra on 2 cores. The machine may be shared: the
script refuses to run while the 1-minute load average is 1.5 or more (``--force`` overrides).
Output: a table and ``--out`` (default ``benchmarks/results/<UTC date>/dicom_write.json``: every
run, the machine, the command).

    .venv/bin/python benchmarks/dicom_write.py [--size 512] [--slices 300] [--labels 14] [--repeats 1]
        [--work-dir DIR] [--out FILE] [--force]
    .venv/bin/python benchmarks/dicom_write.py --size 64 --slices 20 --out /tmp/w.json --force   # a check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TreeMemorySampler, format_table, invocation, machine_info, median, rss_bytes, write_json

MIB = 1024 * 1024
TARGET_WRITE_S, TARGET_EXTRA_BYTES = 30.0, 1.5 * 1024 * MIB
SPACING = (0.8, 0.8, 1.5)  # mm: i, j (in-plane), k
KINDS = ("organ", "lobed", "shell", "vessel", "organ", "nodes", "organ", "vessel", "lobed", "border", "organ",
         "shell", "organ", "vessel")


def _structures(shape: tuple[int, int, int], labels: int, seed: int) -> list[tuple[int, str, dict]]:
    """(value, kind, parameters in mm from the volume's centre) of each structure."""
    import numpy as np
    rng = np.random.default_rng(seed)
    half = np.asarray(shape, float) * np.asarray(SPACING) / 2
    out = []
    for value in range(1, labels + 1):
        kind = KINDS[(value - 1) % len(KINDS)]
        angle = 2 * math.pi * value / labels
        centre = np.array([math.cos(angle) * half[0] * 0.4, math.sin(angle) * half[1] * 0.4,
                           rng.uniform(-0.3, 0.3) * half[2]])
        radii = half * rng.uniform(0.08, 0.18, size=3)
        if kind == "border":  # past the edge of the field of view along i
            centre[0] = half[0] * 0.95
        params = {"centre": centre, "radii": radii, "second": centre + radii * [0.8, 0.5, 0.3],
                  "tube": max(3.0, float(radii[0]) * 0.25), "turns": float(rng.uniform(1, 3)),
                  "nodes": [centre + rng.uniform(-1, 1, 3) * half * [0.25, 0.25, 0.3] for _ in range(12)]}
        out.append((value, kind, params))
    return out


def _plane_mask(kind: str, p: dict, x, y, z: float, half):
    """The structure's mask on the slice at ``z`` mm (``x``, ``y``: column and row coordinate arrays, mm)."""
    import numpy as np

    def ellipsoid(centre, radii, scale=1.0):
        dz = ((z - centre[2]) / (radii[2] * scale)) ** 2
        if dz > 1:
            return np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
        return ((x - centre[0]) / (radii[0] * scale)) ** 2 + ((y - centre[1]) / (radii[1] * scale)) ** 2 + dz <= 1

    if kind in ("organ", "border"):
        return ellipsoid(p["centre"], p["radii"])
    if kind == "lobed":
        return ellipsoid(p["centre"], p["radii"]) | ellipsoid(p["second"], p["radii"] * 0.7)
    if kind == "shell":
        return ellipsoid(p["centre"], p["radii"]) & ~ellipsoid(p["centre"], p["radii"], 0.6)
    if kind == "vessel":  # a tube winding around a line along k
        t = z / half[2] * math.pi * p["turns"]
        cx, cy = p["centre"][0] + p["radii"][0] * math.cos(t), p["centre"][1] + p["radii"][1] * math.sin(t)
        return (x - cx) ** 2 + (y - cy) ** 2 <= p["tube"] ** 2
    mask = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)  # nodes: small separate spheres
    for centre in p["nodes"]:
        mask |= ellipsoid(centre, np.full(3, 4.0))
    return mask


def label_map(shape: tuple[int, int, int], labels: int = 14, seed: int = 0):
    """A CT-like volume (HU, float32 SimpleITK image) and its ``X x Y x Z`` uint8 label map (module docstring).

    Built slice by slice, so a 512 x 512 x 300 case needs little more than its own arrays.
    """
    import numpy as np
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    half = np.asarray(shape, float) * np.asarray(SPACING) / 2
    x = ((np.arange(shape[0]) - (shape[0] - 1) / 2) * SPACING[0])[:, None]
    y = ((np.arange(shape[1]) - (shape[1] - 1) / 2) * SPACING[1])[None, :]
    structures = _structures(shape, labels, seed)
    label = np.zeros(shape, np.uint8)
    hu = np.empty(shape, np.float32)
    body = (x / (half[0] * 0.92)) ** 2 + (y / (half[1] * 0.85)) ** 2 <= 1
    for k in range(shape[2]):
        z = (k - (shape[2] - 1) / 2) * SPACING[2]
        plane = label[:, :, k]
        for value, kind, params in structures:
            plane[_plane_mask(kind, params, x, y, z, half)] = value
        hu[:, :, k] = np.where(body, 40.0, -1000.0) + 15.0 * plane + rng.normal(0, 10, shape[:2])
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    return image, label


def prepare_inputs(work: Path, shape: tuple[int, int, int], labels: int) -> Path:
    """The source series and label map in ``work/writer_case`` (made once per shape and label count)."""
    folder = work / "writer_case"
    marker = work / "writer_case.complete"
    key = json.dumps({"shape": list(shape), "labels": labels, "generator": "dicom_write.label_map"})
    if marker.exists() and marker.read_text() == key:
        return folder
    import numpy as np

    from threedino_pipe.demo.dicom_examples import Identity, series_datasets, write_datasets
    from threedino_pipe.dicom.uids import derive_uid
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    image, label = label_map(shape, labels)
    identity = Identity(study_uid=derive_uid("bench-writer"))
    write_datasets(series_datasets(image, identity, series_uid=derive_uid("bench-writer", "series"), series_number=1,
                                   modality="CT", description="CT 1.5mm"), folder / "series")
    np.save(folder / "label.npy", label)
    marker.write_text(key)
    print(f"wrote the {'x'.join(map(str, shape))} series and label map in {time.perf_counter() - start:.1f} s",
          flush=True)
    return folder


def write_once(kind: str, folder: Path, out: Path) -> dict:
    """In a fresh process: load the series and label map, then time one writer and measure its extra memory."""
    import numpy as np

    from threedino_pipe.dicom.index import index_folder
    from threedino_pipe.dicom.rtstruct_writer import write_rtstruct
    from threedino_pipe.dicom.seg_writer import ModelIdentity, write_seg
    from threedino_pipe.dicom.volume import read_series, source_datasets
    volume = read_series(next(index_folder(folder / "series", processes=1).iter_series()))
    label = np.load(folder / "label.npy")
    headers = source_datasets(volume)
    labels = {v: f"structure_{v:02d}" for v in range(1, int(label.max()) + 1)}
    model = ModelIdentity("benchmark_model", "threedino-pipe 0.1.0", "none", "0f" * 32)
    writer = write_seg if kind == "seg" else write_rtstruct
    baseline = rss_bytes(os.getpid())
    maxrss_before = _maxrss()
    with TreeMemorySampler(os.getpid(), interval=0.02, pss_every=0) as sampler:
        start = time.perf_counter()
        result = writer(label, labels, volume, model, out, headers=headers)
        seconds = time.perf_counter() - start
    maxrss_after = _maxrss()
    return {"kind": kind, "seconds": seconds, "baseline_rss": baseline, "peak_rss": sampler.peak_rss,
            "extra_bytes": sampler.peak_rss - baseline, "maxrss_before": maxrss_before, "maxrss_after": maxrss_after,
            # the kernel's high-water mark: exact when the write set a new one, else only a bound
            "maxrss_extra_bytes": maxrss_after - baseline if maxrss_after > maxrss_before else None,
            "maxrss_extra_at_most": None if maxrss_after > maxrss_before else maxrss_before - baseline,
            "samples": sampler.samples, "file_bytes": Path(result.path).stat().st_size, "labels": len(labels),
            "shape": list(label.shape)}


def _maxrss() -> int:
    """The process's peak resident set size so far (bytes; Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def writer_benchmark(folder: Path, repeats: int) -> dict:
    """Every writer ``repeats`` times, each run in a fresh process; medians and the targets."""
    results = {}
    for kind in ("seg", "rtstruct"):
        runs = []
        for _ in range(repeats):
            run = subprocess.run([sys.executable, __file__, "--write-once", kind, str(folder)], capture_output=True,
                                 text=True, env=dict(os.environ), timeout=1800)
            if run.returncode != 0:
                raise SystemExit(f"{kind} writer failed:\n{run.stderr[-3000:]}")
            runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"{kind}: {runs[-1]['seconds']:.1f} s, extra {runs[-1]['extra_bytes'] / MIB:.0f} MiB", flush=True)
        seconds = median([r["seconds"] for r in runs])
        extra = max(r["extra_bytes"] for r in runs)
        results[kind] = {"runs": runs, "median_s": seconds, "max_extra_bytes": extra,
                         "meets_target": seconds <= TARGET_WRITE_S and extra <= TARGET_EXTRA_BYTES}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the CT")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per writer")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept; generated inputs are reused")
    parser.add_argument("--force", action="store_true", help="run even when the machine is busy")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default benchmarks/results/<UTC date>/dicom_write.json)")
    parser.add_argument("--write-once", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_once:
        kind, folder = args.write_once
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(write_once(kind, Path(folder), Path(tmp) / f"{kind}.dcm")))
        return 0
    load = os.getloadavg()[0]
    if load >= 1.5 and not args.force:
        print(f"the machine is busy (load average {load:.2f} >= 1.5): run this later, or pass --force")
        return 2
    out = args.out or Path(__file__).resolve().parent / "results" / time.strftime("%Y-%m-%d", time.gmtime()) / \
        "dicom_write.json"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dicom_write_"))
    work.mkdir(parents=True, exist_ok=True)
    shape = (args.size, args.size, args.slices)
    report = {"machine": machine_info(), "command": invocation(argv), "shape": list(shape), "spacing_mm": SPACING,
              "labels": args.labels, "targets": {"seconds": TARGET_WRITE_S, "extra_bytes": TARGET_EXTRA_BYTES}}
    try:
        report["writers"] = writer_benchmark(prepare_inputs(work, shape, args.labels), args.repeats)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[f"write {kind}", row["median_s"], f"extra {row['max_extra_bytes'] / MIB:.0f} MiB",
             f"{row['runs'][0]['file_bytes'] / MIB:.1f} MiB", f"<= 30 s, <= 1.5 GiB: {row['meets_target']}"]
            for kind, row in report["writers"].items()]
    print(format_table(["what", "seconds", "memory", "file", "target"], rows))
    write_json(out, report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
