"""Curriculum learning: training examples from easy to hard, easiness judged once, before training, by a trained
model (the teacher in a distillation, or any trained classifier given by path) as its confidence in its top class
or its loss on the label. A pacing function c(t) says what fraction of the data, easiest first, is available at
step t (competence-based curriculum, Platanios et al. 2019):
  linear: c = start + (1 - start)·t/T      root: c = sqrt(start² + (1 - start²)·t/T)
  step:   c = start + (1 - start)·floor(4t/T)/4 (the pool grows in four equal steps)
with T = full_at x the run's steps, and c = 1 from T on.
Two modes: `order` draws each batch uniformly from the easiest c(t) of the data; `weighted` keeps every example
available but draws easy ones more often early on, with weight exp(-λ(t)·rank/N), λ(t) = ln(1/c(t)), so that the
hardest example is c(t) times as likely as the easiest (`start` times at step 0), and uniform from T on.
Batches depend only on the seed, the epoch and their position, and the order is checkpointed, so a resumed run
draws what the straight one did."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdship.config import CurriculumConfig, to_record
from kdship.errors import ConfigError
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


def competence(progress: float, settings: CurriculumConfig) -> float:
    """The fraction of the data (easiest first) available at `progress` (step / total steps)."""
    t = min(progress / settings.full_at, 1.0)
    start = settings.start
    if settings.pacing == "root":
        return min(1.0, math.sqrt(start**2 + (1 - start**2) * t))
    if settings.pacing == "step":
        return min(1.0, start + (1 - start) * math.floor(4 * t) / 4)
    return min(1.0, start + (1 - start) * t)


def difficulty(logits: torch.Tensor, labels: torch.Tensor | None, by: str) -> torch.Tensor:
    """Per example: 1 - the scorer's top probability (confidence), or its cross-entropy on the label (loss)."""
    if by == "loss":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    return 1.0 - logits.float().softmax(-1).max(-1).values


class Curriculum(Technique):
    """Orders what the loop draws; the step itself is unchanged."""

    def __init__(self, hardness: torch.Tensor, settings: CurriculumConfig, draw: int, total_steps: int, accum: int,
                 seed: int):
        self.settings, self.draw, self.total, self.accum, self.seed = settings, draw, total_steps, accum, seed
        self.order = nn.Module()  # checkpointed: a resume keeps the order it started with, whatever a rescore says
        self.order.register_buffer("easiest_first", torch.argsort(hardness, stable=True))
        self.n = len(hardness)
        self.quartiles = [round(float(q), 4) for q in torch.quantile(hardness.float(), torch.tensor([.25, .5, .75]))]

    def batches_of(self, epoch: int) -> list[list[int]]:
        """An epoch's global batches (as many as the plain order has), each drawn at its step's competence."""
        per_epoch = math.ceil(self.n / self.draw)
        steps_per_epoch = math.ceil(per_epoch / self.accum)
        easiest_first, batches = self.order.easiest_first.tolist(), []
        for j in range(per_epoch):
            step = epoch * steps_per_epoch + j // self.accum
            rng = random.Random(hash((self.seed, epoch, j)) & 0x7FFFFFFF)
            batches.append(self._draw(easiest_first, step / self.total, rng))
        return batches

    def _draw(self, easiest_first: list[int], progress: float, rng: random.Random) -> list[int]:
        size = min(self.draw, self.n)
        c = competence(progress, self.settings)
        if self.settings.mode == "order":
            return rng.sample(easiest_first[:max(size, math.ceil(c * self.n))], size)
        weights = np.exp(-math.log(1 / c) * np.arange(self.n) / self.n)
        chosen = np.random.default_rng(rng.getrandbits(32)).choice(self.n, size, replace=False, p=weights / weights.sum())
        return [easiest_first[i] for i in chosen]

    def memory(self) -> dict[str, nn.Module]:
        return {"curriculum": self.order}

    def batches(self) -> Callable[[int], list[list[int]]] | None:
        return self.batches_of

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"curriculum": {**to_record(self.settings), "examples": self.n,
                               "available_at_start": round(competence(0.0, self.settings) * self.n),
                               "difficulty_quartiles": self.quartiles}}


def scorer_logits(settings: CurriculumConfig, context: TechniqueContext) -> torch.Tensor:
    """The judging model's logits for every training example: the teacher's (distill, by: teacher), or those of
    the trained classifier at settings.by."""
    from kdship.run import predict_everywhere
    from kdship.techniques.small_model import load_small_model

    if settings.by == "teacher":
        teacher = context.teacher
        if teacher is None or teacher.model is None:
            raise ConfigError("curriculum by: teacher needs a distillation whose teacher is run (kdship distill with a "
                              "loss that reads it); in kdship train, give by: a trained classifier's folder")
        if teacher.cache is not None:  # the logits of every training example are there already
            return teacher.mapped(teacher.cache).cpu()
        return teacher.predict(context.train, context.cfg.eval_batch_size, context.runtime).cpu()
    small = load_small_model(settings.by, "curriculum scorer", context.cfg, context.tokenizer,
                             context.trainees[0].model, context.runtime.device)
    return predict_everywhere(small, context.tokenizer, context.train, context.cfg.eval_batch_size,
                              context.runtime).cpu()


def build_curriculum(settings: CurriculumConfig, context: TechniqueContext) -> Curriculum:
    cfg = context.cfg
    if cfg.objective != "classify":
        raise ConfigError(f"curriculum judges examples by a classifier's confidence or loss; objective {cfg.objective} "
                          "has none (use objective classify)")
    labels = torch.tensor(context.train.labels) if context.train.labels is not None else None
    if settings.difficulty == "loss" and labels is None:
        raise ConfigError("curriculum difficulty: loss needs labelled data; use difficulty: confidence")
    logits = scorer_logits(settings, context)
    if settings.difficulty == "loss" and logits.shape[-1] != len(context.label_names or []):
        raise ConfigError("curriculum difficulty: loss needs a scorer that predicts this task's labels (a cross-task "
                          "teacher without its label map does not); use difficulty: confidence")
    hardness = difficulty(logits, labels, settings.difficulty)
    return Curriculum(hardness, settings, context.draw_size * context.runtime.world, context.total_steps,
                      cfg.grad_accum, cfg.seed)


CURRICULUM = TechniqueDef("curriculum", "easy to hard: examples ordered (or weighted) by a trained model's "
                                        "confidence or loss, with a pacing schedule (Platanios et al. 2019)",
                          build_curriculum)
