"""Benchmark: crops/s of the pretraining augmentations, batched torch against MONAI (issue 15, item 3).

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/augment_throughput.py [--volumes 4] [--global-size 96] [--local-size 48]
        [--n-local 8] [--repeats 3] [--gpu-volumes 32] [--demand 2750] [--out FILE] [--quick]

What it measures, in one process, on the same crops:

1. **CPU, per core** (``torch.set_num_threads(--threads)``, default 1): a multi-crop batch of
   ``--volumes`` volumes (2 global ``--global-size``^3 crops and ``--n-local`` local
   ``--local-size``^3 crops each, crop-major as the loader makes them) augmented
   - by the MONAI pipelines (``augmentations.global_transform_1/2``, ``local_transform``), crop
     by crop, as the loader's workers do (one shared seeded random state, no reseeding cost);
   - by ``torch_augmentations.BatchAugmenter`` on the whole batch at once.
   crops/s = crops / median seconds over ``--repeats`` rounds (rounds alternate between the two),
   and the ratio torch / MONAI (target >= 3). Without MONAI (the GPU machines) the MONAI rows are
   skipped and said so.
2. **CUDA, when available**: ``BatchAugmenter`` on a batch of ``--gpu-volumes`` volumes already on
   the GPU (the crops arrive unaugmented from the loader and are augmented there), after a
   warm-up, synchronised; crops/s against ``--demand``, the crops/s a ViT-L pretraining step
   consumes on that GPU (default 2,750: the middle of issue 15's estimate of 2,500-3,000 for an
   H100 at 40 % MFU; pass the measured figure when there is one). Target: >= 1.5x the demand.

The crops are synthetic and CT-like (air at -1 around smooth tissue on [-1, 1], some crops all
air), made with torch only. Writes everything, with machine information and the exact command,
to ``--out`` (default ``benchmarks/results/<UTC date>/augment_throughput.json``). ``--quick``: a
tiny run (1 volume, 24^3 and 16^3 crops, 1 round) that only checks the script works.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from common import dated_result_path, invocation, machine_info, openmp_like_3dino, sync, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from threedino_pipe.training_data.torch_augmentations import BatchAugmenter  # noqa: E402


def ct_like_crops(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 1, size, size, size]`` on [-1, 1]: smooth tissue (upsampled noise) with air (-1) where it is low."""
    coarse = torch.randn(n, 1, 6, 6, 6, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
    tissue = torch.tanh(smooth) * 0.6 + 0.05 * torch.randn(smooth.shape, generator=generator)
    return torch.where(smooth < -0.5, torch.full_like(tissue, -1.0), tissue).clamp(-1, 1)


def make_batch(volumes: int, global_size: int, local_size: int, n_local: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Crop-major global ``[2V, 1, g, g, g]`` and local ``[n_local*V, 1, l, l, l]`` crops."""
    generator = torch.Generator().manual_seed(seed)
    return ct_like_crops(2 * volumes, global_size, generator), ct_like_crops(n_local * volumes, local_size, generator)


def monai_pipelines():
    """The three MONAI pipelines seeded once, or None when MONAI is not installed."""
    try:
        from threedino_pipe.training_data.augmentations import global_transform_1, global_transform_2, local_transform
    except ImportError:
        return None
    pipelines = (global_transform_1(), global_transform_2(), local_transform())
    for i, pipeline in enumerate(pipelines):
        pipeline.set_random_state(seed=i)
    return pipelines


def monai_round(pipelines, global_crops: torch.Tensor, local_crops: torch.Tensor) -> float:
    """Seconds to augment the batch crop by crop with MONAI (as the loader's workers do)."""
    half = global_crops.shape[0] // 2
    first, second, local = pipelines
    tick = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image's intensity is a single value")
        for i, crop in enumerate(global_crops):
            torch.as_tensor((first if i < half else second)(crop))
        for crop in local_crops:
            torch.as_tensor(local(crop))
    return time.perf_counter() - tick


def torch_round(augmenter: BatchAugmenter, global_crops: torch.Tensor, local_crops: torch.Tensor,
                seed: int) -> float:
    """Seconds to augment the batch with the batched torch implementation on the crops' device."""
    sync(global_crops.device)
    tick = time.perf_counter()
    augmenter(global_crops, local_crops, seed)
    sync(global_crops.device)
    return time.perf_counter() - tick


def measure_cpu(args: argparse.Namespace) -> dict:
    """Per-core crops/s of both implementations on the same CPU batch (rounds alternate)."""
    torch.set_num_threads(args.threads)
    global_crops, local_crops = make_batch(args.volumes, args.global_size, args.local_size, args.n_local, args.seed)
    crops = global_crops.shape[0] + local_crops.shape[0]
    pipelines, augmenter = monai_pipelines(), BatchAugmenter()
    torch_round(augmenter, global_crops, local_crops, seed=-1)  # warm-up
    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(torch_round(augmenter, global_crops, local_crops, seed=r))
        if pipelines is not None:
            theirs.append(monai_round(pipelines, global_crops, local_crops))
    result = {"threads": args.threads, "crops_per_round": crops, "torch_seconds": ours,
              "torch_crops_per_s": crops / statistics.median(ours)}
    if pipelines is None:
        result["monai"] = "skipped: MONAI is not installed here"
    else:
        result.update(monai_seconds=theirs, monai_crops_per_s=crops / statistics.median(theirs))
        result["ratio_torch_over_monai"] = result["torch_crops_per_s"] / result["monai_crops_per_s"]
    return result


def measure_cuda(args: argparse.Namespace) -> dict:
    """crops/s of the batched torch augmentations on the GPU against the pretraining step's demand."""
    device = torch.device("cuda")
    global_crops, local_crops = (x.to(device) for x in make_batch(args.gpu_volumes, args.global_size,
                                                                  args.local_size, args.n_local, args.seed))
    crops = global_crops.shape[0] + local_crops.shape[0]
    augmenter = BatchAugmenter()
    for w in range(2):
        torch_round(augmenter, global_crops, local_crops, seed=-1 - w)
    seconds = [torch_round(augmenter, global_crops, local_crops, seed=r) for r in range(args.gpu_repeats)]
    rate = crops / statistics.median(seconds)
    return {"device_name": torch.cuda.get_device_name(device), "volumes": args.gpu_volumes, "crops_per_round": crops,
            "seconds": seconds, "crops_per_s": rate, "demand_crops_per_s": args.demand,
            "ratio_over_demand": rate / args.demand, "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--volumes", type=int, default=4, help="volumes per CPU batch (2 global + n_local crops each)")
    p.add_argument("--global-size", type=int, default=96)
    p.add_argument("--local-size", type=int, default=48)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed CPU rounds per implementation")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: the per-core figure)")
    p.add_argument("--gpu-volumes", type=int, default=32, help="volumes per GPU batch")
    p.add_argument("--gpu-repeats", type=int, default=10)
    p.add_argument("--demand", type=float, default=2750.0, help="crops/s the pretraining step consumes on the GPU")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that the script runs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.volumes, args.gpu_volumes, args.global_size, args.local_size = 1, 2, 24, 16
        args.repeats, args.gpu_repeats = 1, 2
    if args.out is None:
        args.out = dated_result_path("augment_throughput", args.quick)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = {"command": invocation(argv), "machine": machine_info(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.no_cpu:
        result["cpu"] = cpu = measure_cpu(args)
        monai = f"{cpu['monai_crops_per_s']:.1f}" if "monai_crops_per_s" in cpu else cpu["monai"]
        print(f"CPU, {args.threads} thread(s): torch {cpu['torch_crops_per_s']:.1f} crops/s, MONAI {monai}"
              + (f", ratio {cpu['ratio_torch_over_monai']:.2f}" if "ratio_torch_over_monai" in cpu else ""))
    if torch.cuda.is_available():
        result["cuda"] = gpu = measure_cuda(args)
        print(f"{gpu['device_name']}: {gpu['crops_per_s']:.0f} crops/s, {gpu['ratio_over_demand']:.2f}x the "
              f"demand of {args.demand:.0f} crops/s")
    else:
        result["cuda"] = "skipped: no CUDA GPU"
    write_json(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    openmp_like_3dino()
    sys.exit(main())
