"""Inference backends, registered by name, shared by `kdship serve` and `kdship bench` (`kdship list backends`).

A backend turns a model file into a runner: numpy feeds by input name -> logits. Given an artifact folder, it picks
the first variant it can run from its preference list (or the one asked for). Adding one is one module and one
decorator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdship.manifest import read_manifest
from kdship.manifest import verify as verify_manifest
from kdship.errors import ConfigError, ModelError, not_a_folder

Runner = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    variants: tuple[str, ...]  # exporter names this backend runs, most preferred first; () = a model folder
    load: Callable[[Path, int | None], Runner]  # (file or folder, CPU threads) -> runner
    available: Callable[[], str | None]  # None when usable here, else why not and how to fix it


BACKENDS: dict[str, Backend] = {}


def _always() -> str | None:
    return None


def register_backend(name: str, variants: tuple[str, ...], available: Callable[[], str | None] = _always):
    def wrap(load: Callable[[Path, int | None], Runner]) -> Callable[[Path, int | None], Runner]:
        summary = (load.__doc__ or "").strip().splitlines()[0]
        BACKENDS[name] = Backend(name, summary, variants, load, available)
        return load

    return wrap


def load_all() -> dict[str, Backend]:
    from kdship.backends import onnxruntime_backends, compiled, torch_backends  # noqa: F401

    return BACKENDS


def get_backend(name: str) -> Backend:
    backends = load_all()
    if name not in backends:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(backends)}")
    backend = backends[name]
    missing = backend.available()
    if missing:
        raise ConfigError(f"backend {name!r} is not available here: {missing}")
    return backend


def model_file(folder: Path, backend: Backend, variant: str | None, verify: bool = True) -> Path:
    """The file (or, for PyTorch backends, the folder) the backend should load from an artifact or model folder;
    an artifact's files are checked against its manifest first (unless verify is False)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{not_a_folder(folder)}; give an artifact folder (kdship export) or a model folder")
    if not backend.variants:
        if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").exists():
            raise ModelError(f"backend {backend.name!r} needs a PyTorch model folder (with model.safetensors); "
                             f"{folder} has none: pass the student folder, or use an ONNX backend")
        from kdship.biencoder import SETTINGS_KEY

        config = folder / "config.json"
        if config.is_file() and SETTINGS_KEY in json.loads(config.read_text()):
            raise ModelError(f"{folder} is a dual-tower (match) model; bench and serve take classifiers only for now")
        return folder
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelError(f"{folder} has no manifest.json; make an artifact with `kdship export` first")
    exported = manifest["variants"]
    wanted = [variant] if variant else [v for v in backend.variants if v in exported]
    if variant and variant not in exported:
        raise ModelError(f"{folder} has no {variant!r} variant (it has: {', '.join(exported)}); export it with "
                         f"kdship export --to {variant}")
    if variant and variant not in backend.variants:
        raise ConfigError(f"backend {backend.name!r} cannot run the {variant!r} variant; it runs: "
                          f"{', '.join(backend.variants)}")
    if not wanted:
        raise ModelError(f"{folder} has no variant that backend {backend.name!r} runs ({', '.join(backend.variants)}); "
                         f"export one with kdship export --to {backend.variants[0]}")
    file = exported[wanted[0]]["file"]
    if verify:
        verify_manifest(folder, manifest, file)
    return folder / file
