"""Compiled engines made by kdship export: TensorRT plans and AOTInductor packages."""

from __future__ import annotations

from pathlib import Path

from kdship.backends import Runner, register_backend


def _tensorrt_missing() -> str | None:
    from kdship.exporters.tensorrt import _unavailable

    return _unavailable()


@register_backend("tensorrt", variants=("tensorrt",), available=_tensorrt_missing)
def tensorrt(path: Path, threads: int | None) -> Runner:
    """TensorRT / TensorRT-RTX engine (model.plan), checked against the GPU and version it was built for."""
    from kdship.exporters.tensorrt import tensorrt_runner

    return tensorrt_runner(path)


@register_backend("aoti", variants=("aoti",))
def aoti(path: Path, threads: int | None) -> Runner:
    """AOTInductor package (model.pt2)."""
    from kdship.exporters.aoti import aoti_runner

    return aoti_runner(path)
