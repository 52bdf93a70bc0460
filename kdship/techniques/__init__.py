"""Techniques that compose around the training step. Each is a plain object built from its own config section
(`selection:`, `reverse:`, `ema:`, ...): it wraps the step (`wrap(step) -> step`), may order what the loop draws
(`batches()`), says what it keeps across a resume (`memory()`) and what the run's record says of it (`record()`).
The commands apply the configured ones in a loop and contain no technique-specific branch; adding one is a
module with a TechniqueDef and an entry in the registry below."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from kdship.config import RunConfig
from kdship.errors import ConfigError
from kdship.loop import Step
from kdship.runtime import Runtime
from kdship.trainee import Trainee


class Technique:
    """What a technique may change; each says only what it does (the defaults change nothing)."""

    def wrap(self, step: Step) -> Step:
        return step

    def batches(self) -> Callable[[int], list[list[int]]] | None:
        """epoch -> its global batches, when the technique decides what the loop draws."""
        return None

    def memory(self) -> dict[str, nn.Module]:  # not trained, checkpointed per process
        return {}

    def record(self, runtime: Runtime) -> dict[str, Any]:  # called by every process
        return {}


@dataclass
class TechniqueContext:
    """What a technique is built from: the run's config, the models it acts on, the data and the processes."""

    cfg: RunConfig
    trainees: list[Trainee]  # not yet distributed: a technique may add heads, or exits, that train with them
    tokenizer: Any
    train: Any  # kdship.data.Encoded
    runtime: Runtime
    total_steps: int
    draw_size: int = 0  # examples each process draws per micro-batch
    teacher: Any = None  # kdship.distill.Teacher, in a distillation
    label_names: list[str] | None = None
    max_length: int = 0  # the run's sequence length (capped by every model's positions)

    @property
    def target(self) -> Trainee:
        """The trained model of a technique that acts on one (kdship train's, or the first student)."""
        return self.trainees[0]


@dataclass
class TechniqueDef:
    name: str  # also its config section
    summary: str
    build: Callable[[Any, TechniqueContext], Technique]  # (its settings, context) -> the technique
    # how many examples a process draws per micro-batch for a batch of the given size, from its settings alone
    # (selection draws more and keeps the best)
    draw_size: Callable[[Any, int], int] = lambda settings, batch_size: batch_size
    sharded_ok: bool = True  # whether it works on a model sharded with FSDP


def _registry() -> dict[str, TechniqueDef]:
    from kdship.techniques.cross_task import CROSS_TASK
    from kdship.techniques.curriculum import CURRICULUM
    from kdship.techniques.early_exit import EARLY_EXIT
    from kdship.techniques.ema import EMA
    from kdship.techniques.on_policy import ON_POLICY
    from kdship.techniques.peers import PEERS
    from kdship.techniques.reverse import REVERSE
    from kdship.techniques.selection import SELECTION
    from kdship.techniques.virtual_teacher import VIRTUAL_TEACHER

    # wrapped in this order, so the last is outermost: selection picks the rows before anything else runs, on-policy
    # sampling replaces them before any other technique reads them, and the virtual teacher's (1 - alpha) scales
    # the step's own loss only
    order = (VIRTUAL_TEACHER, REVERSE, EARLY_EXIT, PEERS, EMA, CROSS_TASK, CURRICULUM, ON_POLICY, SELECTION)
    return {t.name: t for t in order}


def configured(cfg: RunConfig) -> list[tuple[TechniqueDef, Any]]:
    """The techniques a config turns on, with their settings."""
    active = [(t, getattr(cfg, t.name, None)) for t in _registry().values()]
    return [(t, settings) for t, settings in active if settings is not None]


def draw_size_for(cfg: RunConfig) -> int:
    """Examples each process draws per micro-batch under the configured techniques."""
    size = cfg.batch_size
    for technique, settings in configured(cfg):
        size = technique.draw_size(settings, size)
    return size


def build_techniques(context: TechniqueContext) -> list[Technique]:
    built = []
    for technique, settings in configured(context.cfg):
        if context.cfg.sharding == "fsdp" and not technique.sharded_ok:
            raise ConfigError(f"{technique.name} does not work with sharding fsdp (each process scores its own "
                              "samples with the model, which a sharded model cannot do alone); use sharding ddp")
        built.append(technique.build(settings, context))
    return built


def wrap_step(step: Step, techniques: list[Technique]) -> Step:
    for technique in techniques:
        step = technique.wrap(step)
    return step


def technique_batches(techniques: list[Technique]) -> Callable[[int], list[list[int]]] | None:
    """The one technique's order of batches, if one decides it."""
    orders = [order for t in techniques if (order := t.batches()) is not None]
    if len(orders) > 1:
        raise ConfigError("two techniques both decide the order of the data; configure only one of them")
    return orders[0] if orders else None


def technique_memory(techniques: list[Technique]) -> dict[str, nn.Module]:
    return {name: module for t in techniques for name, module in t.memory().items()}


def technique_records(techniques: list[Technique], runtime: Runtime) -> dict[str, Any]:
    return {k: v for t in techniques for k, v in t.record(runtime).items()}


# Families that change what a run is rather than its step: a setting of the distill config, or a command of their own.
OTHER_FAMILIES = {
    "teachers": "several teachers of one task, combined per batch by mean, weights or per-example confidence "
                "(setting teachers:, teacher_weighting:)",
    "generations": "born-again networks: each generation a fresh student taught by the one before (setting "
                   "generations:, Furlanello et al. 2018)",
    "train_layers": "stage-wise progressive: a pipeline's stages distil groups of layers shallow to deep, finished "
                    "groups frozen (stage setting train_layers:)",
    "augment": "TinyBERT's data augmentation: words replaced by a masked-LM's predictions or embedding neighbours, "
               "labelled by the teacher (command kdship augment, Jiao et al. 2020)",
}


def summaries() -> dict[str, str]:
    return {name: t.summary for name, t in _registry().items()} | OTHER_FAMILIES
