"""`kdship eval` for causal LMs: student and teacher on the same held-out tokens (perplexity, next-token accuracy,
the perplexity ratio and how often the student's top next token is the teacher's), and greedy generations from the
same prompts side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kdship.config import EvalConfig, SamplingConfig
from kdship.data import IGNORED, Encoded, LmTable, iterate_batches, lm_prompts, load_lm_table, model_inputs, tokenize_lm
from kdship.errors import ConfigError, ModelError
from kdship.generation import continuations, prompt_ids
from kdship.models import build_model, is_causal_lm, lm_max_length, load_tokenizer, max_tokens, model_kind


@torch.no_grad()
def next_token_predictions(model: Any, tokenizer: Any, encoded: Encoded, batch_size: int,
                           device: torch.device) -> tuple[float, int, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, target tokens, the model's top next token at each target, the targets), targets in
    the data's order, so that two models' predictions compare position by position."""
    model.eval()
    total, tops, targets = 0.0, {}, {}
    for indices, batch in iterate_batches(tokenizer, encoded, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORED,
                                                   reduction="sum").item()
        scored = labels.ne(IGNORED)
        for row, index in enumerate(indices):
            tops[index] = logits[row].argmax(-1)[scored[row]].cpu()
            targets[index] = labels[row][scored[row]].cpu()
    order = sorted(tops)
    top, target = torch.cat([tops[i] for i in order]), torch.cat([targets[i] for i in order])
    return total, len(target), top, target


def lm_eval_metrics(total: float, count: int, top: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    loss = total / max(count, 1)
    return {"lm_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "next_token_accuracy": top.eq(target).float().mean().item(), "tokens": count}


def greedy_generations(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int, device: torch.device,
                       as_chat: bool) -> list[str]:
    """Each prompt's greedy continuation (the prompt itself not repeated), its tokens as training reads a prompt
    (kdship.generation.prompt_ids: `as_chat`, through the chat template where the tokenizer has one)."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.decode(continuations(model, [prompt_ids(tokenizer, p, as_chat)], greedy, pad,
                                           tokenizer.eos_token_id, device, seed=0)[0], skip_special_tokens=True)
            for p in prompts]


def evaluate_lm(cfg: EvalConfig, models: dict[str, str], configs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from kdship.artifacts import atomic_write_json

    for role, config in configs.items():
        if not is_causal_lm(config):
            raise ModelError(f"{role} {models[role]} is {model_kind(config)} and the other model a causal LM; "
                             "evaluate a causal LM with a causal-LM teacher")
    tokenizer = _shared_tokenizer(models)
    table = load_lm_table(cfg.data.eval, cfg.data.text_columns, cfg.data.max_eval_samples)
    encoded = tokenize_lm(tokenizer, table, lm_max_length(cfg.data, max_tokens(cfg.data.max_length, *configs.values())))
    prompts = _prompts(cfg, table)
    result: dict[str, Any] = {"objective": "clm", "label_names": None, "device": str(device),
                              "data": {"source": table.source, "fingerprint": table.fingerprint, "n": len(table),
                                       "kind": table.kind, "sequences": len(encoded.features),
                                       "dropped_too_long": encoded.dropped}}
    tops, outputs = {}, {}
    for role, source in models.items():
        model = build_model("clm", source).to(device)
        total, count, tops[role], target = next_token_predictions(model, tokenizer, encoded, cfg.batch_size, device)
        result[role] = {"source": source, **lm_eval_metrics(total, count, tops[role], target)}
        outputs[role] = greedy_generations(model, tokenizer, prompts, cfg.max_new_tokens, device,
                                           as_chat=cfg.prompts is not None or table.kind != "text")
        del model
    if cfg.teacher:
        result["comparison"] = {
            "perplexity_ratio": result["student"]["perplexity"] / result["teacher"]["perplexity"],
            "token_agreement": tops["student"].eq(tops["teacher"]).float().mean().item()}
    result["generations"] = {"greedy": True, "max_new_tokens": cfg.max_new_tokens,
                             "samples": [{"prompt": _shown(p), **{role: outputs[role][i] for role in models}}
                                         for i, p in enumerate(prompts)]}
    out = Path(cfg.output) if cfg.output else Path(cfg.student) / "eval.json"
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result


def _shared_tokenizer(models: dict[str, str]) -> Any:
    """The teacher's tokenizer (the student's without one); a student reading other tokens cannot be compared."""
    tokenizers = {role: load_tokenizer(source, role) for role, source in models.items()}
    if "teacher" in tokenizers and tokenizers["teacher"].get_vocab() != tokenizers["student"].get_vocab():
        raise ModelError(f"student {models['student']} and teacher {models['teacher']} use different tokenizers; "
                         "perplexities and token agreement compare only on the same tokens")
    return tokenizers.get("teacher", tokenizers["student"])


def _prompts(cfg: EvalConfig, table: LmTable) -> list[Any]:
    if cfg.prompts is None:
        return lm_prompts(table, cfg.generations)
    path = Path(cfg.prompts)
    if not path.is_file():
        raise ConfigError(f"prompts file {cfg.prompts} not found; give a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompts file {cfg.prompts} holds no prompt; give one prompt per line")
    return lines[:cfg.generations]


def _shown(prompt: Any) -> str:
    """A prompt as text: a chat's last user turn."""
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")
