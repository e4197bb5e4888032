"""The self-supervised objective: DINO / iBOT / KoLeo losses, Sinkhorn-Knopp, masking, schedules, EMA."""

from threedino_pipe.ssl.dino_loss import DINOLoss
from threedino_pipe.ssl.ema import clip_gradients, update_teacher
from threedino_pipe.ssl.ibot_loss import iBOTPatchLoss, masked_patch_weights
from threedino_pipe.ssl.koleo import KoLeoLoss, koleo_per_chunk
from threedino_pipe.ssl.masking import PatchMasks, random_patch_masks
from threedino_pipe.ssl.param_groups import apply_schedules, build_param_groups, step_schedules
from threedino_pipe.ssl.schedules import CosineSchedule, make_schedules, scaled_lr, schedule_values
from threedino_pipe.ssl.sinkhorn import sinkhorn_knopp

__all__ = [
    "CosineSchedule", "DINOLoss", "KoLeoLoss", "PatchMasks", "apply_schedules", "build_param_groups",
    "clip_gradients", "iBOTPatchLoss", "koleo_per_chunk", "make_schedules", "masked_patch_weights",
    "random_patch_masks", "scaled_lr", "schedule_values", "sinkhorn_knopp", "step_schedules", "update_teacher",
]
