"""Reverse distillation (knowledge inheritance): a small, already-trained model teaches a large one early in its
training. loss = (1 - α_t)·task_loss + α_t·KD(small -> large), with α_t decaying from `start` to 0 over the first
`steps` updates (Qin et al. 2022, "Knowledge Inheritance for Pre-trained Language Models": α from 1 to 0 over the
first ~45% of updates, temperature 2, KL on masked tokens for MLM)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdship.config import ReverseConfig, to_record
from kdship.data import model_inputs, targets, token_mask
from kdship.errors import ConfigError
from kdship.loop import Step, StepInput, StepResult
from kdship.losses import LossInputs, get_loss, hidden_mse
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef
from kdship.techniques.small_model import load_small_model
from kdship.trainee import Forward, HiddenProjection

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


HEAD = "reverse"  # the trained model's head that maps its hidden states to the small model's width


class ReverseDistillation(Technique):
    """The small model's say in the trained model's loss: (1 - α_t)·loss + α_t·(KD on logits + w·hidden MSE
    through learned projections), wrapped around the step."""

    def __init__(self, small: nn.Module, large_config: Any, settings: ReverseConfig, target: str = "model"):
        self.small, self.settings, self.target = small, settings, target
        self.pairs = layer_pairs(large_config.num_hidden_layers, small.config.num_hidden_layers)

    def head(self, large_config: Any) -> HiddenProjection | None:
        """Learned maps from the large model's width to the small one's, trained with it and not shipped."""
        if not self.settings.hidden_weight:
            return None
        return HiddenProjection([i for i, _ in self.pairs], large_config.hidden_size, self.small.config.hidden_size)

    def alpha(self, step: int) -> float:
        s = self.settings
        return reverse_alpha(step, s.steps, s.schedule, s.start)

    def wrap(self, step: Step) -> Step:
        def reverse_step(x: StepInput) -> StepResult:
            alpha = self.alpha(x.step)
            if alpha == 0:  # after the warm-up the small model is not run at all
                return step(x)
            result = step(x.asking(HEAD) if self.settings.hidden_weight else x)
            distill, logs = self.distill_loss(result.forwards[self.target], x.tensors)
            return result.with_loss((1 - alpha) * result.loss + alpha * distill, {"alpha": alpha, **logs})

        return reverse_step

    def distill_loss(self, forward: Forward, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """KD from the small model (and hidden matching), and what to log."""
        s = self.settings
        with torch.no_grad():
            small = self.small(**model_inputs(batch), output_hidden_states=s.hidden_weight > 0)
        logits = forward.output.logits
        distill = get_loss("kd").fn(LossInputs(student_logits=logits, teacher_logits=small.logits,
                                               labels=targets(batch, logits), temperature=s.temperature))
        logs = {"reverse_kd": distill.detach()}
        if s.hidden_weight:
            hidden = hidden_mse(forward.heads[HEAD], [small.hidden_states[j] for _, j in self.pairs], token_mask(batch))
            distill = distill + s.hidden_weight * hidden
            logs["reverse_hidden"] = hidden.detach()
        return distill, logs

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"reverse": {**to_record(self.settings), "layer_pairs": self.pairs}}


def build_reverse(settings: ReverseConfig, context: TechniqueContext) -> ReverseDistillation:
    if settings.steps > context.total_steps:
        raise ConfigError(f"reverse.steps {settings.steps} is longer than the run ({context.total_steps} steps); "
                          "lower --reverse-steps or train longer")
    large = context.target.model
    small = load_small_model(settings.from_, "small model", context.cfg, context.tokenizer, large,
                             context.runtime.device)
    technique = ReverseDistillation(small, large.config, settings, context.target.name)
    head = technique.head(large.config)
    if head is not None:
        context.target.heads[HEAD] = head
    return technique


REVERSE = TechniqueDef("reverse", "reverse distillation: a small trained model teaches the trained model early "
                                  "on, its weight decaying to 0 (Qin et al. 2022)", build_reverse)
