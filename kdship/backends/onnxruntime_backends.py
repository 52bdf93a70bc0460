"""ONNX Runtime on the CPU and on CUDA."""

from __future__ import annotations

from pathlib import Path

from kdship.backends import Runner, register_backend
from kdship.exporters import onnxruntime_runner


def _cuda_provider_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return "onnxruntime has no CUDA execution provider here; pip install onnxruntime-gpu on a machine with a GPU"


@register_backend("ort-cpu", variants=("ort-opt", "onnx", "int8", "int8-static", "fp16"))
def ort_cpu(path: Path, threads: int | None) -> Runner:
    """ONNX Runtime, CPU execution provider."""
    return onnxruntime_runner(path, ("CPUExecutionProvider",), threads)


@register_backend("ort-cuda", variants=("fp16", "ort-opt", "onnx"), available=_cuda_provider_missing)
def ort_cuda(path: Path, threads: int | None) -> Runner:
    """ONNX Runtime, CUDA execution provider."""
    return onnxruntime_runner(path, ("CUDAExecutionProvider", "CPUExecutionProvider"), threads)
