"""`kdship train`: fine-tune or masked-LM-pretrain one model (how teachers are made), optionally with techniques
around its step (reverse distillation from a small model, sample-value selection by one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdship.config import TrainConfig, to_record
from kdship.errors import ModelError
from kdship.loop import StepInput, StepResult, TrainingPlan, fit, total_steps_for
from kdship.models import (build_model, config_from_spec, load_config, load_tokenizer, max_tokens, task_label_names,
                           under_weights_policy)
from kdship.run import RunData, evaluation_for, load_run_data, mlm_collator_for, training_run, training_summary, \
    write_output
from kdship.runtime import Runtime
from kdship.techniques import (TechniqueContext, build_techniques, draw_size_for, technique_batches, technique_memory,
                               technique_records, wrap_step)
from kdship.data import lm_texts, load_lm_table, load_table, model_inputs
from kdship.losses import target_cross_entropy
from kdship.tokenizer import train_byte_bpe, train_wordpiece
from kdship.trainee import Trainee


@under_weights_policy
def train(cfg: TrainConfig) -> dict[str, Any]:
    with training_run(cfg) as (runtime, run_dir):
        return _train(cfg, runtime, run_dir)


def _train(cfg: TrainConfig, runtime: Runtime, run_dir: Path) -> dict[str, Any]:
    source_config = load_config(cfg.model, "model") if cfg.model else config_from_spec(cfg.init)
    tokenizer = _tokenizer_for(cfg, run_dir, runtime)
    data = load_run_data(cfg, tokenizer, task_label_names(cfg.objective, source_config),
                         max_tokens(cfg.data.max_length, source_config))
    model = _build_train_model(cfg, tokenizer, data, source_config)
    collator = mlm_collator_for(cfg, tokenizer)
    evaluation = evaluation_for(cfg, model, tokenizer, data, runtime, collator)
    trainee = Trainee("model", model, metric=evaluation.metric, higher_is_better=evaluation.higher_is_better)
    total, _ = total_steps_for(cfg, len(data.train.features), runtime.world, draw_size_for(cfg))
    techniques = build_techniques(TechniqueContext(cfg, [trainee], tokenizer, data.train, runtime, total,
                                                   draw_size_for(cfg), label_names=data.label_names,
                                                   max_length=data.max_length))
    # a bi-encoder's pooler gets no gradient, nor does a technique's head once its phase is over
    trainee.distribute(runtime, cfg.sharding, all_used=cfg.objective != "match" and not trainee.heads)

    # a causal LM's data holds its targets aligned with the positions that predict them, which transformers would
    # shift once more: it gets the inputs alone, and the step scores the targets
    causal = cfg.objective == "clm"

    def step(x: StepInput) -> StepResult:
        forward = trainee(model_inputs(x.tensors) if causal else x.tensors, x.outputs)
        loss = target_cross_entropy(forward.output.logits, x.tensors["labels"]) if causal else forward.output.loss
        trainee.trace.add(loss.detach())
        return StepResult(loss, {"loss": loss.detach()}, len(x.indices), {trainee.name: forward})

    plan = TrainingPlan(wrap_step(step, techniques), evaluation.run, [trainee], technique_memory(techniques),
                        draw_size_for(cfg), technique_batches(techniques))
    state = fit(cfg, plan, data.train, tokenizer, run_dir, runtime, collator, "train", data.record())
    record = {"command": "train", "config": to_record(cfg), "data": data.record(), "device": str(runtime.device),
              "model": {"source": cfg.model or cfg.init, "parameters": trainee.parameter_count()},
              "training": training_summary(state, trainee, runtime, cfg.batch_size, cfg.grad_accum),
              **technique_records(techniques, runtime)}
    return write_output(Path(cfg.output), run_dir, state, trainee, tokenizer, record, cfg.overwrite, runtime,
                        data.baseline)


def _tokenizer_for(cfg: TrainConfig, run_dir: Path, runtime: Runtime) -> Any:
    """The model's (or the given) tokenizer; with --init and none given, a WordPiece tokenizer trained on the
    data by rank 0 and read by every process."""
    if cfg.tokenizer or cfg.model:
        return load_tokenizer(cfg.tokenizer or cfg.model, "tokenizer" if cfg.tokenizer else "model")
    saved = run_dir / "tokenizer"
    if runtime.is_main and not saved.exists():  # a resumed run keeps the tokenizer it started with
        if cfg.objective == "clm":  # generation needs text that round-trips: byte-level BPE
            train_byte_bpe(lm_texts(load_lm_table(cfg.data.train, cfg.data.text_columns, cfg.data.max_train_samples)),
                           cfg.vocab_size).save_pretrained(saved)
        else:
            texts = load_table(cfg.data.train, cfg.data.text_columns, None, cfg.data.max_train_samples).texts
            train_wordpiece((" ".join(t) for t in texts), cfg.vocab_size).save_pretrained(saved)
    runtime.barrier()
    return load_tokenizer(str(saved), "tokenizer")


def _build_train_model(cfg: TrainConfig, tokenizer: Any, data: RunData, config: Any) -> nn.Module:
    """The model to train: from cfg.model, or fresh from `config` (the parsed --init spec)."""
    if cfg.model:
        return build_model(cfg.objective, source=cfg.model, label_names=data.label_names, match_loss=cfg.match_loss,
                           keep_exits=cfg.early_exit is not None)
    if "vocab=" not in cfg.init:
        config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if cfg.objective == "clm":  # generation starts and stops on the tokenizer's tokens, not the family's defaults
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if config.vocab_size < len(tokenizer):
        raise ModelError(f"--init vocab={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens); "
                         "drop vocab= or raise it")
    return build_model(cfg.objective, config=config, label_names=data.label_names, match_loss=cfg.match_loss)
