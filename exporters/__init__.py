"""Export backends, registered by name (`kdship list exporters`). Installed as `kdship.exporters`.

Each backend is one module with one decorated function that writes its file into the artifact folder and returns
its path. A backend may build on another (`needs`): int8 quantises the optimised ONNX graph, for example; the
prerequisite's file is kept in the artifact too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdship.errors import ConfigError


@dataclass(frozen=True)
class Tolerance:
    """What a variant must meet against the PyTorch model: logits max-abs error, and label agreement."""

    max_abs: float
    min_agreement: float


@dataclass
class ExportContext:
    """What a backend reads: the student (model, tokenizer, folder), the config, and the files made so far."""

    model: Any
    tokenizer: Any
    student_dir: Path
    out_dir: Path
    config: Any  # kdship.config.ExportConfig
    calibration: list[dict[str, Any]] = field(default_factory=list)  # numpy feeds from real samples
    files: dict[str, Path] = field(default_factory=dict)  # exporter name -> file written
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # exporter name -> facts for the manifest


@dataclass(frozen=True)
class Exporter:
    name: str
    filename: str
    precision: str
    tolerance: Tolerance
    needs: str | None
    summary: str
    build: Callable[[ExportContext], Path]


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, filename: str, precision: str, tolerance: Tolerance,
                      needs: str | None = None) -> Callable:
    def wrap(fn: Callable[[ExportContext], Path]) -> Callable[[ExportContext], Path]:
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        EXPORTERS[name] = Exporter(name, filename, precision, tolerance, needs, summary, fn)
        return fn

    return wrap


def load_all() -> dict[str, Exporter]:
    """Import every backend module so its decorator runs."""
    from kdship.exporters import onnx_export, ort_variants  # noqa: F401

    return EXPORTERS


def get_exporter(name: str) -> Exporter:
    exporters = load_all()
    if name not in exporters:
        raise ConfigError(f"unknown export target {name!r}; valid targets: {', '.join(exporters)}")
    return exporters[name]


def build_order(targets: list[str]) -> list[Exporter]:
    """The requested exporters with their prerequisites first, each once."""
    order: list[Exporter] = []

    def add(name: str) -> None:
        exporter = get_exporter(name)
        if exporter.needs:
            add(exporter.needs)
        if exporter not in order:
            order.append(exporter)

    for target in targets:
        add(target)
    return order
