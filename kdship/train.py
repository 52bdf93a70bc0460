"""`kdship train`: fine-tune or masked-LM-pretrain one model. Also the pieces every training run shares:
preparing data, building the objective's evaluation, and writing the finished output folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdship.artifacts import staged_dir, write_record
from kdship.config import RunConfig, TrainConfig, to_record
from kdship.data import Encoded, TextTable, encode_labels, label_names_from_data, load_table, tokenize
from kdship.errors import ConfigError, ModelError
from kdship.evaluate import classification_metrics, mlm_loss, predict_logits
from kdship.loop import (LoopState, Member, Objective, autocast_for, best_dir, fit, pick_device,
                         run_dir_for_output, seed_everything, total_steps_for)
from kdship.biencoder import embed_pairs, retrieval_metrics
from kdship.techniques.reverse import ReverseDistillation
from kdship.techniques.selection import build_selector, candidate_batches, rows_of
from kdship.techniques.small_model import load_small_model
from kdship.models import build_model, config_from_spec, load_config, load_tokenizer, max_tokens, task_label_names
from kdship.tokenizer import train_wordpiece


@dataclass
class RunData:
    train: Encoded
    eval: Encoded | None
    train_table: TextTable
    eval_table: TextTable | None
    label_names: list[str] | None
    max_length: int


def load_run_data(cfg: RunConfig, tokenizer: Any, label_names: list[str] | None, max_length: int) -> RunData:
    """Train (and eval) examples tokenized with `tokenizer` (at most `max_length` tokens, see models.max_tokens);
    labels checked against the model's label names."""
    if not cfg.data.train:
        raise ConfigError("no training data; pass --data FILE (or data.train in the recipe)")
    labelled = cfg.labelled
    label_col = cfg.data.label_column if labelled else None
    train_table = load_table(cfg.data.train, cfg.data.text_columns, label_col, cfg.data.max_train_samples)
    eval_table = (load_table(cfg.data.eval, cfg.data.text_columns, label_col, cfg.data.max_eval_samples)
                  if cfg.data.eval else None)
    if labelled:
        data_names = label_names_from_data(train_table.raw_labels)
        if label_names is not None and len(data_names) > len(label_names):
            raise ModelError(f"the model has {len(label_names)} labels but {train_table.source} has "
                             f"{len(data_names)}; use a model trained on the same labels")
        label_names = label_names or data_names
    encode = lambda t: tokenize(tokenizer, t, max_length,  # noqa: E731
                                encode_labels(t.raw_labels, label_names, t.source) if labelled else None,
                                apart=cfg.objective == "match")
    return RunData(encode(train_table), encode(eval_table) if eval_table else None, train_table, eval_table,
                   label_names if labelled else None, max_length)


def mlm_collator_for(cfg: RunConfig, tokenizer: Any) -> Any:
    if cfg.objective != "mlm":
        return None
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise ModelError("the tokenizer has no [MASK] token, so it cannot do masked-LM; use --objective classify")
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability, seed=0)


def model_evaluator(cfg: RunConfig, model: nn.Module, tokenizer: Any, data: RunData, device: torch.device,
                    autocast: Any, mlm_collator: Any) -> tuple[Callable[[], dict[str, float]] | None, str, bool]:
    """(evaluate, metric name, higher is better) for the run's objective; evaluate is None without eval data."""
    if data.eval is None or cfg.objective == "features":  # feature matching has no task metric: keep the last
        return None, "", True
    if cfg.objective == "mlm":
        return (lambda: {"mlm_loss": mlm_loss(model, tokenizer, data.eval, cfg.eval_batch_size, device,
                                              mlm_collator)}), "mlm_loss", False
    if not cfg.labelled:  # in-batch matching: each eval pair's left side retrieves among all right sides
        return (lambda: retrieval_metrics(*embed_pairs(model, tokenizer, data.eval, cfg.eval_batch_size, device,
                                                       autocast))), "recall_at_1", True
    labels = torch.tensor(data.eval.labels)

    def accuracy() -> dict[str, float]:
        logits = predict_logits(model, tokenizer, data.eval, cfg.eval_batch_size, device, autocast)
        return {"accuracy": classification_metrics(logits, labels, data.label_names)["accuracy"]}

    return accuracy, "accuracy", True


def member_metrics(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One member's metrics from a history entry (multi-student entries are keyed 'name/metric')."""
    return {k.removeprefix(prefix): v for k, v in entry.items() if k in ("step", "epoch") or k.startswith(prefix)}


def training_summary(state: LoopState, member: str) -> dict[str, Any]:
    best = state.best.get(member, {})
    return {"steps": state.step, "best_step": best.get("step"), "samples_seen": state.samples_seen,
            "train_seconds": round(state.train_seconds, 3),
            "samples_per_second": round(state.samples_seen / max(state.train_seconds, 1e-9), 2)}


def write_output(output: Path, run_dir: Path, state: LoopState, member: str, model: nn.Module, tokenizer: Any,
                 record: dict[str, Any], overwrite: bool, prefix: str = "") -> dict[str, Any]:
    """Write one model's output folder atomically: best weights (or last, without eval data), tokenizer,
    kdship.json with its metrics, evaluation history and training summary."""
    best = best_dir(run_dir, member)
    best_step = state.best.get(member, {}).get("step")
    metrics = next((member_metrics(h, prefix) for h in state.history if h["step"] == best_step), {})
    with staged_dir(output, overwrite=overwrite) as tmp:
        if best.exists():
            shutil.copytree(best, tmp, dirs_exist_ok=True)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {**record, "metrics": metrics, "history": [member_metrics(h, prefix) for h in state.history],
                  "training": {**training_summary(state, member), **record.get("training", {})}}
        write_record(tmp, record)
    return {"output": str(output), **record}


def data_record(data: RunData) -> dict[str, Any]:
    tables = {"train": data.train_table, "eval": data.eval_table}
    record = {name: {"source": t.source, "fingerprint": t.fingerprint, "n": len(t)} for name, t in tables.items() if t}
    return {**record, "max_length": data.max_length}


def _tokenizer_for(cfg: TrainConfig, run_dir: Path) -> Any:
    saved = run_dir / "tokenizer"
    if cfg.tokenizer or cfg.model:
        return load_tokenizer(cfg.tokenizer or cfg.model, "tokenizer" if cfg.tokenizer else "model")
    if saved.exists():  # a resumed run must keep the tokenizer it started with
        return load_tokenizer(str(saved), "tokenizer")
    texts = load_table(cfg.data.train, cfg.data.text_columns, None, cfg.data.max_train_samples).texts
    tokenizer = train_wordpiece((" ".join(t) for t in texts), cfg.vocab_size)
    tokenizer.save_pretrained(saved)
    return tokenizer


def _build_train_model(cfg: TrainConfig, tokenizer: Any, data: RunData, config: Any) -> nn.Module:
    """The model to train: from cfg.model, or fresh from `config` (the parsed --init spec)."""
    if cfg.model:
        return build_model(cfg.objective, source=cfg.model, label_names=data.label_names, match_loss=cfg.match_loss)
    if "vocab=" not in cfg.init:
        config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if config.vocab_size < len(tokenizer):
        raise ModelError(f"--init vocab={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens); "
                         "drop vocab= or raise it")
    return build_model(cfg.objective, config=config, label_names=data.label_names, match_loss=cfg.match_loss)


def train(cfg: TrainConfig) -> dict[str, Any]:
    if not cfg.output:
        raise ConfigError("no output folder; pass --output DIR")
    if not cfg.data.train:
        raise ConfigError("no training data; pass --data FILE (or data.train in the recipe)")
    with run_dir_for_output(Path(cfg.output), cfg) as run_dir:
        return _train(cfg, Path(cfg.output), run_dir)


def _train(cfg: TrainConfig, output: Path, run_dir: Path) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    autocast = autocast_for(device, cfg.precision)
    tokenizer = _tokenizer_for(cfg, run_dir)
    source_config = load_config(cfg.model, "model") if cfg.model else config_from_spec(cfg.init)
    data = load_run_data(cfg, tokenizer, task_label_names(cfg.objective, source_config),
                         max_tokens(cfg.data.max_length, source_config))
    model = _build_train_model(cfg, tokenizer, data, source_config).to(device)
    collator = mlm_collator_for(cfg, tokenizer)
    evaluate, metric, higher = model_evaluator(cfg, model, tokenizer, data, device, autocast, collator)

    loop_cfg = candidate_batches(cfg)
    total, _ = total_steps_for(loop_cfg, len(data.train.features))
    if cfg.reverse_steps and cfg.reverse_steps > total:
        raise ConfigError(f"reverse_steps {cfg.reverse_steps} is longer than the run ({total} steps); lower "
                          "--reverse-steps or train longer")
    reverse = ReverseDistillation(
        load_small_model(cfg.reverse_from, "small model", cfg, tokenizer, model, device), model, cfg.reverse_steps,
        cfg.reverse_schedule, cfg.reverse_start, cfg.reverse_temperature, cfg.reverse_hidden, autocast
    ) if cfg.reverse_from else None
    selector = build_selector(cfg, model, tokenizer, data.train, device, autocast) if cfg.select_by else None

    def step(batch: dict[str, Any], step_no: int, progress: float,
             indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(device) for k, v in batch.items()}
        if selector is not None:
            batch = rows_of(batch, selector.choose(batch, indices, step_no))
        with autocast():
            out = model(**batch, output_hidden_states=bool(reverse and reverse.wants_hidden(step_no)))
        loss, logs = out.loss, {"loss": out.loss.detach()}
        if reverse is not None and reverse.alpha(step_no) > 0:  # the small model is run only while it has a say
            loss, reverse_logs = reverse.loss(out.loss, out, batch, step_no)
            logs |= reverse_logs
        return loss, logs | (selector.last if selector else {})

    trained = nn.ModuleDict({"model": model, "projections": reverse.projections}) if reverse else model
    memory = {"selection": selector.memory} if selector else {}
    objective = Objective(step, evaluate, [Member("model", trained, model.save_pretrained, metric, higher)], memory,
                          selector.trained_of if selector else None)
    state = fit(loop_cfg, objective, data.train, tokenizer, run_dir, collator, "train", data_record(data))
    record = {"command": "train", "config": to_record(cfg), "data": data_record(data), "device": str(device),
              "model": {"source": cfg.model or cfg.init, "parameters": sum(p.numel() for p in model.parameters())}}
    if reverse is not None:
        record["reverse"] = {"from": cfg.reverse_from, "steps": cfg.reverse_steps, "schedule": cfg.reverse_schedule,
                             "temperature": cfg.reverse_temperature, "start": cfg.reverse_start,
                             "hidden_weight": cfg.reverse_hidden, "layer_pairs": reverse.pairs}
    if selector is not None:
        record["selection"] = {"by": cfg.select_by, "candidates_per_step": loop_cfg.batch_size,
                               **selector.summary()}
    result = write_output(output, run_dir, state, "model", model, tokenizer, record, cfg.overwrite)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result

