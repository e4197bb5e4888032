"""Per-iteration schedules of the pretraining (lr, weight decay, teacher momentum and temperature)."""

from __future__ import annotations

import math

import numpy as np


class CosineSchedule:
    """A precomputed per-iteration schedule, indexable like an array (as DINOv2's CosineScheduler).

    Layout over ``total_iters`` iterations: ``freeze_iters`` zeros, then a linear warm-up of
    ``warmup_iters`` values from ``start_warmup`` to ``base`` (both included), then a half cosine
    from ``base`` (at its first iteration) towards ``final`` over the remaining ``n`` iterations:
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for i = 0 .. n-1. Indexing at or past
    ``total_iters`` returns ``final``.

    Args:
        base: peak value (reached at the end of the warm-up).
        final: value approached at the end and returned past it.
        total_iters: schedule length in iterations.
        warmup_iters: linear warm-up length.
        start_warmup: first warm-up value.
        freeze_iters: leading zeros.
    """

    def __init__(self, base: float, final: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup: float = 0.0, freeze_iters: int = 0) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0 or warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"need 0 <= warmup_iters + freeze_iters <= total_iters, got warmup {warmup_iters}, "
                             f"freeze {freeze_iters}, total {total_iters}")
        self.base, self.final, self.total_iters = float(base), float(final), int(total_iters)
        n_cos = total_iters - warmup_iters - freeze_iters
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * np.arange(n_cos) / max(n_cos, 1)))
        self.values = np.concatenate([np.zeros(freeze_iters), np.linspace(start_warmup, base, warmup_iters),
                                      cosine]).astype(np.float64)

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, iteration: int) -> float:
        if iteration < 0:
            raise IndexError(f"negative iteration {iteration}")
        return self.final if iteration >= self.total_iters else float(self.values[iteration])

    def zero_first(self, n_iters: int) -> CosineSchedule:
        """Set the first ``n_iters`` values to 0 in place (the last-layer freeze); returns self."""
        self.values[: max(0, n_iters)] = 0.0
        return self


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """The sqrt scaling rule: ``base_lr * sqrt(total_batch / 1024)`` (total batch over all ranks)."""
    return base_lr * math.sqrt(total_batch / 1024.0)


def make_schedules(total_iters: int, total_batch: int, *, base_lr: float = 0.002, min_lr: float = 1e-6,
                   warmup_frac: float = 0.1, weight_decay: float = 0.04, weight_decay_end: float = 0.4,
                   momentum: float = 0.992, momentum_end: float = 1.0, teacher_temp: float = 0.07,
                   warmup_teacher_temp: float = 0.04, teacher_temp_warmup_frac: float = 0.3,
                   freeze_last_layer_frac: float = 0.01, peak_lr: float | None = None,
                   warmup_iters: int | None = None, teacher_temp_warmup_iters: int | None = None,
                   freeze_last_layer_iters: int | None = None) -> dict[str, CosineSchedule]:
    """Every schedule of a run of ``total_iters`` iterations, with the paper's defaults (docs/method.md).

    Fractions are of ``total_iters`` (rounded to whole iterations), so adapt-highres rebuilds the same
    shapes compressed to its own length by calling this with its own ``total_iters`` and base lr.
    ``peak_lr`` and the ``*_iters`` counts, when given, replace the rule and the fractions (the
    self-configured recipe, :mod:`threedino_pipe.ssl.recipe`).

    Returns:
        ``{"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}``:
        lr: 0 -> ``scaled_lr(base_lr, total_batch)`` linearly over ``warmup_frac``, then cosine to ``min_lr``;
        wd: cosine ``weight_decay`` -> ``weight_decay_end``; momentum: cosine ``momentum`` -> ``momentum_end``;
        teacher_temp: linear ``warmup_teacher_temp`` -> ``teacher_temp`` over ``teacher_temp_warmup_frac``,
        then constant; last_layer_lr: the lr schedule with its first ``freeze_last_layer_frac`` set to 0.
    """
    if total_iters < 1 or total_batch < 1:
        raise ValueError(f"need total_iters >= 1 and total_batch >= 1, got {total_iters}, {total_batch}")
    peak = scaled_lr(base_lr, total_batch) if peak_lr is None else peak_lr
    warmup = round(warmup_frac * total_iters) if warmup_iters is None else warmup_iters
    temp_warmup = round(teacher_temp_warmup_frac * total_iters) if teacher_temp_warmup_iters is None else \
        teacher_temp_warmup_iters
    freeze = round(freeze_last_layer_frac * total_iters) if freeze_last_layer_iters is None else \
        freeze_last_layer_iters
    return {
        "lr": CosineSchedule(peak, min_lr, total_iters, warmup_iters=warmup),
        "wd": CosineSchedule(weight_decay, weight_decay_end, total_iters),
        "momentum": CosineSchedule(momentum, momentum_end, total_iters),
        "teacher_temp": CosineSchedule(teacher_temp, teacher_temp, temp_warmup, warmup_iters=temp_warmup,
                                       start_warmup=warmup_teacher_temp),
        "last_layer_lr": CosineSchedule(peak, min_lr, total_iters, warmup_iters=warmup).zero_first(freeze),
    }


def schedule_values(schedules: dict[str, CosineSchedule], iteration: int) -> dict[str, float]:
    """Every schedule's value at ``iteration`` (for the optimiser step and ``log.csv``)."""
    return {name: schedule[iteration] for name, schedule in schedules.items()}
