"""A servable classifier: artifact folder -> tokenizer, label names, a backend runner; texts -> labels + probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdship.backends import get_backend, model_file
from kdship.manifest import read_manifest
from kdship.errors import ModelError


@dataclass
class ServedModel:
    name: str
    tokenizer: Any
    label_names: list[str]
    input_names: list[str]
    max_length: int
    runner: Any
    manifest: dict[str, Any]
    file: Path

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="np")
        logits = self.runner({n: enc[n].astype(np.int64) for n in self.input_names})
        probs = _softmax(logits.astype(np.float64))
        exits = getattr(self.runner, "last_exits", None)  # an early-exit runner: the layer each text stopped at
        return [{"label": self.label_names[int(p.argmax())], "label_id": int(p.argmax()),
                 "probabilities": {name: float(v) for name, v in zip(self.label_names, p)},
                 **({"exit_layer": int(exits[i])} if exits is not None else {})} for i, p in enumerate(probs)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def load_served_model(folder: str | Path, backend: str, variant: str | None = None, threads: int | None = None,
                      verify: bool = True, exit_threshold: float | None = None,
                      exit_criterion: str = "confidence") -> ServedModel:
    """An artifact made by `kdship export` (or, for the torch backends, a model folder)."""
    from transformers import AutoConfig

    from kdship.exporters.onnx_export import input_names_for
    from kdship.models import load_tokenizer, max_tokens

    folder = Path(folder)
    chosen = get_backend(backend)
    path = model_file(folder, chosen, variant, verify)
    manifest = read_manifest(folder) or {}
    config = AutoConfig.from_pretrained(folder)
    if not config.id2label:
        raise ModelError(f"{folder} holds no label names (config.json id2label); export a classifier")
    tokenizer = load_tokenizer(str(folder), "artifact")
    max_length = max_tokens(manifest.get("max_length") or _trained_max_length(folder) or 128, config)
    if exit_threshold is None:
        runner = chosen.load(path, threads)
    else:
        from kdship.early_exit import ExitRunner

        runner = ExitRunner(ExitRunner.load_model(path, threads), exit_threshold, exit_criterion)
    return ServedModel(name=folder.name, tokenizer=tokenizer,
                       label_names=[str(config.id2label[i]) for i in range(len(config.id2label))],
                       input_names=input_names_for(tokenizer, config), max_length=int(max_length),
                       runner=runner, manifest=manifest, file=path)


def _trained_max_length(folder: Path) -> int | None:
    from kdship.artifacts import read_record

    record = read_record(folder) or {}
    return record.get("data", {}).get("max_length") or record.get("config", {}).get("data", {}).get("max_length")
