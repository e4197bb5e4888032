"""The self-configured SSL recipe: the paper's settings adapted to the batch and length of a run.

The 3DINO paper fixed its settings for a total batch of 512 volumes and 125,000 iterations
(docs/method.md). At a few volumes per step and a few hundred iterations the same settings do
not learn (docs/benchmarks.md, "Pretraining that learns"): with LayerScale at 1e-5 every block
starts as an identity, the EMA teacher (momentum 0.992 -> 1) barely moves from its
input-independent start, and the square-root rule puts the learning rate near 1e-4; the
frozen-feature probe of such a run equals the untrained network's. :func:`configure` chooses
those settings from the run's total batch B and length T by rules that give the paper's values at
the paper's scale; :func:`paper` gives the paper's values unchanged. Every value that differs from
the paper is listed in :attr:`SSLRecipe.deviations` with its reason (written to run.json).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from threedino_pipe.ssl.centering import MODES
from threedino_pipe.ssl.schedules import make_schedules

# The paper's values (docs/method.md)
PAPER_BATCH = 512
PAPER_ITERS = 125_000
PAPER_LR_REFERENCE_BATCH = 1024      # lr = base_lr * sqrt(total batch / 1024)
PAPER_MOMENTUM = 0.992
PAPER_LAYERSCALE = 1e-5
PAPER_TEACHER_TEMP = (0.04, 0.07)
PAPER_TEACHER_TEMP_WARMUP = 0.3       # fraction of the run
PAPER_WARMUP = 0.1                    # fraction of the run
PAPER_FREEZE_LAST_LAYER = 0.01        # fraction of the run
PAPER_PROTOTYPES = 65_536

# Scale rules (measured: docs/benchmarks.md, "Pretraining that learns"; docs/method.md)
MOMENTUM_ITERS = 6            # teacher momentum start 1 - max(0.008, 6 / T): the paper's 0.992 from T = 750 ...
MIN_MOMENTUM = 0.5            # ... and never below 0.5 (runs of under 12 iterations: smoke tests)
PEAK_LR_FLOOR = 0.5           # peak lr at least half the stage's base lr (pretrain 1e-3, adapt-highres 5e-4)
LAYERSCALE_REACH = 1.0        # LayerScale starts at 1 unless AdamW can move a gamma this far in the first tenth ...
EARLY_FRACTION = 0.1
SMALL_BATCH = 256             # ... and the batch is the paper's order. Below it (measured at B = 4): LayerScale
                              # starts at 1 (after 12,000 iterations at lr 1e-3 the gammas reached a mean |gamma|
                              # of only 0.004-0.04 per block), the heads' prototypes are not trained (the
                              # last-layer freeze lasts the run) and the teacher temperature stays at 0.04
SHORT_LAYERSCALE = 1.0
SMALL_BATCH_TEACHER_TEMP = 0.04
QUEUE_ROWS = 2048             # rows Sinkhorn sees with --centering sinkhorn_queue (over all ranks)


@dataclass(frozen=True)
class SSLRecipe:
    """Every setting of the SSL objective that depends on the run's scale (iterations are counts)."""

    recipe: str
    prototypes: int
    peak_lr: float
    warmup_iters: int
    teacher_temp_start: float
    teacher_temp_end: float
    teacher_temp_warmup_iters: int
    momentum_start: float
    layerscale_init: float
    centering: str
    queue_size: int                   # per rank (sinkhorn_queue)
    ibot_centering: str
    freeze_last_layer_iters: int
    deviations: dict[str, str] = field(default_factory=dict)

    def options(self) -> dict:
        """The recipe as run options (``deviations`` go to run.json's decisions)."""
        return {k: v for k, v in asdict(self).items() if k != "deviations"}


def _fraction(fraction: float, iters: int) -> int:
    return round(fraction * iters)


def paper(total_batch: int, iters: int, prototypes: int, base_lr: float) -> SSLRecipe:
    """The paper's settings, unchanged whatever the scale (the negative control of docs/benchmarks.md)."""
    return SSLRecipe(
        recipe="paper", prototypes=prototypes,
        peak_lr=base_lr * math.sqrt(total_batch / PAPER_LR_REFERENCE_BATCH),
        warmup_iters=_fraction(PAPER_WARMUP, iters), teacher_temp_start=PAPER_TEACHER_TEMP[0],
        teacher_temp_end=PAPER_TEACHER_TEMP[1], teacher_temp_warmup_iters=_fraction(PAPER_TEACHER_TEMP_WARMUP, iters),
        momentum_start=PAPER_MOMENTUM, layerscale_init=PAPER_LAYERSCALE, centering="sinkhorn", queue_size=0,
        ibot_centering="sinkhorn", freeze_last_layer_iters=_fraction(PAPER_FREEZE_LAST_LAYER, iters))


def configure(total_batch: int, iters: int, prototypes: int, base_lr: float, world_size: int = 1,
              scale_iters: int | None = None) -> SSLRecipe:
    """The self-configured recipe for a run of ``iters`` iterations at ``total_batch`` volumes per step.

    Five of the paper's settings change with the scale (everything else is the paper's): the peak
    learning rate is floored at half the base rate; the teacher momentum starts at
    ``1 - max(0.008, 6 / T)`` (at least 0.5); LayerScale starts at 1 below a total batch of 256, and at any batch
    when AdamW cannot move a gamma from 1e-5 to order 1 within the first tenth of the run (peak lr x T / 10 < 1);
    below a total batch of 256 the heads' prototypes are not trained (the last-layer freeze lasts the run) and the
    teacher temperature stays at 0.04.

    Args:
        total_batch: volumes per iteration over all processes.
        iters: the run's length.
        prototypes: K the user or the preset asks for (the paper's 65,536 for ViT-S/B/L).
        base_lr: the paper's base rate for this stage (0.002 pretrain, 0.001 adapt-highres).
        world_size: processes (the queue is split between them).
        scale_iters: the length the LayerScale rule judges (default ``iters``; adapt-highres passes its
            source run's, since it continues a trained network).
    """
    base = paper(total_batch, iters, prototypes, base_lr)
    deviations: dict[str, str] = {}
    changes: dict = {}
    floor = PEAK_LR_FLOOR * base_lr
    peak = max(base.peak_lr, floor)
    if peak != base.peak_lr:
        changes["peak_lr"] = peak
        deviations["peak_lr"] = (f"the square-root rule gives {base.peak_lr:.3g} at a total batch of {total_batch}; "
                                 f"floored at half the base rate, {floor:.3g}")
    momentum = max(MIN_MOMENTUM, 1.0 - max(1.0 - PAPER_MOMENTUM, MOMENTUM_ITERS / iters))
    if momentum != PAPER_MOMENTUM:
        changes["momentum_start"] = momentum
        deviations["momentum_start"] = (f"teacher momentum starts at 1 - {MOMENTUM_ITERS} / {iters} iterations (at "
                                        f"least {MIN_MOMENTUM:g}) = {momentum:.4g}: the paper's 0.992 averages over "
                                        "about 125 iterations, longer than a short run's teacher can lag behind its "
                                        "student")
    length = iters if scale_iters is None else scale_iters
    reach = peak * EARLY_FRACTION * length  # AdamW moves a parameter by at most about the lr per step
    if total_batch < SMALL_BATCH:
        changes["layerscale_init"] = SHORT_LAYERSCALE
        deviations["layerscale_init"] = (
            f"LayerScale starts at {SHORT_LAYERSCALE:g}: at a total batch of {total_batch} "
            f"(< {SMALL_BATCH}) AdamW moves a gamma far less than the lr per step (measured at batch 4: "
            "after 12,000 iterations at a peak lr of 0.001 the mean |gamma| per block was 0.004-0.04), so from the "
            "paper's 1e-5 the blocks would stay near identities for the whole run")
    elif reach < LAYERSCALE_REACH:
        changes["layerscale_init"] = SHORT_LAYERSCALE
        deviations["layerscale_init"] = (f"LayerScale starts at {SHORT_LAYERSCALE:g}: in the first tenth of {length} "
                                         f"iterations at a peak lr of {peak:.3g} AdamW moves a gamma by at most about "
                                         f"{reach:.2g} < {LAYERSCALE_REACH:g}, so from the paper's 1e-5 the blocks "
                                         "would stay near identities and the teacher's output would not depend on "
                                         "its input for much of the run")
    if total_batch < SMALL_BATCH:
        changes["freeze_last_layer_iters"] = iters
        deviations["freeze_last_layer_iters"] = (
            f"the heads' prototypes stay at their random initialisation for the whole run: at a total batch of "
            f"{total_batch} (< {SMALL_BATCH}) trained prototypes turn away from the directions in which the "
            "heads' outputs differ between inputs (measured at batch 4: the smallest singular value of the DINO "
            "prototypes fell from about 3 to 0.002 in 1,800 iterations), after which every target is uniform and "
            "the DINO and iBOT gradients vanish")
        changes["teacher_temp_end"] = SMALL_BATCH_TEACHER_TEMP
        deviations["teacher_temp_end"] = (
            f"the teacher temperature stays at {SMALL_BATCH_TEACHER_TEMP:g} (no warm-up to "
            f"{PAPER_TEACHER_TEMP[1]:g}): at a total batch of {total_batch} Sinkhorn-Knopp spreads each of the "
            f"{2 * total_batch} teacher rows over many prototypes, and the sharper teacher keeps the targets from "
            "uniform (measured at batch 4, 60 iterations, 3 seeds: entropy 0.93 of log K at the end, against 0.97 "
            "at 0.07)")
    return SSLRecipe(**{**base.options(), **changes, "recipe": "auto", "deviations": deviations})


def apply_overrides(recipe: SSLRecipe, overrides: dict) -> SSLRecipe:
    """``recipe`` with the user's explicit options (None = keep); each one is recorded as a deviation."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(chosen) - set(recipe.options())
    if unknown:
        raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
    for key in ("centering", "ibot_centering"):
        if chosen.get(key, getattr(recipe, key)) not in MODES:
            raise ValueError(f"unknown centring {chosen[key]!r}")
    deviations = dict(recipe.deviations)
    for key, value in chosen.items():
        if value != getattr(recipe, key):
            deviations[key] = f"set by the user ({value!r}; the {recipe.recipe} recipe gives {getattr(recipe, key)!r})"
    queued = "sinkhorn_queue" in (chosen.get("centering"), chosen.get("ibot_centering"))
    if queued and not chosen.get("queue_size") and not recipe.queue_size:
        chosen["queue_size"] = QUEUE_ROWS
    return SSLRecipe(**{**recipe.options(), **chosen, "deviations": deviations})


def recipe_schedules(recipe: SSLRecipe, iters: int, total_batch: int) -> dict:
    """Every per-iteration schedule of a run of ``iters`` iterations with ``recipe`` (ssl/schedules.py)."""
    return make_schedules(iters, total_batch, peak_lr=recipe.peak_lr, warmup_iters=recipe.warmup_iters,
                          momentum=recipe.momentum_start, teacher_temp=recipe.teacher_temp_end,
                          warmup_teacher_temp=recipe.teacher_temp_start,
                          teacher_temp_warmup_iters=recipe.teacher_temp_warmup_iters,
                          freeze_last_layer_iters=recipe.freeze_last_layer_iters)
