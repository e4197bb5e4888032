"""User-facing errors: which file, what is wrong, how to fix it.

The CLI catches :class:`UserError`, prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback.

    Args:
        problem: what is wrong, one sentence.
        file: the file or folder concerned, if any.
        fix: what the user should do about it.
        exit_code: process exit code (2 for bad input, 1 for failures found by a check).
    """

    def __init__(self, problem: str, *, file: str | Path | None = None, fix: str | None = None,
                 exit_code: int = 2) -> None:
        self.problem = problem
        self.file = None if file is None else str(file)
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.file}: {self.problem}" if self.file else self.problem
        return head if not self.fix else f"{head}\n  fix: {self.fix}"
