"""The teacher of a distillation as its step sees it: `outputs(batch, indices)` whether its outputs are computed
now or were cached, one teacher or several combined, its logits in its own label space or mapped into the
student's (cross-task), or no teacher model at all when no loss reads one."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdship.artifacts import read_record, sha256_file
from kdship.data import model_inputs
from kdship.logit_cache import TopKCache
from kdship.models import captured_qkv
from kdship.runtime import Runtime
from kdship.trainee import ATTENTIONS, HIDDEN


@dataclass
class TeacherOutputs:
    logits: torch.Tensor
    hidden_states: Any = None
    attentions: Any = None
    qkv: dict[int, list[torch.Tensor]] | None = None  # teacher layer -> its query, key and value projections
    token_ids: torch.Tensor | None = None  # top-K cache: the vocabulary ids `logits` (log-probabilities) are for


def combined_logits(logits: list[torch.Tensor], weighting: str, weights: list[float] | None,
                    temperature: float) -> torch.Tensor:
    """Several teachers as one: scores whose softmax at `temperature` is the weighted mean of the teachers'
    softmaxes at it, so soft-label KD at that temperature learns exactly the mixture. Weights: equal (mean), given
    (weights, normalised), or per example each teacher's top probability, normalised (confidence: a teacher that
    is sure of an example has more say on it). One teacher: its logits unchanged."""
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([F.log_softmax(z.float() / temperature, -1) for z in logits])  # [teachers, rows, K]
    if weighting == "confidence":
        sure = log_probs.exp().amax(-1, keepdim=True)
        mix = sure / sure.sum(0, keepdim=True)
    elif weighting == "weights":
        given = torch.tensor(weights, dtype=log_probs.dtype, device=log_probs.device)
        mix = (given / given.sum())[:, None, None]
    else:
        mix = torch.full((len(logits), 1, 1), 1.0 / len(logits), device=log_probs.device)
    return temperature * torch.logsumexp(log_probs + mix.clamp_min(1e-12).log(), 0)


class Teacher:
    """`models` (none when no loss reads a teacher), combined by `weighting`; `cache` holds the combined logits of
    every training example when that is all the losses read, `topk` a causal LM's top-K cache on disk (then the
    models are unloaded); `label_map` (cross-task) maps logits into the student's label space. Feature outputs
    (hidden states, attention maps, q/k/v) come from the first teacher."""

    def __init__(self, models: list[nn.Module], sources: list[str], tokenizer: Any, label_names: list[str] | None,
                 parameters: int | None, wants: frozenset[str] = frozenset(), qkv_layers: frozenset[int] = frozenset(),
                 weighting: str = "mean", weights: list[float] | None = None, temperature: float = 1.0):
        self.models, self.sources, self.tokenizer, self.label_names = models, sources, tokenizer, label_names
        self.parameters, self.wants, self.qkv_layers = parameters, wants, qkv_layers
        self.weighting, self.weights, self.temperature = weighting, weights, temperature
        self.cache: torch.Tensor | None = None
        self.topk: TopKCache | None = None
        self.topk_built_here = False  # the run ran the teacher to write its top-K cache
        self.label_map: nn.Module | None = None
        self.memory = nn.Module()  # checkpointed with the run: a resumed record counts the whole run's calls
        self.memory.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))

    @property
    def model(self) -> nn.Module | None:
        return self.models[0] if self.models else None

    @property
    def source(self) -> str | None:
        return self.sources[0] if self.sources else None

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return combined_logits(logits, self.weighting, self.weights, self.temperature)

    def mapped(self, logits: torch.Tensor) -> torch.Tensor:
        return self.label_map(logits.float()) if self.label_map is not None else logits

    def outputs(self, batch: dict[str, torch.Tensor], indices: list[int]) -> TeacherOutputs | None:
        if self.topk is not None:
            log_probs, token_ids = self.topk.outputs(batch["labels"], indices)
            return TeacherOutputs(log_probs, token_ids=token_ids)
        if self.cache is not None:
            return TeacherOutputs(self.mapped(self.cache[torch.as_tensor(indices, device=self.cache.device)]))
        if not self.models:
            return None
        inputs = model_inputs(batch)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            qkv = {layer: stack.enter_context(captured_qkv(self.model, layer)) for layer in sorted(self.qkv_layers)}
            first = self.model(**inputs, output_hidden_states=HIDDEN in self.wants,
                               output_attentions=ATTENTIONS in self.wants)
            others = [m(**inputs).logits for m in self.models[1:]]
        self.memory.forward_calls += len(self.models)  # a CPU tensor: counting costs no device sync
        logits = self.mapped(self.combine([first.logits, *others]))
        return TeacherOutputs(logits, first.hidden_states, first.attentions, qkv)

    def predict(self, encoded: Any, batch_size: int, runtime: Runtime, mapped: bool = True) -> torch.Tensor:
        """The (combined, and with `mapped` label-mapped) logits of every example, on this process's device, each
        process predicting a share."""
        from kdship.run import predict_everywhere

        logits = self.combine([predict_everywhere(m, self.tokenizer, encoded, batch_size, runtime)
                               for m in self.models])
        return self.mapped(logits) if mapped else logits

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (combined) teachers' scores for model inputs."""
        return self.combine([m(**inputs).logits for m in self.models])

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"teacher_read": bool(self.models) or self.topk_built_here,
                "teacher_cache": self.cache is not None or self.topk is not None,
                "teacher_forward_calls": int(runtime.total(int(self.memory.forward_calls))),
                **({"teacher_topk_cache": self._topk_record()} if self.topk else {})}

    def _topk_record(self) -> dict[str, Any]:
        made_here = {"folder": "the run folder (removed when the run ends)"} if self.topk_built_here else {}
        return self.topk.record() | made_here

    def identity(self) -> dict[str, Any]:
        """Where the teacher came from, for the record (every teacher, when there are several)."""
        if not self.sources:
            return {"source": None, "teacher_free": True}
        first = teacher_identity(self.sources[0]) | {"parameters": self.parameters}
        if len(self.sources) == 1:
            return first
        return first | {"teachers": [teacher_identity(s) for s in self.sources], "weighting": self.weighting,
                        "weights": self.weights}


def teacher_identity(source: str) -> dict[str, Any]:
    record = read_record(Path(source)) if Path(source).is_dir() else None
    identity: dict[str, Any] = {"source": source}
    weights = Path(source) / "model.safetensors"
    if weights.is_file():
        identity["weights_sha256"] = sha256_file(weights)
    if record:
        identity |= {"command": record.get("command"), "metrics": record.get("metrics"), "data": record.get("data")}
    return identity

