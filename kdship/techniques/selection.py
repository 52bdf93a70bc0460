"""Sample-value selection: a small trained model judges which samples are worth a gradient step for the large one.
value(x) = loss_large(x) - loss_small(x): high when the large model has not yet learnt what the small model already
knows (the "reducible holdout loss" of RHO-LOSS, Mindermann et al. 2022). Each step scores an over-sampled batch
and trains on the top fraction (topk) or on all samples weighted by value (weighted)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per example: classification [batch, classes], or MLM [batch, seq, vocab] averaged over the
    masked positions of each example (labels -100 elsewhere)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    masked = labels.ne(-100).float()
    return (token * masked).sum(1) / masked.sum(1).clamp_min(1.0)


def select_topk(values: Tensor, ratio: float) -> Tensor:
    """Indices of the ceil(ratio·n) highest values, highest first."""
    k = max(1, math.ceil(ratio * values.numel()))
    return torch.topk(values, k).indices


def value_weights(values: Tensor) -> Tensor:
    """Weights ∝ softmax(value), scaled to mean 1, so the loss keeps its size while valuable samples count more."""
    return torch.softmax(values.float(), 0) * values.numel()


def candidates_per_step(batch_size: int, ratio: float) -> int:
    """How many samples to score so that ratio of them fill one training batch."""
    return math.ceil(batch_size / ratio)


class Selector:
    """Scores each over-sampled batch and keeps the valuable samples. The small model's losses are computed once
    when the inputs are fixed (classification); with random masking (MLM) they are computed per batch. The large
    model re-scores a sample at most every `refresh` steps."""

    def __init__(self, small: torch.nn.Module, large: torch.nn.Module, ratio: float, mode: str, refresh: int,
                 n_examples: int, small_losses: Tensor | None, autocast=None):
        self.small, self.large = small, large
        self.autocast = autocast
        self.ratio, self.mode, self.refresh = ratio, mode, refresh
        self.small_losses = small_losses
        self.large_losses = torch.zeros(n_examples)
        self.scored_at = torch.full((n_examples,), -(10**9), dtype=torch.long)
        self.stats = {"candidates": 0, "selected": 0, "large_scoring_rows": 0, "value_selected_sum": 0.0,
                      "value_rejected_sum": 0.0}

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
        was_training = model.training
        model.eval()  # no dropout noise in the scores
        inputs = {k: v[rows] for k, v in batch.items() if k != "labels"}
        with self.autocast() if self.autocast else torch.autocast("cpu", enabled=False):
            logits = model(**inputs).logits
        losses = per_example_loss(logits, batch["labels"][rows]).cpu()
        model.train(was_training)
        return losses

    def values(self, batch: dict[str, Tensor], indices: list[int], step: int) -> Tensor:
        idx = torch.tensor(indices)
        everyone = torch.arange(len(indices), device=batch["input_ids"].device)
        stale = (step - self.scored_at[idx]) >= self.refresh
        if stale.any():
            rows = everyone[stale.to(everyone.device)]
            self.large_losses[idx[stale]] = self._score(self.large, batch, rows)
            self.scored_at[idx[stale]] = step
            self.stats["large_scoring_rows"] += int(stale.sum())
        small = self.small_losses[idx] if self.small_losses is not None else self._score(self.small, batch, everyone)
        return self.large_losses[idx] - small

    def choose(self, batch: dict[str, Tensor], indices: list[int], step: int) -> tuple[dict[str, Tensor], Tensor | None]:
        """(the batch to train on, per-example weights or None)."""
        values = self.values(batch, indices, step)
        self.stats["candidates"] += len(indices)
        if self.mode == "weighted":
            self.stats["selected"] += len(indices)
            self.stats["value_selected_sum"] += float(values.sum())
            return batch, value_weights(values).to(batch["input_ids"].device)
        keep = select_topk(values, self.ratio)
        rejected = torch.ones(len(values), dtype=torch.bool)
        rejected[keep] = False
        self.stats["selected"] += len(keep)
        self.stats["value_selected_sum"] += float(values[keep].sum())
        self.stats["value_rejected_sum"] += float(values[rejected].sum())
        rows = keep.to(batch["input_ids"].device)
        return {k: v[rows] for k, v in batch.items()}, None

    def summary(self) -> dict[str, float]:
        s = self.stats
        rejected = s["candidates"] - s["selected"]
        return {"mode": self.mode, "ratio": self.ratio, "refresh": self.refresh, "candidates": s["candidates"],
                "selected": s["selected"], "large_scoring_rows": s["large_scoring_rows"],
                "mean_value_selected": s["value_selected_sum"] / max(s["selected"], 1),
                "mean_value_rejected": s["value_rejected_sum"] / rejected if rejected else None}
