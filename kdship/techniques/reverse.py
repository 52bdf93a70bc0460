"""Reverse distillation (knowledge inheritance): a small, already-trained model teaches a large one early in its
training. loss = (1 - α_t)·task_loss + α_t·KD(small -> large), with α_t decaying from `start` to 0 over the first
`steps` updates (Qin et al. 2022, "Knowledge Inheritance for Pre-trained Language Models": α from 1 to 0 over the
first ~45% of updates, temperature 2, KL on masked tokens for MLM)."""

from __future__ import annotations

import math

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
