"""One rich console for every table kdship prints: full width in a terminal, 140 columns in logs and CI."""

from __future__ import annotations

import sys


def console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 140)
