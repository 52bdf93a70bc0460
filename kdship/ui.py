"""One rich console for every table kdship prints: full width in a terminal, 140 columns in logs and CI."""

from __future__ import annotations

import contextlib
import sys


def console():
    """Rank 0 prints; the other processes of a launched run are quiet (their output would repeat it)."""
    from rich.console import Console

    from kdship.runtime import is_main_process

    return Console(width=None if sys.stdout.isatty() else 140, quiet=not is_main_process())


def quiet_libraries() -> None:
    """Our own progress bar and messages are the output; transformers' per-file bars and hints are noise."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextlib.contextmanager
def without_log_message(start: str, logger: str = ""):
    """Drop one known, misleading log message of another library (by its start) while the block runs."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(start)

    target, drop = logging.getLogger(logger), Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)
