"""Benchmark: throughput, FLOPs and MFU of one 3DINO pretraining step, and of the data pipeline feeding it.

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python benchmarks/pretrain_throughput.py [--presets tiny small] [--iters 7] [--profile]

What it measures, all in one process:

1. **Training step** (:func:`ssl_step`): one iteration of ``threedino_pipe.training.ssl_trainer.train_ssl``
   reproduced call for call (schedules, the iteration's patch masks, teacher targets, student pass,
   DINO + iBOT + KoLeo with Sinkhorn-Knopp, backward, per-part gradient clipping, AdamW step, EMA
   update), on synthetic crops already in memory (2 global ``96^3`` + 8 local ``48^3`` per volume;
   the data is "prefetched", so the loader costs nothing here). Student and teacher are the
   trainer's own (``build_ssl_pair``, ``_optimizer``), heads as ``HEAD_DIMS`` of the preset. fp32 and bf16
   (autocast) steps alternate round by round with the same iteration index (same masks), so both
   dtypes see the same load; ``--warmup`` rounds are dropped, the median of ``--iters`` rounds is
   reported as crops/s.
2. **FLOPs per step**, counted with ``torch.utils.flop_counter.FlopCounterMode`` on the same
   iterations (student forward + backward, teacher forward, heads included; the counter counts
   matrix products, convolutions and attention only: Sinkhorn, softmax, norms, AdamW and EMA add
   no counted FLOPs). They vary a little with the number of masked patches, so each round has its own
   count; achieved FLOP/s = median over rounds of (FLOPs / seconds).
3. **Matrix-multiply peak** of this machine in each dtype: a loop of ``--matmul-size`` square
   products (fp32 tensors, or bf16 tensors for bf16), best of ``--matmul-repeats``, measured before
   and after the steps of each preset; MFU = achieved FLOP/s / best peak of that dtype.
4. **Data pipeline alone**: ``make_pretrain_loader`` on real preprocessed MNI152 data (built with
   ``build_mni_dataset``, ``3dino plan``, ``3dino preprocess -c pretrain`` into a temporary folder),
   with 0 and 2 worker processes, the batch size of each preset; crops/s over ``--loader-batches``
   batches after the warm-up ones, and its ratio to the crops/s of the step it feeds.

``torch.set_num_threads`` = the cores this process may use. Prints a table and writes everything,
with machine information and the exact command, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    add_torch_options,
    format_table,
    gflop,
    invocation,
    machine_info,
    matmul_peak,
    median,
    register_cpu_attention_flops,
    sync,
    torch_device,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode

from threedino_pipe.models.presets import param_count
from threedino_pipe.runtime.precision import autocast
from threedino_pipe.ssl import (
    DINOLoss,
    apply_schedules,
    clip_gradients,
    iBOTPatchLoss,
    make_schedules,
    random_patch_masks,
    step_schedules,
    update_teacher,
)
from threedino_pipe.ssl.centering import TeacherCentring
from threedino_pipe.training.ssl_model import HEAD_DIMS, SSLLosses
from threedino_pipe.training.ssl_trainer import SSLRunConfig, _optimizer, _rank_rows, build_ssl_pair
from threedino_pipe.training_data.pretrain_loader import PretrainDataset, make_pretrain_loader

REPO = Path(__file__).resolve().parents[1]
GLOBAL_CROP, LOCAL_CROP, N_LOCAL = 96, 48, 8
# Volumes per step (x 10 crops). Memory is not the limit on a CPU (small at 4 needs about 4 GB); time is:
# small's bf16 step takes minutes on a CPU without native bf16, so it runs at 2. base/large are for a GPU.
DEFAULT_BATCH = {"tiny": 4, "small": 2, "base": 16, "large": 8}
MFU_TARGET = 0.5
LOADER_RATIO_TARGET = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None,
                   help="presets to measure (default: tiny small, plus base large when CUDA is available)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", nargs="+", default=[], metavar="PRESET=B",
                   help=f"volumes per step, overriding {DEFAULT_BATCH}")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (each round = one step per dtype)")
    p.add_argument("--iters", type=int, default=7, help="timed rounds")
    add_torch_options(p)
    p.add_argument("--loader-workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--loader-batches", type=int, default=8, help="timed batches per loader measurement")
    p.add_argument("--loader-warmup", type=int, default=2,
                   help="untimed batches per loader measurement (plus the prefetch queue for workers)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--profile", nargs="*", default=None, metavar="PRESET",
                   help="profile one step of these presets (all measured ones when empty) with torch.profiler, "
                        "and the loader with cProfile")
    p.add_argument("--compile-blocks", action="store_true",
                   help="after the eager rounds, time --iters more with every transformer block of student and "
                        "teacher under torch.compile (an experiment: the trainer runs eagerly)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "pretrain_throughput.json")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the step


class StepState:
    """Student, teacher, optimiser, losses and schedules of one preset, as ``train_ssl`` builds them."""

    def __init__(self, preset: str, batch: int, total_iters: int, device: torch.device, seed: int = 0) -> None:
        self.config = SSLRunConfig(datasets=["synthetic"], configuration="pretrain", preset=preset, iters=total_iters,
                                   batch_size=batch, global_crop=GLOBAL_CROP, local_crop=LOCAL_CROP,
                                   num_local_crops=N_LOCAL, min_axis=24, base_lr=0.002, seed=seed,
                                   head_dims=dict(HEAD_DIMS[preset]), pos_grid=GLOBAL_CROP // 16)
        torch.manual_seed(seed)
        self.student, self.teacher = build_ssl_pair(self.config)
        self.student.to(device)
        self.teacher.to(device)
        self.optimizer = _optimizer(self.student)
        self.schedules = make_schedules(total_iters, batch, base_lr=self.config.base_lr)
        out_dim = self.config.head_dims["out_dim"]
        self.losses = SSLLosses(DINOLoss(out_dim), iBOTPatchLoss(out_dim), koleo_weight=self.config.koleo_weight)
        self.centring = {"dino": TeacherCentring("sinkhorn"), "ibot": TeacherCentring("sinkhorn")}  # the paper's
        self.device = device
        self.grid = (GLOBAL_CROP // self.student.backbone.patch_size,) * 3


def synthetic_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Crop-major float32 crops in [-1, 1] like the loader's: ``[2B, 1, 96^3]`` and ``[8B, 1, 48^3]``."""
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.rand(2 * batch, 1, *(GLOBAL_CROP,) * 3, generator=g) * 2 - 1,
            "local_crops": torch.rand(N_LOCAL * batch, 1, *(LOCAL_CROP,) * 3, generator=g) * 2 - 1}


def ssl_step(state: StepState, batch: dict[str, torch.Tensor], it: int, precision: str, *,
             optimizer_step: bool = True, phases: dict[str, float] | None = None) -> dict[str, float]:
    """One training iteration exactly as ``train_ssl`` runs it (single process); returns the loss terms.

    ``optimizer_step=False`` stops after the backward pass (for FLOP counting; the clip, AdamW and
    EMA add no counted FLOPs): the weights stay unchanged, the gradients stay in ``.grad``.
    ``phases``, when given, receives the seconds of each phase (``masks``, ``teacher``, ``student``,
    ``loss``, ``backward``, ``clip``, ``adamw``, ``ema``; CPU wall time, no device synchronisation).
    """
    config, student, teacher, optimizer = state.config, state.student, state.teacher, state.optimizer
    clock = [time.perf_counter()]

    def mark(name: str) -> None:
        if phases is not None:
            clock.append(time.perf_counter())
            phases[name] = phases.get(name, 0.0) + clock[-1] - clock[-2]

    values = step_schedules(optimizer, state.schedules, it)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + it)
    masks = _rank_rows(random_patch_masks(2 * config.batch_size, state.grid, generator=generator),
                       config.batch_size, 0)
    global_crops = batch["global_crops"].to(state.device, non_blocking=True)
    local_crops = batch["local_crops"].to(state.device, non_blocking=True)
    mark("masks")
    with autocast(precision, state.device):
        targets = teacher.teacher_outputs(global_crops, masks)
        temp = values["teacher_temp"]
        dino_probs = state.centring["dino"].targets(targets["dino"], teacher.dino_head.prototypes, temp)
        ibot_probs = state.centring["ibot"].targets(targets["ibot"], teacher.ibot_head.prototypes, temp)
        mark("teacher")
        outputs = student(global_crops, local_crops, masks)
        mark("student")
        loss, terms = state.losses(outputs, dino_probs, ibot_probs, masks)
    if not math.isfinite(terms["loss"]):
        raise FloatingPointError(f"non-finite loss at iteration {it}: {terms}")
    mark("loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    terms["n_masked"] = float(masks.mask_indices.numel())
    if not optimizer_step:
        return terms
    for part in (student.backbone, student.dino_head, student.ibot_head):
        clip_gradients(part, 3.0)
    mark("clip")
    optimizer.step()
    mark("adamw")
    update_teacher(student, teacher, values["momentum"])
    mark("ema")
    return terms


def count_flops(state: StepState, batch: dict[str, torch.Tensor], it: int) -> dict[str, int]:
    """FLOPs of iteration ``it``: ``total`` (student forward + backward, teacher forward) and ``teacher``.

    Counted in fp32 (the count does not depend on the dtype), weights left unchanged.
    """
    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        ssl_step(state, batch, it, "fp32", optimizer_step=False)
    state.optimizer.zero_grad(set_to_none=True)
    total = int(counter.get_total_flops())
    generator = torch.Generator().manual_seed(state.config.seed * 1_000_003 + it)
    masks = _rank_rows(random_patch_masks(2 * state.config.batch_size, state.grid, generator=generator),
                       state.config.batch_size, 0)
    with FlopCounterMode(display=False) as counter:
        state.teacher.teacher_outputs(batch["global_crops"].to(state.device), masks)
    teacher = int(counter.get_total_flops())
    return {"total": total, "teacher": teacher, "student": total - teacher}


def analytic_flops(state: StepState, batch: int, n_masked: float) -> float:
    """A cross-check of the counter: 2 x multiply-adds of every linear layer, convolution and attention
    product; student x 3 (forward + backward) except the patch embedding (no input gradient: x 2)."""
    bb = state.student.backbone
    d, depth, hd = bb.embed_dim, bb.depth, state.config.head_dims

    def vit(tokens: int) -> tuple[float, float]:
        per_layer = 2 * tokens * (4 * d * d + 2 * d * round(d * bb.mlp_ratio)) + 4 * tokens * tokens * d
        return depth * per_layer, 2 * (tokens - 1) * d * bb.patch_size ** 3 * bb.in_chans

    head = 2 * (d * hd["hidden_dim"] + hd["hidden_dim"] ** 2 + hd["hidden_dim"] * hd["bottleneck_dim"]
                + hd["bottleneck_dim"] * hd["out_dim"])
    (g_blocks, g_embed), (l_blocks, l_embed) = vit((GLOBAL_CROP // 16) ** 3 + 1), vit((LOCAL_CROP // 16) ** 3 + 1)
    student = (3 * (2 * batch * g_blocks + N_LOCAL * batch * l_blocks + ((2 + N_LOCAL) * batch + n_masked) * head)
               + 2 * (2 * batch * g_embed + N_LOCAL * batch * l_embed))
    teacher = 2 * batch * (g_blocks + g_embed) + (2 * batch + n_masked) * head
    return student + teacher


# --------------------------------------------------------------------------- data pipeline


def prepare_mni(work: Path, num_cases: int = 12) -> Path:
    """Raw MNI152 dataset 990 -> ``3dino plan`` -> ``3dino preprocess -c pretrain``; the preprocessed folder."""
    from threedino_pipe.demo.examples import build_mni_dataset
    env = dict(os.environ)
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        env[f"THREEDINO_{name.upper()}"] = str(work / name)
    build_mni_dataset(work / "raw", 990, num_cases)
    cli = [sys.executable, "-m", "threedino_pipe.cli"]
    for args in (["plan", "-d", "990"], ["preprocess", "-d", "990", "-c", "pretrain"]):
        done = subprocess.run([*cli, *args, "--no-progress"], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"3dino {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return next((work / "preprocessed").glob("Dataset990_*"))


def loader_throughput(folder: Path, batch: int, workers: int, n_batches: int, warmup: int,
                      seed: int = 0) -> dict[str, Any]:
    """Crops/s of ``make_pretrain_loader`` alone (augmented multi-crop batches of ``batch`` volumes)."""
    dataset = PretrainDataset([folder], "pretrain", 24)
    loader = make_pretrain_loader(dataset, batch, workers, seed, GLOBAL_CROP, LOCAL_CROP, N_LOCAL)
    crops = (2 + N_LOCAL) * batch
    try:
        # for workers, drain the prefetch queue too so the timed batches are made while we wait
        for _ in range(warmup + workers * loader.num_cached_per_worker):
            next(loader)
        gaps = []
        start = last = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    return {"workers": workers, "batch": batch, "batches": n_batches, "seconds": elapsed,
            "crops_per_s": crops * n_batches / elapsed, "median_batch_s": median(gaps)}


def profile_loader(folder: Path, batch: int, n_batches: int, seed: int = 0, top: int = 15) -> dict[str, Any]:
    """cProfile of the in-process loader: total seconds and the functions with the most own time."""
    dataset = PretrainDataset([folder], "pretrain", 24)
    loader = make_pretrain_loader(dataset, batch, 0, seed, GLOBAL_CROP, LOCAL_CROP, N_LOCAL)
    next(loader)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n_batches):
        next(loader)
    profiler.disable()
    loader.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls, "tottime_s": tottime,
                     "cumtime_s": cumtime, "share": tottime / total})
    return {"batches": n_batches, "batch": batch, "total_s": total,
            "top": sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:top]}


# --------------------------------------------------------------------------- profile of a step


def profile_step(state: StepState, batch: dict[str, torch.Tensor], it: int, precision: str,
                 top: int = 15) -> dict[str, Any]:
    """torch.profiler of one step: the operators with the most self CPU time, and their share."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ssl_step(state, batch, it, precision)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"precision": precision, "self_cpu_total_s": total / 1e6,
            "top": [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "share": e.self_cpu_time_total / total} for e in rows]}


# --------------------------------------------------------------------------- main


def optimizer_variants(state: StepState, batch: dict[str, torch.Tensor], repeats: int = 3) -> dict[str, float]:
    """Median seconds of the AdamW step alone as the trainer builds it (``default``: for-loop on CPU)
    and with ``foreach=True`` / ``fused=True``, on the gradients of one real backward pass."""
    ssl_step(state, batch, 0, "fp32", optimizer_step=False)
    keys = ("params", "names", "lr_multiplier", "wd_multiplier", "is_last_layer")
    groups = [{k: g[k] for k in keys if k in g} for g in state.optimizer.param_groups]
    result = {}
    for name, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        try:
            optimizer = torch.optim.AdamW([dict(g) for g in groups], betas=(0.9, 0.999), **options)
        except (RuntimeError, ValueError) as exc:
            result[name] = f"unavailable: {exc}"
            continue
        apply_schedules(optimizer, 1e-6, 0.04, 1e-6)
        times = []
        for _ in range(repeats + 1):
            sync(state.device)
            start = time.perf_counter()
            optimizer.step()
            sync(state.device)
            times.append(time.perf_counter() - start)
        result[name] = median(times[1:])
    state.optimizer.zero_grad(set_to_none=True)
    return result


def patch_embed_as_linear(x: torch.Tensor, proj: torch.nn.Conv3d) -> torch.Tensor:
    """The patch embedding (a Conv3d with kernel = stride = p) as one matrix product: ``[B, C, W, H, D]``
    -> ``[B, N, dim]`` (W-major tokens, the same as ``PatchEmbed3D``)."""
    p = proj.kernel_size[0]
    b, c, w, h, d = x.shape
    patches = x.reshape(b, c, w // p, p, h // p, p, d // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return torch.nn.functional.linear(patches.reshape(b, -1, c * p ** 3), proj.weight.reshape(proj.out_channels, -1),
                                      proj.bias)


def patch_embed_variants(state: StepState, batch: dict[str, torch.Tensor], precision: str,
                         repeats: int = 3) -> dict[str, Any]:
    """Forward + backward seconds (median) of the patch embedding on the global crops: the model's
    Conv3d against the same map as reshape + linear; max abs difference of their outputs."""
    embed = state.student.backbone.patch_embed
    x = batch["global_crops"].to(state.device)
    variants = {"conv3d": lambda: embed(x), "reshape_linear": lambda: patch_embed_as_linear(x, embed.proj)}
    result: dict[str, Any] = {"precision": precision}
    outputs = {}
    for name, run in variants.items():
        times = []
        for _ in range(repeats + 1):
            sync(state.device)
            start = time.perf_counter()
            with autocast(precision, state.device):
                out = run()
            out.float().sum().backward()
            sync(state.device)
            times.append(time.perf_counter() - start)
        outputs[name] = out.detach().float()
        result[name] = median(times[1:])
    state.optimizer.zero_grad(set_to_none=True)
    result["max_abs_diff"] = float((outputs["conv3d"] - outputs["reshape_linear"]).abs().max())
    return result


def timed_step(state: StepState, data: dict[str, torch.Tensor], it: int, precision: str, device: torch.device,
               phases: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds (device synchronised) and loss terms of one :func:`ssl_step`."""
    sync(device)
    start = time.perf_counter()
    terms = ssl_step(state, data, it, precision, phases=phases)
    sync(device)
    return time.perf_counter() - start, terms


def measure_preset(preset: str, batch: int, dtypes: list[str], args: argparse.Namespace, device: torch.device,
                   peaks: dict[str, list[dict]]) -> dict[str, Any]:
    """Steps of one preset in every dtype, alternating round by round, with FLOP counts and phase times."""
    rounds = args.warmup + args.iters
    state = StepState(preset, batch, total_iters=max(2 * rounds + 2, 100), device=device, seed=args.seed)
    data = synthetic_batch(batch, args.seed)
    crops = (2 + N_LOCAL) * batch
    for precision in dtypes:
        peaks[precision].append(matmul_peak(DTYPES[precision], device, args.matmul_size, args.matmul_loops,
                                            args.matmul_repeats, args.matmul_budget))
    times: dict[str, list[float]] = {p: [] for p in dtypes}
    phases: dict[str, list[dict[str, float]]] = {p: [] for p in dtypes}
    counts: list[dict[str, int]] = []
    masked: list[float] = []
    for it in range(rounds):
        for precision in dtypes:
            split: dict[str, float] = {}
            seconds, terms = timed_step(state, data, it, precision, device, phases=split)
            if it >= args.warmup:
                times[precision].append(seconds)
                phases[precision].append(split)
        if it >= args.warmup:
            counts.append(count_flops(state, data, it))
            masked.append(terms["n_masked"])
        print(f"  {preset} round {it + 1}/{rounds}: " + (", ".join(f"{p} {times[p][-1]:.2f} s" for p in dtypes)
                                                        if it >= args.warmup else "warm-up"), flush=True)
    for precision in dtypes:
        peaks[precision].append(matmul_peak(DTYPES[precision], device, args.matmul_size, args.matmul_loops,
                                            args.matmul_repeats, args.matmul_budget))
    flops = [c["total"] for c in counts]
    result = {"preset": preset, "batch": batch, "crops_per_step": crops, "rounds_timed": args.iters,
              "rounds_warmup": args.warmup, "flops_per_step": flops, "flops_per_step_median": median(flops),
              "flops_teacher_median": median([c["teacher"] for c in counts]),
              "flops_student_median": median([c["student"] for c in counts]),
              "masked_patches": masked, "flops_analytic": analytic_flops(state, batch, median(masked)),
              "params_student": param_count(state.student), "params_backbone": param_count(state.student.backbone),
              "head_dims": state.config.head_dims, "dtypes": {}}
    for precision in dtypes:
        secs = times[precision]
        achieved = median([f / s for f, s in zip(flops, secs, strict=True)])
        result["dtypes"][precision] = {
            "step_seconds": secs, "median_step_s": median(secs), "crops_per_s": crops / median(secs),
            "achieved_flops_per_s": achieved,
            "phases_median_s": {k: median([ph[k] for ph in phases[precision]]) for k in phases[precision][0]}}
    result["adamw_step_s"] = optimizer_variants(state, data)
    result["patch_embed_fwd_bwd_s"] = [patch_embed_variants(state, data, p) for p in dtypes]
    if args.profile is not None and (not args.profile or preset in args.profile):
        result["profile"] = [profile_step(state, data, rounds, p) for p in dtypes]
    if args.compile_blocks:
        result["compiled_blocks"] = compiled_block_rounds(state, data, dtypes, args.iters, rounds + 1, device,
                                                          median(flops), crops)
    del state, data
    return result


def compiled_block_rounds(state: StepState, data: dict[str, torch.Tensor], dtypes: list[str], n_rounds: int,
                          first_it: int, device: torch.device, flops: float, crops: int) -> dict[str, dict]:
    """Steps with every transformer block of student and teacher compiled (``nn.Module.compile``; heads,
    losses and optimiser stay eager), alternating dtypes; the first step per dtype compiles and is timed
    apart (``compile_step_s``). ``flops`` per step as counted eagerly."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for backbone in (state.student.backbone, state.teacher.backbone):
        for block in backbone.blocks:
            block.compile()

    out = {p: {"compile_step_s": timed_step(state, data, first_it, p, device)[0], "step_seconds": []}
           for p in dtypes}
    for r in range(n_rounds):
        for precision in dtypes:
            out[precision]["step_seconds"].append(timed_step(state, data, first_it + 1 + r, precision, device)[0])
        print(f"  {state.config.preset} compiled round {r + 1}/{n_rounds}: "
              + ", ".join(f"{p} {out[p]['step_seconds'][-1]:.2f} s" for p in dtypes), flush=True)
    for d in out.values():
        d["median_step_s"] = median(d["step_seconds"])
        d["crops_per_s"] = crops / d["median_step_s"]
        d["achieved_flops_per_s"] = flops / d["median_step_s"]
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = invocation(argv)
    device = torch_device(args.device, args.threads)
    presets = args.presets or (["tiny", "small"] + (["base", "large"] if device.type == "cuda" else []))
    batches = dict(DEFAULT_BATCH)
    for item in args.batch:
        name, _, value = item.partition("=")
        batches[name] = int(value)
    info = {**machine_info(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"{info['cpu_model']}, {info['nproc']} cores, torch {info['torch']} ({info['cpu_capability']}, mkldnn bf16 "
          f"{info['mkldnn_bf16_supported']}), {info['torch_threads']} threads, load {info['load_average_at_start']}",
          flush=True)

    peaks: dict[str, list[dict]] = {p: [] for p in args.dtypes}
    steps = []
    for preset in presets:
        print(f"{preset}: batch {batches[preset]} volumes ({(2 + N_LOCAL) * batches[preset]} crops) per step",
              flush=True)
        steps.append(measure_preset(preset, batches[preset], args.dtypes, args, device, peaks))
    peak = {p: max(m["best_flops_per_s"] for m in peaks[p]) for p in args.dtypes}
    peak_median = {p: median([m["best_flops_per_s"] for m in peaks[p]]) for p in args.dtypes}
    for step in steps:
        for precision, d in [*step["dtypes"].items(), *step.get("compiled_blocks", {}).items()]:
            d["mfu"] = d["achieved_flops_per_s"] / peak[precision]
            d["mfu_vs_median_peak"] = d["achieved_flops_per_s"] / peak_median[precision]

    loaders: list[dict] = []
    loader_profile = None
    if not args.skip_loader and args.loader_workers:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="pretrain_bench_"))
        try:
            start = time.perf_counter()
            folder = prepare_mni(work)
            print(f"MNI data preprocessed in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
            for batch in sorted({batches[p] for p in presets}):
                for workers in args.loader_workers:
                    loaders.append(loader_throughput(folder, batch, workers, args.loader_batches, args.loader_warmup,
                                                     args.seed))
                    print(f"  loader batch {batch}, {workers} workers: {loaders[-1]['crops_per_s']:.1f} crops/s",
                          flush=True)
            if args.profile is not None:
                loader_profile = profile_loader(folder, min(batches[p] for p in presets), 4, args.seed)
        finally:
            if args.work_dir is None:
                shutil.rmtree(work, ignore_errors=True)

    rows = []
    for step in steps:
        for precision, d in step["dtypes"].items():
            feeds = {f"loader_w{lo['workers']}_ratio": lo["crops_per_s"] / d["crops_per_s"]
                     for lo in loaders if lo["batch"] == step["batch"]}
            d.update(feeds)
            rows.append([step["preset"], precision, step["batch"], f"{d['median_step_s']:.2f}",
                         f"{d['crops_per_s']:.1f}", gflop(step["flops_per_step_median"]),
                         gflop(d["achieved_flops_per_s"]), gflop(peak[precision]), f"{100 * d['mfu']:.1f}",
                         *[f"{feeds.get(f'loader_w{w}_ratio', float('nan')):.2f}" for w in args.loader_workers]])
    headers = ["preset", "dtype", "B", "step s", "crops/s", "GFLOP/step", "GFLOP/s", "peak GFLOP/s", "MFU %",
               *[f"loader w{w} / step" for w in args.loader_workers]]
    print()
    print(format_table(headers, rows))
    for lo in loaders:
        print(f"loader: batch {lo['batch']}, {lo['workers']} workers: {lo['crops_per_s']:.1f} crops/s "
              f"({lo['median_batch_s']:.2f} s per batch median)")
    for step in steps:
        for precision, d in step["dtypes"].items():
            split = ", ".join(f"{k} {v:.2f}" for k, v in d["phases_median_s"].items())
            print(f"phases {step['preset']} {precision} (s): {split}")
        adamw = ", ".join(f"{k} {v:.3f} s" if isinstance(v, float) else f"{k} {v}"
                          for k, v in step["adamw_step_s"].items())
        print(f"AdamW step {step['preset']}: {adamw}")
        for pe in step["patch_embed_fwd_bwd_s"]:
            print(f"patch embedding fwd+bwd {step['preset']} {pe['precision']}: Conv3d {pe['conv3d']:.3f} s, "
                  f"reshape+linear {pe['reshape_linear']:.3f} s (max |diff| {pe['max_abs_diff']:.1e})")
    for step in steps:
        for precision, d in step.get("compiled_blocks", {}).items():
            eager = step["dtypes"][precision]["median_step_s"]
            print(f"compiled blocks {step['preset']} {precision}: step {d['median_step_s']:.2f} s "
                  f"(eager {eager:.2f} s, x{d['median_step_s'] / eager:.2f}), MFU {100 * d['mfu']:.1f} %, compile step "
                  f"{d['compile_step_s']:.0f} s")
    fastest = None
    small = next((s for s in steps if s["preset"] == "small"), None)
    if small:
        fastest = max(small["dtypes"], key=lambda p: small["dtypes"][p]["crops_per_s"])
        mfu = small["dtypes"][fastest]["mfu"]
        print(f"target MFU >= {MFU_TARGET:.0%} (small, {fastest}, the faster dtype): {mfu:.1%} -> "
              f"{'met' if mfu >= MFU_TARGET else 'missed'}")
    for step in steps:
        for precision, d in step["dtypes"].items():
            for key in (k for k in d if k.startswith("loader_w")):
                print(f"target loader >= {LOADER_RATIO_TARGET:g}x the step ({step['preset']} {precision}, "
                      f"{key[8:-6]} workers): {d[key]:.2f}x -> {'met' if d[key] >= LOADER_RATIO_TARGET else 'missed'}")
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    info["load_average_at_end"] = load_end
    write_json(args.out, {"command": command, "machine": info, "settings": vars(args) | {
        "out": str(args.out), "work_dir": str(args.work_dir) if args.work_dir else None,
        "global_crop": GLOBAL_CROP, "local_crop": LOCAL_CROP, "n_local": N_LOCAL, "batches": batches},
        "matmul_peak": {"best_flops_per_s": peak, "median_of_measurements": peak_median, "runs": peaks},
        "steps": steps, "loader": loaders,
        "loader_profile": loader_profile,
        "targets": {"mfu_small_faster_dtype": MFU_TARGET, "loader_over_step": LOADER_RATIO_TARGET,
                    "small_faster_dtype": fastest}})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
