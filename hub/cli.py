"""Command-line plumbing shared by `python -m hub`, `python -m train` and its tools."""

from __future__ import annotations

import logging
import sys


def setup_logging(*names: str) -> None:
    """Our own loggers at INFO; third-party ones (e.g. the HTTP client) only when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO)


def print_error(message: object) -> None:
    """`error: MESSAGE` on stderr as one write, so lines of several processes (torchrun) never interleave.

    `print` writes the text and its newline separately, and under `python -u` each is its own
    system call; two ranks failing at once then mixed their sentences on one line.
    """
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
