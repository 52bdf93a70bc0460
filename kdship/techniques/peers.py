"""Online (collaborative) distillation: several students trained together teach each other, with or without a fixed
teacher. Each student is run once per batch by the step; this technique only reads their predictions.

- mutual: deep mutual learning (Zhang et al. 2018): each peer also learns the others' soft predictions,
  loss_i += w·T²·mean_{j≠i} KL(p_j^T || p_i^T), the others detached.
- ensemble: the peers' averaged soft predictions are the teacher of each (KDCL / ONE-style online ensemble
  distillation, Guo et al. 2020, Lan et al. 2018): loss_i += w·T²·KL(mean_j p_j^T || p_i^T), the average detached."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kdship.config import PeersConfig, to_record
from kdship.errors import ConfigError
from kdship.loop import Step, StepInput, StepResult
from kdship.losses import soft_kl
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


def ensemble_logits(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Scores whose softmax at `temperature` is the mean of the peers' softmaxes at it (what soft_kl reads)."""
    log_probs = torch.stack([F.log_softmax(z.float() / temperature, -1) for z in logits])
    return temperature * (torch.logsumexp(log_probs, 0) - math.log(len(logits)))


def peer_losses(logits: list[torch.Tensor], mode: str, temperature: float) -> list[torch.Tensor]:
    """Each peer's online-distillation term, the targets detached (every peer learns, none is pulled back)."""
    detached = [z.detach() for z in logits]
    if mode == "ensemble":
        teacher = ensemble_logits(detached, temperature)
        return [soft_kl(z, teacher, temperature) for z in logits]
    return [torch.stack([soft_kl(z, other, temperature) for j, other in enumerate(detached) if j != i]).mean()
            for i, z in enumerate(logits)]


class Peers(Technique):
    def __init__(self, names: list[str], prefixes: dict[str, str], settings: PeersConfig):
        self.names, self.prefixes, self.settings = names, prefixes, settings

    def wrap(self, step: Step) -> Step:
        s = self.settings

        def peers_step(x: StepInput) -> StepResult:
            result = step(x)
            logits = [result.forwards[name].output.logits for name in self.names]
            terms = peer_losses(logits, s.mode, s.temperature)
            logs = {f"{self.prefixes[n]}peer_kd": term.detach() for n, term in zip(self.names, terms)}
            return result.with_loss(result.loss + s.weight * sum(terms), logs)

        return peers_step

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"peers": {**to_record(self.settings), "students": self.names}}


def build_peers(settings: PeersConfig, context: TechniqueContext) -> Peers:
    if len(context.trainees) < 2:
        raise ConfigError("peers needs at least two students trained together; give --students A,B (or students: "
                          "in the recipe)")
    labels = {t.name: t.model.config.num_labels for t in context.trainees}
    if len(set(labels.values())) > 1:
        raise ConfigError(f"peers must predict the same labels, but their label counts differ ({labels}); use "
                          "students trained on the same labels, or shape specs (which take the data's labels)")
    return Peers([t.name for t in context.trainees], {t.name: t.prefix for t in context.trainees}, settings)


PEERS = TechniqueDef("peers", "online distillation between students trained together: mutual (deep mutual "
                              "learning, Zhang et al. 2018) or ensemble (their averaged predictions teach each, Guo et "
                              "al. 2020); a fixed teacher is optional", build_peers)
