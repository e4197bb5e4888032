"""Benchmark: one pretraining step per method (3DINO, SimMIM, Tang et al.'s) side by side: crops/s, FLOPs and MFU.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/pretrain_methods.py [--preset small] [--batch 2] [--iters 5] [--dtype fp32]
    .venv/bin/python benchmarks/pretrain_methods.py --quick   # tiny, batch 1, one timed step: a check, not a figure

What it measures, in one process, on synthetic crops already in memory (the loader costs nothing):

- **3DINO**: the step of ``benchmarks/pretrain_throughput.py`` (``ssl_step``: teacher targets, student
  pass on 2 global ``96^3`` + 8 local ``48^3`` crops per volume, DINO + iBOT + KoLeo, backward, clipping,
  AdamW, EMA), the trainer's own networks and optimiser.
- **SimMIM**: the step of ``threedino_pipe.training.simmim_trainer`` (one ``96^3`` crop per volume, the
  iteration's token masks at the default ratio, masked L1 of the linear head's reconstruction,
  backward, clipping, AdamW), the trainer's own network (``build_simmim_network``) and optimiser.
- **Tang et al.** (``tang-vit``, ``tang-swin``): the step of ``threedino_pipe.training.tang_trainer`` (two
  ``96^3`` crops per volume, rotated and cut out, inpainting L1 + rotation cross-entropy + contrastive,
  backward, clipping, AdamW) with the 3D ViT or MONAI's Swin encoder of the preset (``build_tang_network``).

Per method: ``--warmup`` untimed and ``--iters`` timed steps (the methods alternate step by step, so
both see the same load), the median step time; crops/s and volumes/s (3DINO makes 10 crops per
volume, SimMIM 1, Tang et al. 2); FLOPs of one step (forward + backward, the teacher's forward for 3DINO) counted
with ``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs / median step time / the machine's
matrix-multiply peak of the dtype (``common.matmul_peak``, measured before and after, best). Writes
everything with machine information and the exact command to ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

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
    sync,
    torch_device,
    write_json,
)
from pretrain_throughput import GLOBAL_CROP, N_LOCAL, StepState, ssl_step, synthetic_batch

from threedino_pipe.models.presets import param_count
from threedino_pipe.runtime.precision import autocast
from threedino_pipe.ssl import clip_gradients, make_schedules, step_schedules
from threedino_pipe.ssl.simmim import random_token_masks
from threedino_pipe.training.loop import optimizer_step
from threedino_pipe.training.simmim_trainer import (
    CLIP_NORM,
    SimMIMRunConfig,
    build_simmim_network,
    simmim_loss,
    simmim_optimizer,
    simmim_peak_lr,
)
from threedino_pipe.training.tang_network import build_tang_network
from threedino_pipe.training.tang_trainer import CLIP_NORM as TANG_CLIP
from threedino_pipe.training.tang_trainer import (
    DROP_PATH,
    PEAK_LR,
    WEIGHT_DECAY,
    tang_optimizer,
    tang_terms,
    tang_views,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("dino", "simmim", "tang-vit", "tang-swin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", help="backbone preset (the issue's figure: small)")
    p.add_argument("--batch", type=int, default=2, help="volumes per step, the same for both methods")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    p.add_argument("--iters", type=int, default=5, help="timed steps per method")
    p.add_argument("--quick", action="store_true",
                   help="a check of the script, not a figure: tiny preset, batch 1, no warm-up, one timed step, "
                        "a 256^3 matmul peak")
    add_torch_options(p)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "pretrain_methods.json")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.warmup, args.iters = "tiny", 1, 0, 1
        args.matmul_size, args.matmul_loops, args.matmul_repeats, args.matmul_budget = 256, 1, 2, 2.0
    return args


class SimMIMStep:
    """SimMIM's network, optimiser and schedules for one preset, as ``SimMIMTask`` builds them (no loader)."""

    def __init__(self, preset: str, batch: int, total_iters: int, device: torch.device, seed: int = 0) -> None:
        self.config = SimMIMRunConfig(datasets=["synthetic"], configuration="pretrain", preset=preset,
                                      iters=total_iters, batch_size=batch, global_crop=GLOBAL_CROP, min_axis=24,
                                      peak_lr=simmim_peak_lr(batch), warmup_iters=total_iters // 10, seed=seed,
                                      pos_grid=GLOBAL_CROP // 16)
        torch.manual_seed(seed)
        self.network = build_simmim_network(self.config).to(device)
        self.optimizer = simmim_optimizer(self.network)
        self.schedules = make_schedules(total_iters, batch, peak_lr=self.config.peak_lr,
                                        warmup_iters=self.config.warmup_iters, weight_decay=self.config.weight_decay,
                                        weight_decay_end=self.config.weight_decay)
        self.device = device
        self.n_patches = (GLOBAL_CROP // self.network.backbone.patch_size) ** 3

    def step(self, crops: torch.Tensor, it: int, precision: str, *, update: bool = True) -> float:
        """One iteration as ``SimMIMTask.step`` runs it on ``crops`` ``[B, 1, 96^3]``; returns the loss.

        ``update=False`` stops after the backward pass (FLOP counting: clipping and AdamW add none).
        """
        step_schedules(self.optimizer, self.schedules, it)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + it)
        masks = random_token_masks(crops.shape[0], self.n_patches, self.config.mask_ratio, generator=generator)
        with autocast(precision, self.device):
            loss = simmim_loss(self.network, crops, masks.to(self.device), self.network.backbone.patch_size)
        if update:
            optimizer_step(loss, self.optimizer, None, clip=lambda: clip_gradients(self.network, CLIP_NORM))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        return float(loss.item())


class TangStep:
    """Tang et al.'s network (``arch`` vit or swin), optimiser and schedules, as ``TangTask`` builds them."""

    def __init__(self, arch: str, preset: str, batch: int, total_iters: int, device: torch.device,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.network = build_tang_network(arch, preset, GLOBAL_CROP, 1, DROP_PATH).to(device)
        self.optimizer = tang_optimizer(self.network)
        self.schedules = make_schedules(total_iters, batch, peak_lr=PEAK_LR, warmup_iters=total_iters // 10,
                                        weight_decay=WEIGHT_DECAY, weight_decay_end=WEIGHT_DECAY)
        self.device, self.seed = device, seed

    def step(self, crops: torch.Tensor, it: int, precision: str, *, update: bool = True) -> float:
        """One iteration as ``TangTask.step`` runs it on ``crops`` ``[2B, 1, 96^3]`` (crop-major); the loss."""
        step_schedules(self.optimizer, self.schedules, it)
        inputs, targets, rotations = (t.to(self.device) for t in tang_views(crops.cpu(), self.seed, it, 0))
        loss = tang_terms(self.network, inputs, targets, rotations, precision, self.device)[0]
        if update:
            optimizer_step(loss, self.optimizer, None, clip=lambda: clip_gradients(self.network, TANG_CLIP))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        return float(loss.item())


def timed(run: Any, device: torch.device) -> float:
    """Seconds ``run()`` takes, the device's queue included."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both methods' steps, alternating, with one FLOP count per method; the per-method results."""
    total = max(100, 2 * (args.warmup + args.iters))
    dino = StepState(args.preset, args.batch, total_iters=total, device=device, seed=args.seed)
    simmim = SimMIMStep(args.preset, args.batch, total, device, seed=args.seed)
    data = synthetic_batch(args.batch, args.seed)
    crops = data["global_crops"][:args.batch].to(device)  # one crop per volume
    pairs = data["global_crops"].to(device)  # two per volume, crop-major
    tang = {arch: TangStep(arch, args.preset, args.batch, total, device, seed=args.seed) for arch in ("vit", "swin")}
    steps = {"dino": lambda it: ssl_step(dino, data, it, args.dtype),
             "simmim": lambda it: simmim.step(crops, it, args.dtype),
             "tang-vit": lambda it: tang["vit"].step(pairs, it, args.dtype),
             "tang-swin": lambda it: tang["swin"].step(pairs, it, args.dtype)}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for it in range(args.warmup + args.iters):
        for method in METHODS:
            took = timed(lambda method=method, it=it: steps[method](it), device)
            if it >= args.warmup:
                seconds[method].append(took)
        print(f"  step {it + 1}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in METHODS if seconds[m]),
              flush=True)
    flops = {"dino": counted_flops(lambda: ssl_step(dino, data, 0, "fp32", optimizer_step=False))[0],
             "simmim": counted_flops(lambda: simmim.step(crops, 0, "fp32", update=False))[0],
             **{f"tang-{a}": counted_flops(lambda a=a: tang[a].step(pairs, 0, "fp32", update=False))[0]
                for a in tang}}
    crops_per_step = {"dino": (2 + N_LOCAL) * args.batch, "simmim": args.batch, "tang-vit": 2 * args.batch,
                      "tang-swin": 2 * args.batch}
    params = {"dino": param_count(dino.student), "simmim": param_count(simmim.network),
              **{f"tang-{a}": param_count(tang[a].network) for a in tang}}
    return {m: {"step_seconds": seconds[m], "median_step_s": median(seconds[m]), "flops_per_step": flops[m],
                "crops_per_step": crops_per_step[m], "crops_per_s": crops_per_step[m] / median(seconds[m]),
                "volumes_per_s": args.batch / median(seconds[m]), "params_trained": params[m]} for m in METHODS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch_device(args.device, args.threads)
    torch.manual_seed(args.seed)
    peak_args = (DTYPES[args.dtype], device, args.matmul_size, args.matmul_loops, args.matmul_repeats,
                 args.matmul_budget)
    peaks = [matmul_peak(*peak_args)]
    methods = measure(args, device)
    peaks.append(matmul_peak(*peak_args))
    peak = max(p["best_flops_per_s"] for p in peaks)
    for result in methods.values():
        result["achieved_flops_per_s"] = result["flops_per_step"] / result["median_step_s"]
        result["mfu"] = result["achieved_flops_per_s"] / peak
    rows = [[m, r["median_step_s"], r["crops_per_s"], r["volumes_per_s"], gflop(r["flops_per_step"]),
             r["mfu"]] for m, r in methods.items()]
    print(format_table(["method", "step s", "crops/s", "volumes/s", "GFLOP/step", "MFU"], rows))
    write_json(args.out, {"benchmark": "pretrain_methods", "command": invocation(argv), "machine": machine_info(),
                          "quick": args.quick, "preset": args.preset, "batch": args.batch, "dtype": args.dtype,
                          "device": str(device), "matmul_peaks": peaks, "peak_flops_per_s": peak,
                          "methods": methods})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
