"""Shared by the benchmark scripts: device naming and result files (JSON with the device, plus the run log)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from kdship.ui import quiet_libraries

quiet_libraries()  # the logs hold kdship's progress and results, not transformers' load reports

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared beside the checkout; KDSHIP_SHARED names another copy (the GPU machine gets one carried in the checkout)
SHARED = Path(os.environ.get("KDSHIP_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def device_name() -> str:
    import torch

    from kdship.bench import cpu_name

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


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
