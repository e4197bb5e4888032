"""Logging of a ``3dino`` process: plain lines on stderr, chatty third-party loggers quietened."""

from __future__ import annotations

import logging
import sys

# libraries imported on the way (pandas and blosc2 import numexpr) that log at INFO level
QUIET_LOGGERS = ("numexpr",)


def configure_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) messages as plain lines on stderr; called once by each command."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
