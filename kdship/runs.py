"""What `report` and `gate` read: saved artifacts only (kdship.json, eval.json, manifest.json, bench.json), found
in the folders given or one or two levels below them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdship.artifacts import RECORD_NAME
from kdship.errors import DataError, not_a_folder
from kdship.manifest import MANIFEST, read_manifest

FILES = (RECORD_NAME, "eval.json", "manifest.json", "bench.json", "gate.json")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "ece")
RETRIEVAL_METRICS = ("recall_at_1", "recall_at_5", "mrr")  # in-batch bi-encoders: no labels, pairs retrieve


LM_METRICS = ("perplexity", "lm_loss", "next_token_accuracy")  # causal LMs: lower perplexity is better


def is_lm_eval(ev: dict[str, Any]) -> bool:
    return ev.get("objective") == "clm"


def headline_metrics(ev: dict[str, Any]) -> tuple[str, ...]:
    """The metrics an eval.json reports for its kind of model; the first is the one retention is measured on (a
    causal LM's: perplexity, compared as a ratio)."""
    if is_lm_eval(ev):
        return LM_METRICS
    return CLASSIFICATION_METRICS if ev["label_names"] else RETRIEVAL_METRICS


@dataclass
class Runs:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> kdship.json (train/distill outputs)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> eval.json
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> manifest.json
    benches: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> bench.json
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> gate.json (kdship gate --json)

    def main_eval(self) -> dict[str, Any] | None:
        """The evaluation to headline: the last one that compares a student with its teacher."""
        with_teacher = [e for e in self.evals.values() if "comparison" in e]
        return (with_teacher or list(self.evals.values()) or [None])[-1]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} could not be read as JSON ({e}); rerun the command that wrote it") from None
    problem = _shape_problem(path.name, data)
    if problem:
        raise DataError(f"{path} is not the {path.name} kdship writes ({problem}); rerun the command that wrote it")
    return data


def _shape_problem(name: str, data: Any) -> str | None:
    """What report and gate read of each file, checked before they read it: None when it is all there."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if name == "eval.json":
        student = data.get("student")
        if not isinstance(student, dict) or "label_names" not in data:
            return "no student metrics or label names"
        metrics = headline_metrics(data)
        wrong = next((m for m in metrics if not isinstance(student.get(m), (int, float))), None)
        return f"student {wrong} is not a number" if wrong else None
    if name == "bench.json":
        rows = data.get("results")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "backend", "batch", "seq"} <= r.keys()
                                                 for r in rows):
            return "results are not a list of measured rows"
    if name == RECORD_NAME and not isinstance(data.get("metrics", {}), dict):
        return "metrics is not a mapping"
    return None


def _candidates(root: Path) -> list[Path]:
    return sorted({root, *(p for p in root.glob("*") if p.is_dir()), *(p for p in root.glob("*/*") if p.is_dir())})


def collect(paths: list[str]) -> Runs:
    runs = Runs()
    slots = {RECORD_NAME: runs.models, "eval.json": runs.evals, "manifest.json": runs.artifacts,
             "bench.json": runs.benches, "gate.json": runs.gates}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise DataError(f"{not_a_folder(root)}; give run folders (model, artifact, bench) or a folder holding them")
        for folder in _candidates(root):
            is_artifact = (folder / "manifest.json").exists()
            for name in FILES:
                if (folder / name).exists() and not (is_artifact and name == RECORD_NAME):  # a copy of the student's
                    slots[name][str(folder)] = read_manifest(folder) if name == MANIFEST else _read(folder / name)
    if not any((runs.models, runs.evals, runs.artifacts, runs.benches)):
        raise DataError(f"no kdship outputs (kdship.json, eval.json, manifest.json, bench.json) in {', '.join(paths)}")
    return runs
