"""Export backends, registered by name (`kdship list exporters`). Installed as `kdship.exporters`.

Each backend is one module with one decorated function that writes its file into the artifact folder and returns
its path. A backend may build on another (`needs`): int8 quantises the optimised ONNX graph, for example; the
prerequisite's file is kept in the artifact too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdship.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Tolerance:
    """What a variant must meet against the PyTorch model: logits max-abs error (None: not bounded, as for int8,
    whose logits move while its labels must not), and label agreement."""

    max_abs: float | None
    min_agreement: float


@dataclass
class ExportContext:
    """What a backend reads: the student (model, tokenizer, folder), the config, and the files made so far."""

    model: Any
    tokenizer: Any
    out_dir: Path
    config: Any  # kdship.config.ExportConfig
    calibration: list[dict[str, Any]] = field(default_factory=list)  # numpy feeds from real samples
    files: dict[str, Path] = field(default_factory=dict)  # exporter name -> file written
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # exporter name -> facts for the manifest


Runner = Callable[[dict[str, Any]], Any]  # numpy feeds by input name -> logits (numpy)


def onnxruntime_runner(path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                       threads: int | None = None) -> Runner:
    """Run an ONNX file with ONNX Runtime (on the CPU by default: the way a variant is checked)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as e:  # ORT's own error types: a truncated or foreign file is not a crash of kdship
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} cannot be loaded by ONNX Runtime ({reason}); the file is damaged or not an ONNX "
                         "model: re-export it") from None
    return lambda feeds: session.run(["logits"], feeds)[0]


@dataclass(frozen=True)
class Exporter:
    name: str
    filename: str
    precision: str
    tolerance: Tolerance
    needs: str | None
    summary: str
    build: Callable[[ExportContext], Path]
    load: Callable[[Path], Runner]  # how parity runs the file
    available: Callable[[], str | None]  # None when usable here, else why not and how to fix it


def _always() -> str | None:
    return None


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, filename: str, precision: str, tolerance: Tolerance, needs: str | None = None,
                      load: Callable[[Path], Runner] = onnxruntime_runner,
                      available: Callable[[], str | None] = _always) -> Callable:
    def wrap(fn: Callable[[ExportContext], Path]) -> Callable[[ExportContext], Path]:
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        EXPORTERS[name] = Exporter(name, filename, precision, tolerance, needs, summary, fn, load, available)
        return fn

    return wrap


LISTING_ORDER = ("onnx", "ort-opt", "fp16", "int8", "int8-static", "aoti", "tensorrt")


def load_all() -> dict[str, Exporter]:
    """Import every backend module so its decorator runs; listed in pipeline order, whatever the import order."""
    from kdship.exporters import aoti, onnx_export, ort_variants, tensorrt  # noqa: F401

    rank = {name: i for i, name in enumerate(LISTING_ORDER)}
    return {name: EXPORTERS[name] for name in sorted(EXPORTERS, key=lambda n: (rank.get(n, len(rank)), n))}


def get_exporter(name: str) -> Exporter:
    exporters = load_all()
    if name not in exporters:
        raise ConfigError(f"unknown export target {name!r}; valid targets: {', '.join(exporters)}")
    return exporters[name]


def build_order(targets: list[str]) -> list[Exporter]:
    """The requested exporters with their prerequisites first, each once; one unusable here is a clear error."""
    order: list[Exporter] = []

    def add(name: str) -> None:
        exporter = get_exporter(name)
        missing = exporter.available()
        if missing:
            raise ConfigError(f"export target {name!r} is not available here: {missing}")
        if exporter.needs:
            add(exporter.needs)
        if exporter not in order:
            order.append(exporter)

    for target in targets:
        add(target)
    return order
