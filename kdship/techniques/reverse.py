"""Reverse distillation (knowledge inheritance): a small, already-trained model teaches a large one early in its
training. loss = (1 - α_t)·task_loss + α_t·KD(small -> large), with α_t decaying from `start` to 0 over the first
`steps` updates (Qin et al. 2022, "Knowledge Inheritance for Pre-trained Language Models": α from 1 to 0 over the
first ~45% of updates, temperature 2, KL on masked tokens for MLM)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdship.biencoder import targets, token_mask
from kdship.losses import LossInputs, get_loss, hidden_mse

SCHEDULES = ("linear", "cosine", "step")


def reverse_alpha(step: int, steps: int, schedule: str = "linear", start: float = 1.0) -> float:
    """The weight of the small model's KD at optimizer step `step` (0-based); 0 from `steps` on."""
    if step >= steps:
        return 0.0
    progress = step / steps
    if schedule == "linear":
        return start * (1.0 - progress)
    if schedule == "cosine":
        return start * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return start
    raise ValueError(f"unknown reverse schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def layer_pairs(large_layers: int, small_layers: int) -> list[tuple[int, int]]:
    """(large hidden-state index, small hidden-state index) pairs: the embeddings, then each small layer with the
    large layer at the same relative depth (the uniform map of distillation, read from the small side)."""
    return [(round(j * large_layers / small_layers), j) for j in range(small_layers + 1)]


class ReverseDistillation:
    """The small model's say in the large model's loss: α_t·(KD on logits + w·hidden MSE through projections)."""

    def __init__(self, small: nn.Module, large: nn.Module, steps: int, schedule: str, start: float,
                 temperature: float, hidden_weight: float, autocast: Any):
        self.small, self.steps, self.schedule, self.start = small, steps, schedule, start
        self.temperature, self.hidden_weight, self.autocast = temperature, hidden_weight, autocast
        self.pairs = layer_pairs(large.config.num_hidden_layers, small.config.num_hidden_layers)
        # learned maps from the large model's width to the small one's; trained with the large model, not shipped
        self.projections = nn.ModuleList(
            nn.Linear(large.config.hidden_size, small.config.hidden_size) for _ in self.pairs) \
            if hidden_weight > 0 else nn.ModuleList()
        self.projections.to(next(large.parameters()).device)

    def alpha(self, step: int) -> float:
        return reverse_alpha(step, self.steps, self.schedule, self.start)

    def wants_hidden(self, step: int) -> bool:
        return self.hidden_weight > 0 and self.alpha(step) > 0

    def loss(self, task: Tensor, out: Any, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Any]]:
        """(1 - α)·task + α·distill, and what to log. Called only while α > 0: afterwards the small model is not
        run at all."""
        alpha = self.alpha(step)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), self.autocast():
            small = self.small(**inputs, output_hidden_states=self.hidden_weight > 0)
        distill = get_loss("kd").fn(LossInputs(student_logits=out.logits, teacher_logits=small.logits,
                                               labels=targets(batch, out.logits), temperature=self.temperature))
        logs = {"alpha": alpha, "reverse_kd": distill.detach()}
        if self.hidden_weight > 0:
            hidden = hidden_mse([proj(out.hidden_states[i].float()) for proj, (i, _) in zip(self.projections, self.pairs)],
                                [small.hidden_states[j] for _, j in self.pairs], token_mask(batch))
            distill = distill + self.hidden_weight * hidden
            logs["reverse_hidden"] = hidden.detach()
        return (1 - alpha) * task + alpha * distill, logs
