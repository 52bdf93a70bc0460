"""A causal LM's continuations of prompts: a prompt's tokens as training reads them, batched generation with left
padding, and `kdship generate`, which writes a sequence-level KD transfer set (Kim & Rush 2016: the teacher's own
outputs become the student's training targets) as prompt/response JSONL that `kdship distill --objective clm`
reads like any other."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kdship.artifacts import SIDECAR, atomic_write_json, atomic_write_text, library_versions
from kdship.config import GenerateConfig, SamplingConfig, to_record
from kdship.data import LmTable, load_prompt_table
from kdship.errors import ConfigError, DataError, ModelError
from kdship.models import build_model, is_causal_lm, load_config, load_tokenizer, model_kind, under_weights_policy
from kdship.runtime import pick_device


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]], as_chat: bool = True) -> list[int]:
    """A prompt's tokens as the model reads them before a response, as prompt/response and chat training data
    are encoded (kdship.data.tokenize_lm): chat messages, or with a tokenizer that has a chat template a prompt
    (`as_chat`) as a user turn, through the template with the generation prompt; otherwise the text itself (the
    start of a text to continue: as_chat False)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list) and not template:
        raise DataError("the prompts are chat messages but the tokenizer has no chat template to render them; give "
                        "plain prompts, or a model whose tokenizer has a chat template")
    if isinstance(prompt, list) or (template and as_chat):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def positions_of(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def continuations(model: Any, prompts: list[list[int]], sampling: SamplingConfig, pad: int, eos: int,
                  device: torch.device, seed: int) -> list[list[int]]:
    """The tokens each prompt is continued with: through the first end-of-text token (kept: a response's targets
    end with it), at most sampling.max_new_tokens and never past the model's positions. One generate call,
    prompts padded on the left; sampled under `seed` without touching the caller's random state."""
    longest = max(len(p) for p in prompts)
    room = (positions_of(model.config) or longest + sampling.max_new_tokens) - longest
    if room < 1:
        return [[] for _ in prompts]  # the longest prompt fills the positions
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    drawn = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_k": sampling.top_k} if sampling.do_sample else {"do_sample": False})
    stops = stop_tokens(model, eos)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(ids.to(device), attention_mask=mask.to(device), pad_token_id=pad, eos_token_id=stops,
                             max_new_tokens=min(sampling.max_new_tokens, room), **drawn)
    model.train(was_training)
    return [_through_end(row, set(stops)) for row in out[:, longest:].tolist()]


def stop_tokens(model: Any, eos: int) -> list[int]:
    """The tokenizer's end-of-text and every stop token of the model's generation config (chat models end a turn
    with their own, e.g. Llama 3's <|eot_id|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({eos, *configured})


def _through_end(tokens: list[int], stops: set[int]) -> list[int]:
    end = next((i for i, token in enumerate(tokens) if token in stops), None)
    return tokens if end is None else tokens[:end + 1]


def prompts_of(table: LmTable) -> list[str | list[dict[str, str]]]:
    """The prompts of a file: a prompt column, each line of text, the prompts of prompt/response rows; each chat
    before its last assistant turn, or whole when it ends with the user (the responses are written anew)."""
    if table.kind in ("prompts", "text"):
        return list(table.items)
    if table.kind == "prompt_response":
        return [p for p, _ in table.items]
    return [m[:max((i for i, x in enumerate(m) if x["role"] == "assistant"), default=len(m))] for m in table.items]


@under_weights_policy
def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write cfg.output: for each prompt, samples_per_prompt continuations by cfg.model as prompt/response rows
    (chat prompts: messages ending in the new assistant turn); a continuation with no text is dropped and
    counted. The settings, the model's identity and the counts go beside it."""
    from kdship.teacher import teacher_identity

    out = Path(cfg.output)
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder; give the .jsonl file to write")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite or choose another -o")
    config = load_config(cfg.model, "model")
    if not is_causal_lm(config):
        raise ModelError(f"--model {cfg.model} is {model_kind(config)}; kdship generate needs a causal LM "
                         "(AutoModelForCausalLM)")
    tokenizer = load_tokenizer(cfg.model, "model")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(f"the tokenizer of {cfg.model} has no end-of-text token, which ends each response")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    table = load_prompt_table(cfg.prompts, cfg.max_prompts)
    prompts, skipped = _usable(prompts_of(table), tokenizer, positions_of(config))
    if not prompts:
        raise DataError(f"none of the {skipped} prompts in {cfg.prompts} can be continued: each is empty or fills "
                        f"the model's {positions_of(config)} positions")
    device = pick_device(cfg.device)
    model = build_model("clm", source=cfg.model).to(device).eval()
    started, rows, empty, tokens = time.perf_counter(), [], 0, 0
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        ids = [i for _, i in batch]
        for copy in range(cfg.samples_per_prompt):
            for (prompt, _), new in zip(batch, continuations(model, ids, cfg.sampling, pad, eos, device,
                                                             seed=cfg.seed + start * cfg.samples_per_prompt + copy)):
                tokens += len(new)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if not text.strip():
                    empty += 1
                    continue
                rows.append({"prompt": prompt, "response": text} if isinstance(prompt, str) else
                            {"messages": [*prompt, {"role": "assistant", "content": text}]})
    if not rows:
        raise DataError(f"every continuation by {cfg.model} was empty (it ended each prompt at once); check the "
                        "model and --max-new-tokens")
    seconds = time.perf_counter() - started
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    facts = {"command": "generate", "config": to_record(cfg), "model": teacher_identity(cfg.model),
             "device": str(device), "versions": library_versions(),
             "prompts": {"source": table.source, "fingerprint": table.fingerprint, "kind": table.kind,
                         "n": len(prompts) + skipped, "skipped_too_long_or_empty": skipped},
             "rows": len(rows), "empty_dropped": empty, "generated_tokens": tokens, "seconds": round(seconds, 2),
             "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    atomic_write_json(Path(str(out) + SIDECAR), facts)
    return {"output": str(out), **facts}


def _usable(prompts: list[Any], tokenizer: Any, positions: int | None) -> tuple[list[tuple[Any, list[int]]], int]:
    """(prompt, its tokens) of the prompts the model can continue, and how many cannot: no tokens at all, or so
    many that they fill the model's positions (one such prompt would leave no room to its whole batch)."""
    encoded = [(p, prompt_ids(tokenizer, p)) for p in prompts]
    usable = [(p, ids) for p, ids in encoded if ids and (positions is None or len(ids) < positions)]
    return usable, len(encoded) - len(usable)
