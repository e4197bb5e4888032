"""Mixed precision: bf16 autocast on CPU and GPU, fp16 with a gradient scaler on GPUs without bf16."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where the device supports it (CUDA bf16, or a CPU with native bf16), fp16 on
    older GPUs, else fp32."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            return "bf16"
        return requested
    if device.type == "cuda":  # native bf16 only: by default torch also reports emulated bf16 (slow) on pre-Ampere GPUs
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA, else None."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
