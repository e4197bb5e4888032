"""Retries with exponential backoff for network operations (DIMSE and DICOMweb).

An operation raises :class:`TransientError` for what may pass (connection refused, a timeout, a
connection dropped mid-transfer, a transient rejection, HTTP 5xx/429) and :class:`PermanentError`
for what will not (a permanent association rejection, HTTP 4xx, a refused query). Transient errors
are retried after 1, 2, 4, ... seconds (capped); the last one, or any permanent error, becomes a
:class:`~threedino_pipe.runtime.errors.UserError` naming the node and the operation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from threedino_pipe.runtime.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransientError(Exception):
    """A failure that may pass if the operation is tried again."""


class PermanentError(Exception):
    """A failure that trying again will not fix."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Attributes:
        attempts: tries in all (at least 1).
        first_delay_s: wait before the second try (s).
        factor: each further wait is this many times longer.
        max_delay_s: longest wait (s).
    """

    attempts: int = 4
    first_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * self.factor ** (attempt - 1))


@dataclass
class Attempts:
    """How many tries an operation took (filled in by :func:`with_retries`)."""

    count: int = 0


def with_retries(operation: Callable[[], T], *, what: str, where: str, policy: RetryPolicy,
                 fix: str, attempts: Attempts | None = None) -> T:
    """Run ``operation`` under ``policy``.

    Args:
        what: the operation, for messages (e.g. ``"C-GET of study 1.2.3"``).
        where: the node, for messages (``AET@host:port`` or a URL).
        fix: the advice given when every try failed.
        attempts: filled with the number of tries made.

    Raises:
        UserError: a permanent error, or the last transient error once the tries are used up.
    """
    counter = attempts or Attempts()
    for attempt in range(1, max(1, policy.attempts) + 1):
        counter.count = attempt
        try:
            return operation()
        except PermanentError as exc:
            raise UserError(f"{what} at {where} failed: {exc}", fix=exc.fix or fix) from None
        except TransientError as exc:
            if attempt >= policy.attempts:
                raise UserError(f"{what} at {where} failed after {attempt} attempt(s): {exc}", fix=fix) from None
            wait = policy.delay(attempt)
            log.warning("%s at %s: %s; trying again in %.1f s (attempt %d of %d)", what, where, exc, wait,
                        attempt + 1, policy.attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")
