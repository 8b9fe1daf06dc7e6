"""Command-line plumbing shared by `python -m hub`, `python -m train` and its tools."""

from __future__ import annotations

import logging


def setup_logging(*names: str) -> None:
    """Our own loggers at INFO; third-party ones (e.g. the HTTP client) only when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO)
