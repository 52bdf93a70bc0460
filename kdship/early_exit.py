"""Early-exit classifiers (layer-wise self-distillation, as in DeeBERT, Xin et al. 2020, and BERxiT, Xin et al.
2021): small classifier heads on chosen transformer layers, trained beside the final classifier and taught by it
(kdship.techniques.early_exit). At inference a row stops at the first exit that is sure enough (its top
probability at or above a threshold, or its normalised entropy at or below one), and the forward stops after the
layer at which every row of the batch has stopped: at batch 1 each input runs only the layers it needs.

A model folder is the transformers classifier's save_pretrained plus a `kdship_early_exit` entry in config.json
(the exit layers) and `exit_heads.safetensors`. kdship loads such a folder as an EarlyExitModel, whose output
carries `exit_logits` (one [batch, labels] tensor per exit) beside the final `logits`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

SETTINGS_KEY = "kdship_early_exit"
HEADS_FILE = "exit_heads.safetensors"
CRITERIA = ("confidence", "entropy")


def early_exit_settings(config: Any) -> dict[str, Any] | None:
    return getattr(config, SETTINGS_KEY, None)


@dataclass
class EarlyExitOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    exit_logits: tuple[Tensor, ...] | None = None  # one per exit layer, shallowest first


class ExitHead(nn.Module):
    """A classifier on one layer's first-token state, shaped like BERT's pooler + classifier."""

    def __init__(self, width: int, labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, labels)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.dropout(torch.tanh(self.dense(hidden[:, 0]))))


class EarlyExitModel(nn.Module):
    """A transformers sequence classifier with exit heads after the given layers (1-based, below the last)."""

    def __init__(self, model: nn.Module, layers: list[int]):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        config = model.config
        dropout = getattr(config, "hidden_dropout_prob", getattr(config, "dropout", 0.1)) or 0.0
        self.heads = nn.ModuleList(ExitHead(config.hidden_size, config.num_labels, dropout) for _ in self.layers)
        setattr(config, SETTINGS_KEY, {"layers": self.layers})

    @property
    def config(self) -> Any:
        return self.model.config

    def set_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation(name)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False, **inputs: Tensor) -> EarlyExitOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True,
                         output_attentions=output_attentions, **inputs)
        exits = tuple(head(out.hidden_states[layer]) for layer, head in zip(self.layers, self.heads))
        return EarlyExitOutput(loss=out.loss, logits=out.logits, attentions=out.attentions, exit_logits=exits,
                               hidden_states=out.hidden_states if output_hidden_states else None)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The classifier's folder and the exit heads beside it; `state_dict` (this module's, e.g. gathered from
        FSDP shards) replaces the live weights."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        self.model.save_pretrained(folder, state_dict=part("model."))
        save_file({k: v.contiguous() for k, v in part("heads.").items()}, Path(folder) / HEADS_FILE)


def with_exit_heads(model: nn.Module, layers: list[int], source: str | None = None) -> EarlyExitModel:
    """`model` with exit heads after `layers`, their weights read from `source`'s exit_heads.safetensors when it has
    them (a model saved with exits)."""
    wrapped = EarlyExitModel(model, layers)
    heads = Path(source) / HEADS_FILE if source else None
    if heads is not None and heads.is_file():
        from safetensors.torch import load_file

        saved = load_file(heads)
        fresh = wrapped.heads.state_dict()
        if saved.keys() == fresh.keys() and all(saved[k].shape == fresh[k].shape for k in saved):
            wrapped.heads.load_state_dict(saved)  # (heads of another label count start afresh, as the classifier)
    return wrapped


def exit_scores(logits: Tensor, criterion: str) -> Tensor:
    """How sure each row is: its top probability (confidence), or minus its entropy over log(labels) (entropy, so
    that higher is surer for both)."""
    probs = logits.float().softmax(-1)
    if criterion == "confidence":
        return probs.max(-1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(logits.shape[-1])
    return -entropy


def passes(logits: Tensor, threshold: float, criterion: str) -> Tensor:
    """Rows sure enough to stop here: confidence >= threshold, or normalised entropy <= threshold."""
    score = exit_scores(logits, criterion)
    return score >= threshold if criterion == "confidence" else score >= -threshold


class _AllRowsExited(Exception):
    """Raised from a layer's hook once every row has stopped: the rest of the forward is not run."""


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers (the ModuleList as long as it has layers)."""
    wanted = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == wanted:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {wanted} transformer layers found for early exit")


@contextlib.contextmanager
def _exit_hooks(model: EarlyExitModel, decide: Any) -> Iterator[None]:
    layers = encoder_layers(model.model)
    hooks = [layers[layer - 1].register_forward_hook(
        lambda _m, _in, out, i=i: decide(i, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(model.layers)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def predict_with_exits(model: EarlyExitModel, inputs: dict[str, Tensor], threshold: float,
                       criterion: str = "confidence") -> tuple[Tensor, Tensor]:
    """(logits, exit layer) per row: each row's first exit that passes decides; the final layer decides the rest.
    The forward stops after the layer at which every row has decided."""
    batch = inputs["input_ids"].shape[0]
    logits = torch.zeros(batch, model.config.num_labels, device=inputs["input_ids"].device)
    exit_layer = torch.full((batch,), model.config.num_hidden_layers, device=logits.device)
    open_rows = torch.ones(batch, dtype=torch.bool, device=logits.device)

    def decide(i: int, hidden: Tensor) -> None:
        z = model.heads[i](hidden).float()
        stop = open_rows & passes(z, threshold, criterion)
        logits[stop] = z[stop]
        exit_layer[stop] = model.layers[i]
        open_rows.logical_and_(~stop)
        if not open_rows.any():
            raise _AllRowsExited()

    model.eval()
    with _exit_hooks(model, decide):
        try:
            final = model.model(**inputs).logits.float()
            logits[open_rows] = final[open_rows]
        except _AllRowsExited:
            pass
    return logits, exit_layer


def exit_distribution(exit_layers: Tensor, layers: int) -> dict[str, float]:
    """Share of rows that stopped at each layer (1-based; the last layer is the final classifier)."""
    counts = torch.bincount(exit_layers.long().cpu(), minlength=layers + 1)[1:].float()
    return {str(i + 1): round(float(c / max(len(exit_layers), 1)), 4) for i, c in enumerate(counts) if c > 0}


def check_exit_layers(layers: list[int], model_layers: int) -> list[int]:
    """Exit layers as given, or every layer below the last; each must lie in 1..layers-1, once."""
    chosen = sorted(set(layers or range(1, model_layers)))
    bad = [layer for layer in chosen if not 1 <= layer < model_layers]
    if not chosen:
        raise ValueError(f"a {model_layers}-layer student has no layer below its last for an exit; give it more layers")
    if bad or len(chosen) != len(layers or chosen):
        raise ValueError(f"exit layers {layers} must be distinct layers in 1..{model_layers - 1} of this "
                         f"{model_layers}-layer student (the last layer has the final classifier)")
    return chosen


def exit_kd_loss(exits: tuple[Tensor, ...], final: Tensor, labels: Tensor, alpha: float,
                 temperature: float) -> Tensor:
    """Each exit learns the final classifier's soft predictions (weight alpha) and the labels (1 - alpha), mean over
    exits: (1 - α)·CE(exit, y) + α·T²·KL(p_final^T || p_exit^T), the final layer detached (it teaches, it is not
    pulled towards its exits)."""
    from kdship.losses import soft_kl

    teacher = final.detach()
    terms = [(1 - alpha) * F.cross_entropy(z.float(), labels) + alpha * soft_kl(z, teacher, temperature)
             for z in exits]
    return torch.stack(terms).mean()


DEFAULT_THRESHOLDS = {"confidence": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99], "entropy": [0.6, 0.4, 0.3, 0.2, 0.1, 0.05]}


class ExitRunner:
    """A bench/serve runner of a model with exits on PyTorch: numpy feeds -> logits, each row decided by its first
    exit that passes `threshold`; `last_exits` holds the exit layer of each row of the last call."""

    def __init__(self, model: EarlyExitModel, threshold: float, criterion: str = "confidence"):
        self.model, self.threshold, self.criterion = model, threshold, criterion
        self.device = next(model.parameters()).device
        self.last_exits = None

    @staticmethod
    def load_model(folder: Path, threads: int | None) -> EarlyExitModel:
        """The model of a folder with exits, on CUDA when available (a clear error for one without)."""
        from kdship.errors import ConfigError
        from kdship.models import build_model

        if threads:
            torch.set_num_threads(threads)
        model = build_model("classify", str(folder), keep_exits=True)
        if not isinstance(model, EarlyExitModel):
            raise ConfigError(f"{folder} has no early exits, so --exit-threshold cannot apply; distil or train it with "
                              "--exits (early_exit:) first")
        return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def __call__(self, feeds: dict[str, Any]) -> Any:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
        logits, exits = predict_with_exits(self.model, inputs, self.threshold, self.criterion)
        self.last_exits = exits.cpu().numpy()
        return logits.cpu().numpy()


@torch.no_grad()
def exit_curve(model: EarlyExitModel, batches: list[dict[str, Tensor]], labels: Tensor,
               thresholds: list[float], criterion: str = "confidence") -> dict[str, Any]:
    """Accuracy of each exit alone and of the final classifier, and at each threshold the accuracy, the mean exit
    layer and the share of rows stopping at each layer (per row the same whatever the batch)."""
    model.eval()
    outputs = [model(**b) for b in batches]
    finals = torch.cat([o.logits.float().cpu() for o in outputs])
    exits = [torch.cat([o.exit_logits[i].float().cpu() for o in outputs]) for i in range(len(model.layers))]
    accuracy = lambda logits: float(logits.argmax(-1).eq(labels).float().mean())  # noqa: E731
    curve = []
    for threshold in thresholds:
        decided = finals.clone()
        layer = torch.full((len(labels),), model.config.num_hidden_layers)
        open_rows = torch.ones(len(labels), dtype=torch.bool)
        for z, at in zip(exits, model.layers):
            stop = open_rows & passes(z, threshold, criterion)
            decided[stop], layer[stop] = z[stop], at
            open_rows &= ~stop
        curve.append({"threshold": threshold, "accuracy": accuracy(decided),
                      "mean_exit_layer": float(layer.float().mean()),
                      "layers_saved": 1.0 - float(layer.float().mean()) / model.config.num_hidden_layers,
                      "exit_distribution": exit_distribution(layer, model.config.num_hidden_layers)})
    return {"criterion": criterion, "layers": model.layers, "num_layers": model.config.num_hidden_layers,
            "final_accuracy": accuracy(finals),
            "exit_accuracy": {str(at): accuracy(z) for z, at in zip(exits, model.layers)}, "curve": curve}


@torch.no_grad()
def exit_latency(model: EarlyExitModel, inputs: list[dict[str, Tensor]], thresholds: list[float],
                 criterion: str = "confidence", repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Mean latency of one input at a time (batch 1, each at its own length) through all layers and at each
    threshold, over the same real inputs: where each input stops depends on the input, so a fixed input would
    say nothing. The settings are interleaved per input (their order rotated), and each speedup over all layers
    is the ratio of means with a bootstrap 95% interval over the inputs."""
    import time

    import numpy as np

    model.eval()
    cuda = next(model.parameters()).is_cuda
    settings: list[float | None] = [None, *thresholds]

    def run(setting: float | None, x: dict[str, Tensor]) -> None:
        if setting is None:
            model.model(**x)
        else:
            predict_with_exits(model, x, setting, criterion)
        if cuda:
            torch.cuda.synchronize()

    for setting in settings:  # warm-up
        run(setting, inputs[0])
    times = np.zeros((len(settings), len(inputs)))
    for r in range(repeats):
        for j, x in enumerate(inputs):
            shift = (j + r) % len(settings)
            for k in [*range(shift, len(settings)), *range(shift)]:
                started = time.perf_counter()
                run(settings[k], x)
                times[k, j] += time.perf_counter() - started
    times *= 1000 / repeats
    picks = np.random.default_rng(seed).integers(0, len(inputs), size=(1000, len(inputs)))
    points = []
    for k, threshold in enumerate(thresholds, start=1):
        ratios = times[0, picks].mean(1) / times[k, picks].mean(1)
        points.append({"threshold": threshold, "mean_ms": float(times[k].mean()),
                       "speedup_vs_all_layers": float(times[0].mean() / times[k].mean()),
                       "speedup_ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]})
    return {"inputs": len(inputs), "batch": 1, "repeats": repeats, "all_layers_mean_ms": float(times[0].mean()),
            "thresholds": points}
