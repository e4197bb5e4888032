"""Does the self-configured pretraining pay off on real scans, on this CPU? (the pretraining issue's benchmark)

One dataset per invocation (``--dataset mni``: the MNI152 tissue task resampled so every axis has
at least 96 voxels; ``--dataset phantom``: the CT phantom of ``preprocess_vs_nnunet.py``, as no
non-brain real scans install from the package registries), every stage resumable, so a long
run goes in chunks (``--max-minutes``; rerun the same command to continue):

1. build the raw dataset (24 cases: ``3dino preprocess`` holds 20 % out as the test list, which
   nothing below trains or selects on), ``3dino plan --preset tiny --patch-size 64,64,64`` (finetune
   patches of 64^3 instead of 112^3 so that 2 x 3 finetune runs fit a CPU), ``3dino preprocess``;
2. ``3dino pretrain`` tiny, fp32, batch 4, the ``auto`` recipe, ``--iters`` (about 2 hours here),
   snapshots and patch probes every tenth;
3. (a) the patch probe (``training/feature_probe.py``) of the final teacher and of the same
   network at its initialisation: fitted on the non-test cases, scored on the test cases;
   difference with a 95 % bootstrap CI over test cases; (c) the same probe at every snapshot;
4. (b) ``3dino finetune --pct 25`` for seeds 0-2 with the pretrained backbone frozen + adapter
   and with ``--backbone none`` + the same adapter head trained end to end, the same iterations;
   ``3dino predict`` on the test cases and ``3dino evaluate``; mean foreground Dice per model and
   the pretrained-minus-none difference with a 95 % bootstrap CI over (seed, test case) pairs.

    python benchmarks/pretrain_value.py --dataset mni --pretrain-iters 12000 --finetune-iters 600 \\
        --max-minutes 140 --out benchmarks/results/<date>/pretrain_value_mni.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import invocation, machine_info, openmp_like_3dino, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"mni": (993, "MNITissue96"), "phantom": (994, "CTPhantom")}
NUM_CASES = 24


class OutOfTime(Exception):
    """The chunk's ``--max-minutes`` are spent: rerun the same command to continue."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), required=True)
    p.add_argument("--pretrain-iters", type=int, default=12_000)
    p.add_argument("--finetune-iters", type=int, default=600)
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="finetune --lr for both arms (default: finetune's, 1e-4 for the adapter); runs and outputs "
                        "then carry __lr<LR> in their names")
    p.add_argument("--val-every", type=int, default=200,
                   help="finetune validations (each sweeps the validation cases: about 50 s here at 1.0-1.5 mm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pct", type=float, default=25.0)
    p.add_argument("--chunk", type=int, default=500, help="pretrain iterations per invocation of 3dino pretrain")
    p.add_argument("--max-minutes", type=float, default=140.0, help="stop (cleanly, resumable) after this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/out/pretrain_value_<dataset>")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


class Runner:
    """Runs ``3dino`` commands in the experiment's folders and stops cleanly when the time is up."""

    def __init__(self, work: Path, threads: int, max_minutes: float) -> None:
        self.work, self.deadline = work, time.monotonic() + 60 * max_minutes
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        THREEDINO_RAW=str(work / "raw"), THREEDINO_PREPROCESSED=str(work / "preprocessed"),
                        THREEDINO_RESULTS=str(work / "results"))

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime

    def __call__(self, *args: str) -> str:
        self.check_time()
        done = subprocess.run([sys.executable, "-m", "threedino_pipe.cli", *args, "--no-progress"], env=self.env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"3dino {' '.join(args)} failed:\n{done.stderr[-4000:]}")
        return done.stderr


def build_raw(kind: str, raw: Path) -> Path:
    dataset_id, name = DATASETS[kind]
    folder = raw / f"Dataset{dataset_id}_{name}"
    if (folder / "dataset.json").is_file():
        return folder
    if kind == "mni":
        from threedino_pipe.demo.examples import build_mni_dataset
        # the demo's 2.6-4 mm spacings give 37-66 voxels per axis; 0.375 of them (1.0-1.5 mm) give 97-170
        return build_mni_dataset(raw, dataset_id, NUM_CASES, seed=7, max_size=192, name=name, spacing_scale=0.375)
    from preprocess_vs_nnunet import build_ct_phantom_dataset
    return build_ct_phantom_dataset(raw, dataset_id, NUM_CASES, (128, 128, 96), (1.5, 1.5, 2.5), 0.15, False, seed=7,
                                    name=name)


def pretrain(run: Runner, dataset_id: int, iters: int, chunk: int) -> Path:
    folder = run.work / "results" / "pretrain" / "value"
    while not (folder / "checkpoint_final.pt").is_file():
        run("pretrain", "-d", str(dataset_id), "--preset", "tiny", "--iters", str(iters), "--batch-size", "4",
            "--precision", "fp32", "--num-workers", "1", "--run", "value", "--stop-after", str(chunk))
    return folder


def test_ids(preprocessed: Path) -> list[str]:
    return json.loads((preprocessed / "splits.json").read_text())["test"]


def probe_cases(preprocessed: Path) -> tuple[tuple, tuple]:
    """The probe's (training, test) cases: fold 0's training and validation lists, and the test list."""
    from threedino_pipe.training.feature_probe import load_cases

    splits = json.loads((preprocessed / "splits.json").read_text())
    train_ids = sorted(set(splits["folds"][0]["train"]) | set(splits["folds"][0]["val"]))
    folder = preprocessed / "finetune"
    return load_cases(folder, train_ids), load_cases(folder, sorted(splits["test"]))


def probe_pairs(backbone, train: tuple, test: tuple) -> list:
    """(prediction, label) pairs of the test cases from a probe fitted on ``backbone``'s training-case tokens."""
    import torch

    from threedino_pipe.training.feature_probe import case_predictions, fit_probe

    device = torch.device("cpu")
    return case_predictions(backbone, fit_probe(backbone, *train, device), *test, device)


def probes(run_dir: Path, preprocessed: Path, bootstrap: int) -> dict:
    """(a) final teacher vs its initial network, (c) every snapshot: fitted on non-test, scored on test cases."""
    import torch

    from threedino_pipe.training.feature_probe import balanced_accuracy
    from threedino_pipe.training.ssl_trainer import build_ssl_pair, load_ssl_pair

    splits = json.loads((preprocessed / "splits.json").read_text())
    train, test = probe_cases(preprocessed)

    def pairs_of(backbone) -> list:
        return probe_pairs(backbone, train, test)

    final = torch.load(run_dir / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    config, _, teacher = load_ssl_pair(final)
    torch.manual_seed(config.seed)
    _, initial = build_ssl_pair(config)
    trained, random_init = pairs_of(teacher.backbone), pairs_of(initial.backbone)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(trained), len(trained))
        diffs.append(balanced_accuracy([trained[i] for i in pick]) - balanced_accuracy([random_init[i] for i in pick]))
    curve = {0: balanced_accuracy(random_init)}
    for path in sorted(run_dir.glob("checkpoint_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        _, _, snap = load_ssl_pair(torch.load(path, map_location="cpu", weights_only=True))
        curve[int(path.stem.split("_")[1])] = balanced_accuracy(pairs_of(snap.backbone))
    return {"probe_pretrained": balanced_accuracy(trained), "probe_random": balanced_accuracy(random_init),
            "probe_difference_ci95": [float(np.nanpercentile(diffs, 2.5)), float(np.nanpercentile(diffs, 97.5))],
            "probe_curve": curve, "probe_train_cases": len(train[0]), "probe_test_cases": len(splits["test"])}


def finetune_and_evaluate(run: Runner, dataset_id: int, dataset_name: str, backbone: str, seed: int,
                          args: argparse.Namespace, test_images: Path, test_labels: Path) -> Path:
    """One finetune run, its predictions on the test cases and their evaluation; returns per_case.csv."""
    tag = ("pretrained" if backbone != "none" else "none") + (f"__lr{args.finetune_lr:g}" if args.finetune_lr else "")
    out = run.work / "evaluations" / f"{tag}__seed{seed}"
    if (out / "per_case.csv").is_file():
        return out / "per_case.csv"
    lr = ("--lr", f"{args.finetune_lr:g}", "--run", f"finetune__adapter__{tag}__pct{args.pct:g}__seed{seed}") \
        if args.finetune_lr else ()
    run("finetune", "-d", str(dataset_id), "--pct", str(args.pct), "--head", "adapter", "--backbone", backbone,
        "--iters", str(args.finetune_iters), "--val-every", str(args.val_every), "--seed", str(seed), "--precision",
        "fp32", "--num-workers", "1", *lr)
    if args.finetune_lr:
        folder = run.work / "results" / dataset_name / lr[-1]
    else:
        pattern = f"finetune__adapter__*__pct{args.pct:g}__fold0__seed{seed}"
        folder = next(f for f in (run.work / "results" / dataset_name).glob(pattern)
                      if (f.name.split("__")[2] == "none") == (backbone == "none"))
    predictions = run.work / "predictions" / f"{tag}__seed{seed}"
    run("predict", "-i", str(test_images), "-o", str(predictions), "-m", str(folder), "--precision", "fp32")
    run("evaluate", "-r", str(test_labels), "-p", str(predictions), "-d", str(dataset_id), "-o", str(out))
    return out / "per_case.csv"


def mean_dice(per_case: Path) -> dict[str, float]:
    """Per test case, the mean Dice over its foreground labels."""
    by_case: dict[str, list[float]] = {}
    for row in csv.DictReader(per_case.open()):
        if row["dice"] not in ("", "nan"):
            by_case.setdefault(row["case_id"], []).append(float(row["dice"]))
    return {case: float(np.mean(values)) for case, values in by_case.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = (args.work_dir or REPO / "benchmarks" / "out" / f"pretrain_value_{args.dataset}").resolve()
    run = Runner(work, args.threads, args.max_minutes)
    dataset_id, name = DATASETS[args.dataset]
    result: dict = {"command": invocation(sys.argv if argv is None else ["pretrain_value.py", *argv]),
                    "machine": machine_info(), "dataset": args.dataset, "pretrain_iters": args.pretrain_iters,
                    "finetune_iters": args.finetune_iters, "finetune_lr": args.finetune_lr, "pct": args.pct,
                    "seeds": args.seeds}
    out = args.out or work / "pretrain_value.json"
    try:
        raw = build_raw(args.dataset, work / "raw")
        preprocessed = work / "preprocessed" / raw.name
        if not (preprocessed / "splits.json").is_file():
            run("plan", "-d", str(dataset_id), "--preset", "tiny", "--patch-size", "64,64,64")
            run("preprocess", "-d", str(dataset_id))
        run_dir = pretrain(run, dataset_id, args.pretrain_iters, args.chunk)
        result["pretrain_run"] = json.loads((run_dir / "run.json").read_text())["decisions"]
        result.update(probes(run_dir, preprocessed, args.bootstrap))
        test_images, test_labels = work / "test" / "images", work / "test" / "labels"
        for case in test_ids(preprocessed):
            for path in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
                test_images.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, test_images / path.name)
            test_labels.mkdir(parents=True, exist_ok=True)
            shutil.copy2(raw / "labelsTr" / f"{case}.nii.gz", test_labels / f"{case}.nii.gz")
        dice: dict[str, dict[int, dict[str, float]]] = {"pretrained": {}, "none": {}}
        for seed in args.seeds:
            for tag, backbone in (("pretrained", str(run_dir)), ("none", "none")):
                per_case = finetune_and_evaluate(run, dataset_id, raw.name, backbone, seed, args, test_images,
                                                 test_labels)
                dice[tag][seed] = mean_dice(per_case)
        pairs = [(dice["pretrained"][s][c], dice["none"][s][c]) for s in args.seeds for c in dice["none"][s]]
        rng = np.random.default_rng(0)
        diffs = [float(np.mean([pairs[i][0] - pairs[i][1] for i in rng.integers(0, len(pairs), len(pairs))]))
                 for _ in range(args.bootstrap)]
        result.update({"dice": dice, "dice_pretrained": float(np.mean([p for p, _ in pairs])),
                       "dice_none": float(np.mean([n for _, n in pairs])),
                       "dice_difference_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
                       "complete": True})
    except OutOfTime:
        result["complete"] = False
        print(f"--max-minutes {args.max_minutes:g} spent; rerun the same command to continue", flush=True)
    write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "dice", "probe_curve")}, indent=1))
    if "probe_curve" in result:
        print("probe vs iterations:", {k: round(v, 3) if not math.isnan(v) else v
                                        for k, v in result["probe_curve"].items()})


if __name__ == "__main__":
    openmp_like_3dino()
    main()
