"""Teacher-free self-distillation from a mean teacher: an exponential moving average of the trained model's own
weights (Tarvainen & Valpola 2017, "Mean teachers are better role models") teaches the model with soft labels.
loss = task loss + w·T²·KL(p_ema^T || p_model^T). The average trails the model and smooths out the noise of
single steps, so its predictions are a steadier target than the labels alone; no second network is trained."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kdship.config import EmaConfig, to_record
from kdship.data import model_inputs, targets
from kdship.loop import Step, StepInput, StepResult
from kdship.losses import soft_kl
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef
from kdship.trainee import Trainee


class MeanTeacher(Technique):
    """One EMA copy per trained model, updated from its weights at the start of every optimizer step (the weights
    the last step left), and read under no_grad, in eval mode, on the same inputs as the model."""

    def __init__(self, trainees: list[Trainee], settings: EmaConfig, device: torch.device):
        self.settings = settings
        self.trainees = trainees
        self.averages = nn.ModuleDict({t.name: copy.deepcopy(t.model).to(device).eval().requires_grad_(False)
                                       for t in trainees})
        self.updated_at = nn.Module()  # checkpointed with the averages: a resumed run does not update twice
        self.updated_at.register_buffer("step", torch.tensor(-1))

    def update(self, step: int) -> None:
        """Move each average towards its model: ema = decay·ema + (1 - decay)·weights (once per step)."""
        if int(self.updated_at.step) >= step:
            return
        decay = self.settings.decay if step > 0 else 0.0
        with torch.no_grad():
            for t in self.trainees:
                live = dict(t.model.named_parameters())
                for name, value in self.averages[t.name].named_parameters():
                    value.lerp_(live[name].detach().to(value.dtype), 1.0 - decay)
        self.updated_at.step.fill_(step)

    def weight_at(self, progress: float) -> float:
        """Off until `start` of the run (the average of an untrained model teaches nothing), then the weight."""
        return self.settings.weight if progress >= self.settings.start else 0.0

    def wrap(self, step: Step) -> Step:
        def mean_teacher_step(x: StepInput) -> StepResult:
            self.update(x.step)
            result = step(x)
            weight = self.weight_at(x.progress)
            if not weight:
                return result
            inputs = model_inputs(x.tensors)
            extra, logs = 0.0, {}
            for t in self.trainees:
                logits = result.forwards[t.name].output.logits
                with torch.no_grad():
                    teacher = self.averages[t.name](**inputs).logits
                mask = None if logits.dim() == 2 else targets(x.tensors, logits).ne(-100)  # MLM: masked tokens
                term = soft_kl(logits, teacher, self.settings.temperature, mask)
                extra = extra + weight * term
                logs[f"{t.prefix}ema_kd"] = term.detach()
            return result.with_loss(result.loss + extra, logs)

        return mean_teacher_step

    def memory(self) -> dict[str, nn.Module]:
        return {"ema": self.averages, "ema_updated_at": self.updated_at}

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"ema": to_record(self.settings)}


def build_ema(settings: EmaConfig, context: TechniqueContext) -> MeanTeacher:
    return MeanTeacher(context.trainees, settings, context.runtime.device)


EMA = TechniqueDef("ema", "teacher-free: an exponential moving average of the trained model's weights teaches it "
                          "with soft labels (mean teacher, Tarvainen & Valpola 2017)", build_ema, sharded_ok=False)
