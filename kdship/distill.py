"""`kdship distill`: a student learns from a teacher. The step reads top to bottom: teacher forward under no_grad,
student forward, the weighted registry losses, the optimizer step (in kdship.loop)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdship.config import DistillConfig, to_record
from kdship.errors import ConfigError, ModelError
from kdship.evaluate import predict_logits
from kdship.loop import Objective, autocast_for, fit, pick_device, run_dir_for_output, seed_everything
from kdship.losses import LossInputs, WeightedLoss, get_loss
from kdship.models import (build_model, check_tokenizers_match, check_vocab_compatible, config_from_spec,
                           init_from_teacher, is_mlm, is_shape_spec, label_names_of, load_config, load_tokenizer,
                           max_tokens, uniform_layer_map)
from kdship.artifacts import read_record, sha256_file
from kdship.train import data_record, finish_run, load_run_data, mlm_collator_for, model_evaluator


@dataclass
class Pair:
    """Teacher, student and how their layers line up."""

    teacher: nn.Module
    student: nn.Module
    layer_map: list[int]  # teacher hidden-state index for each student hidden state
    copied_from_teacher: int


def _teacher_config(cfg: DistillConfig) -> Any:
    if not cfg.teacher:
        raise ConfigError("no teacher; pass --teacher DIR_OR_HUB_ID")
    config = load_config(cfg.teacher, "teacher")
    if cfg.objective == "classify" and label_names_of(config) is None:
        raise ModelError(f"teacher {cfg.teacher} has no trained classification head; fine-tune it first with "
                         "`kdship train` (or distill with --objective mlm)")
    if cfg.objective == "mlm" and not is_mlm(config):
        raise ModelError(f"teacher {cfg.teacher} has no masked-LM head, so --objective mlm cannot use it; use a "
                         "masked-LM teacher, or hidden/attention losses with --objective classify")
    return config


def _layer_map(cfg: DistillConfig, student_layers: int, teacher_layers: int) -> list[int]:
    if cfg.layer_map is None:
        return uniform_layer_map(student_layers, teacher_layers)
    valid = cfg.layer_map[0] == 0 and all(1 <= i <= teacher_layers for i in cfg.layer_map[1:])
    if len(cfg.layer_map) != student_layers + 1 or not valid:
        raise ConfigError(f"layer_map needs {student_layers + 1} entries (0 for the embeddings, then for each student "
                          f"layer a teacher layer in 1..{teacher_layers}); got {cfg.layer_map}")
    return cfg.layer_map


def _student(cfg: DistillConfig, teacher: nn.Module, tokenizer: Any, label_names: list[str] | None,
             eager: bool) -> Pair:
    if not cfg.student:
        raise ConfigError("no student; pass --student DIR, a hub id, or a shape spec such as bert:layers=4,hidden=312")
    tcfg = teacher.config
    if is_shape_spec(cfg.student):
        config = config_from_spec(cfg.student, base=tcfg)
        student = build_model(cfg.objective, config=config, label_names=label_names, attn_eager=eager)
    else:
        config = load_config(cfg.student, "student")
        if (Path(cfg.student) / "tokenizer_config.json").exists() or (Path(cfg.student) / "tokenizer.json").exists():
            check_tokenizers_match(tokenizer, load_tokenizer(cfg.student, "student"), cfg.student)
        check_vocab_compatible(config, tokenizer, cfg.student)
        names = label_names_of(config)
        if cfg.objective == "classify" and names is not None and len(names) != len(label_names):
            raise ModelError(f"student {cfg.student} has {len(names)} labels but the teacher has {len(label_names)}; "
                             "use a student without a classification head, or one trained on the same labels")
        student = build_model(cfg.objective, source=cfg.student, label_names=label_names, attn_eager=eager)
    layer_map = _layer_map(cfg, student.config.num_hidden_layers, tcfg.num_hidden_layers)
    copied = 0
    if is_shape_spec(cfg.student) and cfg.init_from_teacher and student.config.hidden_size == tcfg.hidden_size:
        copied = init_from_teacher(student, teacher, layer_map)
    return Pair(teacher, student, layer_map, copied)


def _projections(pair: Pair, wanted: bool) -> nn.ModuleList:
    """One learned linear map per matched hidden state, student width -> teacher width (identity when equal)."""
    if not wanted:
        return nn.ModuleList()
    s, t = pair.student.config.hidden_size, pair.teacher.config.hidden_size
    projections = nn.ModuleList(nn.Linear(s, t) for _ in pair.layer_map)
    if s == t:
        for p in projections:
            nn.init.eye_(p.weight)
            nn.init.zeros_(p.bias)
    return projections


def teacher_identity(source: str) -> dict[str, Any]:
    record = read_record(Path(source)) if Path(source).is_dir() else None
    identity: dict[str, Any] = {"source": source}
    weights = Path(source) / "model.safetensors"
    if weights.is_file():
        identity["weights_sha256"] = sha256_file(weights)
    if record:
        identity |= {"command": record.get("command"), "metrics": record.get("metrics"), "data": record.get("data")}
    return identity


def distill(cfg: DistillConfig) -> dict[str, Any]:
    if not cfg.output:
        raise ConfigError("no output folder; pass --output DIR")
    tconfig = _teacher_config(cfg)
    with run_dir_for_output(Path(cfg.output), cfg) as run_dir:
        return _distill(cfg, tconfig, Path(cfg.output), run_dir)


def _distill(cfg: DistillConfig, tconfig: Any, output: Path, run_dir: Path) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    autocast = autocast_for(device, cfg.precision)
    terms = [WeightedLoss(get_loss(spec.name), spec.weight, spec.weight_end) for spec in cfg.losses]
    needs = set().union(*(t.loss.needs for t in terms))
    eager = "attentions" in needs  # fused attention kernels do not return attention maps
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    label_names = label_names_of(tconfig) if cfg.objective == "classify" else None
    teacher = build_model(cfg.objective, source=cfg.teacher, attn_eager=eager).to(device).eval()
    teacher.requires_grad_(False)
    pair = _student(cfg, teacher, tokenizer, label_names, eager)
    student = pair.student.to(device)
    data = load_run_data(cfg, tokenizer, label_names,
                         max_tokens(cfg.data.max_length, teacher.config, student.config))
    projections = _projections(pair, "hidden" in needs).to(device)
    collator = mlm_collator_for(cfg, tokenizer)
    evaluate_student, metric, higher = model_evaluator(cfg, student, tokenizer, data, device, autocast, collator)
    teacher_eval = (predict_logits(teacher, tokenizer, data.eval, cfg.eval_batch_size, device, autocast)
                    if data.eval is not None and cfg.objective == "classify" else None)

    def evaluate_with_agreement() -> dict[str, float]:
        metrics = evaluate_student()
        if teacher_eval is not None:
            student_eval = predict_logits(student, tokenizer, data.eval, cfg.eval_batch_size, device, autocast)
            metrics["agreement"] = student_eval.argmax(-1).eq(teacher_eval.argmax(-1)).float().mean().item()
        return metrics

    def step(batch: dict[str, Any], progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = {"output_hidden_states": "hidden" in needs, "output_attentions": "attentions" in needs}
        with autocast():
            with torch.no_grad():
                t_out = teacher(**inputs, **want)
            s_out = student(**inputs, **want)
        x = LossInputs(student_logits=s_out.logits, teacher_logits=t_out.logits, labels=batch.get("labels"),
                       attention_mask=batch["attention_mask"], temperature=cfg.temperature)
        if "hidden" in needs:
            x.student_hidden = [proj(h.float()) for proj, h in zip(projections, s_out.hidden_states)]
            x.teacher_hidden = [t_out.hidden_states[i] for i in pair.layer_map]
        if "attentions" in needs:
            x.student_attentions = s_out.attentions
            x.teacher_attentions = [t_out.attentions[i - 1] for i in pair.layer_map[1:]]
        total, logs = 0.0, {}
        for term in terms:
            value = term.loss.fn(x)
            total = total + term.weight_at(progress) * value
            logs[term.loss.name] = value.item()
        return total, logs

    evaluate = evaluate_with_agreement if evaluate_student else None
    objective = Objective(step, evaluate, metric, higher, student.save_pretrained)
    trainable = nn.ModuleDict({"student": student, "projections": projections})
    state = fit(cfg, trainable, objective, data.train, tokenizer, run_dir, collator, "distill")
    record = {"command": "distill", "config": to_record(cfg), "data": data_record(data), "device": str(device),
              "teacher": teacher_identity(cfg.teacher) | {"parameters": sum(p.numel() for p in teacher.parameters())},
              "student": {"source": cfg.student, "parameters": sum(p.numel() for p in student.parameters()),
                          "layer_map": pair.layer_map, "tensors_copied_from_teacher": pair.copied_from_teacher}}
    return finish_run(output, run_dir, state, student, tokenizer, record, cfg.overwrite)
