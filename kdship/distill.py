"""`kdship distill`: students learn from a teacher (or from several, or, teacher-free, from themselves and each
other). Three parts: build the run (teacher, students, data, techniques), the step (the teacher's outputs, each
student's forward and weighted registry losses), and writing the outputs. The optimizer step, evaluation and
checkpoints are kdship.loop's; techniques wrap the step."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdship.artifacts import read_record, staged_dir, with_relative_sources, write_record
from kdship.config import TEACHER_FREE, DistillConfig, to_record
from kdship.data import model_inputs, targets, token_mask
from kdship.errors import ConfigError, ModelError
from kdship.logit_cache import MANIFEST as CACHE_MANIFEST
from kdship.logit_cache import TopKCache, cache_about, teacher_fingerprint, write_topk_cache
from kdship.loop import LoopState, Step, StepInput, StepResult, TrainingPlan, fit, total_steps_for
from kdship.losses import LossInputs, WeightedLoss, get_loss
from kdship.models import (LAYER_KEY, build_model, check_tokenizers_match, check_vocab_compatible, config_from_spec,
                           expand_shorthand, init_from_teacher, is_causal_lm, is_mlm, is_shape_spec, label_names_of,
                           load_config, load_tokenizer, max_tokens, model_kind, relation_heads, task_label_names,
                           under_weights_policy, uniform_layer_map)
from kdship.run import (RunData, evaluation_for, final_weights, label_metrics, load_run_data, mlm_collator_for,
                        output_record, predict_everywhere, training_run, training_summary, write_model_folder,
                        write_output)
from kdship.runtime import Runtime
from kdship.sanity import findings, warn
from kdship.teacher import Teacher, TeacherOutputs
from kdship.techniques import (Technique, TechniqueContext, build_techniques, draw_size_for, technique_batches,
                               technique_memory, technique_records, wrap_step)
from kdship.trainee import ATTENTIONS, HIDDEN, PROJECTIONS, QKV, Forward, HiddenProjection, Trainee

# default peak learning rates by how a student's weights began. Measured on SST-2 (random 4L-312, MiniLM-L6 teacher,
# 250 steps of 32): task KD 76.0% at 5e-4 vs 70.1% at 1e-4, which leaves the majority-class plateau only after ~130
# steps; weights that already encode language are fine-tuned at the usual 1e-4. A student kdship trained from random
# init keeps 5e-4 in later stages and runs: after 600 steps of feature distillation, the progressive pipeline's
# prediction stages (300 + 300 steps) reached 80.28% at 5e-4 vs 78.67% at 1e-4 (README, issue 12)
PRETRAINED_LR, RANDOM_INIT_LR = 1e-4, 5e-4
RANDOM_INIT, TEACHER_LAYERS, PRETRAINED = "random init", "teacher layers", "pretrained"
EMBEDDINGS = re.compile(r"\.(embeddings|embed_tokens|wte|wpe)\.")  # token/position tables (BERT, Llama, GPT-2)


def _teacher_config(cfg: DistillConfig, source: str | None = None) -> Any:
    source = source or cfg.teacher
    if not source:
        raise ConfigError("no teacher; pass --teacher DIR_OR_HUB_ID")
    config = load_config(source, "teacher")
    if (cfg.objective == "clm") != is_causal_lm(config) and cfg.objective != "features":
        fix = "--objective clm needs a decoder teacher (AutoModelForCausalLM)" if cfg.objective == "clm" else \
            "distil it with --objective clm"
        raise ModelError(f"teacher {source} is {model_kind(config)}; {fix}")
    cross_task = cfg.cross_task is not None  # its teacher may have other labels, or none (it teaches by features)
    if cfg.objective == "classify" and label_names_of(config) is None and not cross_task:
        raise ModelError(f"teacher {source} has no trained classification head; fine-tune it first with "
                         "`kdship train` (or distill with --objective mlm)")
    if cfg.labelled and cfg.objective == "match" and task_label_names("match", config) is None:
        raise ModelError(f"teacher {source} is not a bi-encoder trained to classify pairs; train one with "
                         "`kdship train --objective match --match-loss classify` (or use --match-loss in_batch)")
    if cfg.objective == "mlm" and not is_mlm(config):
        raise ModelError(f"teacher {source} has no masked-LM head, so --objective mlm cannot use it; use a "
                         "masked-LM teacher, or hidden/attention losses with --objective classify")
    return config


@dataclass
class Reference:
    """What the students are built against: the (first) teacher's config, tokenizer and labels; teacher-free, the
    tokenizer (--tokenizer, or the first student folder's) and, for spec students, that folder's config."""

    config: Any  # the teacher's config; teacher-free: the first student folder's, or None
    tokenizer: Any
    label_names: list[str] | None  # the labels students predict; None: the data's
    teacher: bool

    @property
    def family(self) -> str:
        return self.config.model_type if self.config is not None else "bert"


def _reference(cfg: DistillConfig) -> Reference:
    head_labels = lambda config: task_label_names(head_for(cfg, config), config)  # noqa: E731
    if cfg.teacher_sources:
        configs = [_teacher_config(cfg, source) for source in cfg.teacher_sources]
        tokenizer = load_tokenizer(cfg.teacher_sources[0], "teacher")
        _check_teachers_agree(cfg, configs, tokenizer)
        labels = None if cfg.cross_task or (cfg.objective == "match" and not cfg.labelled) else head_labels(configs[0])
        return Reference(configs[0], tokenizer, labels, teacher=True)
    reading = [s.name for s in cfg.losses if "teacher" in get_loss(s.name).needs]
    if reading or cfg.cross_task or cfg.generations > 1:
        raise ConfigError(f"no teacher; pass --teacher DIR_OR_HUB_ID (or train teacher-free: {', '.join(TEACHER_FREE)} "
                          "with --loss ce)")
    folders = [s for s in student_sources(cfg, "bert").values() if not is_shape_spec(s)]
    source = cfg.tokenizer or (folders[0] if folders else None)
    if source is None:
        raise ConfigError("without a teacher, spec students need a tokenizer: pass --tokenizer DIR_OR_HUB_ID (or a "
                          "student folder)")
    config = load_config(folders[0], "student") if folders else None
    return Reference(config, load_tokenizer(source, "tokenizer"), None, teacher=False)


def _check_teachers_agree(cfg: DistillConfig, configs: list[Any], tokenizer: Any) -> None:
    """Several teachers are averaged label by label, token by token: they must share labels and vocabulary."""
    for source, config in zip(cfg.teacher_sources[1:], configs[1:]):
        first, other = task_label_names(head_for(cfg, configs[0]), configs[0]), task_label_names(head_for(cfg, config),
                                                                                                   config)
        if other != first:
            raise ModelError(f"teacher {source} predicts labels {other}, teacher {cfg.teacher_sources[0]} {first}; "
                             "several teachers must share one label set")
        if load_tokenizer(source, "teacher").get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"teacher {source} uses another tokenizer than {cfg.teacher_sources[0]}; several "
                             "teachers must read the same tokens")


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
    if is_causal_lm(teacher_config):
        return "clm"
    return "mlm" if is_mlm(teacher_config) else "classify"  # a bare encoder (no head) is loaded as a classifier


def student_sources(cfg: DistillConfig, family: str) -> dict[str, str]:
    """name -> source of every student; shorthand like 4L312 becomes a spec of the teacher's family."""
    if cfg.students:
        return {name: expand_shorthand(source, family) for name, source in cfg.students.items()}
    if not cfg.student:
        raise ConfigError("no student; pass --student DIR, a hub id, or a shape spec such as bert:layers=4,hidden=312 "
                          "(or --students 4L312,6L768)")
    return {"student": expand_shorthand(cfg.student, family)}


def _student_config(source: str, ref: Reference) -> Any:
    """The config a student will have: its folder's, or its spec's, sized from the teacher (teacher-free: from
    the reference folder, or to the tokenizer)."""
    config = load_config(source, "student") if not is_shape_spec(source) else config_from_spec(source, base=ref.config)
    if is_shape_spec(source) and ref.config is None:
        config.vocab_size, config.pad_token_id = len(ref.tokenizer), ref.tokenizer.pad_token_id
    if not is_shape_spec(source):  # a student of its own reads the teacher's tokens: the same vocabulary, covered
        if (Path(source) / "tokenizer_config.json").exists() or (Path(source) / "tokenizer.json").exists():
            check_tokenizers_match(ref.tokenizer, load_tokenizer(source, "student"), source)
        check_vocab_compatible(config, ref.tokenizer, source)
    if ref.config is not None and is_causal_lm(ref.config) != is_causal_lm(config):
        raise ModelError(f"student {source} is {model_kind(config)} but the teacher is {model_kind(ref.config)}; "
                         "give a student of the teacher's kind (a shape spec of its family, e.g. "
                         f"{ref.family}:layers=2)")
    if is_causal_lm(config) and ref.config is not None and config.vocab_size != ref.config.vocab_size:
        raise ModelError(f"student {source} predicts {config.vocab_size} tokens, the teacher "
                         f"{ref.config.vocab_size}; token-level distillation compares the two distributions token "
                         "by token, so the vocabularies must be the same (a shape spec inherits the teacher's)")
    return config


def _copies_teacher_layers(cfg: DistillConfig, source: str, tcfg: Any) -> bool:
    """Whether this student starts from the teacher's layers (a shape spec of the teacher's family and width)."""
    if not (tcfg is not None and is_shape_spec(source) and cfg.init_from_teacher):
        return False
    config = config_from_spec(source, base=tcfg)
    return config.model_type == tcfg.model_type and config.hidden_size == tcfg.hidden_size


def _student(cfg: DistillConfig, name: str, source: str, config: Any, head: str, ref: Reference,
             teacher: nn.Module | None, label_names: list[str] | None, eager: bool, prefix: str) -> Trainee:
    if is_shape_spec(source):
        student = build_model(head, config=config, label_names=label_names, attn_eager=eager,
                              match_loss=cfg.match_loss)
    else:
        names = task_label_names(head, config)
        if names is not None and label_names is not None and len(names) != len(label_names):
            raise ModelError(f"student {source} has {len(names)} labels but the run has {len(label_names)}; use a "
                             "student without a classification head, or one trained on the same labels")
        student = build_model(head, source=source, label_names=label_names, attn_eager=eager,
                              match_loss=cfg.match_loss, keep_exits=cfg.early_exit is not None)
    layer_map = (_layer_map(cfg, student.config.num_hidden_layers, ref.config.num_hidden_layers) if ref.teacher
                 else None)
    copied = init_from_teacher(student, teacher, layer_map) if teacher is not None and _copies_teacher_layers(
        cfg, source, ref.config) else 0
    weights_from = _weights_origin(source, copied)
    lr = cfg.lr or (RANDOM_INIT_LR if weights_from == RANDOM_INIT else PRETRAINED_LR)
    return Trainee(name, student, prefix=prefix, lr=lr,
                   details={"name": name, "source": source, "layer_map": layer_map,
                            "tensors_copied_from_teacher": copied, "weights_from": weights_from, "lr": lr})


def _weights_origin(source: str, copied: int) -> str:
    """How the student's weights began: random init, the teacher's layers, or a pretrained model; a folder kdship
    distilled earlier (a previous pipeline stage) keeps the origin its own record names."""
    if copied:
        return TEACHER_LAYERS
    if is_shape_spec(source):
        return RANDOM_INIT
    earlier = read_record(Path(source)) if Path(source).is_dir() else None
    return (earlier or {}).get("student", {}).get("weights_from", PRETRAINED)


def _teacher(cfg: DistillConfig, head: str, ref: Reference, needs: set[str], sources: dict[str, str],
             eager: bool) -> Teacher:
    """The teacher(s) as the step sees them. Weights are loaded when a loss reads the teacher or a student starts
    from its layers; with hard labels alone the teacher only lends its vocabulary and labels and is never run."""
    live = "teacher" in needs and not cfg.teacher_cache_folder  # a cache folder stands in for the teacher
    weights_read = live or any(_copies_teacher_layers(cfg, s, ref.config) for s in sources.values())
    models = [build_model(head, source=s, attn_eager=eager, match_loss=cfg.match_loss)
              for s in cfg.teacher_sources] if weights_read else []
    wants = frozenset({HIDDEN} if "hidden" in needs else set()) | ({ATTENTIONS} if eager else set())
    parameters = sum(p.numel() for p in models[0].parameters()) if models else None
    teacher_labels = task_label_names(head, ref.config) if ref.teacher else None
    return Teacher(models, cfg.teacher_sources, ref.tokenizer, teacher_labels, parameters, wants,
                   weighting=cfg.teacher_weighting, weights=cfg.teacher_weights, temperature=cfg.temperature)


def attach_teacher_cache(cfg: DistillConfig, needs: set[str], teacher: Teacher, data: RunData, runtime: Runtime,
                         run_dir: Path, teacher_config: Any, examples_drawn: int) -> None:
    """The teacher's outputs read from a cache where the run allows one: a causal LM's top-K cache (made here, or
    a folder made earlier), after which the teacher is unloaded, or a classifier's logits kept in memory."""
    if cfg.topk_cache or cfg.teacher_cache_folder:
        teacher.topk = _topk_cache(cfg, teacher, data, runtime, run_dir, teacher_config.vocab_size)
        teacher.models = []  # every teacher output now comes from the files
    else:
        teacher.cache = cached_teacher_logits(cfg, needs, teacher, data, runtime, examples_drawn)


def _topk_cache(cfg: DistillConfig, teacher: Teacher, data: RunData, runtime: Runtime, run_dir: Path,
                vocab_size: int) -> TopKCache:
    """A cache folder given, checked against this run's data and teacher; or the one this run writes into its run
    folder (a resumed run reads what its first start wrote)."""
    identity = runtime.from_main(teacher_fingerprint(cfg.teacher_sources, combine_settings(cfg)) if runtime.is_main
                                 else None)  # (hashing a large teacher's weights once, not once per process)
    about = cache_about(data, identity)
    folder = Path(cfg.teacher_cache_folder) if cfg.teacher_cache_folder else run_dir / "teacher-topk"
    if cfg.teacher_cache_folder or (folder / CACHE_MANIFEST).exists():
        cache = TopKCache.open(folder)
        cache.check_fits(about, vocab_size)
        return cache
    teacher.topk_built_here = True
    return write_topk_cache(folder, teacher.logits, teacher.tokenizer, data.train, cfg.topk_cache, vocab_size,
                            cfg.batch_size, runtime, about, overwrite=True)  # (full-vocabulary logits: the
    # training batch, which the device holds beside the student, not the larger eval batch)


def combine_settings(cfg: DistillConfig) -> dict[str, Any] | None:
    """How several teachers' predictions are combined (part of what their outputs are)."""
    if len(cfg.teacher_sources) < 2:
        return None
    return {"weighting": cfg.teacher_weighting, "weights": cfg.teacher_weights, "temperature": cfg.temperature}


def cached_teacher_logits(cfg: DistillConfig, needs: set[str], teacher: Teacher, data: RunData,
                          runtime: Runtime, examples_drawn: int) -> torch.Tensor | None:
    """The teacher's logits for every training example, once, when that is all the losses read and the inputs do
    not change between epochs (no random masking): the teacher then costs one pass instead of one per epoch,
    split over the processes. Computed in a fixed order, so a resumed run uses exactly the same values. A run
    that draws fewer examples than the data holds (a short stage on a large transfer set) runs the teacher live:
    caching would run it on examples the run never reads."""
    safe = cfg.labelled and needs <= {"logits", "teacher"} and teacher.models \
        and examples_drawn >= len(data.train.features)
    if cfg.teacher_cache == "off" or not safe:
        return None
    # kept on the device: each step gathers its rows there instead of copying them from the host
    return teacher.predict(data.train, cfg.eval_batch_size, runtime, mapped=False)


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
    with training_run(cfg) as (runtime, run_dir):
        run = _build_run(cfg, runtime, run_dir)
        plan = TrainingPlan(wrap_step(_step(run), run.techniques), run.evaluate, run.trainees,
                            {"teacher": run.teacher.memory, **technique_memory(run.techniques)}, draw_size_for(cfg),
                            technique_batches(run.techniques))
        state = fit(cfg, plan, run.data.train, run.tokenizer, run_dir, runtime, run.collator, _label(run),
                    run.data.record())
        return _write_outputs(run, state, run_dir)


def _build_run(cfg: DistillConfig, runtime: Runtime, run_dir: Path) -> DistillRun:
    terms = [WeightedLoss(get_loss(spec.name), spec.weight, spec.weight_end, spec.until) for spec in cfg.losses]
    needs = set().union(*(t.loss.needs for t in terms))
    eager = "attentions" in needs  # fused attention kernels do not return attention maps
    ref = _reference(cfg)
    head = head_for(cfg, ref.config)
    sources = student_sources(cfg, ref.family)
    configs = {name: _student_config(source, ref) for name, source in sources.items()}
    data = load_run_data(cfg, ref.tokenizer, ref.label_names if cfg.labelled else None,
                         max_tokens(cfg.data.max_length, *[c for c in (ref.config, *configs.values()) if c]))
    teacher = _teacher(cfg, head, ref, needs, sources, eager)
    prefix = lambda name: f"{name}/" if cfg.students is not None else ""  # noqa: E731
    labels = data.label_names if cfg.labelled else ref.label_names  # (a feature stage keeps the teacher's labels)
    trainees = [_student(cfg, name, sources[name], configs[name], head, ref, teacher.model, labels, eager,
                         prefix(name)) for name in sources]  # copied from the teacher before it is sharded
    teacher.models = [runtime.frozen_module(m, cfg.teacher_sharding) for m in teacher.models] if "teacher" in needs \
        else []
    teacher.qkv_layers = frozenset(t.details["layer_map"][-1] - 1 for t in trainees) if "qkv" in needs else frozenset()
    draw_size = draw_size_for(cfg)
    total, _ = total_steps_for(cfg, len(data.train.features), runtime.world, draw_size)
    attach_teacher_cache(cfg, needs, teacher, data, runtime, run_dir, ref.config,
                         examples_drawn=total * cfg.grad_accum * draw_size * runtime.world)
    techniques = build_techniques(TechniqueContext(cfg, trainees, ref.tokenizer, data.train, runtime, total,
                                                   draw_size, teacher, data.label_names, data.max_length))
    collator = mlm_collator_for(cfg, ref.tokenizer)
    evaluate = _evaluation(cfg, trainees, teacher, ref.tokenizer, data, runtime, collator)
    _prepare_trainees(cfg, trainees, needs, ref.config, runtime)
    return DistillRun(cfg, runtime, ref.tokenizer, teacher, trainees, data, collator, terms, needs, techniques,
                      evaluate)


def _prepare_trainees(cfg: DistillConfig, trainees: list[Trainee], needs: set[str], tcfg: Any,
                      runtime: Runtime) -> None:
    """What each student needs beside its model for the losses (projections to the teacher's width, relation
    heads), the layers it trains (stage-wise distillation), and its place on the devices."""
    for t in trainees:
        layers = cfg.train_layers or list(range(t.model.config.num_hidden_layers + 1))
        if max(layers) > t.model.config.num_hidden_layers:
            raise ConfigError(f"train_layers {cfg.train_layers}: student {t.name} has "
                              f"{t.model.config.num_hidden_layers} layers (0: the embeddings)")
        t.details["feature_layers"] = layers
        if cfg.train_layers:
            t.details["frozen_parameters"] = freeze_other_layers(t.model, layers)
        if "hidden" in needs:
            projection = HiddenProjection(layers, t.model.config.hidden_size, tcfg.hidden_size)
            t.details["projections_from"] = projection.load_carried(t.details["source"])
            t.heads[PROJECTIONS] = projection
        if "qkv" in needs:
            t.details["relation_heads"] = relation_heads(t.model.config, tcfg)
    # every parameter gets a gradient when a loss reads the student's own head (a bi-encoder's pooler does not)
    all_used = "logits" in needs and cfg.objective not in ("match", "features")
    for t in trainees:
        t.distribute(runtime, cfg.sharding, all_used)


def freeze_other_layers(model: nn.Module, layers: list[int]) -> int:
    """Freeze the transformer layers not in `layers` (1-based) and the embeddings unless 0 is in it; heads stay
    trainable. Returns how many tensors were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        match = LAYER_KEY.search(f".{name}")
        layer = int(match.group(2)) + 1 if match else (0 if EMBEDDINGS.search(f".{name}") else None)
        if layer is not None and layer not in layers:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def _evaluation(cfg: DistillConfig, trainees: list[Trainee], teacher: Teacher, tokenizer: Any, data: RunData,
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
    labels = torch.tensor(data.eval.labels) if labelled else None
    teacher_top: list[torch.Tensor | None] = []  # computed at the first evaluation (a cross-task map exists by then)

    def student_metrics(t: Trainee) -> dict[str, float]:
        if not labelled:
            return evaluations[t.name].run()
        if not teacher_top:
            # (a cross-task teacher speaks this task's labels only through its map)
            readable = teacher.models and (teacher.label_map is not None if cfg.cross_task else
                                           teacher.label_names is not None)
            teacher_top.append(teacher.predict(data.eval, cfg.eval_batch_size, runtime).argmax(-1).cpu()
                               if readable else None)
        top = predict_everywhere(t.model, tokenizer, data.eval, cfg.eval_batch_size, runtime).argmax(-1).cpu()
        metrics = label_metrics(top, labels, teacher_top[0])
        warn(f"student {t.name}" if t.prefix else "the student", findings(metrics, data.baseline))
        return metrics

    return lambda: {f"{t.prefix}{k}": v for t in trainees for k, v in student_metrics(t).items()}


def _loss_inputs(trainee: Trainee, t_out: TeacherOutputs | None, forward: Forward, batch: dict[str, Any],
                 needs: set[str], cfg: DistillConfig) -> LossInputs:
    s_out, heads = forward.output, forward.heads
    x = LossInputs(student_logits=s_out.logits, teacher_logits=t_out and t_out.logits,
                   teacher_token_ids=t_out and t_out.token_ids,
                   labels=targets(batch, s_out.logits), attention_mask=token_mask(batch), temperature=cfg.temperature,
                   beta=cfg.jsd_beta)
    layer_map, layers = trainee.details["layer_map"], trainee.details["feature_layers"]
    if "hidden" in needs:
        x.student_hidden = heads[PROJECTIONS]
        x.teacher_hidden = [t_out.hidden_states[layer_map[i]] for i in layers]
    if "attentions" in needs:
        x.student_attentions = [s_out.attentions[i - 1] for i in layers if i]
        x.teacher_attentions = [t_out.attentions[layer_map[i] - 1] for i in layers if i]
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
        total, logs, forwards = 0.0, {}, {}
        for t in run.trainees:
            with t.timer.region():
                forward = forwards[t.name] = t(inputs, x.outputs | outputs)
                loss_inputs = _loss_inputs(t, t_out, forward, x.tensors, run.needs, run.cfg)
                values = [term.loss.fn(loss_inputs) for term in run.terms]
                student_total = sum(term.weight_at(x.progress) * value for term, value in zip(run.terms, values))
            # detached tensors, not floats: .item() would wait for the GPU on every step (the bar reads them rarely)
            logs |= {f"{t.prefix}{term.loss.name}": value.detach() for term, value in zip(run.terms, values)}
            t.trace.add(student_total.detach())
            total = total + student_total
        return StepResult(total, logs, len(x.indices), forwards)

    return step


def _label(run: DistillRun) -> str:
    several = f" x{len(run.trainees)} students" if run.cfg.students is not None else ""
    teachers = f" from {len(run.teacher.sources)} teachers" if len(run.teacher.sources) > 1 else ""
    teacher = " (teacher cached)" if run.teacher.cache is not None else ""
    teacher = " (no loss reads the teacher: not run)" if not run.teacher.models else teacher
    teacher = f" (teacher: its top-{run.teacher.topk.k} cache)" if run.teacher.topk is not None else teacher
    teacher = " (teacher-free)" if not run.teacher.sources else teacher
    return f"distill{several}{teachers}{teacher}"


def _write_outputs(run: DistillRun, state: LoopState, run_dir: Path) -> dict[str, Any]:
    cfg, runtime = run.cfg, run.runtime
    teacher = run.teacher.identity()
    teacher_training = run.teacher.record(runtime)
    techniques = technique_records(run.techniques, runtime)

    def record_for(t: Trainee) -> dict[str, Any]:
        params = sum(p.numel() for p in t.module.parameters())  # the model and its heads
        training = {**training_summary(state, t, runtime, cfg.batch_size, cfg.grad_accum), **teacher_training,
                    "student_forward_seconds": round(t.timer.total(), 3), "student_forward_calls": t.timer.regions,
                    "students_in_pass": len(run.trainees),
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

