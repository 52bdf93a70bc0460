"""Cross-task distillation: a teacher trained on a related task, with another label set, teaches a student of this
task. Its features transfer as they are (hidden-state, attention and relation losses compare layers, not labels);
its predictions transfer through a learned map from its label space to this task's: a linear map W fitted before
training on the teacher's logits over the training set against the training labels (a probe; the teacher stays
frozen), after which the teacher's outputs are W·z_teacher for every loss that reads its logits (kd). A teacher
without a classification head teaches through features alone. (Cross-task transfer by feature matching: e.g.
Yang et al. 2022, "Cross-Task Knowledge Distillation in Multi-Task Recommendation"; the probe is the usual bridge
between label spaces.)"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdship.config import CrossTaskConfig, to_record
from kdship.errors import ConfigError
from kdship.losses import LOSSES
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


def fit_label_map(teacher_logits: torch.Tensor, labels: torch.Tensor, classes: int, steps: int,
                  seed: int = 0) -> tuple[nn.Linear, float]:
    """A linear map from the teacher's logits to `classes` scores, fitted full-batch with Adam on cross-entropy
    against the labels (standardised inputs: the teacher's logit scale does not matter); and its accuracy there."""
    torch.manual_seed(seed)
    x = teacher_logits.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    layer = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(layer((x - mean) / std), labels).backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the map: it then applies to raw teacher logits
        layer.bias -= layer.weight @ (mean / std)
        layer.weight /= std
        accuracy = layer(x).argmax(-1).eq(labels).float().mean().item()
    return layer.requires_grad_(False), accuracy


class CrossTask(Technique):
    """The teacher's logits seen through the fitted map; the step is unchanged."""

    def __init__(self, settings: CrossTaskConfig, facts: dict[str, Any], label_map: nn.Module | None = None):
        self.settings, self.facts, self.label_map = settings, facts, label_map

    def memory(self) -> dict[str, nn.Module]:  # a resumed run maps with the map it started with
        return {"cross_task_map": self.label_map} if self.label_map is not None else {}

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"cross_task": {**to_record(self.settings), **self.facts}}


def build_cross_task(settings: CrossTaskConfig, context: TechniqueContext) -> CrossTask:
    teacher, cfg = context.teacher, context.cfg
    logit_losses = sorted(s.name for s in cfg.losses if {"logits", "teacher"} <= LOSSES[s.name].needs)
    feature_losses = sorted(s.name for s in cfg.losses if LOSSES[s.name].needs & {"hidden", "attentions", "qkv"})
    facts: dict[str, Any] = {"teacher_labels": teacher.label_names, "student_labels": context.label_names}
    if teacher.label_names is None:  # no classification head: it teaches through features alone
        if logit_losses or not feature_losses:
            raise ConfigError(f"cross-task teacher {teacher.source} has no classification head, so it can teach only "
                              "through features: use hidden_mse, attention_kl or qkv_relations (with ce), not "
                              f"{', '.join(logit_losses) or 'no feature loss'}")
        return CrossTask(settings, {**facts, "label_map": None})
    if logit_losses:
        logits = teacher.predict(context.train, cfg.eval_batch_size, context.runtime).cpu()
        label_map, accuracy = fit_label_map(logits, torch.tensor(context.train.labels), len(context.label_names),
                                            settings.map_steps, cfg.seed)
        teacher.label_map = label_map.to(context.runtime.device)
        facts |= {"label_map": "linear", "label_map_train_accuracy": round(accuracy, 4)}
    return CrossTask(settings, facts, teacher.label_map)


CROSS_TASK = TechniqueDef("cross_task", "a teacher of a related task with other labels teaches through features "
                                        "and a learned linear map from its label space to this task's",
                          build_cross_task)

