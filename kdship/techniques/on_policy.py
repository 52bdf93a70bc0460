"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): in a share `ratio` (lambda) of the batches the responses are replaced by the student's
own sampled continuations of the prompts, and the step's losses then compare student and teacher on those tokens.
The student learns on the sequences it will produce, not only on the data's, which removes the mismatch between
training and generation; no gradient flows through the sampling.

A batch's prompt is each sequence through the position that predicts its first target token (prompt/response and
chat data; plain text has no prompts). The first student samples for every student; which batches are on-policy
and the samples themselves are seeded by the step and the batch's examples, so a resumed run draws the same."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from kdship.config import OnPolicyConfig, to_record
from kdship.data import IGNORED, Encoded, collate, next_token_targets
from kdship.errors import ConfigError
from kdship.generation import continuations
from kdship.loop import Step, StepInput, StepResult
from kdship.runtime import Runtime
from kdship.techniques import Technique, TechniqueContext, TechniqueDef


class OnPolicy(Technique):
    def __init__(self, settings: OnPolicyConfig, model: nn.Module, tokenizer: Any, max_length: int, seed: int):
        self.settings, self.model, self.tokenizer, self.max_length, self.seed = settings, model, tokenizer, \
            max_length, seed
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.counts = nn.Module()  # checkpointed: a resumed run's record counts the whole run
        for name in ("micro_batches", "on_policy_batches", "sampled_tokens"):
            self.counts.register_buffer(name, torch.zeros((), dtype=torch.long))

    def on_policy_at(self, step: int) -> bool:
        """Whether this optimizer step's batches are the student's samples (the same on every process)."""
        return random.Random(self.seed * 1_000_003 + step).random() < self.settings.ratio

    def wrap(self, step: Step) -> Step:
        def on_policy_step(x: StepInput) -> StepResult:
            self.counts.micro_batches += 1
            if not self.on_policy_at(x.step):
                return step(x)
            sampled = self.student_batch(x.tensors, seed=self.seed * 1_000_003 + x.step * 10_007 + x.indices[0])
            if sampled is None:
                return step(x)
            self.counts.on_policy_batches += 1
            return step(replace(x, tensors=sampled))

        return on_policy_step

    def student_batch(self, tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor] | None:
        """The batch with each sequence's prompt continued by the student (targets: the sampled tokens), or None
        when the prompts leave no room within max_length."""
        prompts = [ids[:int(labels.ne(IGNORED).nonzero()[0]) + 1].tolist()
                   for ids, labels in zip(tensors["input_ids"], tensors["labels"])]
        room = self.max_length - max(len(p) for p in prompts)
        if room < 1:
            return None
        sampling = self.settings.model_copy(update={"max_new_tokens": min(self.settings.max_new_tokens, room)})
        device = tensors["input_ids"].device
        samples = continuations(self.model, prompts, sampling, self.pad, self.eos, device, seed)
        self.counts.sampled_tokens += sum(len(s) for s in samples)
        features = [{"input_ids": p + s, "labels": next_token_targets([IGNORED] * len(p) + s)}
                    for p, s in zip(prompts, samples)]
        batch = collate(self.tokenizer, Encoded(features, None), range(len(features)))
        return {key: value.to(device) for key, value in batch.items()}

    def memory(self) -> dict[str, nn.Module]:
        return {"on_policy_counts": self.counts}

    def record(self, runtime: Runtime) -> dict[str, Any]:
        counts = {name: int(runtime.total(int(value))) for name, value in self.counts.named_buffers()}
        return {"on_policy": {**to_record(self.settings), **counts}}


def build_on_policy(settings: OnPolicyConfig, context: TechniqueContext) -> OnPolicy:
    if all(f["labels"][0] != IGNORED for f in context.train.features):
        raise ConfigError("on_policy samples the student's continuations of prompts, and this data is plain text "
                          "(every token a target); give prompt/response or chat data")
    return OnPolicy(settings, context.target.model, context.tokenizer, context.max_length, context.cfg.seed)


ON_POLICY = TechniqueDef("on_policy", "causal LMs: a share of the batches is the student's own sampled "
                                      "continuations, scored by the teacher (GKD, Agarwal et al. 2024)",
                         build_on_policy, sharded_ok=False)
