"""The `kdship` command line: thin. Each command builds its typed config and calls a library function.

Heavy libraries are imported inside commands so `kdship --help` is instant. A user's mistake (a KdshipError) is
printed as one line on stderr with a non-zero exit code, never as a traceback."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Callable, Optional

import typer

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(help="Distill a large transformer into a small, fast, deployable one.", no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings=HELP_OPTIONS)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kdship {version('kdship')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                          help="print kdship's version and exit")] = None) -> None:
    """Distill a large transformer into a small, fast, deployable one."""


class ShowsConfigDefaults(typer.core.TyperCommand):
    """A command whose options default to None on the command line (so that a recipe's value is not overridden)
    and whose --help still shows the default a run gets: the typed config's, read when help is shown."""

    config_name: str | None = None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _show_config_defaults(self.params, self.config_name)
        super().format_help(ctx, formatter)


def _show_config_defaults(params: list[Any], config_name: str | None) -> None:
    from pydantic_core import PydanticUndefined

    from kdship import config as configs

    if config_name is None:
        return
    fields = {**configs.DataConfig.model_fields, **getattr(configs, config_name).model_fields}
    for param in params:
        field = fields.get(param.name)
        if param.default is not None or field is None or field.default in (None, PydanticUndefined):
            continue
        param.show_default = str(field.default.value if hasattr(field.default, "value") else field.default)


def command(fn: Callable | None = None, *, name: str | None = None, on: typer.Typer = app,
            config: str | None = None) -> Callable:
    """Register a command (on `app` or a sub-app) whose KdshipErrors become one line on stderr and an exit code;
    `config` names its class in kdship.config, whose defaults --help shows."""
    if fn is None:
        return functools.partial(command, name=name, on=on, config=config)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from kdship.errors import KdshipError

        from kdship.ui import quiet_libraries

        quiet_libraries()
        _stop_cleanly_on_sigterm()
        try:
            result = fn(*args, **kwargs)
            _leave_process_group()
            return result
        except KdshipError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a path that cannot be written or read: under a file, no permission, disk full
            typer.echo(f"error: {_path_problem(e)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            hint = "; rerun with --resume to continue from the last checkpoint" if fn.__name__ in RESUMABLE else ""
            typer.echo(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}{hint}", err=True)
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    cls = type(f"{fn.__name__}_command", (ShowsConfigDefaults,), {"config_name": config})
    return on.command(name=name, cls=cls, context_settings=HELP_OPTIONS)(run)


RESUMABLE = ("train", "distill")


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, a cancelled CI job, a launcher stopping its workers), raised where the command is, so
    that it unwinds like Ctrl-C: staged outputs and empty run folders are removed, nothing half-written stays."""


def _stop_cleanly_on_sigterm() -> None:
    import signal
    import threading

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        signal.signal(signal.SIGTERM, terminated)


def _leave_process_group() -> None:
    """A launched command that succeeded leaves its process group together with the others (kdship.runtime is
    imported only by commands that start a runtime, so the other commands do not pay for importing torch)."""
    import sys

    if "kdship.runtime" in sys.modules:
        sys.modules["kdship.runtime"].close_process_group(succeeded=True)


def _path_problem(e: OSError) -> str:
    """One line for a path the command could not use."""
    import errno
    from pathlib import Path

    if e.filename and e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = next((p for p in (Path(e.filename), *Path(e.filename).parents) if p.is_file()), None)
        if blocking is not None:
            return f"{blocking} is a file, so nothing can be written under it; choose another path"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; choose another path or fix its permissions"


# ---- options shared by several commands (declared once) -----------------------------------------------------------
Recipe = Annotated[Optional[str], typer.Option("--recipe", "-r", help="YAML recipe (pipelines/*.yaml); flags override it")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="output folder")]
Data = Annotated[Optional[str], typer.Option("--data", help="train data: csv/tsv/jsonl/parquet/txt, folder, or hub id")]
EvalData = Annotated[Optional[str], typer.Option("--eval-data", help="eval data for periodic evaluation")]
TextColumn = Annotated[Optional[list[str]], typer.Option("--text-column", help="text column (twice for pairs)")]
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help="label column (default: label)")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="truncate to this many tokens")]
MaxTrain = Annotated[Optional[int], typer.Option("--max-train-samples", help="use the first N training rows")]
MaxEval = Annotated[Optional[int], typer.Option("--max-eval-samples", help="use the first N eval rows")]
Objective = Annotated[Optional[str], typer.Option("--objective", help="classify | mlm | clm (causal LM: text, "
                                                  "prompt/response or chat data) | match (bi-encoder on pairs) | "
                                                  "features (distill)")]
MatchLoss = Annotated[Optional[str], typer.Option("--match-loss", help="objective match: in_batch (positive pairs) | "
                                                                       "classify (labelled pairs)")]
SelectBy = Annotated[Optional[str], typer.Option("--select-by", help="small model that scores samples (sample-value "
                                                                     "selection)")]
SelectRatio = Annotated[Optional[float], typer.Option("--select-ratio", help="fraction that gets the step")]
SelectMode = Annotated[Optional[str], typer.Option("--select-mode", help="topk | weighted")]
SelectRefresh = Annotated[Optional[int], typer.Option("--select-refresh", help="reuse a sample's score by the "
                                                                               "trained model for K steps")]
Epochs = Annotated[Optional[float], typer.Option("--epochs")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="stop after N optimizer steps")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size")]
GradAccum = Annotated[Optional[int], typer.Option("--grad-accum", help="micro-batches per optimizer step")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="peak learning rate")]
StudentLr = Annotated[Optional[float], typer.Option("--lr", help="peak learning rate; default by how each student's "
                                                                 "weights began: 1e-4 pretrained, 5e-4 random "
                                                                 "(kept in later stages)")]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", help="evaluate every N steps (default: per epoch)")]
SaveEvery = Annotated[Optional[int], typer.Option("--save-every", help="checkpoint every N steps for --resume")]
ReportTo = Annotated[Optional[list[str]], typer.Option("--report-to", help="tensorboard | wandb | mlflow (repeat or "
                                                                          "comma-separate): experiment tracking")]
LoggingDir = Annotated[Optional[str], typer.Option("--logging-dir", help="where trackers write (default: "
                                                                         "OUTPUT-logs)")]
Seed = Annotated[Optional[int], typer.Option("--seed")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 on CUDA) | fp32 | bf16")]
Resume = Annotated[Optional[bool], typer.Option("--resume", help="continue an interrupted run from its checkpoint")]
Overwrite = Annotated[Optional[bool], typer.Option("--overwrite", help="replace an existing output")]
AllowPickle = Annotated[Optional[bool], typer.Option("--allow-pickle-weights", help="load pytorch_model.bin (pickle: "
                                                    "can run code) from folders without safetensors")]
Verify = Annotated[Optional[bool], typer.Option("--verify/--no-verify", help="check the artifact's files against the "
                                                                            "sha256 in its manifest (default: on)")]
Sharding = Annotated[Optional[str], typer.Option("--sharding", help="with several processes: ddp (a copy of the "
                                                                    "trained model per device) | fsdp (sharded)")]
ExitThresholds = Annotated[Optional[str], typer.Option("--exit-threshold", help="models with early exits: stop a "
                                                       "row at the first exit this sure, e.g. 0.9 (several: "
                                                       "0.8,0.9,0.95)")]
ExitCriterion = Annotated[Optional[str], typer.Option("--exit-criterion", help="confidence (top probability >= "
                                                      "threshold) | entropy (normalised entropy <= threshold)")]
# techniques shared by train and distill (each flag is the CLI spelling of a field of the recipe's section)
EmaDecay = Annotated[Optional[float], typer.Option("--ema-decay", help="mean teacher: an EMA of the model's weights "
                                                   "teaches it (e.g. 0.999)")]
EmaWeight = Annotated[Optional[float], typer.Option("--ema-weight", help="weight of the mean teacher's KD term")]
VirtualTeacher = Annotated[Optional[float], typer.Option("--virtual-teacher", help="Tf-KD virtual teacher: its "
                                                         "probability of the label (e.g. 0.9)")]
VirtualTemperature = Annotated[Optional[float], typer.Option("--virtual-temperature")]
VirtualAlpha = Annotated[Optional[float], typer.Option("--virtual-alpha", help="its share of the loss")]
Exits = Annotated[Optional[str], typer.Option("--exits", help="early exits after these layers, e.g. 1,2,3, or all "
                                              "(every layer below the last)")]
ExitWeight = Annotated[Optional[float], typer.Option("--exit-weight", help="weight of the exits' loss")]
Curriculum = Annotated[Optional[str], typer.Option("--curriculum", help="easy to hard by the scorer's confidence | "
                                                   "loss")]
CurriculumBy = Annotated[Optional[str], typer.Option("--curriculum-by", help="teacher | a trained classifier's "
                                                     "folder")]
CurriculumMode = Annotated[Optional[str], typer.Option("--curriculum-mode", help="order | weighted")]
Pacing = Annotated[Optional[str], typer.Option("--pacing", help="linear | root | step")]
CurriculumStart = Annotated[Optional[float], typer.Option("--curriculum-start", help="easiest fraction at step 0")]
CurriculumFullAt = Annotated[Optional[float], typer.Option("--curriculum-full-at", help="fraction of the run from "
                                                           "which all data is available")]


def _data(train: str | None = None, eval: str | None = None, text_columns: list[str] | None = None,
          label_column: str | None = None, max_length: int | None = None, max_train_samples: int | None = None,
          max_eval_samples: int | None = None) -> dict[str, Any]:
    return {"train": train, "eval": eval, "text_columns": text_columns or None, "label_column": label_column,
            "max_length": max_length, "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}


def _names(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated flag values as one list."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()] if values else None


def _selection(by: str | None, ratio: float | None, mode: str | None, refresh: int | None) -> dict[str, Any]:
    """The --select-* flags: the CLI spelling of the recipe's `selection:` section."""
    return {"by": by, "ratio": ratio, "mode": mode, "refresh": refresh}


def _self_teaching(ema_decay: float | None, ema_weight: float | None, virtual_teacher: float | None,
                   virtual_temperature: float | None, virtual_alpha: float | None, exits: str | None,
                   exit_weight: float | None, curriculum: str | None, curriculum_by: str | None,
                   curriculum_mode: str | None, pacing: str | None, curriculum_start: float | None,
                   curriculum_full_at: float | None) -> dict[str, Any]:
    """The technique flags train and distill share, as their recipe sections (unset flags drop out)."""
    layers = None if exits is None else [] if exits.strip() == "all" else _ints(exits, "--exits")
    return {"ema": {"decay": ema_decay, "weight": ema_weight},
            "virtual_teacher": {"correct_prob": virtual_teacher, "temperature": virtual_temperature,
                                "alpha": virtual_alpha},
            "early_exit": {"layers": layers, "weight": exit_weight},
            "curriculum": {"difficulty": curriculum, "by": curriculum_by, "mode": curriculum_mode, "pacing": pacing,
                           "start": curriculum_start, "full_at": curriculum_full_at}}


def _echo(line: str) -> None:
    """A result line, from rank 0 only when a launcher started several processes."""
    from kdship.runtime import is_main_process

    if is_main_process():
        typer.echo(line)


def _print_run(result: dict[str, Any]) -> None:
    metrics = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, float)}
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    _echo(f"wrote {result['output']}  {shown}")


@command(config="TrainConfig")
def train(
    model: Annotated[Optional[str], typer.Option("--model", help="save_pretrained folder or hub id")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="shape spec, e.g. bert:layers=12,hidden=768")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="tokenizer folder or hub id")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="for a tokenizer trained on the data")] = None,
    reverse_from: Annotated[Optional[str], typer.Option("--reverse-from", help="small trained model that teaches "
                                                        "this one early on (reverse distillation)")] = None,
    reverse_steps: Annotated[Optional[int], typer.Option("--reverse-steps", help="its weight decays to 0 over these "
                                                         "steps")] = None,
    reverse_schedule: Annotated[Optional[str], typer.Option("--reverse-schedule", help="linear | cosine | step")] = None,
    reverse_temperature: Annotated[Optional[float], typer.Option("--reverse-temperature")] = None,
    reverse_hidden: Annotated[Optional[float], typer.Option("--reverse-hidden", help="weight of hidden-state "
                                                            "matching through projections (default 0: logits only)")] = None,
    select_by: SelectBy = None, select_ratio: SelectRatio = None, select_mode: SelectMode = None,
    select_refresh: SelectRefresh = None, match_loss: MatchLoss = None,
    ema_decay: EmaDecay = None, ema_weight: EmaWeight = None, virtual_teacher: VirtualTeacher = None,
    virtual_temperature: VirtualTemperature = None, virtual_alpha: VirtualAlpha = None, exits: Exits = None,
    exit_weight: ExitWeight = None, curriculum: Curriculum = None, curriculum_by: CurriculumBy = None,
    curriculum_mode: CurriculumMode = None, pacing: Pacing = None, curriculum_start: CurriculumStart = None,
    curriculum_full_at: CurriculumFullAt = None,
    data: Data = None, eval_data: EvalData = None, text_column: TextColumn = None, label_column: LabelColumn = None,
    max_length: MaxLength = None, max_train_samples: MaxTrain = None, max_eval_samples: MaxEval = None,
    objective: Objective = None, epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None,
    grad_accum: GradAccum = None, lr: Lr = None, eval_every: EvalEvery = None, save_every: SaveEvery = None,
    report_to: ReportTo = None, logging_dir: LoggingDir = None,
    seed: Seed = None, device: Device = None, precision: Precision = None, sharding: Sharding = None,
    output: Output = None, recipe: Recipe = None, resume: Resume = None, overwrite: Overwrite = None,
    allow_pickle_weights: AllowPickle = None,
) -> None:
    """Fine-tune (or --objective mlm pretrain) one model: how teachers are made; with reverse distillation from a
    small model, sample-value selection by one, teacher-free self-distillation (mean teacher, virtual teacher,
    early exits) or a curriculum."""
    from kdship.config import TrainConfig, build_config
    from kdship.train import train as run

    cfg = build_config(
        TrainConfig, recipe, model=model, init=init, tokenizer=tokenizer, vocab_size=vocab_size,
        reverse={"from": reverse_from, "steps": reverse_steps, "schedule": reverse_schedule,
                 "temperature": reverse_temperature, "hidden_weight": reverse_hidden}, match_loss=match_loss,
        selection=_selection(select_by, select_ratio, select_mode, select_refresh), sharding=sharding,
        **_self_teaching(ema_decay, ema_weight, virtual_teacher, virtual_temperature, virtual_alpha, exits, exit_weight,
                         curriculum, curriculum_by, curriculum_mode, pacing, curriculum_start, curriculum_full_at),
        data=_data(data, eval_data, text_column, label_column, max_length, max_train_samples, max_eval_samples),
        objective=objective, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, eval_every=eval_every, save_every=save_every,
        report_to=_names(report_to), logging_dir=logging_dir, seed=seed, device=device, precision=precision,
        output=output, resume=resume, overwrite=overwrite, allow_pickle_weights=allow_pickle_weights)
    _print_run(run(cfg))


def _losses(specs: list[str] | None) -> list[dict[str, Any]] | None:
    """--loss kd:0.5 --loss ce:0.5 --loss hidden_mse:1:0 (name[:weight[:weight_end]])."""
    from kdship.errors import ConfigError

    if not specs:
        return None
    losses = []
    for spec in specs:
        name, *weights = spec.split(":")
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise ConfigError(f"--loss {spec!r}: weights must be numbers (name[:weight[:weight_end]])") from None
        losses.append({"name": name} | dict(zip(("weight", "weight_end"), values)))
    return losses


def _split_students(value: str | None) -> list[str] | None:
    """Split on commas that separate students, not on the commas inside a shape spec (bert:layers=2,hidden=64)."""
    if not value:
        return None
    parts: list[str] = []
    for piece in value.split(","):
        if parts and "=" in piece and ":" not in piece:
            parts[-1] += "," + piece
        else:
            parts.append(piece.strip())
    return parts


@command(config="DistillConfig")
def distill(
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="teacher folder or hub id")] = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", help="several teachers, comma-separated (same "
                                                    "labels and tokenizer)")] = None,
    teacher_weighting: Annotated[Optional[str], typer.Option("--teacher-weighting", help="mean | weights | "
                                                             "confidence (several teachers)")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option("--teacher-weights", help="e.g. 0.7,0.3 (with "
                                                           "--teacher-weighting weights)")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="teacher-free runs: the spec students' "
                                                     "tokenizer")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="folder, hub id or shape spec")] = None,
    students: Annotated[Optional[str], typer.Option("--students", help="several in one pass: 4L312,6L768 (layers L "
                                                    "width), specs or folders, comma-separated")] = None,
    teacher_cache: Annotated[Optional[str], typer.Option("--teacher-cache", help="auto | off | topk:K (causal LMs) | "
                                                         "a folder from kdship cache-teacher")] = None,
    teacher_sharding: Annotated[Optional[str], typer.Option("--teacher-sharding", help="with several processes: "
                                                            "replicate (a teacher per device) | fsdp (sharded)")] = None,
    loss: Annotated[Optional[list[str]], typer.Option("--loss", help="name[:weight[:weight_end]], repeatable")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    jsd_beta: Annotated[Optional[float], typer.Option("--jsd-beta", help="loss jsd: 0 forward KL .. 1 reverse KL "
                                                      "(default 0.5)")] = None,
    layer_map: Annotated[Optional[str], typer.Option("--layer-map", help="e.g. 0,2,4 (teacher hidden index per "
                                                                         "student hidden state)")] = None,
    train_layers: Annotated[Optional[str], typer.Option("--train-layers", help="train only these student layers, "
                                                        "e.g. 1,2 (0: embeddings); the rest frozen")] = None,
    generations: Annotated[Optional[int], typer.Option("--generations", help="born-again: N generations, each "
                                                       "taught by the one before")] = None,
    peers: Annotated[Optional[str], typer.Option("--peers", help="online distillation between --students: mutual "
                                                 "| ensemble")] = None,
    peers_weight: Annotated[Optional[float], typer.Option("--peers-weight")] = None,
    cross_task: Annotated[Optional[bool], typer.Option("--cross-task", help="the teacher has other labels: the "
                                                       "student takes the data's, KD goes through a learned map")] = None,
    cross_task_map_steps: Annotated[Optional[int], typer.Option("--cross-task-map-steps")] = None,
    on_policy_ratio: Annotated[Optional[float], typer.Option("--on-policy-ratio", help="causal LMs: the share of "
                                                             "batches replaced by the student's samples (GKD)")] = None,
    on_policy_max_new_tokens: Annotated[Optional[int], typer.Option("--on-policy-max-new-tokens")] = None,
    on_policy_temperature: Annotated[Optional[float], typer.Option("--on-policy-temperature")] = None,
    select_by: SelectBy = None, select_ratio: SelectRatio = None, select_mode: SelectMode = None,
    select_refresh: SelectRefresh = None, match_loss: MatchLoss = None,
    ema_decay: EmaDecay = None, ema_weight: EmaWeight = None, virtual_teacher: VirtualTeacher = None,
    virtual_temperature: VirtualTemperature = None, virtual_alpha: VirtualAlpha = None, exits: Exits = None,
    exit_weight: ExitWeight = None, curriculum: Curriculum = None, curriculum_by: CurriculumBy = None,
    curriculum_mode: CurriculumMode = None, pacing: Pacing = None, curriculum_start: CurriculumStart = None,
    curriculum_full_at: CurriculumFullAt = None,
    data: Data = None, eval_data: EvalData = None, text_column: TextColumn = None, label_column: LabelColumn = None,
    max_length: MaxLength = None, max_train_samples: MaxTrain = None, max_eval_samples: MaxEval = None,
    objective: Objective = None, epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None,
    grad_accum: GradAccum = None, lr: StudentLr = None, eval_every: EvalEvery = None, save_every: SaveEvery = None,
    report_to: ReportTo = None, logging_dir: LoggingDir = None,
    seed: Seed = None, device: Device = None, precision: Precision = None, sharding: Sharding = None,
    output: Output = None, recipe: Recipe = None, resume: Resume = None, overwrite: Overwrite = None,
    allow_pickle_weights: AllowPickle = None,
    keep_going: Annotated[Optional[bool], typer.Option("--keep-going", help="pipelines: run the next stages even "
                                                       "after a stage whose student collapsed")] = None,
) -> None:
    """Distill students from a teacher (or several, or none): soft/hard labels, hidden-state and attention
    matching, MLM or feature objectives, several students in one pass, online, self- and born-again distillation,
    curricula, progressive pipelines (a recipe with stages:)."""
    from kdship.pipeline import distill_recipe

    weights = _numbers(teacher_weights, "--teacher-weights")
    result = distill_recipe(
        recipe, teacher=teacher, teachers=_names([teachers]) if teachers else None,
        teacher_weighting=teacher_weighting, teacher_weights=weights, tokenizer=tokenizer,
        train_layers=_ints(train_layers, "--train-layers"), generations=generations,
        peers={"mode": peers, "weight": peers_weight},
        cross_task={"labels": "data" if cross_task else None, "map_steps": cross_task_map_steps},
        on_policy={"ratio": on_policy_ratio, "max_new_tokens": on_policy_max_new_tokens,
                   "temperature": on_policy_temperature},
        **_self_teaching(ema_decay, ema_weight, virtual_teacher, virtual_temperature, virtual_alpha, exits, exit_weight,
                         curriculum, curriculum_by, curriculum_mode, pacing, curriculum_start, curriculum_full_at),
        student=student, losses=_losses(loss), temperature=temperature, jsd_beta=jsd_beta,
        students=_split_students(students), teacher_cache=teacher_cache, teacher_sharding=teacher_sharding,
        layer_map=layer_map.split(",") if layer_map else None, match_loss=match_loss,
        selection=_selection(select_by, select_ratio, select_mode, select_refresh), sharding=sharding,
        data=_data(data, eval_data, text_column, label_column, max_length, max_train_samples, max_eval_samples),
        objective=objective, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, eval_every=eval_every, save_every=save_every,
        report_to=_names(report_to), logging_dir=logging_dir, seed=seed, device=device, precision=precision,
        output=output, resume=resume, overwrite=overwrite, allow_pickle_weights=allow_pickle_weights,
        keep_going=keep_going)
    if "final" in result:  # a pipeline
        _echo(f"wrote {result['output']}: final {', '.join(result['final'].values())}")
    else:
        _print_run(result)


@command(config="AugmentConfig")
def augment(
    model: Annotated[Optional[str], typer.Option("--model", help="masked-LM that proposes words")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="classifier that labels the sentences")] = None,
    data: Data = None, text_column: TextColumn = None, label_column: LabelColumn = None,
    max_length: MaxLength = None, max_train_samples: MaxTrain = None,
    copies: Annotated[Optional[int], typer.Option("--copies", help="augmented copies per sentence")] = None,
    replace_prob: Annotated[Optional[float], typer.Option("--replace-prob", help="chance to replace each word")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="candidates per word")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="mlm | embedding")] = None,
    keep_original: Annotated[Optional[bool], typer.Option("--keep-original/--no-original")] = None,
    seed: Seed = None, device: Device = None, output: Output = None, overwrite: Overwrite = None,
    allow_pickle_weights: AllowPickle = None, recipe: Recipe = None,
) -> None:
    """A larger transfer set (TinyBERT's data augmentation): words replaced by a masked-LM's predictions or
    embedding neighbours, every sentence labelled by the teacher; settings recorded beside the file."""
    from kdship.augment import augment as run
    from kdship.config import AugmentConfig, build_config

    result = run(build_config(
        AugmentConfig, recipe, model=model, teacher=teacher, copies=copies, replace_prob=replace_prob, top_k=top_k,
        method=method, keep_original=keep_original, seed=seed, device=device, output=output, overwrite=overwrite,
        allow_pickle_weights=allow_pickle_weights,
        data=_data(data, None, text_column, label_column, max_length, max_train_samples, None)))
    typer.echo(f"wrote {result['output']}: {result['rows']} rows ({result['augmented_rows']} augmented), labels "
               f"{result['label_counts']}")


@command(name="cache-teacher", config="CacheTeacherConfig")
def cache_teacher(
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="causal-LM teacher folder or hub id")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="tokens kept per position")] = None,
    data: Data = None, text_column: TextColumn = None, max_length: MaxLength = None, max_train_samples: MaxTrain = None,
    batch_size: BatchSize = None, device: Device = None, precision: Precision = None, output: Output = None,
    overwrite: Overwrite = None, allow_pickle_weights: AllowPickle = None, recipe: Recipe = None,
) -> None:
    """A causal-LM teacher's top-K next-token log-probabilities on the training data, written once (memory-mapped
    shards): `kdship distill --teacher-cache DIR` then trains without loading the teacher."""
    from kdship.config import CacheTeacherConfig, build_config
    from kdship.logit_cache import cache_teacher as run

    result = run(build_config(
        CacheTeacherConfig, recipe, teacher=teacher, top_k=top_k, batch_size=batch_size, device=device,
        precision=precision, output=output, overwrite=overwrite, allow_pickle_weights=allow_pickle_weights,
        data=_data(data, None, text_column, None, max_length, max_train_samples, None)))
    typer.echo(f"wrote {result['output']}: top-{result['k']} of {result['tokens']} tokens, "
               f"{result['bytes'] / 2**20:.1f} MiB ({result['bytes_per_token']} bytes per token), mean tail mass "
               f"{result['mean_tail_mass']:.4f}")


@command(config="GenerateConfig")
def generate(
    model: Annotated[Optional[str], typer.Option("--model", help="causal LM that writes the responses")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="text file (one prompt per line), or "
                                                   "prompt/response or chat data whose responses are written anew")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    sample: Annotated[Optional[bool], typer.Option("--sample/--greedy", help="sample (default) or take the most "
                                                   "likely token")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="0: off")] = None,
    samples_per_prompt: Annotated[Optional[int], typer.Option("--samples-per-prompt")] = None,
    max_prompts: Annotated[Optional[int], typer.Option("--max-prompts", help="use the first N prompts")] = None,
    batch_size: BatchSize = None, seed: Seed = None, device: Device = None, output: Output = None,
    overwrite: Overwrite = None, allow_pickle_weights: AllowPickle = None, recipe: Recipe = None,
) -> None:
    """A causal LM's continuations of prompts as prompt/response JSONL (sequence-level KD: distil a student on the
    teacher's own outputs with --objective clm); the sampling settings are recorded beside the file."""
    from kdship.config import GenerateConfig, build_config
    from kdship.generation import generate as run

    sampling = {"max_new_tokens": max_new_tokens, "do_sample": sample, "temperature": temperature, "top_p": top_p,
                "top_k": top_k}
    result = run(build_config(
        GenerateConfig, recipe, model=model, prompts=prompts, samples_per_prompt=samples_per_prompt,
        max_prompts=max_prompts, batch_size=batch_size, seed=seed, device=device, output=output, overwrite=overwrite,
        allow_pickle_weights=allow_pickle_weights, sampling=sampling))
    typer.echo(f"wrote {result['output']}: {result['rows']} responses to {result['prompts']['n']} prompts "
               f"({result['generated_tokens']} tokens, {result['tokens_per_second']:.0f} tokens/s"
               + (f", {result['empty_dropped']} empty dropped" if result["empty_dropped"] else "") + ")")


@command(name="eval", config="EvalConfig")
def evaluate(
    model: Annotated[Optional[str], typer.Argument(help="the model to evaluate (a student folder), named as "
                                                        "export, bench and serve name theirs")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="the same, as an option (older spelling)")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="teacher folder (for retention/agreement)")] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help="auto (read from the models) | classify | "
                                                     "match | clm: checked against the models")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="eval data file or hub id[:split]")] = None,
    text_column: TextColumn = None, label_column: LabelColumn = None, max_length: MaxLength = None,
    max_eval_samples: MaxEval = None,
    batch_size: BatchSize = None, device: Device = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="JSON path (default STUDENT/eval.json)")] = None,
    exit_thresholds: ExitThresholds = None, exit_criterion: ExitCriterion = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="causal LMs: prompts to generate from, one per "
                                                   "line (default: the eval data's)")] = None,
    generations: Annotated[Optional[int], typer.Option("--generations", help="causal LMs: how many prompts")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="causal LMs: tokens generated "
                                                          "per prompt")] = None,
    allow_pickle_weights: AllowPickle = None, recipe: Recipe = None,
) -> None:
    """Evaluate student and teacher on the same split: accuracy, macro-F1, retention, agreement, ECE; for a
    student with early exits, each exit's accuracy and the accuracy at each exit threshold; for causal LMs,
    perplexity, its ratio, next-token agreement and greedy generations side by side."""
    from kdship.config import EvalConfig, build_config
    from kdship.errors import ConfigError
    from kdship.evaluate import evaluate as run
    from kdship.evaluate import print_eval

    if model and student and model != student:
        raise ConfigError(f"two models to evaluate: {model} and --student {student}; give one")
    if not (model or student or recipe):
        raise ConfigError("no model to evaluate; kdship eval STUDENT --teacher TEACHER --data DEV")
    cfg = build_config(EvalConfig, recipe, student=model or student, teacher=teacher, objective=objective,
                       batch_size=batch_size, device=device,
                       output=output, data=_data(None, data, text_column, label_column, max_length, None,
                                                 max_eval_samples), allow_pickle_weights=allow_pickle_weights,
                       exit_thresholds=_numbers(exit_thresholds, "--exit-threshold"), exit_criterion=exit_criterion,
                       prompts=prompts, generations=generations, max_new_tokens=max_new_tokens)
    print_eval(run(cfg))


@command(config="ExportConfig")
def export(
    student: Annotated[str, typer.Argument(help="student folder (kdship train/distill output)")],
    to: Annotated[Optional[list[str]], typer.Option("--to", help="onnx|ort-opt|fp16|int8|int8-static|aoti|tensorrt; "
                                                                  "repeat or comma-separate")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="artifact folder")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="parity data (default: the student's)")] = None,
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="int8-static calibration data")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop")] = None,
    allow_mismatch: Annotated[Optional[bool], typer.Option("--allow-mismatch", help="write even if parity fails")] = None,
    trt_opt: Annotated[Optional[str], typer.Option("--trt-opt", help="TensorRT profile: BATCHxSEQ to optimise "
                                                                     "for, e.g. 8x128")] = None,
    trt_max: Annotated[Optional[str], typer.Option("--trt-max", help="TensorRT profile: the largest BATCHxSEQ "
                                                                     "the engine accepts, e.g. 256x512")] = None,
    text_column: TextColumn = None, label_column: LabelColumn = None, max_length: MaxLength = None,
    allow_pickle_weights: AllowPickle = None, overwrite: Overwrite = None, recipe: Recipe = None,
) -> None:
    """Export to ONNX / ONNX Runtime variants, each checked against PyTorch, in one artifact folder."""
    from kdship.config import ExportConfig, build_config
    from kdship.export import export as run

    (opt_batch, opt_seq), (max_batch, max_seq) = _batch_by_seq(trt_opt, "--trt-opt"), _batch_by_seq(trt_max, "--trt-max")
    cfg = build_config(ExportConfig, recipe, student=student, to=to, output=output, opset=opset, eval_data=eval_data,
                       calib_data=calib_data, max_accuracy_drop=max_accuracy_drop, allow_mismatch=allow_mismatch,
                       text_columns=text_column, label_column=label_column, max_length=max_length,
                       allow_pickle_weights=allow_pickle_weights, overwrite=overwrite, trt_opt_batch=opt_batch,
                       trt_opt_seq=opt_seq, trt_max_batch=max_batch, trt_max_seq=max_seq)
    result = run(cfg)
    typer.echo(f"wrote {result['output']} ({', '.join(v['file'] for v in result['variants'].values())})")


@command(config="ServeConfig")
def serve(
    artifact: Annotated[str, typer.Argument(help="artifact folder from kdship export")],
    host: Annotated[Optional[str], typer.Option("--host")] = None,
    port: Annotated[Optional[int], typer.Option("--port")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="ort-cpu | ort-cuda | tensorrt | aoti | "
                                                                       "torch")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="exported variant, e.g. int8")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
    batching: Annotated[Optional[bool], typer.Option("--batching/--no-batching")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="most texts per model call")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option("--max-wait-ms")] = None,
    max_texts: Annotated[Optional[int], typer.Option("--max-texts", help="most texts per request")] = None,
    max_text_chars: Annotated[Optional[int], typer.Option("--max-text-chars")] = None,
    exit_threshold: Annotated[Optional[float], typer.Option("--exit-threshold", help="a model with early exits, "
                                                            "backend torch: stop each text at its first exit this "
                                                            "sure (the answer says which layer)")] = None,
    exit_criterion: ExitCriterion = None,
    verify: Verify = None, allow_pickle_weights: AllowPickle = None, recipe: Recipe = None,
) -> None:
    """Serve an artifact over HTTP: /v1/classify, /health, /metrics, /v1/model."""
    from kdship.config import ServeConfig, build_config
    from kdship.serve.app import serve as run

    run(build_config(ServeConfig, recipe, artifact=artifact, host=host, port=port, backend=backend, variant=variant,
                     threads=threads, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     max_texts=max_texts, max_text_chars=max_text_chars, exit_threshold=exit_threshold,
                     exit_criterion=exit_criterion, verify=verify, allow_pickle_weights=allow_pickle_weights))


def _batch_by_seq(value: str | None, flag: str) -> tuple[int | None, int | None]:
    """'8x128' -> (8, 128); None -> (None, None): the recipe's or the config's profile stays."""
    from kdship.errors import ConfigError

    if value is None:
        return None, None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"{flag} {value!r}: give BATCHxSEQ, two positive integers, e.g. 8x128")
    return int(parts[0]), int(parts[1])


def _ints(value: str | None, flag: str = "") -> list[int] | None:
    from kdship.errors import ConfigError

    try:
        return [int(v) for v in value.split(",") if v.strip()] if value else None
    except ValueError:
        where = f"{flag} " if flag else ""
        raise ConfigError(f"{where}{value!r} is not a comma-separated list of integers, e.g. 1,8,64") from None


def _numbers(value: str | None, flag: str) -> list[float] | None:
    from kdship.errors import ConfigError

    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: give numbers separated by commas, e.g. 0.7,0.3") from None


@command(config="BenchConfig")
def bench(
    models: Annotated[list[str], typer.Argument(help="artifact or model folders; the first is the baseline")],
    backend: Annotated[Optional[list[str]], typer.Option("--backend", help="torch | torch-compile | ort-cpu | "
                                                          "ort-cuda | tensorrt | aoti (repeat or comma-separate)")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", help="e.g. 1,8,64,256")] = None,
    seq: Annotated[Optional[str], typer.Option("--seq", help="e.g. 32,128,512")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
    cpus: Annotated[Optional[str], typer.Option("--cpus", help="pin to these cores, e.g. 0,1")] = None,
    warmup_s: Annotated[Optional[float], typer.Option("--warmup-s")] = None,
    min_runs: Annotated[Optional[int], typer.Option("--min-runs", help="timed calls per model per round")] = None,
    min_rounds: Annotated[Optional[int], typer.Option("--min-rounds", help="interleaved rounds at least")] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="time bound per point")] = None,
    inputs: Annotated[Optional[str], typer.Option("--inputs", help="auto (real when known) | real | random")] = None,
    exit_thresholds: ExitThresholds = None, exit_criterion: ExitCriterion = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="folder for bench.json/csv")] = None,
    verify: Verify = None, allow_pickle_weights: AllowPickle = None, overwrite: Overwrite = None,
    recipe: Recipe = None,
) -> None:
    """Latency and throughput, several models side by side, per backend, batch size and sequence length; models
    with early exits also at each --exit-threshold (backend torch), with the accuracy there."""
    from kdship.bench import bench as run
    from kdship.bench import print_bench
    from kdship.config import BenchConfig, build_config

    backends = [b.strip() for item in backend for b in item.split(",") if b.strip()] if backend else None
    print_bench(run(build_config(BenchConfig, recipe, models=models, backends=backends, batch=_ints(batch),
                                 seq=_ints(seq), threads=threads, cpus=_ints(cpus), warmup_s=warmup_s,
                                 min_runs=min_runs, min_rounds=min_rounds,
                                 max_seconds=max_seconds, inputs=inputs, output=output, overwrite=overwrite,
                                 exit_thresholds=_numbers(exit_thresholds, "--exit-threshold"),
                                 exit_criterion=exit_criterion, verify=verify,
                                 allow_pickle_weights=allow_pickle_weights)))


@command(config="ReportConfig")
def report(
    runs: Annotated[list[str], typer.Argument(help="run folders (model, artifact, bench) or a folder of them")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="HTML path (report.md is written beside)")] = None,
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    verify: Verify = None,
) -> None:
    """An HTML report (and Markdown) with accuracy, parity, speed plots and recipes, from saved artifacts."""
    from kdship.config import ReportConfig, build_config
    from kdship.report import report as run

    result = run(build_config(ReportConfig, runs=runs, output=output, title=title, verify=verify))
    typer.echo(f"wrote {result['output']} and {result['markdown']} ({len(result['plots'])} plots)")


@command(config="GateConfig")
def gate(
    runs: Annotated[list[str], typer.Argument(help="run folders (model, eval, artifact, bench) or a folder of them")],
    budgets: Annotated[str, typer.Option("--budgets", help="budgets YAML")],
    junit: Annotated[Optional[str], typer.Option("--junit", help="write JUnit XML here")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="write the results as JSON here")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="committed baseline JSON to compare")] = None,
    update_baseline: Annotated[Optional[bool], typer.Option("--update-baseline", help="write --baseline anew")] = None,
    verify: Verify = None,
    allow_unstable: Annotated[Optional[bool], typer.Option("--allow-unstable", help="let speed budgets pass on "
                                                           "measurements the bench marked unstable")] = None,
) -> None:
    """Check accuracy and speed budgets: exit 0 when all hold, 1 when any fails, 2 on bad input."""
    from kdship.config import GateConfig, build_config
    from kdship.gate import gate as run
    from kdship.gate import print_gate, raise_if_failed

    result = run(build_config(GateConfig, budgets=budgets, runs=runs, junit=junit, json_out=json_out,
                              baseline=baseline, update_baseline=update_baseline, verify=verify,
                              allow_unstable=allow_unstable))
    print_gate(result)
    raise_if_failed(result)


deploy_app = typer.Typer(help="Write inference-server deployments.", no_args_is_help=True, context_settings=HELP_OPTIONS)
app.add_typer(deploy_app, name="deploy")


@command(name="triton", on=deploy_app, config="TritonConfig")
def deploy_triton(
    artifact: Annotated[str, typer.Argument(help="artifact folder from kdship export")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="model repository folder")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="ensemble name clients call")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="auto (loads on a GPU or a CPU-only Triton) | gpu | cpu")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch")] = None,
    instances: Annotated[Optional[int], typer.Option("--instances")] = None,
    max_length: MaxLength = None, verify: Verify = None, overwrite: Overwrite = None, recipe: Recipe = None,
) -> None:
    """A Triton model repository: tokenizer, classifier and label models in an ensemble (text in, labels out)."""
    from kdship.config import TritonConfig, build_config
    from kdship.serve.triton import deploy_triton as run

    result = run(build_config(TritonConfig, recipe, artifact=artifact, output=output, name=name, variant=variant,
                              kind=kind, max_batch=max_batch, instances=instances, max_length=max_length,
                              verify=verify, overwrite=overwrite))
    typer.echo(f"wrote {result['output']}: {', '.join(result['models'].values())} ({result['variant']} variant, "
               f"texts padded to {result['max_length']} tokens)")


@command(name="list")
def list_(what: Annotated[str, typer.Argument(help="losses | exporters | backends")] = "losses") -> None:
    """List registered components (losses, exporters, backends)."""
    from kdship.registries import list_components

    list_components(what)


@command(config="QuickstartConfig")
def quickstart(
    output: Annotated[str, typer.Option("--output", "-o", help="where the run goes")] = "kdship-quickstart",
    overwrite: Overwrite = None, seed: Seed = None, device: Device = None,
) -> None:
    """Offline end to end on a built-in synthetic task: data, teacher, student, eval, export, bench, report, gate."""
    from kdship.config import QuickstartConfig, build_config
    from kdship.quickstart import quickstart as run

    run(build_config(QuickstartConfig, output=output, overwrite=overwrite, seed=seed, device=device))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
