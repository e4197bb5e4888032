"""nnU-Net habits on the ``3dino`` command line: options typed the nnU-Net way are refused with the
``3dino`` equivalent named (``-chk: did you mean --checkpoint?``), never silently accepted.

Before click parses a command's arguments, :class:`HabitGroup` looks at each word that starts with
``-``, is not one of the command's options, and is either an nnU-Net option of :data:`NNUNET` or an
option of the command written with underscores or a single dash (``--save_probabilities``,
``-device``). Such a word is a usage error (exit code 2) naming the equivalent. Anything else is
left to click (``No such option``).
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

# nnU-Net's option -> (the 3dino option that does the same, or None; a note on how it differs)
NNUNET: dict[str, tuple[str | None, str]] = {
    "-chk": ("--checkpoint", "best or final, the weights file of each run"),
    "-device": ("--device", "auto, cpu, cuda or cuda:N"),
    "-npp": ("--num-workers", "cases read and preprocessed ahead while one is predicted"),
    "-nps": ("--num-workers", "3dino writes each case in the predicting process; --num-workers sets how many "
                              "cases are read ahead"),
    "-step_size": ("--overlap", "--overlap is 1 - step_size: -step_size 0.5 is --overlap 0.5"),
    "--disable_tta": (None, "3dino predicts without test-time augmentation unless --tta is given: leave it out"),
    "--save_probabilities": ("--save-probabilities", ""),
    "--continue_prediction": ("--continue", ""),
    "-f": ("--fold", ""),
    "-pretrained_weights": ("--backbone", "a pretrain run folder or backbone file"),
    "-num_gpus": (None, "start several processes with `torchrun --nproc-per-node N -m threedino_pipe.cli ...` "
                        "(docs/gpu_and_clusters.md)"),
    "--c": (None, "a rerun of the same command resumes by itself: leave it out"),
    "-gpu_memory_target": ("--memory-gb", ""),
    "-overwrite_target_spacing": ("--target-spacing", "i,j,k in mm, e.g. 0.8,0.8,3"),
    "--verify_dataset_integrity": (None, "`3dino plan` verifies the dataset; `3dino verify -d N` alone"),
    "--disable_progress_bar": ("--no-progress", ""),
}


class HabitError(typer.BadParameter):
    """A usage error (exit code 2) whose message is shown as it is."""

    def format_message(self) -> str:
        return self.message


def _names(command: Any) -> set[str]:
    return {name for p in command.params for name in (*p.opts, *p.secondary_opts)} | {"--help"}


def habit_problem(command: Any, name: str, args: list[str], owners: dict[str, list[str]]) -> str | None:
    """The usage error for the first nnU-Net-style option in ``args`` of ``command`` (``name``), or None.

    ``owners`` maps every option of the app to the commands that have it.
    """
    own = _names(command)
    for arg in args:
        if arg == "--":
            break
        word = arg.split("=", 1)[0]
        if not word.startswith("-") or word in own or word.lstrip("-").replace(".", "").isdigit():
            continue
        target, note = NNUNET.get(word, (None, None))
        if note is None:  # not in the table: an option of this command written with '_' or one dash?
            spelled = "--" + word.lstrip("-").replace("_", "-")
            target, note = (spelled, "") if spelled in own and spelled != word else (None, None)
        if note is None:
            continue
        note = f" ({note})" if note else ""
        if target is None:
            return f"{word} is an nnU-Net option that 3dino does not need{note}"
        if target in own:
            return f"{word}: did you mean {target}?{note}"
        where = " or ".join(f"`3dino {c}`" for c in sorted(owners.get(target, [])))
        return (f"{word}: `3dino {name}` has no such option; the equivalent {target} belongs to {where}{note}"
                if where else f"{word} is an nnU-Net option that `3dino {name}` does not have{note}")
    return None


class HabitGroup(TyperGroup):
    """The ``3dino`` group: refuses nnU-Net-style options before the command parses (:func:`habit_problem`)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and name is not None and "--help" not in rest:
            owners: dict[str, list[str]] = {}
            for other_name, other in self.commands.items():
                for option in _names(other):
                    owners.setdefault(option, []).append(other_name)
            problem = habit_problem(command, name, rest, owners)
            if problem:
                raise HabitError(problem, ctx=type(ctx)(command, info_name=name, parent=ctx))
        return name, command, rest
