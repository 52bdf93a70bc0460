"""A PyTorch-native compiled artifact: torch.export + AOTInductor package (`model.pt2`), for GPU users without
TensorRT (and CPU). Compiled for CUDA when it is available, else for the CPU; the device is in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdship.exporters import ExportContext, Runner, Tolerance, register_exporter
from kdship.exporters.onnx_export import exported_program


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def aoti_runner(path: Path) -> Runner:
    runner = torch._inductor.aoti_load_package(str(path))
    device = _device()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = runner(*(torch.from_numpy(v).to(device) for v in feeds.values()))
        return (out[0] if isinstance(out, (list, tuple)) else out).float().cpu().numpy()

    return run


def _compiler_missing() -> str | None:
    import shutil

    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        return None
    return "AOTInductor compiles C++ and no C++ compiler was found; install g++ (e.g. apt-get install g++)"


def _outputs(model: torch.nn.Module) -> dict[str, dict]:
    from kdship.early_exit import early_exit_settings

    labels = model.config.num_labels
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", labels]}}
    exits = early_exit_settings(model.config)
    if exits:
        outputs["exit_logits"] = {"dtype": "float32", "shape": ["batch", len(exits["layers"]), labels]}
    return outputs


@register_exporter("aoti", "model.pt2", "fp32", Tolerance(max_abs=1e-4, min_agreement=1.0), load=aoti_runner,
                   available=_compiler_missing)
def export_aoti(ctx: ExportContext) -> Path:
    """AOTInductor package (torch.export + ahead-of-time compile), dynamic batch and sequence."""
    device = _device()
    ctx.model.to(device)
    try:
        program, names = exported_program(ctx, device)
        path = ctx.out_dir / "model.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    finally:
        ctx.model.to("cpu")
    ctx.details["aoti"] = {"device": device, "torch": torch.__version__,
                           "io": {"inputs": {n: {"dtype": "int64", "shape": ["batch", "sequence"]} for n in names},
                                  "outputs": _outputs(ctx.model)}}
    return path
