"""`kdship list WHAT`: every registry keyed by name, in one table."""

from __future__ import annotations

from typing import Callable

from kdship.errors import ConfigError


def _losses() -> dict[str, str]:
    from kdship.losses import LOSSES

    return {name: f"{d.summary} [needs: {', '.join(sorted(d.needs))}]" for name, d in sorted(LOSSES.items())}


def _exporters() -> dict[str, str]:
    from kdship.exporters import load_all

    return {name: f"{e.summary} -> {e.filename}" for name, e in load_all().items()}


def _backends() -> dict[str, str]:
    from kdship.backends import load_all

    return {name: b.summary + (f" [not here: {b.available()}]" if b.available() else "")
            for name, b in load_all().items()}


def _techniques() -> dict[str, str]:
    from kdship.techniques import summaries

    return summaries()


REGISTRIES: dict[str, Callable[[], dict[str, str]]] = {"losses": _losses, "techniques": _techniques,
                                                       "exporters": _exporters, "backends": _backends}


def list_components(what: str) -> None:
    from kdship.ui import console
    from rich.markup import escape
    from rich.table import Table

    if what not in REGISTRIES:
        raise ConfigError(f"nothing called {what!r} to list; choose one of: {', '.join(REGISTRIES)}")
    table = Table(title=f"kdship {what}")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    for name, summary in REGISTRIES[what]().items():
        table.add_row(name, escape(summary))
    console().print(table)
