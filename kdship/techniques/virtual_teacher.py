"""Teacher-free KD with a virtual teacher (Yuan et al. 2020, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", Tf-KD_reg): a hand-made teacher that gives the true class probability `correct_prob` and spreads
the rest evenly over the other classes, softened by a high temperature, teaches the model beside its own loss:
loss = (1 - α)·task loss + α·T²·KL(softmax(p_virtual / T) || softmax(z / T)). It is label smoothing with a tuned
shape and temperature, and costs nothing: there is no teacher network."""

from __future__ import annotations

from typing import Any

import torch

from kdship.config import VirtualTeacherConfig, to_record
from kdship.data import targets
from kdship.loop import Step, StepInput, StepResult
from kdship.losses import soft_kl
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


def virtual_teacher_logits(labels: torch.Tensor, classes: int, correct_prob: float) -> torch.Tensor:
    """The virtual teacher's distribution as a score vector per row: `correct_prob` on the label, the rest shared
    by the other classes. Tf-KD softens these probabilities themselves (softmax(p / T)), so they are the logits."""
    rest = (1.0 - correct_prob) / max(classes - 1, 1)
    scores = torch.full((len(labels), classes), rest, device=labels.device)
    return scores.scatter_(1, labels[:, None], correct_prob)


class VirtualTeacher(Technique):
    def __init__(self, names: list[str], prefixes: dict[str, str], settings: VirtualTeacherConfig):
        self.names, self.prefixes, self.settings = names, prefixes, settings

    def wrap(self, step: Step) -> Step:
        s = self.settings

        def virtual_teacher_step(x: StepInput) -> StepResult:
            result = step(x)
            total, logs = 0.0, {}
            for name in self.names:
                logits = result.forwards[name].output.logits
                teacher = virtual_teacher_logits(targets(x.tensors, logits), logits.shape[-1], s.correct_prob)
                term = soft_kl(logits, teacher, s.temperature)
                total = total + term
                logs[f"{self.prefixes[name]}virtual_kd"] = term.detach()
            return result.with_loss((1 - s.alpha) * result.loss + s.alpha * total, logs)

        return virtual_teacher_step

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"virtual_teacher": to_record(self.settings)}


def build_virtual_teacher(settings: VirtualTeacherConfig, context: TechniqueContext) -> VirtualTeacher:
    return VirtualTeacher([t.name for t in context.trainees], {t.name: t.prefix for t in context.trainees}, settings)


VIRTUAL_TEACHER = TechniqueDef(
    "virtual_teacher", "teacher-free: a hand-made teacher (correct_prob on the label, the rest spread) at a high "
                       "temperature, beside the task loss (Tf-KD, Yuan et al. 2020)", build_virtual_teacher)
