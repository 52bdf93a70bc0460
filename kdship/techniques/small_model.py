"""The small model that reverse distillation and sample-value selection consult: loaded frozen, and checked to read
the same tokens and predict the same outputs as the model being trained, so a mismatch stops the run before it
starts instead of training on garbage."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdship.config import RunConfig
from kdship.errors import ModelError
from kdship.models import (build_model, check_tokenizers_match, is_mlm, load_config, load_tokenizer,
                           task_label_names)


def load_small_model(source: str, role: str, cfg: RunConfig, tokenizer: Any, large: nn.Module,
                     device: torch.device) -> nn.Module:
    config = load_config(source, role)
    check_tokenizers_match(tokenizer, load_tokenizer(source, role), source)
    if cfg.objective == "mlm" and (not is_mlm(config) or config.vocab_size != large.config.vocab_size):
        raise ModelError(f"{role} {source} needs a masked-LM head over the same {large.config.vocab_size}-token "
                         "vocabulary; use a small model made with kdship train --objective mlm and this tokenizer")
    expected = task_label_names(cfg.objective, large.config)
    if cfg.labelled and task_label_names(cfg.objective, config) != expected:
        kind = "pair-classifying bi-encoder" if cfg.objective == "match" else "classifier"
        raise ModelError(f"{role} {source} is not a {kind} with the labels {expected} of the model being trained; "
                         "use a small model fine-tuned on the same labels")
    small = build_model(cfg.objective, source=source, match_loss=cfg.match_loss).to(device).eval()
    small.requires_grad_(False)
    return small
