"""Shared by the benchmark scripts: device naming and result files (JSON with the device, plus the run log)."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

def _quiet_libraries() -> None:
    """The logs hold kdship's progress and results; transformers' load reports and per-file bars are noise."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


_quiet_libraries()
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    from kdship.artifacts import atomic_write_json, library_versions

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "device": device_name(), "commit": git_commit(),
                             "date": time.strftime("%Y-%m-%d"), "versions": library_versions(), **payload})
    return path
