"""Logging of a ``3dino`` process: plain lines on stderr, third-party loggers kept quiet.

``-v`` turns on DEBUG for threedino-pipe's own loggers only: libraries imported on the way
(matplotlib, PIL, numexpr, filelock, ...) stay at WARNING, so a verbose run is not flooded.
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "threedino_pipe"
# numexpr logs thread counts at INFO on import, pynetdicom every association event: not messages for users
QUIET_LOGGERS = ("numexpr", "pynetdicom")


def configure_logging(verbose: bool = False) -> None:
    """INFO lines on stderr; DEBUG for threedino-pipe's own loggers with ``verbose``. Called once per command."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger(PACKAGE).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
