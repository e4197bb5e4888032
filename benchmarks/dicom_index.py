"""Issue 14's DICOM index benchmark: indexing speed against SimpleITK (the writers: ``dicom_write.py``).

Index: a generated tree of ``--files`` DICOM files (default 10,000 CT slices of 256 x 256 int16,
``--studies`` 50 studies of 2 series each, one folder per series, random file names), with a warm
file cache (every file read once before timing). Timed, each ``--repeats`` times, alternating:

- ours: ``threedino_pipe.dicom.index.index_folder(root, processes=P)`` (headers only, P worker
  processes; their start-up is included);
- SimpleITK, as ``3dino predict`` reads DICOM today: per folder ``GetGDCMSeriesIDs``,
  ``GetGDCMSeriesFileNames`` and ``ImageSeriesReader.Execute()`` (discovery and reading, ITK with P
  threads); and, for reference, its discovery alone.

Files per second and the ratio ours / SimpleITK (target >= 5).

The machine is shared: the script refuses to run while the 1-minute load average is 1.5 or more
(``--force`` overrides). Output: a table and ``--out`` (JSON with every run, machine, command).

    .venv/bin/python benchmarks/dicom_index.py [--files 10000] [--studies 50] [--processes 2]
        [--repeats 2] [--work-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import format_table, invocation, machine_info, median, write_json

# numpy and threedino_pipe are imported inside the functions: the index's worker processes are
# spawned and import this script again, as they would import the `3dino` entry point (a few modules).

MIB = 1024 * 1024
TARGET_RATIO = 5.0


def build_tree(root: Path, files: int, studies: int, seed: int = 0) -> int:
    """Write ``files`` CT slices (256 x 256 int16) as ``studies`` studies of 2 series, one folder per series."""
    import numpy as np
    import SimpleITK as sitk

    from threedino_pipe.demo.dicom_examples import Identity, series_datasets, synthetic_ct_volume, write_datasets
    from threedino_pipe.dicom.uids import derive_uid
    per_series = files // (2 * studies)
    image, _ = synthetic_ct_volume((256, 256, per_series), (0.9, 0.9, 2.0), labels=4, seed=seed)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image = sitk.Cast(image, sitk.sitkFloat32)
    rng = np.random.default_rng(seed)
    written = 0
    for s in range(studies):
        identity = Identity(patient_name=f"Bench^Patient{s}", patient_id=f"BENCH{s:04d}",
                            study_uid=derive_uid("bench-study", str(s)))
        for n in range(2):
            series_uid = derive_uid("bench-series", str(s), str(n))
            datasets = series_datasets(image, identity, series_uid=series_uid, series_number=n + 1, modality="CT",
                                       description=f"series {n}")
            written += len(write_datasets(datasets, root / f"study_{s:03d}" / f"series_{n}", names="random", rng=rng))
    return written


def warm(root: Path) -> int:
    """Read every file once (the benchmark is for a warm file cache); returns the bytes read."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def time_ours(root: Path, processes: int) -> dict:
    from threedino_pipe.dicom.index import index_folder
    start = time.perf_counter()
    index = index_folder(root, processes=processes)
    seconds = time.perf_counter() - start
    instances = sum(len(s.instances) for s in index.iter_series())
    return {"seconds": seconds, "files": index.files, "instances": instances,
            "series": sum(1 for _ in index.iter_series()), "skipped": len(index.skipped)}


def time_simpleitk(root: Path, threads: int, read: bool) -> dict:
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    start = time.perf_counter()
    files = series = 0
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
            files += len(names)
            series += 1
            if read:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(names)
                reader.Execute()
    return {"seconds": time.perf_counter() - start, "files": files, "series": series}


def index_benchmark(args, work: Path) -> dict:
    root = work / "tree"
    marker = work / "tree.complete"
    if not marker.exists() or json.loads(marker.read_text()) != {"files": args.files, "studies": args.studies}:
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        count = build_tree(root, args.files, args.studies)
        marker.write_text(json.dumps({"files": args.files, "studies": args.studies}))
        print(f"wrote {count} files in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"warm cache: {warm(root) / MIB:.0f} MiB read", flush=True)
    runs = {"ours": [], "simpleitk_discover_and_read": [], "simpleitk_discover": []}
    for repeat in range(args.repeats):
        runs["ours"].append(time_ours(root, args.processes))
        runs["simpleitk_discover_and_read"].append(time_simpleitk(root, args.processes, read=True))
        runs["simpleitk_discover"].append(time_simpleitk(root, args.processes, read=False))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()),
              flush=True)
    summary = {name: {"median_s": median([r["seconds"] for r in rows]),
                      "files_per_s": rows[0]["files"] / median([r["seconds"] for r in rows])}
               for name, rows in runs.items()}
    ratio = summary["ours"]["files_per_s"] / summary["simpleitk_discover_and_read"]["files_per_s"]
    return {"runs": runs, "summary": summary, "ratio_vs_discover_and_read": ratio,
            "ratio_vs_discover": summary["ours"]["files_per_s"] / summary["simpleitk_discover"]["files_per_s"],
            "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2, help="index workers and ITK threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept; generated inputs are reused")
    parser.add_argument("--force", action="store_true", help="run even when the machine is busy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/dicom_index.json"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if load >= 1.5 and not args.force:
        print(f"the machine is busy (load average {load:.2f} >= 1.5): run this later, or pass --force")
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dicom_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "command": invocation(argv), "index": None}
    try:
        report["index"] = index_benchmark(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[f"index: {name}", row["median_s"], f"{row['files_per_s']:.0f} files/s", ""]
            for name, row in report["index"]["summary"].items()]
    rows.append(["index: ours / SimpleITK read", report["index"]["ratio_vs_discover_and_read"], "",
                 f">= {TARGET_RATIO:g}: {report['index']['meets_target']}"])
    print(format_table(["what", "seconds", "rate / memory", "target"], rows))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
