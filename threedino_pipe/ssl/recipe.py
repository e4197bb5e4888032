"""The self-configured SSL recipe: the paper's settings adapted to the batch and length of a run.

The 3DINO paper fixed its settings for a total batch of 512 volumes and 125,000 iterations
(docs/method.md). At a few volumes per step and a few hundred iterations the same settings do
not learn (docs/benchmarks.md, "Pretraining that learns"): Sinkhorn-Knopp over 8 teacher crops
gives near-uniform targets, the EMA teacher (momentum 0.992 -> 1, LayerScale 1e-5) barely moves
from its input-independent start, and the square-root rule puts the learning rate near 1e-4.
:func:`configure` chooses each of those settings from the run's total batch B and length T by a
rule that gives the paper's value at the paper's scale; :func:`paper` gives the paper's values
unchanged. Every value that differs from the paper is listed in :attr:`SSLRecipe.deviations`
with its reason (written to run.json).
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
MIN_SINKHORN_ROWS = 256               # fewer teacher rows per step than this: centre over a queue
QUEUE_ROWS = 2048                     # rows Sinkhorn sees with a queue (over all ranks)
MOMENTUM_HORIZON = 0.05               # the EMA's averaging horizon 1/(1 - m0) at most this fraction of T
MIN_MOMENTUM = 0.8
SHORT_RUN = 1_000                     # at or below: the short-run settings measured on the CPU
SHORT_LAYERSCALE = 1.0                # LayerScale init of a short run (the paper's 1e-5 at 125,000 iterations)
SHORT_TEACHER_TEMP = 0.04             # teacher temperature of a short run: no warm-up to 0.07
MIN_PEAK_LR = 5e-4                    # a floor under the square-root rule at small batches


def run_scale(iters: int) -> float:
    """Where a run of ``iters`` lies between a short run (0, at or below ``SHORT_RUN``) and the paper's
    length (1, at or above 125,000), on a log scale; the length-dependent settings interpolate along it."""
    if iters <= SHORT_RUN:
        return 0.0
    return min(1.0, math.log(iters / SHORT_RUN) / math.log(PAPER_ITERS / SHORT_RUN))


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

    Args:
        total_batch: volumes per iteration over all processes.
        iters: the run's length.
        prototypes: K the user or the preset asks for (the paper's 65,536 for ViT-S/B/L).
        base_lr: the paper's base rate for this stage (0.002 pretrain, 0.001 adapt-highres).
        world_size: processes (the queue is split between them).
        scale_iters: the length the LayerScale and teacher-temperature rules judge (default ``iters``;
            adapt-highres passes its source run's, since it continues a trained network).
    """
    base = paper(total_batch, iters, prototypes, base_lr)
    deviations: dict[str, str] = {}
    changes: dict = {}
    teacher_rows = 2 * total_batch
    if teacher_rows < MIN_SINKHORN_ROWS:
        queue = math.ceil(max(QUEUE_ROWS - teacher_rows, 0) / world_size)
        changes.update(centering="sinkhorn_queue", queue_size=queue)
        deviations["centering"] = (f"{teacher_rows} teacher crops per step < {MIN_SINKHORN_ROWS}: Sinkhorn over the "
                                   f"batch would spread each target over >= K/{teacher_rows} prototypes; Sinkhorn "
                                   f"over a queue of {queue * world_size} recent teacher embeddings + the batch "
                                   "(SwAV's small-batch rule)")
    horizon_momentum = 1.0 - 1.0 / max(MOMENTUM_HORIZON * iters, 1.0)
    momentum = max(MIN_MOMENTUM, min(PAPER_MOMENTUM, horizon_momentum))
    if momentum != PAPER_MOMENTUM:
        changes["momentum_start"] = momentum
        deviations["momentum_start"] = (f"teacher EMA horizon 1/(1 - m) = {1 / (1 - momentum):.0f} iterations: "
                                        f"{MOMENTUM_HORIZON:g} of the {iters} iterations, with m at least "
                                        f"{MIN_MOMENTUM:g} (the paper's 0.992 averages over 125 iterations: a short "
                                        "run's teacher would not move)")
    scale = run_scale(iters if scale_iters is None else scale_iters)
    layerscale = float(10 ** (math.log10(SHORT_LAYERSCALE) * (1 - scale) + math.log10(PAPER_LAYERSCALE) * scale))
    if scale < 1:
        changes["layerscale_init"] = layerscale
        deviations["layerscale_init"] = (f"LayerScale starts at {layerscale:.3g} (log-interpolated from "
                                         f"{SHORT_LAYERSCALE:g} at <= {SHORT_RUN} iterations to the paper's 1e-5 at "
                                         f"{PAPER_ITERS}): at 1e-5 every block starts as an identity, the teacher's "
                                         "output does not depend on its input and a short run ends before it does")
        temp = SHORT_TEACHER_TEMP + (PAPER_TEACHER_TEMP[1] - SHORT_TEACHER_TEMP) * scale
        changes["teacher_temp_end"] = temp
        deviations["teacher_temp_end"] = (f"teacher temperature {PAPER_TEACHER_TEMP[0]:g} -> {temp:.3g} (the paper "
                                          f"warms up to {PAPER_TEACHER_TEMP[1]:g}; interpolated from "
                                          f"{SHORT_TEACHER_TEMP:g} at <= {SHORT_RUN} iterations): softer targets in "
                                          "a short run are near uniform")
    if base.peak_lr < MIN_PEAK_LR:
        changes["peak_lr"] = MIN_PEAK_LR
        deviations["peak_lr"] = (f"the square-root rule gives {base.peak_lr:.3g} at a total batch of {total_batch}; "
                                 f"floored at {MIN_PEAK_LR:g}")
    return SSLRecipe(**{**base.options(), **changes, "recipe": "auto", "deviations": deviations})


def apply_overrides(recipe: SSLRecipe, overrides: dict) -> SSLRecipe:
    """``recipe`` with the user's explicit options (None = keep); each one is recorded as a deviation."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(chosen) - set(recipe.options())
    if unknown:
        raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
    if chosen.get("centering", recipe.centering) not in MODES:
        raise ValueError(f"unknown centring {chosen['centering']!r}")
    deviations = dict(recipe.deviations)
    for key, value in chosen.items():
        if value != getattr(recipe, key):
            deviations[key] = f"set by the user ({value!r}; the {recipe.recipe} recipe gives {getattr(recipe, key)!r})"
    if chosen.get("centering") == "sinkhorn_queue" and not chosen.get("queue_size") and not recipe.queue_size:
        chosen["queue_size"] = QUEUE_ROWS
    return SSLRecipe(**{**recipe.options(), **chosen, "deviations": deviations})


def recipe_schedules(recipe: SSLRecipe, iters: int, total_batch: int) -> dict:
    """Every per-iteration schedule of a run of ``iters`` iterations with ``recipe`` (ssl/schedules.py)."""
    return make_schedules(iters, total_batch, peak_lr=recipe.peak_lr, warmup_iters=recipe.warmup_iters,
                          momentum=recipe.momentum_start, teacher_temp=recipe.teacher_temp_end,
                          warmup_teacher_temp=recipe.teacher_temp_start,
                          teacher_temp_warmup_iters=recipe.teacher_temp_warmup_iters,
                          freeze_last_layer_iters=recipe.freeze_last_layer_iters)
