"""`kdship distill`: a student learns from a teacher. The step reads top to bottom: teacher forward under no_grad,
student forward, the weighted registry losses, the optimizer step (in kdship.loop)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdship.config import DistillConfig, to_record
from kdship.errors import ConfigError, ModelError
from kdship.evaluate import predict_logits
from kdship.biencoder import targets, token_mask
from kdship.loop import Member, Objective, autocast_for, fit, pick_device, run_dir_for_output, seed_everything
from kdship.techniques.selection import build_selector, candidate_batches, rows_of
from kdship.losses import LossInputs, WeightedLoss, get_loss
from kdship.models import (build_model, check_tokenizers_match, check_vocab_compatible, config_from_spec,
                           expand_shorthand, init_from_teacher, is_mlm, is_shape_spec, label_names_of, load_config,
                           load_tokenizer, max_tokens, task_label_names, uniform_layer_map)
from kdship.artifacts import read_record, sha256_file, staged_dir, write_record
from kdship.train import data_record, load_run_data, mlm_collator_for, model_evaluator, write_output


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
    if cfg.labelled and cfg.objective == "match" and task_label_names("match", config) is None:
        raise ModelError(f"teacher {cfg.teacher} is not a bi-encoder trained to classify pairs; train one with "
                         "`kdship train --objective match --match-loss classify` (or use --match-loss in_batch)")
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


def head_for(cfg: DistillConfig, teacher_config: Any) -> str:
    """The model class to build: the objective's, or for feature matching the teacher's own kind of head."""
    if cfg.objective != "features":
        return cfg.objective
    return "mlm" if is_mlm(teacher_config) else "classify"  # a bare encoder (no head) is loaded as a classifier


def student_sources(cfg: DistillConfig, family: str) -> dict[str, str]:
    """name -> source of every student; shorthand like 4L312 becomes a spec of the teacher's family."""
    if cfg.students:
        return {name: expand_shorthand(source, family) for name, source in cfg.students.items()}
    if not cfg.student:
        raise ConfigError("no student; pass --student DIR, a hub id, or a shape spec such as bert:layers=4,hidden=312 "
                          "(or --students 4L312,6L768)")
    return {"student": expand_shorthand(cfg.student, family)}


def _student(cfg: DistillConfig, source: str, head: str, teacher: nn.Module, tokenizer: Any,
             label_names: list[str] | None, eager: bool) -> Pair:
    tcfg = teacher.config
    if is_shape_spec(source):
        config = config_from_spec(source, base=tcfg)
        student = build_model(head, config=config, label_names=label_names, attn_eager=eager,
                              match_loss=cfg.match_loss)
    else:
        config = load_config(source, "student")
        if (Path(source) / "tokenizer_config.json").exists() or (Path(source) / "tokenizer.json").exists():
            check_tokenizers_match(tokenizer, load_tokenizer(source, "student"), source)
        check_vocab_compatible(config, tokenizer, source)
        names = task_label_names(head, config)
        if names is not None and label_names is not None and len(names) != len(label_names):
            raise ModelError(f"student {source} has {len(names)} labels but the teacher has {len(label_names)}; "
                             "use a student without a classification head, or one trained on the same labels")
        student = build_model(head, source=source, label_names=label_names, attn_eager=eager,
                              match_loss=cfg.match_loss)
    layer_map = _layer_map(cfg, student.config.num_hidden_layers, tcfg.num_hidden_layers)
    copied = 0
    if is_shape_spec(source) and cfg.init_from_teacher and student.config.hidden_size == tcfg.hidden_size:
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
    if not cfg.data.train:
        raise ConfigError("no training data; pass --data FILE (or data.train in the recipe)")
    tconfig = _teacher_config(cfg)
    with run_dir_for_output(Path(cfg.output), cfg) as run_dir:
        return _distill(cfg, tconfig, Path(cfg.output), run_dir)


class RegionTimer:
    """Seconds spent in a region, summed over steps. On CUDA the kernels run after the host moves on, so CUDA events
    time them, and their elapsed times are read (one sync) every FOLD regions, not every step."""

    FOLD = 100

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.pending: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def region(self):
        if not self.cuda:
            started = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((start, end))
        if len(self.pending) >= self.FOLD:
            self.total()

    def total(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pending) / 1000
            self.pending.clear()
        return self.seconds


LOSS_WINDOW = 5  # steps averaged for the first and the last loss in kdship.json


@dataclass
class Trainee:
    """One student in training: the model, its projections and loss bookkeeping."""

    name: str
    pair: Pair
    projections: nn.ModuleList
    prefix: str  # "" for a single student, "name/" for several (log and metric keys)
    timer: RegionTimer
    # detached per micro-batch losses: only the first and last few are kept (read once, at the end)
    first_losses: list[torch.Tensor] = field(default_factory=list)
    last_losses: deque = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))

    def record_loss(self, loss: torch.Tensor) -> None:
        if len(self.first_losses) < LOSS_WINDOW:
            self.first_losses.append(loss)
        self.last_losses.append(loss)

    def loss_summary(self) -> dict[str, float]:
        """Mean loss over the first and the last few steps: did this student learn?"""
        if not self.first_losses:
            return {}
        mean = lambda losses: sum(float(x) for x in losses) / len(losses)  # noqa: E731
        return {"loss_first": mean(self.first_losses), "loss_last": mean(self.last_losses)}


def precompute_teacher_logits(cfg: DistillConfig, needs: set[str], teacher: nn.Module, tokenizer: Any,
                              data: Any, device: torch.device, autocast: Any) -> torch.Tensor | None:
    """The teacher's logits for every training example, once, when that is all the losses read and the inputs do
    not change between epochs (no random masking): the teacher then costs one pass instead of one per epoch.
    Computed in a fixed order, so a resumed run uses exactly the same values."""
    safe = cfg.labelled and needs <= {"logits", "teacher"}
    if cfg.teacher_cache == "off" or not safe:
        return None
    # kept on the device: each step gathers its rows there instead of copying them from the host
    return predict_logits(teacher, tokenizer, data.train, cfg.eval_batch_size, device, autocast).to(device)


def _losses_for(trainee: Trainee, t_out: Any, s_out: Any, batch: dict[str, Any], needs: set[str],
                teacher_logits: torch.Tensor, temperature: float) -> LossInputs:
    x = LossInputs(student_logits=s_out.logits, teacher_logits=teacher_logits, labels=targets(batch, s_out.logits),
                   attention_mask=token_mask(batch), temperature=temperature)
    if "hidden" in needs:
        x.student_hidden = [proj(h.float()) for proj, h in zip(trainee.projections, s_out.hidden_states)]
        x.teacher_hidden = [t_out.hidden_states[i] for i in trainee.pair.layer_map]
    if "attentions" in needs:
        x.student_attentions = s_out.attentions
        x.teacher_attentions = [t_out.attentions[i - 1] for i in trainee.pair.layer_map[1:]]
    return x


def _distill(cfg: DistillConfig, tconfig: Any, output: Path, run_dir: Path) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    autocast = autocast_for(device, cfg.precision)
    terms = [WeightedLoss(get_loss(spec.name), spec.weight, spec.weight_end) for spec in cfg.losses]
    needs = set().union(*(t.loss.needs for t in terms))
    eager = "attentions" in needs  # fused attention kernels do not return attention maps
    head = head_for(cfg, tconfig)
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    label_names = task_label_names(head, tconfig) if head != "match" or cfg.labelled else None
    teacher = build_model(head, source=cfg.teacher, attn_eager=eager, match_loss=cfg.match_loss).to(device).eval()
    teacher.requires_grad_(False)
    sources = student_sources(cfg, tconfig.model_type)
    multi = cfg.students is not None
    trainees = []
    for name, source in sources.items():
        pair = _student(cfg, source, head, teacher, tokenizer, label_names, eager)
        pair.student.to(device)
        trainees.append(Trainee(name, pair, _projections(pair, "hidden" in needs).to(device), f"{name}/" if multi else "",
                                RegionTimer(device)))
    data = load_run_data(cfg, tokenizer, label_names if cfg.labelled else None,
                         max_tokens(cfg.data.max_length, teacher.config, *(t.pair.student.config for t in trainees)))
    collator = mlm_collator_for(cfg, tokenizer)
    cached = precompute_teacher_logits(cfg, needs, teacher, tokenizer, data, device, autocast)
    teacher_eval = (predict_logits(teacher, tokenizer, data.eval, cfg.eval_batch_size, device, autocast)
                    if data.eval is not None and cfg.labelled else None)
    selector = (build_selector(cfg, trainees[0].pair.student, tokenizer, data.train, device, autocast)
                if cfg.select_by else None)
    loop_cfg = candidate_batches(cfg)
    evaluators = {t.name: model_evaluator(cfg, t.pair.student, tokenizer, data, device, autocast, collator)
                  for t in trainees}
    eval_labels = torch.tensor(data.eval.labels) if teacher_eval is not None else None
    counters = {"teacher_forward_calls": 0}

    def evaluate() -> dict[str, float]:
        metrics = {}
        for t in trainees:
            if teacher_eval is not None:  # one pass over the eval set gives accuracy and agreement
                logits = predict_logits(t.pair.student, tokenizer, data.eval, cfg.eval_batch_size, device, autocast)
                student_metrics = {"accuracy": logits.argmax(-1).eq(eval_labels).float().mean().item(),
                                   "agreement": logits.argmax(-1).eq(teacher_eval.argmax(-1)).float().mean().item()}
            else:
                student_metrics = evaluators[t.name][0]()
            metrics |= {f"{t.prefix}{k}": v for k, v in student_metrics.items()}
        return metrics

    def step(batch: dict[str, Any], step_no: int, progress: float,
             indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(device) for k, v in batch.items()}
        if selector is not None:  # the student is the model being trained: it gets the valuable samples
            rows = selector.choose(batch, indices, step_no)
            batch, indices = rows_of(batch, rows), [indices[r] for r in rows.tolist()]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = {"output_hidden_states": "hidden" in needs, "output_attentions": "attentions" in needs}
        t_out = None
        if cached is None:
            with autocast(), torch.no_grad():
                t_out = teacher(**inputs, **want)  # once per batch, shared by every student
            counters["teacher_forward_calls"] += 1
        teacher_logits = cached[torch.as_tensor(indices, device=device)] if cached is not None else t_out.logits
        total, logs = 0.0, {}
        for t in trainees:
            with t.timer.region():
                with autocast():
                    s_out = t.pair.student(**inputs, **want)
                x = _losses_for(t, t_out, s_out, batch, needs, teacher_logits, cfg.temperature)
                values = [term.loss.fn(x) for term in terms]
                student_total = sum(term.weight_at(progress) * value for term, value in zip(terms, values))
            # detached tensors, not floats: .item() would wait for the GPU on every step (the bar reads them rarely)
            logs |= {f"{t.prefix}{term.loss.name}": value.detach() for term, value in zip(terms, values)}
            t.record_loss(student_total.detach())
            total = total + student_total
        return total, logs | (selector.last if selector else {})

    members = [Member(t.name, nn.ModuleDict({"model": t.pair.student, "projections": t.projections}),
                      t.pair.student.save_pretrained, f"{t.prefix}{evaluators[t.name][1]}" if evaluators[t.name][0]
                      else "", evaluators[t.name][2]) for t in trainees]
    has_eval = any(e[0] for e in evaluators.values())
    label = "distill" + (f" x{len(trainees)} students" if multi else "") + (" (teacher cached)" if cached is not None
                                                                            else "")
    memory = {"selection": selector.memory} if selector else {}
    objective = Objective(step, evaluate if has_eval else None, members, memory,
                          selector.trained_of if selector else None)
    state = fit(loop_cfg, objective, data.train, tokenizer, run_dir, collator, label, data_record(data))
    teacher_record = teacher_identity(cfg.teacher) | {"parameters": sum(p.numel() for p in teacher.parameters())}

    def record_for(t: Trainee) -> dict[str, Any]:
        student_params = sum(p.numel() for p in t.pair.student.parameters())
        params = student_params + sum(p.numel() for p in t.projections.parameters())
        return {"command": "distill", "config": to_record(cfg), "data": data_record(data), "device": str(device),
                "teacher": teacher_record,
                "student": {"name": t.name, "source": sources[t.name], "parameters": student_params,
                            "layer_map": t.pair.layer_map, "tensors_copied_from_teacher": t.pair.copied_from_teacher},
                "training": {"teacher_cache": cached is not None, **counters, **t.loss_summary(),
                             "student_forward_seconds": round(t.timer.total(), 3), "students_in_pass": len(trainees),
                             # weights, gradients and AdamW's two moments, fp32
                             "training_state_mb": round(params * 4 * 4 / 2**20, 2)},
                **({"selection": {"by": cfg.select_by, "candidates_per_step": loop_cfg.batch_size,
                                  **selector.summary()}} if selector else {})}

    if not multi:
        result = write_output(output, run_dir, state, "student", trainees[0].pair.student, tokenizer,
                              record_for(trainees[0]), cfg.overwrite)
        shutil.rmtree(run_dir, ignore_errors=True)
        return result
    with staged_dir(output, cfg.overwrite) as tmp:  # every student appears at once, or none does
        results = {t.name: write_output(tmp / t.name, run_dir, state, t.name, t.pair.student, tokenizer, record_for(t),
                                        False, t.prefix) for t in trainees}
        write_record(tmp, {"command": "distill-students", "config": to_record(cfg),
                           "students": {t.name: str(output / t.name) for t in trainees}})
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"output": str(output), "students": results, "metrics": {}}
