"""`kdship distill`: students learn from a teacher. Three parts: build the run (teacher, students, data,
techniques), the step (the teacher's outputs, each student's forward and weighted registry losses), and writing
the outputs. The optimizer step, evaluation and checkpoints are kdship.loop's; techniques wrap the step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdship.artifacts import read_record, sha256_file, staged_dir, with_relative_sources, write_record
from kdship.config import DistillConfig, to_record
from kdship.data import model_inputs, targets, token_mask
from kdship.errors import ConfigError, ModelError
from kdship.loop import LoopState, Step, StepInput, StepResult, TrainingPlan, fit, total_steps_for
from kdship.losses import LossInputs, WeightedLoss, get_loss
from kdship.models import (build_model, check_tokenizers_match, check_vocab_compatible, config_from_spec,
                           captured_qkv, expand_shorthand, init_from_teacher, is_mlm, is_shape_spec, label_names_of,
                           load_config, load_tokenizer, max_tokens, relation_heads, task_label_names,
                           under_weights_policy, uniform_layer_map)
from kdship.run import (RunData, evaluation_for, final_weights, label_metrics, load_run_data, mlm_collator_for,
                        output_record,
                        predict_everywhere, training_run, training_summary, write_model_folder, write_output)
from kdship.runtime import Runtime
from kdship.sanity import findings, warn
from kdship.techniques import (Technique, TechniqueContext, build_techniques, draw_size_for, technique_memory,
                               technique_records, wrap_step)
from kdship.trainee import ATTENTIONS, HIDDEN, QKV, Forward, HiddenProjection, Trainee

# default peak learning rates by how a student starts. Measured on SST-2 (random 4L-312, MiniLM-L6 teacher, 250
# steps of 32): task KD 76.0% at 5e-4 vs 70.1% at 1e-4, which leaves the majority-class plateau only after ~130
# steps; weights that already encode language are fine-tuned at the usual 1e-4
PRETRAINED_LR, RANDOM_INIT_LR = 1e-4, 5e-4
PROJECTIONS = "projections"  # a student's head mapping its hidden states to the teacher's width


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


def _copies_teacher_layers(cfg: DistillConfig, source: str, tcfg: Any) -> bool:
    """Whether this student starts from the teacher's layers (a shape spec of the teacher's width)."""
    return is_shape_spec(source) and cfg.init_from_teacher and config_from_spec(source, base=tcfg).hidden_size == \
        tcfg.hidden_size


def _student(cfg: DistillConfig, name: str, source: str, head: str, tcfg: Any, teacher: nn.Module | None,
             tokenizer: Any, label_names: list[str] | None, eager: bool, prefix: str) -> Trainee:
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
    copied = init_from_teacher(student, teacher, layer_map) if _copies_teacher_layers(cfg, source, tcfg) else 0
    lr = cfg.lr or (PRETRAINED_LR if copied or not is_shape_spec(source) else RANDOM_INIT_LR)
    return Trainee(name, student, prefix=prefix, lr=lr,
                   details={"name": name, "source": source, "layer_map": layer_map,
                            "tensors_copied_from_teacher": copied, "lr": lr})


def teacher_identity(source: str) -> dict[str, Any]:
    record = read_record(Path(source)) if Path(source).is_dir() else None
    identity: dict[str, Any] = {"source": source}
    weights = Path(source) / "model.safetensors"
    if weights.is_file():
        identity["weights_sha256"] = sha256_file(weights)
    if record:
        identity |= {"command": record.get("command"), "metrics": record.get("metrics"), "data": record.get("data")}
    return identity


@dataclass
class TeacherOutputs:
    logits: torch.Tensor
    hidden_states: Any = None
    attentions: Any = None
    qkv: dict[int, list[torch.Tensor]] | None = None  # teacher layer -> its query, key and value projections


class Teacher:
    """The teacher as the step sees it: `outputs(batch, indices)`, computed now under no_grad, or read from the
    logits computed once before training when that is all the losses read (`cache`). Without a loss that reads
    it there is no teacher model at all (`model` None) and `outputs` is None."""

    def __init__(self, model: nn.Module | None, source: str, parameters: int | None, wants: frozenset[str],
                 qkv_layers: frozenset[int], cache: torch.Tensor | None):
        self.model, self.source, self.parameters, self.wants = model, source, parameters, wants
        self.qkv_layers, self.cache = qkv_layers, cache
        self.memory = nn.Module()  # checkpointed with the run: a resumed record counts the whole run's calls
        self.memory.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))

    def outputs(self, batch: dict[str, torch.Tensor], indices: list[int]) -> TeacherOutputs | None:
        if self.cache is not None:
            return TeacherOutputs(self.cache[torch.as_tensor(indices, device=self.cache.device)])
        if self.model is None:
            return None
        with torch.no_grad(), contextlib.ExitStack() as stack:
            qkv = {layer: stack.enter_context(captured_qkv(self.model, layer)) for layer in sorted(self.qkv_layers)}
            out = self.model(**model_inputs(batch), output_hidden_states=HIDDEN in self.wants,
                             output_attentions=ATTENTIONS in self.wants)
        self.memory.forward_calls += 1  # a CPU tensor: counting costs no device sync
        return TeacherOutputs(out.logits, out.hidden_states, out.attentions, qkv)

    def record(self, runtime: Runtime) -> dict[str, Any]:
        return {"teacher_read": self.model is not None, "teacher_cache": self.cache is not None,
                "teacher_forward_calls": int(runtime.total(int(self.memory.forward_calls)))}


def cached_teacher_logits(cfg: DistillConfig, needs: set[str], teacher: nn.Module, tokenizer: Any, data: RunData,
                          runtime: Runtime) -> torch.Tensor | None:
    """The teacher's logits for every training example, once, when that is all the losses read and the inputs do
    not change between epochs (no random masking): the teacher then costs one pass instead of one per epoch,
    split over the processes. Computed in a fixed order, so a resumed run uses exactly the same values."""
    safe = cfg.labelled and needs <= {"logits", "teacher"}
    if cfg.teacher_cache == "off" or not safe:
        return None
    # kept on the device: each step gathers its rows there instead of copying them from the host
    return predict_everywhere(teacher, tokenizer, data.train, cfg.eval_batch_size, runtime)


@dataclass
class DistillRun:
    """Everything a distillation run is built from."""

    cfg: DistillConfig
    runtime: Runtime
    tokenizer: Any
    teacher: Teacher
    trainees: list[Trainee]
    data: RunData
    collator: Any
    terms: list[WeightedLoss]
    needs: set[str]
    techniques: list[Technique]
    evaluate: Any  # () -> metrics of every student, or None


@under_weights_policy
def distill(cfg: DistillConfig) -> dict[str, Any]:
    tconfig = _teacher_config(cfg)
    with training_run(cfg) as (runtime, run_dir):
        run = _build_run(cfg, tconfig, runtime)
        plan = TrainingPlan(wrap_step(_step(run), run.techniques), run.evaluate, run.trainees,
                            {"teacher": run.teacher.memory, **technique_memory(run.techniques)}, draw_size_for(cfg))
        state = fit(cfg, plan, run.data.train, run.tokenizer, run_dir, runtime, run.collator, _label(run),
                    run.data.record())
        return _write_outputs(run, state, run_dir)


def _build_run(cfg: DistillConfig, tconfig: Any, runtime: Runtime) -> DistillRun:
    terms = [WeightedLoss(get_loss(spec.name), spec.weight, spec.weight_end, spec.until) for spec in cfg.losses]
    needs = set().union(*(t.loss.needs for t in terms))
    eager = "attentions" in needs  # fused attention kernels do not return attention maps
    head = head_for(cfg, tconfig)
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    label_names = task_label_names(head, tconfig) if head != "match" or cfg.labelled else None
    sources = student_sources(cfg, tconfig.model_type)
    # the teacher's weights are loaded when a loss reads its outputs or a student starts from its layers; with hard
    # labels alone it gives the students its vocabulary and labels and is never run
    weights_read = "teacher" in needs or any(_copies_teacher_layers(cfg, s, tconfig) for s in sources.values())
    teacher = build_model(head, source=cfg.teacher, attn_eager=eager, match_loss=cfg.match_loss) if weights_read else None
    parameters = sum(p.numel() for p in teacher.parameters()) if teacher is not None else None
    prefix = lambda name: f"{name}/" if cfg.students is not None else ""  # noqa: E731
    trainees = [_student(cfg, name, source, head, tconfig, teacher, tokenizer, label_names, eager, prefix(name))
                for name, source in sources.items()]  # copied from the teacher before it is sharded
    teacher = runtime.frozen_module(teacher, cfg.teacher_sharding) if "teacher" in needs else None
    data = load_run_data(cfg, tokenizer, label_names if cfg.labelled else None,
                         max_tokens(cfg.data.max_length, tconfig, *(t.model.config for t in trainees)))
    wants = frozenset({HIDDEN} if "hidden" in needs else set()) | ({ATTENTIONS} if eager else set())
    cache = cached_teacher_logits(cfg, needs, teacher, tokenizer, data, runtime) if teacher is not None else None
    collator = mlm_collator_for(cfg, tokenizer)
    evaluate = _evaluation(cfg, trainees, teacher, tokenizer, data, runtime, collator)
    for t in trainees:
        if "hidden" in needs:
            t.heads[PROJECTIONS] = HiddenProjection(list(range(t.model.config.num_hidden_layers + 1)),
                                                    t.model.config.hidden_size, tconfig.hidden_size)
        if "qkv" in needs:
            t.details["relation_heads"] = relation_heads(t.model.config, tconfig)
    total, _ = total_steps_for(cfg, len(data.train.features), runtime.world, draw_size_for(cfg))
    techniques = build_techniques(TechniqueContext(cfg, trainees[0], tokenizer, data.train, runtime, total))
    # every parameter gets a gradient when a loss reads the student's own head (a bi-encoder's pooler does not)
    all_used = "logits" in needs and cfg.objective not in ("match", "features")
    for t in trainees:
        t.distribute(runtime, cfg.sharding, all_used)
    qkv_layers = frozenset(t.details["layer_map"][-1] - 1 for t in trainees) if "qkv" in needs else frozenset()
    return DistillRun(cfg, runtime, tokenizer, Teacher(teacher, cfg.teacher, parameters, wants, qkv_layers, cache),
                      trainees, data, collator, terms, needs, techniques, evaluate)


def _evaluation(cfg: DistillConfig, trainees: list[Trainee], teacher: nn.Module | None, tokenizer: Any, data: RunData,
                runtime: Runtime, collator: Any) -> Any:
    """Each student's evaluation (accuracy and agreement with the teacher, in one pass over the eval set, for
    classifiers); sets which metric decides each student's best step."""
    evaluations = {t.name: evaluation_for(cfg, t.model, tokenizer, data, runtime, collator) for t in trainees}
    for t in trainees:
        e = evaluations[t.name]
        t.metric, t.higher_is_better = (f"{t.prefix}{e.metric}" if e.run else ""), e.higher_is_better
    if not any(e.run for e in evaluations.values()):
        return None
    labelled = data.eval is not None and cfg.labelled
    teacher_top = predict_everywhere(teacher, tokenizer, data.eval, cfg.eval_batch_size,
                                     runtime).argmax(-1).cpu() if labelled and teacher is not None else None
    labels = torch.tensor(data.eval.labels) if labelled else None

    def student_metrics(t: Trainee) -> dict[str, float]:
        if not labelled:
            return evaluations[t.name].run()
        top = predict_everywhere(t.model, tokenizer, data.eval, cfg.eval_batch_size, runtime).argmax(-1).cpu()
        metrics = label_metrics(top, labels, teacher_top)
        warn(f"student {t.name}" if t.prefix else "the student", findings(metrics, data.baseline))
        return metrics

    return lambda: {f"{t.prefix}{k}": v for t in trainees for k, v in student_metrics(t).items()}


def _loss_inputs(trainee: Trainee, t_out: TeacherOutputs | None, forward: Forward, batch: dict[str, Any],
                 needs: set[str], temperature: float) -> LossInputs:
    s_out, heads = forward.output, forward.heads
    x = LossInputs(student_logits=s_out.logits, teacher_logits=t_out and t_out.logits,
                   labels=targets(batch, s_out.logits), attention_mask=token_mask(batch), temperature=temperature)
    layer_map = trainee.details["layer_map"]
    if "hidden" in needs:
        x.student_hidden = heads[PROJECTIONS]
        x.teacher_hidden = [t_out.hidden_states[i] for i in layer_map]
    if "attentions" in needs:
        x.student_attentions = s_out.attentions
        x.teacher_attentions = [t_out.attentions[i - 1] for i in layer_map[1:]]
    if "qkv" in needs:  # the student's last layer against the teacher layer it is mapped to
        x.student_qkv, x.teacher_qkv = heads[QKV], t_out.qkv[layer_map[-1] - 1]
        x.relation_heads = trainee.details["relation_heads"]
    return x


def _step(run: DistillRun) -> Step:
    outputs = frozenset({PROJECTIONS} if "hidden" in run.needs else set()) | (
        {ATTENTIONS} if "attentions" in run.needs else set()) | ({QKV} if "qkv" in run.needs else set())

    def step(x: StepInput) -> StepResult:
        t_out = run.teacher.outputs(x.tensors, x.indices)  # once per batch, shared by every student
        inputs = model_inputs(x.tensors)
        total, logs = 0.0, {}
        for t in run.trainees:
            with t.timer.region():
                forward = t(inputs, x.outputs | outputs)
                loss_inputs = _loss_inputs(t, t_out, forward, x.tensors, run.needs, run.cfg.temperature)
                values = [term.loss.fn(loss_inputs) for term in run.terms]
                student_total = sum(term.weight_at(x.progress) * value for term, value in zip(run.terms, values))
            # detached tensors, not floats: .item() would wait for the GPU on every step (the bar reads them rarely)
            logs |= {f"{t.prefix}{term.loss.name}": value.detach() for term, value in zip(run.terms, values)}
            t.trace.add(student_total.detach())
            total = total + student_total
        return StepResult(total, logs, len(x.indices))

    return step


def _label(run: DistillRun) -> str:
    several = f" x{len(run.trainees)} students" if run.cfg.students is not None else ""
    teacher = " (teacher cached)" if run.teacher.cache is not None else ""
    teacher = " (no loss reads the teacher: not run)" if run.teacher.model is None else teacher
    return f"distill{several}{teacher}"


def _write_outputs(run: DistillRun, state: LoopState, run_dir: Path) -> dict[str, Any]:
    cfg, runtime = run.cfg, run.runtime
    teacher = teacher_identity(cfg.teacher) | {"parameters": run.teacher.parameters}
    teacher_training = run.teacher.record(runtime)
    techniques = technique_records(run.techniques, runtime)

    def record_for(t: Trainee) -> dict[str, Any]:
        params = sum(p.numel() for p in t.module.parameters())  # the model and its heads
        training = {**training_summary(state, t, runtime, cfg.batch_size, cfg.grad_accum), **teacher_training,
                    "student_forward_seconds": round(t.timer.total(), 3), "students_in_pass": len(run.trainees),
                    "training_state_mb": round(params * 4 * 4 / 2**20, 2)}  # weights, grads, AdamW's moments, fp32
        return {"command": "distill", "config": to_record(cfg), "data": run.data.record(),
                "device": str(runtime.device), "teacher": teacher,
                "student": {**t.details, "parameters": t.parameter_count()}, "training": training, **techniques}

    if cfg.students is None:
        t = run.trainees[0]
        return write_output(Path(cfg.output), run_dir, state, t, run.tokenizer, record_for(t), cfg.overwrite, runtime,
                            run.data.baseline)
    weights = {t.name: final_weights(run_dir, state, t, runtime) for t in run.trainees}
    results = {t.name: with_relative_sources(output_record(state, t, record_for(t), run.data.baseline),
                                             Path(cfg.output) / t.name) for t in run.trainees}
    output = Path(cfg.output)
    if runtime.is_main:
        with staged_dir(output, cfg.overwrite) as tmp:  # every student appears at once, or none does
            for t in run.trainees:
                write_model_folder(tmp / t.name, weights[t.name], run.tokenizer, results[t.name])
            write_record(tmp, {"command": "distill-students", "config": to_record(cfg),
                               "students": {t.name: str(output / t.name) for t in run.trainees}})
    runtime.barrier()
    return {"output": str(output), "students": {n: {"output": str(output / n), **r} for n, r in results.items()},
            "metrics": {}}
