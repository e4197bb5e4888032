"""Teacher update (exponential moving average of the student) and gradient clipping."""

from __future__ import annotations

import torch
from torch import nn

from threedino_pipe.ssl.param_groups import clean_name


def _params_by_name(module: nn.Module) -> dict[str, nn.Parameter]:
    return {clean_name(name): param for name, param in module.named_parameters()}


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter, in place.

    Parameters are paired by name (wrapper prefixes such as DDP's ``module.`` ignored), so the two
    modules must have the same parameter names and shapes (frozen ones included); buffers are not
    averaged. Uses ``torch._foreach_mul_`` / ``torch._foreach_add_`` (one fused kernel per list).

    Args:
        student: the trained network (e.g. a ModuleDict of backbone and heads).
        teacher: its EMA copy, same architecture.
        momentum: m in [0, 1] (0.992 -> 1.0 over training).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    s_params, t_params = _params_by_name(student), _params_by_name(teacher)
    if s_params.keys() != t_params.keys():
        only_s = sorted(s_params.keys() - t_params.keys())[:5]
        only_t = sorted(t_params.keys() - s_params.keys())[:5]
        raise ValueError(f"student and teacher parameters differ: student only {only_s}, teacher only {only_t}")
    names = list(t_params)
    for name in names:
        if s_params[name].shape != t_params[name].shape:
            raise ValueError(f"{name}: student {tuple(s_params[name].shape)} vs teacher {tuple(t_params[name].shape)}")
    teacher_list = [t_params[name] for name in names]
    student_list = [s_params[name].detach() for name in names]
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)


def clip_gradients(module: nn.Module, max_norm: float = 3.0) -> torch.Tensor:
    """Clip the total L2 norm of ``module``'s gradients to ``max_norm``; returns the norm before clipping.

    FSDP modules use their own ``clip_grad_norm_`` (shards summed over ranks); other modules use
    ``torch.nn.utils.clip_grad_norm_``. DINOv2 clips each student part (backbone, DINO head, iBOT
    head) separately: call this once per part for the same behaviour.
    """
    if hasattr(module, "clip_grad_norm_"):
        return module.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


@torch.no_grad()
def relative_distance(student: nn.Module, teacher: nn.Module) -> float:
    """``||theta_student - theta_teacher|| / ||theta_teacher||`` over the paired parameters: how far the EMA
    teacher lags behind the student (0 at the start, when the teacher is a copy)."""
    s_params, t_params = _params_by_name(student), _params_by_name(teacher)
    names = [n for n in t_params if n in s_params]
    teacher_list = [t_params[n].float() for n in names]
    diffs = torch._foreach_sub([s_params[n].detach().float() for n in names], teacher_list)
    num = torch.stack(torch._foreach_norm(diffs)).norm()
    den = torch.stack(torch._foreach_norm(teacher_list)).norm()
    return float(num / den.clamp_min(1e-12))
