"""PyTorch eager (and torch.compile) on the model folder: the reference the exports are checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdship.backends import Runner, register_backend


def _torch_runner(folder: Path, threads: int | None, compiled: bool) -> Runner:
    import torch

    from kdship.models import build_model

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("classify", str(folder)).to(device).eval()
    forward = torch.compile(model, dynamic=True) if compiled else model

    def run(feeds: dict[str, Any]):
        with torch.no_grad():
            logits = forward(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()}).logits
        return logits.float().cpu().numpy()

    return run


@register_backend("torch", variants=())
def torch_eager(folder: Path, threads: int | None) -> Runner:
    """PyTorch eager on the model folder (CUDA when available)."""
    return _torch_runner(folder, threads, compiled=False)


@register_backend("torch-compile", variants=())
def torch_compiled(folder: Path, threads: int | None) -> Runner:
    """torch.compile (inductor, dynamic shapes) on the model folder (CUDA when available)."""
    return _torch_runner(folder, threads, compiled=True)
