"""Logging of a ``3dino`` process: plain lines on stderr, third-party loggers kept quiet.

``-v`` turns on DEBUG for threedino-pipe's own loggers only: libraries imported on the way
(matplotlib, PIL, numexpr, filelock, ...) stay at WARNING, so a verbose run is not flooded.
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "threedino_pipe"
QUIET_LOGGERS = ("numexpr",)  # log at INFO on import (thread counts): not a message for users


def configure_logging(verbose: bool = False) -> None:
    """INFO lines on stderr; DEBUG for threedino-pipe's own loggers with ``verbose``. Called once per command."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger(PACKAGE).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
