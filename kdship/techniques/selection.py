"""Sample-value selection: a small trained model judges which samples are worth a gradient step for the large one.
value(x) = loss_large(x) - loss_small(x): high when the large model has not yet learnt what the small model already
knows (the "reducible holdout loss" of RHO-LOSS, Mindermann et al. 2022). Each step scores an over-sampled batch
and trains on the top fraction (topk) or on a fraction drawn with probability softmax(value) (weighted)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdship.config import SelectionConfig
from kdship.data import model_inputs, targets
from kdship.loop import Step, StepInput, StepResult
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per example: classification [batch, classes], or MLM [batch, seq, vocab] averaged over the
    masked positions of each example (labels -100 elsewhere)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    masked = labels.ne(-100).float()
    return (token * masked).sum(1) / masked.sum(1).clamp_min(1.0)


def example_losses(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each example's loss under `model`: against its label, its masked tokens, or (in-batch matching, where a
    batch has no labels) its own partner among the batch's."""
    logits = model(**model_inputs(batch)).logits
    return per_example_loss(logits, targets(batch, logits))


def select_topk(values: Tensor, ratio: float) -> Tensor:
    """Indices of the ceil(ratio·n) highest values, highest first."""
    return torch.topk(values, kept_count(values.numel(), ratio)).indices


def select_weighted(values: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """ceil(ratio·n) indices drawn without replacement with probability softmax(value): valuable samples are
    likelier, every sample keeps a chance (less brittle than top-k when the small model is wrong)."""
    return torch.multinomial(torch.softmax(values.float(), 0), kept_count(values.numel(), ratio), replacement=False,
                             generator=generator)


def kept_count(candidates: int, ratio: float) -> int:
    """How many of a batch's candidates get the gradient step."""
    return max(1, math.ceil(ratio * candidates))


def candidates_per_step(batch_size: int, ratio: float) -> int:
    """How many samples to score so that ratio of them fill one training batch."""
    return math.ceil(batch_size / ratio)


COUNTS = ("candidates", "selected", "large_scoring_rows", "value_selected_sum", "value_rejected_sum")


class Selector:
    """Scores each over-sampled batch and keeps the valuable samples. The small model's losses are computed once
    when an example's loss depends on it alone (classification); otherwise (random masking, in-batch negatives)
    per batch. The trained model re-scores a sample at most every `refresh` steps."""

    def __init__(self, small: torch.nn.Module, large: torch.nn.Module, ratio: float, mode: str, refresh: int,
                 n_examples: int, small_losses: Tensor | None, seed: int = 0):
        self.small, self.large = small, large
        self.ratio, self.mode, self.refresh, self.seed = ratio, mode, refresh, seed
        self.small_losses = small_losses
        # Buffers, not attributes: the loop checkpoints them, so a resumed run reuses scores and keeps its counts.
        self.memory = torch.nn.Module()
        self.memory.register_buffer("large_losses", torch.zeros(n_examples))
        self.memory.register_buffer("scored_at", torch.full((n_examples,), -(10**9), dtype=torch.long))
        self.memory.register_buffer("counts", torch.zeros(len(COUNTS), dtype=torch.float64))
        self.last: dict[str, float] = {}  # the last batch's mean value of kept and dropped samples

    @property
    def stats(self) -> dict[str, float]:
        return dict(zip(COUNTS, self.memory.counts.tolist()))

    def _count(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.memory.counts[COUNTS.index(name)] += amount

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
        was_training = model.training
        model.eval()  # no dropout noise in the scores
        losses = example_losses(model, {k: v[rows.to(v.device)] for k, v in batch.items()}).cpu()
        model.train(was_training)
        return losses

    def values(self, batch: dict[str, Tensor], indices: list[int], step: int) -> Tensor:
        idx = torch.tensor(indices)
        memory = self.memory
        stale = (step - memory.scored_at[idx]) >= self.refresh
        if stale.any():
            memory.large_losses[idx[stale]] = self._score(self.large, batch, torch.arange(len(idx))[stale])
            memory.scored_at[idx[stale]] = step
            self._count(large_scoring_rows=int(stale.sum()))
        small = (self.small_losses[idx] if self.small_losses is not None
                 else self._score(self.small, batch, torch.arange(len(idx))))
        return memory.large_losses[idx] - small

    def choose(self, batch: dict[str, Tensor], indices: list[int], step: int) -> Tensor:
        """The rows of the batch that get the gradient step. Weighted draws are seeded by the step and the
        candidates (micro-batches of one step differ), so a resumed run draws what the uninterrupted one did."""
        values = self.values(batch, indices, step)
        if self.mode == "weighted":
            seed = hash((self.seed, step, tuple(indices))) & 0x7FFFFFFF  # ints hash the same in every process
            keep = select_weighted(values, self.ratio, torch.Generator().manual_seed(seed))
        else:
            keep = select_topk(values, self.ratio)
        rejected = torch.ones(len(values), dtype=torch.bool)
        rejected[keep] = False
        self._count(candidates=len(indices), selected=len(keep), value_selected_sum=float(values[keep].sum()),
                    value_rejected_sum=float(values[rejected].sum()))
        # for the progress line: the values are on the CPU already, so reading them costs no GPU sync
        self.last = {"value_kept": float(values[keep].mean()),
                     "value_dropped": float(values[rejected].mean()) if rejected.any() else 0.0}
        return keep

    def summary(self, runtime: Runtime | None = None) -> dict[str, float]:
        """The selection's counts, summed over processes when a runtime is given (every process calls it)."""
        s = {k: runtime.total(v) for k, v in self.stats.items()} if runtime else self.stats
        rejected = s["candidates"] - s["selected"]
        return {"mode": self.mode, "ratio": self.ratio, "refresh": self.refresh, "candidates": int(s["candidates"]),
                "selected": int(s["selected"]), "large_scoring_rows": int(s["large_scoring_rows"]),
                "mean_value_selected": s["value_selected_sum"] / max(s["selected"], 1),
                "mean_value_rejected": s["value_rejected_sum"] / rejected if rejected else None}


class SampleSelection(Technique):
    """The technique around the step: the selector picks the rows of each over-sampled batch that get the step."""

    def __init__(self, selector: Selector, settings: SelectionConfig, candidates: int):
        self.selector, self.settings, self.candidates = selector, settings, candidates

    def wrap(self, step: Step) -> Step:
        def selected_step(x: StepInput) -> StepResult:
            result = step(x.rows(self.selector.choose(x.tensors, x.indices, x.step)))
            return result.logging(self.selector.last)

        return selected_step

    def memory(self) -> dict[str, torch.nn.Module]:
        return {"selection": self.selector.memory}

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"selection": {"by": self.settings.by, "candidates_per_step": self.candidates,
                              **self.selector.summary(runtime)}}


def build_selection(settings: SelectionConfig, context: TechniqueContext) -> SampleSelection:
    """The scoring model loaded and checked, and its losses computed once when they cannot change (labelled
    data), each process scoring a share."""
    from kdship.run import predict_everywhere
    from kdship.techniques.small_model import load_small_model

    cfg, runtime, train = context.cfg, context.runtime, context.train
    small = load_small_model(settings.by, "scoring model", cfg, context.tokenizer, context.target.model,
                             runtime.device)
    small_losses = None
    if cfg.labelled:
        logits = predict_everywhere(small, context.tokenizer, train, cfg.eval_batch_size, runtime).cpu()
        small_losses = per_example_loss(logits, torch.tensor(train.labels))
    selector = Selector(small, context.target.model, settings.ratio, settings.mode, settings.refresh,
                        len(train.features), small_losses, cfg.seed)
    return SampleSelection(selector, settings, candidates_per_step(cfg.batch_size, settings.ratio))


SELECTION = TechniqueDef("selection", "sample-value selection: a small trained model's loss against the trained "
                                      "model's picks the samples worth a step (RHO-LOSS, Mindermann et al. 2022)",
                         build_selection, sharded_ok=False,
                         # each step draws enough candidates that `ratio` of them fill the batch
                         draw_size=lambda settings, batch_size: candidates_per_step(batch_size, settings.ratio))
