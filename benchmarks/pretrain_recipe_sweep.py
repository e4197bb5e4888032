"""Which SSL settings make a short pretraining run learn: the sweep behind the ``auto`` recipe.

Runs the real ``3dino pretrain`` once per (variant, seed) on a preprocessed dataset (default: the
example MNI152 dataset the tests use, built here when missing) and reads each run's log.csv: the
final and minimum target entropy / log K, prototypes in use over the last 50 iterations, the
effective rank and spread of the teacher's CLS tokens; then the patch probe
(``training/feature_probe.py``) of the final teacher and of the same network at its
initialisation (``feature_probe.cross_validated_probe``: 5 folds, shifted grids). Variants: the
paper's recipe (the negative control), the ``auto`` recipe, ``auto`` with one of its changes
reverted at a time (the ablation that says which lever matters), and ``auto`` with the centring
options (a queue, a lower teacher temperature, a faster teacher) that lower the target entropy.
One run at a time; ``--threads`` torch threads each.

    python benchmarks/pretrain_recipe_sweep.py --iters 60 --seeds 0 1 2 --out benchmarks/results/<date>/sweep.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, invocation, machine_info, openmp_like_3dino, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "paper": ["--recipe", "paper"],
    "auto": ["--recipe", "auto"],
    "auto, LayerScale 1e-5": ["--recipe", "auto", "--layerscale-init", "1e-5"],
    "auto, momentum 0.992": ["--recipe", "auto", "--momentum-start", "0.992"],
    "auto, sqrt lr": ["--recipe", "auto", "--peak-lr", "0.000125"],
    "auto + queue": ["--recipe", "auto", "--centering", "sinkhorn_queue"],
    "auto + queue + temp 0.04": ["--recipe", "auto", "--centering", "sinkhorn_queue", "--teacher-temp", "0.04"],
    "auto + queue + temp 0.04 + momentum 0.8": ["--recipe", "auto", "--centering", "sinkhorn_queue", "--teacher-temp",
                                                "0.04", "--momentum-start", "0.8", "--peak-lr", "0.0005"],
    "auto + softmax centring": ["--recipe", "auto", "--centering", "softmax"],
    "auto + temp 0.04": ["--recipe", "auto", "--teacher-temp", "0.04"],
    "auto + temp 0.03": ["--recipe", "auto", "--teacher-temp", "0.03"],
    "auto + temp 0.02": ["--recipe", "auto", "--teacher-temp", "0.02"],
    "auto + queue 32": ["--recipe", "auto", "--centering", "sinkhorn_queue", "--queue-size", "32"],
    "auto + queue 128": ["--recipe", "auto", "--centering", "sinkhorn_queue", "--queue-size", "128"],
    "auto + queue 512": ["--recipe", "auto", "--centering", "sinkhorn_queue", "--queue-size", "512"],
    "auto + fixed prototypes": ["--recipe", "auto", "--freeze-last-layer-iters", "1000000"],
    "auto + fixed prototypes + temp 0.04": ["--recipe", "auto", "--freeze-last-layer-iters", "1000000",
                                            "--teacher-temp", "0.04"],
    "auto + fixed prototypes + queue": ["--recipe", "auto", "--freeze-last-layer-iters", "1000000", "--centering",
                                        "sinkhorn_queue", "--ibot-centering", "sinkhorn_queue"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--prototypes", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dataset", default="990", help="preprocessed dataset id (990 is built when missing)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "out" / "recipe_sweep")
    p.add_argument("--no-probe", action="store_true", help="skip the patch probes")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "pretrain_recipe_sweep.json")
    return p.parse_args(argv)


def example_dataset(work: Path) -> dict[str, str]:
    """THREEDINO_* for the tests' real-scan dataset 990 (8 MNI152 resamplings), planned and preprocessed once."""
    env = {"THREEDINO_RAW": str(work / "raw"), "THREEDINO_PREPROCESSED": str(work / "preprocessed")}
    if not (work / "preprocessed" / "Dataset990_MNITissue" / "splits.json").is_file():
        from threedino_pipe.demo.examples import build_mni_dataset
        build_mni_dataset(work / "raw", 990, 8, seed=0, num_test=2)
        for stage in (["plan", "-d", "990"], ["preprocess", "-d", "990"]):
            subprocess.run([sys.executable, "-m", "threedino_pipe.cli", *stage, "--no-progress"], check=True,
                           env={**os.environ, **env})
    return env


def probe_pair(run_dir: Path, preprocessed: Path) -> tuple[float, float]:
    """Cross-validated patch probe (5 folds, shifted grids) of the run's final teacher and of its initial
    network (same seed)."""
    import torch

    from threedino_pipe.training.feature_probe import cross_validated_probe
    from threedino_pipe.training.ssl_trainer import build_ssl_pair, load_ssl_pair

    state = torch.load(run_dir / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    config, _, teacher = load_ssl_pair(state)
    device = torch.device("cpu")
    trained = cross_validated_probe(teacher.backbone, preprocessed, device)
    torch.manual_seed(config.seed)
    _, initial = build_ssl_pair(config)
    return trained, cross_validated_probe(initial.backbone, preprocessed, device)


def summarise(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    last = rows[-1]
    return {"entropy_final": float(last["target_entropy"]),
            "entropy_min": min(float(r["target_entropy"]) for r in rows),
            "prototypes_used": float(last["prototypes_used"]), "cls_rank": float(last["cls_rank"]),
            "teacher_cls_std": float(last["teacher_cls_std"]), "loss": float(last["loss"])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.update(example_dataset(args.work_dir) if args.dataset == "990" else {})
    env["THREEDINO_RESULTS"] = str(args.work_dir / "results")
    preprocessed = Path(env["THREEDINO_PREPROCESSED"])
    dataset_dir = next(preprocessed.glob(f"Dataset{int(args.dataset):03d}_*"))
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant.replace(' ', '_').replace(',', '')}__s{seed}"
            command = [sys.executable, "-m", "threedino_pipe.cli", "pretrain", "-d", args.dataset, "--preset", "tiny",
                       "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--prototypes",
                       str(args.prototypes), "--precision", "fp32", "--num-workers", "0", "--probe-every", "0",
                       "--seed", str(seed), "--run", name, "--restart", "--no-progress", *VARIANTS[variant]]
            tick = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            run_dir = args.work_dir / "results" / "pretrain" / name
            record = {"variant": variant, "seed": seed, "args": VARIANTS[variant],
                      "seconds": time.perf_counter() - tick, **summarise(run_dir)}
            if not args.no_probe:
                record["probe_trained"], record["probe_initial"] = probe_pair(run_dir, dataset_dir)
            runs.append(record)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}),
                  flush=True)
    table = []
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]

        def mean(key: str, rows: list[dict] = mine) -> float:
            values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
            return sum(values) / len(values) if values else math.nan

        table.append([variant, f"{mean('entropy_final'):.4f}", f"{mean('entropy_min'):.4f}",
                      f"{mean('prototypes_used'):.3f}", f"{min(r['prototypes_used'] for r in mine):.3f}",
                      f"{mean('cls_rank'):.1f}", f"{mean('probe_trained'):.3f} / {mean('probe_initial'):.3f}"])
    text = format_table(["variant", "entropy final", "entropy min", "prototypes used (mean)", "(min)", "CLS rank",
                         "probe trained / initial"], table)
    print(text)
    write_json(args.out, {"command": invocation(sys.argv if argv is None else ["pretrain_recipe_sweep.py", *argv]),
                          "machine": machine_info(), "iters": args.iters, "seeds": args.seeds,
                          "prototypes": args.prototypes, "batch_size": args.batch_size, "runs": runs,
                          "table": text})


if __name__ == "__main__":
    openmp_like_3dino()
    main()
