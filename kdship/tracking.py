"""Experiment tracking (`--report-to tensorboard|wandb|mlflow`, as HF Trainer's `report_to`) through Accelerate's
own tracker classes: the resolved config as hyperparameters at the start, the loss terms and learning rate every
LOG_EVERY steps, each evaluation, all against the optimizer step. Only the main process writes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from kdship.errors import require_extra

TRACKERS = {  # --report-to name -> (accelerate.tracking class, the module it needs, the pip extra)
    "tensorboard": ("TensorBoardTracker", "tensorboard", "tracking"),
    "wandb": ("WandBTracker", "wandb", "wandb"),
    "mlflow": ("MLflowTracker", "mlflow", "mlflow"),
}


def logging_dir_for(output: Path, logging_dir: str | None) -> Path:
    """Where tracker files go: --logging-dir, else `<output>-logs` beside the output (the output folder itself is
    only written, atomically, when the run ends)."""
    return Path(logging_dir) if logging_dir else output.parent / f"{output.name}-logs"


def flat_hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"data.max_length": 64, ...} with values trackers accept (str, int, float, bool)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_hyperparameters(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def start_trackers(names: list[str], run_name: str, logging_dir: Path, config: dict[str, Any]) -> list[Any]:
    import accelerate.tracking

    trackers = []
    for name in names:
        cls_name, module, extra = TRACKERS[name]
        require_extra(extra, f"--report-to {name}", module)
        cls = getattr(accelerate.tracking, cls_name)
        tracker = (cls(run_name, logging_dir=str(logging_dir)) if name == "tensorboard" else
                   cls(experiment_name=run_name, logging_dir=str(logging_dir)) if name == "mlflow" else cls(run_name))
        tracker.start()
        tracker.store_init_configuration(flat_hyperparameters(config))
        trackers.append(tracker)
    return trackers


@contextlib.contextmanager
def tracked(names: list[str], run_name: str, logging_dir: Path, config: dict[str, Any],
            shown: bool) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """Yields log(step, values); finishes every tracker when the run ends, however it ends."""
    trackers = start_trackers(names, run_name, logging_dir, config) if names and shown else []
    try:
        yield lambda step, values: [t.log(values, step=step) for t in trackers]
    finally:
        for tracker in trackers:
            tracker.finish()
