"""Benchmark: finetuning throughput (patches/s, FLOPs, MFU) per segmentation head, and the probe grid's feature cache.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/finetune_throughput.py [--presets tiny small] [--heads adapter unetr linear]
        [--patch 64 64 64] [--iters 3] [--probe-preset small] [--recompute-points 3]

What it measures, all in one process:

1. **Segmentation training step** (:func:`train_step`): one iteration of
   ``threedino_pipe.training.segmentation_trainer.train_segmentation`` reproduced call for call
   with the trainer's own pieces (``build_network`` from a ``SegRunConfig``, ``TargetMaker``,
   ``make_loss``: DiceCE with softmax; AdamW on ``trainable_parameters()``, MONAI's
   ``WarmupCosineSchedule``, ``autocast``/``make_scaler`` of the resolved precision): forward,
   loss in float32, ``zero_grad``, backward, AdamW step, scheduler step. The patches are synthetic
   and already in memory (the loader costs nothing here): ``[B, 1, *patch]`` float32 and labels
   0..K-1. Heads ``adapter``, ``unetr``, ``linear`` on a frozen backbone (a pretrained backbone's
   default), and ``unetr-unfrozen`` (``--backbone none``, the paper's Random baseline, trained end
   to end). Steps of all variants of a preset alternate round by round, so they share the
   machine's load; ``--warmup`` rounds are dropped, the median of ``--iters`` rounds is reported
   as patches/s = B / median step seconds.
2. **FLOPs per step** with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of
   the same step, the CPU flash-attention kernels registered; ``grid_sample`` of the adapter's
   deformable attention, norms and element-wise work are not counted), and **MFU** = median over
   rounds of (FLOPs / step seconds) / the best matrix-multiply peak of that dtype measured in the
   same run (:func:`common.matmul_peak`, before and after each preset's steps).
3. **Probe grid search** (``finetune --head probe``, 13 learning rates x layers {1, 4} x avgpool =
   52 points): *cached* = the frozen features of every (case, view) computed once
   (``inference.features.extract_cases``) and the whole grid trained at once on them
   (``training.probe_grid.ProbeGrid`` + ``training.probe._train``, the probe's own loop with its
   validation and checkpoints); *recompute* = what a grid search without the cache costs: for each
   grid point, the same features computed again into a fresh cache and that one point trained
   alone by the same loop. ``--recompute-points N`` of the 52 are run for real (spread over the
   grid); the recompute total is 52 x their median (every point does the same work: the same
   feature extraction, the same matrix shapes). The cached search runs before and after them
   (median of the two). Ratio = cached / recompute (target <= 0.05).
   Synthetic volumes (``--probe-cases`` training cases with 1 + 8 views each, as the probe draws
   them, and ``--probe-val-cases`` validation cases), 2 classes.

CPU defaults keep the whole run to a few minutes on 2 cores (patch 64^3, batch 2 = the trainer's
CPU batch cap); ``--patch 112 112 112`` is the paper's and the planner's default patch. On CUDA
the defaults are the paper's (patch 112^3, batch 8, 16 for the linear head) and the presets
include ``large``. ``torch.set_num_threads`` = the usable cores; ``OMP_WAIT_POLICY=PASSIVE`` as
``3dino finetune`` runs (the script re-executes itself with it unless the variable is set).
Prints tables and writes everything, with machine information and the exact command, to
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    add_torch_options,
    counted_flops,
    format_table,
    gflop,
    invocation,
    machine_info,
    matmul_peak,
    median,
    openmp_like_3dino,
    sync,
    torch_device,
    write_json,
)
from monai.optimizers import WarmupCosineSchedule
from rich.console import Console

from threedino_pipe.inference.features import FeatureCache, extract_cases
from threedino_pipe.models.classification import MAX_LAYERS, FrozenFeatures
from threedino_pipe.models.presets import build_backbone, param_count
from threedino_pipe.models.segmentation import HEAD_TRAINING_DEFAULTS
from threedino_pipe.runtime.precision import autocast, make_scaler, resolve_precision
from threedino_pipe.stages.finetune import CPU_BATCH_CAP
from threedino_pipe.training import probe
from threedino_pipe.training.probe_grid import ProbeGrid, grid_points
from threedino_pipe.training.segmentation_trainer import SegRunConfig, TargetMaker, build_network, make_loss

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("adapter", "unetr", "linear", "unetr-unfrozen")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_RATIO_TARGET = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None,
                   help="backbone presets (default: tiny small, plus large when CUDA is available)")
    p.add_argument("--heads", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="head variants; '-unfrozen' trains the backbone too (--backbone none)")
    p.add_argument("--patch", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                   help="patch size in voxels (default: 64^3 on the CPU, 112^3 on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"patches per step (default: the head's batch, capped at {CPU_BATCH_CAP} on the CPU as "
                        "the trainer does)")
    p.add_argument("--classes", type=int, default=3, help="output channels (background included)")
    p.add_argument("--precision", default="auto", help="auto (as the trainer resolves it), fp32, bf16 or fp16")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (each round = one step per variant)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds")
    add_torch_options(p)
    p.add_argument("--skip-steps", action="store_true", help="only the probe grid part")
    p.add_argument("--skip-probe", action="store_true", help="only the segmentation steps")
    p.add_argument("--probe-preset", default="small")
    p.add_argument("--probe-patch", nargs=3, type=int, default=[64, 64, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--probe-volume", nargs=3, type=int, default=[96, 96, 72], metavar=("X", "Y", "Z"),
                   help="size of each synthetic preprocessed case")
    p.add_argument("--probe-cases", type=int, default=20, help="training cases (1 + 8 views each)")
    p.add_argument("--probe-val-cases", type=int, default=6, help="validation cases (centre view)")
    p.add_argument("--probe-augmentations", type=int, default=probe.DEFAULT_AUGMENTATIONS)
    p.add_argument("--probe-iters", type=int, default=12_500, help="probe iterations (the probe's default)")
    p.add_argument("--probe-batch", type=int, default=probe.DEFAULT_BATCH)
    p.add_argument("--recompute-points", type=int, default=3,
                   help="grid points run for real in the recompute arm (0: all of them)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "finetune_throughput.json")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the segmentation step


@dataclass
class StepState:
    """Network, targets, loss, optimiser, scheduler and scaler of one head variant, as the trainer builds them."""

    variant: str
    config: SegRunConfig
    net: torch.nn.Module
    targets: TargetMaker
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device


def make_state(variant: str, preset: str, patch: list[int], batch: int, classes: int, precision: str,
               device: torch.device, seed: int = 0, total_iters: int = 1000) -> StepState:
    """Build a variant's state through the trainer's own functions (``build_network`` etc.)."""
    head, _, frozen_flag = variant.partition("-")
    frozen = frozen_flag != "unfrozen"
    values = list(range(classes))
    config = SegRunConfig(
        dataset="Dataset000_Synthetic", head=head, backbone_tag="synthetic" if frozen else "none",
        backbone_source="synthetic" if frozen else "none", backbone_sha256=None, backbone_dims=preset,
        frozen=frozen, preset=preset, pct=100.0, fold=0, seed=seed, train_ids=[], val_ids=[], iters=total_iters,
        batch_size=batch, lr=float(HEAD_TRAINING_DEFAULTS[head]["lr"]), weight_decay=1e-5,
        warmup_iters=total_iters // 10, patch_size=list(patch), in_channels=1, output="softmax", targets=values,
        target_names=[f"class_{v}" for v in values[1:]], val_every=total_iters, overlap=0.5, precision=precision,
        plans_checksum="")
    net = build_network(config, None).to(device)  # a frozen backbone gets random weights: same cost as pretrained
    net.train()
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=config.warmup_iters, t_total=config.iters)
    return StepState(variant, config, net, TargetMaker("softmax", values), make_loss("softmax"), optimizer,
                     scheduler, make_scaler(precision, device), device)


def synthetic_patches(batch: int, patch: list[int], classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-like batch: ``data [B, 1, *patch]`` float32 (normalised range) and ``seg [B, 1, *patch]`` labels."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, 1, *patch, generator=g).clamp_(-3, 3)
    seg = torch.randint(0, classes, (batch, 1, *patch), generator=g).to(torch.int16)
    return {"data": data, "seg": seg}


def train_step(state: StepState, batch: dict[str, torch.Tensor], *, optimizer_step: bool = True,
               phases: dict[str, float] | None = None) -> float:
    """One iteration exactly as ``train_segmentation`` runs it (single process); returns the loss.

    ``optimizer_step=False`` stops after the backward pass (for FLOP counting; weights unchanged).
    ``phases`` receives the seconds of ``forward``, ``loss``, ``backward``, ``optimizer`` (device-synchronised).
    """
    config, device = state.config, state.device
    clock = [time.perf_counter()]

    def mark(name: str) -> None:
        if phases is not None:
            sync(device)
            clock.append(time.perf_counter())
            phases[name] = phases.get(name, 0.0) + clock[-1] - clock[-2]

    image = batch["data"].to(device, non_blocking=True)
    target = state.targets(batch["seg"]).to(device, non_blocking=True)
    with autocast(config.precision, device):
        logits = state.net(image)
    mark("forward")
    loss = state.loss_fn(logits.float(), target)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss in {state.variant}")
    mark("loss")
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
    else:
        loss.backward()
    mark("backward")
    if not optimizer_step:
        return float(loss.detach())
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    mark("optimizer")
    return float(loss.detach())


def step_flops(state: StepState, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one step (forward + backward; the AdamW step adds no counted FLOPs), weights unchanged."""
    flops, _ = counted_flops(lambda: train_step(state, batch, optimizer_step=False))
    state.optimizer.zero_grad(set_to_none=True)
    return flops


def measure_preset(preset: str, args: argparse.Namespace, device: torch.device, precision: str,
                   patch: list[int], peaks: list[dict]) -> list[dict[str, Any]]:
    """Steps of every head variant of one preset, alternating round by round; FLOPs and phase times."""
    peaks.append(matmul_peak(DTYPES[precision], device, args.matmul_size, args.matmul_loops, args.matmul_repeats,
                             args.matmul_budget))
    states, data = [], {}
    for variant in args.heads:
        head = variant.partition("-")[0]
        batch = args.batch or HEAD_TRAINING_DEFAULTS[head]["batch_size"]
        if device.type == "cpu" and args.batch is None:
            batch = min(batch, CPU_BATCH_CAP)
        states.append(make_state(variant, preset, patch, batch, args.classes, precision, device, args.seed))
        data[variant] = synthetic_patches(batch, patch, args.classes, args.seed)
    times: dict[str, list[float]] = {s.variant: [] for s in states}
    phases: dict[str, list[dict[str, float]]] = {s.variant: [] for s in states}
    rounds = args.warmup + args.iters
    for it in range(rounds):
        for state in states:
            split: dict[str, float] = {}
            sync(device)
            start = time.perf_counter()
            train_step(state, data[state.variant], phases=split)
            sync(device)
            if it >= args.warmup:
                times[state.variant].append(time.perf_counter() - start)
                phases[state.variant].append(split)
        print(f"  {preset} round {it + 1}/{rounds}: " + (", ".join(f"{v} {t[-1]:.2f} s" for v, t in times.items())
                                                        if it >= args.warmup else "warm-up"), flush=True)
    results = []
    for state in states:
        flops = step_flops(state, data[state.variant])
        secs = times[state.variant]
        batch = state.config.batch_size
        results.append({
            "preset": preset, "variant": state.variant, "head": state.config.head, "frozen": state.config.frozen,
            "batch": batch, "patch": patch, "precision": precision, "step_seconds": secs,
            "median_step_s": median(secs), "patches_per_s": batch / median(secs), "flops_per_step": flops,
            "achieved_flops_per_s": median([flops / s for s in secs]),
            "phases_median_s": {k: median([ph[k] for ph in phases[state.variant]]) for k in phases[state.variant][0]},
            "params_total": param_count(state.net), "params_trainable": param_count(state.net, trainable_only=True)})
    del states, data
    peaks.append(matmul_peak(DTYPES[precision], device, args.matmul_size, args.matmul_loops, args.matmul_repeats,
                             args.matmul_budget))
    return results


# --------------------------------------------------------------------------- probe grid: cached vs recompute


def synthetic_cases(n: int, size: list[int], seed: int, prefix: str) -> dict[str, np.ndarray]:
    """``n`` preprocessed-like cases ``1 x size`` (float32, smooth random content in about [-1, 1])."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        coarse = torch.from_numpy(rng.standard_normal((1, 1, *(max(2, s // 8) for s in size))).astype(np.float32))
        volume = torch.nn.functional.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=False)
        cases[f"{prefix}_{i:03d}"] = volume[0].clamp_(-1, 1).numpy()
    return cases


def _features(extractor: FrozenFeatures, wanted: list[tuple[str, int]], cases: dict[str, np.ndarray],
              patch: list[int], cache_path: Path, seed: int, device: torch.device) -> tuple[dict, float]:
    """Features of ``wanted`` computed into a fresh cache file, as ``probe.run`` computes them; and the seconds."""
    cache_path.unlink(missing_ok=True)
    cache = FeatureCache(cache_path, {"benchmark": str(cache_path)})
    start = time.perf_counter()
    features = extract_cases(extractor, wanted, cases.__getitem__, patch, cache, seed=seed, device=device,
                             batch_size=probe.EXTRACT_BATCH, description="frozen features")
    return features, time.perf_counter() - start


def _train_grid(points: list, extractor: FrozenFeatures, features: dict, train_ids: list[str], val_ids: list[str],
                labels: dict[str, int], folder: Path, args: argparse.Namespace, dim: int,
                device: torch.device) -> float:
    """Stack the features and train ``points`` with the probe's own loop (``probe._train``); seconds."""
    start = time.perf_counter()
    x, y = probe._stack(features, train_ids, labels)
    x_val, y_val = probe._stack({c: {k: v[:1] for k, v in features[c].items()} for c in val_ids}, val_ids, labels)
    grid = ProbeGrid(points, extractor.num_layers, dim, 2, seed=args.seed, device=device)
    folder.mkdir(parents=True, exist_ok=True)
    done = probe._train(grid, x.to(device), y.to(device), x_val.to(device), y_val.to(device), ["a", "b"], folder,
                        iters=args.probe_iters, batch=args.probe_batch, seed=args.seed, resume=False, stop_after=None,
                        console=Console(stderr=True, quiet=True))
    assert done
    return time.perf_counter() - start


def probe_grid_ratio(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Wall time of the cached grid search against recomputing the features for every grid point."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.probe_preset)
    extractor = FrozenFeatures(backbone, MAX_LAYERS).to(device)
    points = grid_points(extractor.num_layers)
    train = synthetic_cases(args.probe_cases, args.probe_volume, args.seed, "train")
    val = synthetic_cases(args.probe_val_cases, args.probe_volume, args.seed + 1, "val")
    cases = {**train, **val}
    labels = {c: i % 2 for i, c in enumerate(cases)}
    wanted = [(c, 1 + args.probe_augmentations) for c in train] + [(c, 1) for c in val]
    views = sum(n for _, n in wanted)
    patch = list(args.probe_patch)
    n_recompute = len(points) if args.recompute_points <= 0 else min(args.recompute_points, len(points))
    chosen = sorted({round(i * (len(points) - 1) / max(1, n_recompute - 1)) for i in range(n_recompute)})
    work = Path(tempfile.mkdtemp(prefix="probe_bench_"))
    try:
        # warm-up (untimed): first calls allocate and pick kernels
        _features(extractor, wanted[:1], cases, patch, work / "warmup.pt", args.seed, device)
        cached_runs = []

        def run_cached() -> dict:
            found, extract_s = _features(extractor, wanted, cases, patch, work / "cached.pt", args.seed, device)
            train_s = _train_grid(points, extractor, found, list(train), list(val), labels, work / "cached", args,
                                  backbone.embed_dim, device)
            cached_runs.append({"extract_s": extract_s, "train_s": train_s, "total_s": extract_s + train_s})
            print(f"  probe cached: features {extract_s:.1f} s ({views} views), grid of {len(points)} "
                  f"{train_s:.1f} s", flush=True)
            return found

        features = run_cached()  # once before and once after the recompute points (shared load)
        per_point = []
        for g in chosen:
            fresh, extract_s = _features(extractor, wanted, cases, patch, work / f"point{g}.pt", args.seed, device)
            train_s = _train_grid([points[g]], extractor, fresh, list(train), list(val), labels, work / f"point{g}",
                                  args, backbone.embed_dim, device)
            same = all(torch.equal(fresh[c]["cls"], features[c]["cls"]) for c in cases)
            per_point.append({"point": points[g].to_dict(), "index": g, "extract_s": extract_s, "train_s": train_s,
                              "total_s": extract_s + train_s, "features_identical_to_cached": same})
            print(f"  probe recompute point {g} ({points[g].lr:g}, {points[g].layers}, {points[g].avgpool}): "
                  f"features {extract_s:.1f} s, training {train_s:.1f} s", flush=True)
        run_cached()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cached = median([r["total_s"] for r in cached_runs])
    point_median = median([p["total_s"] for p in per_point])
    recompute = len(points) * point_median
    return {"preset": args.probe_preset, "patch": patch, "volume": args.probe_volume, "train_cases": len(train),
            "val_cases": len(val), "views": views, "augmentations": args.probe_augmentations,
            "iters": args.probe_iters, "batch": args.probe_batch, "grid_points": len(points),
            "cached_runs": cached_runs, "cached": {k: median([r[k] for r in cached_runs]) for k in cached_runs[0]},
            "recompute_points_run": per_point, "recompute_point_median_s": point_median,
            "recompute_total_s": recompute, "recompute_extrapolated": len(per_point) < len(points),
            "ratio": cached / recompute, "target": PROBE_RATIO_TARGET}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation(argv)
    device = torch_device(args.device, args.threads)
    precision = resolve_precision(args.precision, device)
    presets = args.presets or (["tiny", "small"] + (["large"] if device.type == "cuda" else []))
    patch = list(args.patch or ([112] * 3 if device.type == "cuda" else [64] * 3))
    info = {**machine_info(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "precision": precision,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"{info['cpu_model']}, {info['nproc']} cores, torch {info['torch']}, {info['torch_threads']} threads, "
          f"{precision}, device {device}, load {info['load_average_at_start']}", flush=True)

    peaks: list[dict] = []
    steps: list[dict] = []
    if not args.skip_steps:
        for preset in presets:
            print(f"{preset}: patch {'x'.join(map(str, patch))}, variants {', '.join(args.heads)}", flush=True)
            steps.extend(measure_preset(preset, args, device, precision, patch, peaks))
    peak = max(m["best_flops_per_s"] for m in peaks) if peaks else None
    for step in steps:
        step["mfu"] = step["achieved_flops_per_s"] / peak
    probe_result = None if args.skip_probe else probe_grid_ratio(args, device)

    if steps:
        rows = [[s["preset"], s["variant"], s["batch"], f"{s['median_step_s']:.2f}", f"{s['patches_per_s']:.2f}",
                 gflop(s["flops_per_step"]), gflop(s["achieved_flops_per_s"]), f"{100 * s['mfu']:.1f}",
                 f"{s['params_trainable'] / 1e6:.1f}/{s['params_total'] / 1e6:.1f}"] for s in steps]
        print()
        print(format_table(["preset", "head", "B", "step s", "patches/s", "GFLOP/step", "GFLOP/s", "MFU %",
                            "trainable/all M params"], rows))
        print(f"matmul peak ({precision}, {args.matmul_size}^3, best of {len(peaks)} measurements): {gflop(peak)} "
              f"GFLOP/s (measurements {', '.join(gflop(m['best_flops_per_s']) for m in peaks)})")
        for s in steps:
            split = ", ".join(f"{k} {v:.2f}" for k, v in s["phases_median_s"].items())
            print(f"phases {s['preset']} {s['variant']} (s): {split}")
    if probe_result:
        r = probe_result
        c = r["cached"]
        how = f"{len(r['recompute_points_run'])} of {r['grid_points']} points run, x{r['grid_points']} their median" \
            if r["recompute_extrapolated"] else "all points run"
        print(f"probe grid ({r['preset']}, {r['views']} views of {'x'.join(map(str, r['patch']))}, {r['iters']} "
              f"iterations): cached {c['total_s']:.1f} s (features {c['extract_s']:.1f} s + grid "
              f"{c['train_s']:.1f} s); "
              f"recompute {r['recompute_total_s']:.1f} s ({how}; per point {r['recompute_point_median_s']:.1f} s)")
        print(f"target probe cached / recompute <= {PROBE_RATIO_TARGET:g}: {r['ratio']:.4f} -> "
              f"{'met' if r['ratio'] <= PROBE_RATIO_TARGET else 'missed'}")
    try:
        info["load_average_at_end"] = os.getloadavg()
    except OSError:
        info["load_average_at_end"] = None
    write_json(args.out, {"command": command, "machine": info,
                          "settings": vars(args) | {"out": str(args.out), "patch": patch, "presets": presets},
                          "matmul_peak": {"best_flops_per_s": peak, "runs": peaks}, "steps": steps,
                          "probe_grid": probe_result})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    openmp_like_3dino()
    sys.exit(main())
