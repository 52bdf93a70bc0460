"""Layer-wise self-distillation with early exits: classifier heads on chosen layers of the trained model, each taught
by the model's own final classifier (its soft predictions) and the labels, so that at inference an input the
shallow layers already classify confidently can stop there (kdship.early_exit; DeeBERT, Xin et al. 2020; BERxiT,
Xin et al. 2021; self-distillation as in Zhang et al. 2019, "Be Your Own Teacher").
loss = step loss + w·mean over exits of [(1 - α)·CE(exit, y) + α·T²·KL(p_final^T || p_exit^T)]. The heads ship with
the model: kdship export writes every exit's logits, bench and serve take --exit-threshold."""

from __future__ import annotations

from typing import Any

from kdship.config import EarlyExitConfig, to_record
from kdship.data import targets
from kdship.early_exit import EarlyExitModel, check_exit_layers, exit_kd_loss, with_exit_heads
from kdship.errors import ConfigError
from kdship.loop import Step, StepInput, StepResult
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


class EarlyExits(Technique):
    def __init__(self, names: list[str], prefixes: dict[str, str], layers: dict[str, list[int]],
                 settings: EarlyExitConfig):
        self.names, self.prefixes, self.layers, self.settings = names, prefixes, layers, settings

    def wrap(self, step: Step) -> Step:
        s = self.settings

        def early_exit_step(x: StepInput) -> StepResult:
            result = step(x)
            total, logs = 0.0, {}
            for name in self.names:
                out = result.forwards[name].output
                term = exit_kd_loss(out.exit_logits, out.logits, targets(x.tensors, out.logits), s.alpha, s.temperature)
                total = total + term
                logs[f"{self.prefixes[name]}exit_loss"] = term.detach()
            return result.with_loss(result.loss + s.weight * total, logs)

        return early_exit_step

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"early_exit": {**to_record(self.settings), "exit_layers": self.layers}}


def build_early_exits(settings: EarlyExitConfig, context: TechniqueContext) -> EarlyExits:
    """Exit heads added to every trained model (before it is distributed, so they train with it)."""
    if context.cfg.objective != "classify":
        raise ConfigError(f"early exits are classifiers on the student's layers; objective {context.cfg.objective} has "
                          "none (use objective classify)")
    layers = {}
    for t in context.trainees:
        try:
            layers[t.name] = check_exit_layers(settings.layers, t.model.config.num_hidden_layers)
        except ValueError as e:
            raise ConfigError(f"early_exit: {e}") from None
        if not isinstance(t.model, EarlyExitModel):  # (a student saved with exits keeps them, weights included)
            t.model = with_exit_heads(t.model, layers[t.name])
        elif t.model.layers != layers[t.name]:
            raise ConfigError(f"{t.name} already has exits after layers {t.model.layers}; give early_exit.layers "
                              f"{t.model.layers} or a student without exits")
    return EarlyExits([t.name for t in context.trainees], {t.name: t.prefix for t in context.trainees}, layers,
                      settings)


EARLY_EXIT = TechniqueDef("early_exit", "layer-wise self-distillation: exit classifiers on chosen layers learn the "
                                        "final classifier's soft predictions, so confident inputs can stop early "
                                        "(DeeBERT / BERxiT)", build_early_exits)
