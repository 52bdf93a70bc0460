"""Progressive multi-stage distillation: a pipeline of named stages, each stating its teacher, data, objective and
losses, each student starting from the previous stage's. By default a stage changes exactly ONE of teacher, data
and objective (the scheme of progressive distillation); the validator refuses more unless the stage says
`allow_multi_change: true`. Everything is checked before the first stage runs; stages resume individually
(--resume skips finished stages and continues an interrupted one), and each stage's student and metrics are kept."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdship.artifacts import read_record, staged_dir, write_record
from kdship.config import (PIPELINE_FIELDS, STAGE_SETTINGS, DataConfig, DistillConfig, PipelineConfig, StageConfig,
                           build_config, deep_merge, drop_unset, nest_flat_spellings, read_recipe, to_record)
from kdship.errors import CheckFailed, ConfigError, KdshipError
from kdship.loop import START_FLAGS
from kdship.runtime import Runtime, start_runtime

STAGES = "stages"
PREVIOUS = "previous"  # a stage's teacher: the student the stage before it made


@dataclass
class Stage:
    spec: StageConfig
    config: DistillConfig
    changed: list[str]


def _teacher(p: PipelineConfig, stage: StageConfig, previous: Path | None) -> str:
    if stage.teacher == PREVIOUS:
        if previous is None:
            raise ConfigError(f"stage {stage.name!r}: teacher previous means the student of the stage before, and it "
                              "is the first stage; give it a teacher")
        return str(previous)
    if stage.teacher in p.teachers:
        return p.teachers[stage.teacher]
    if Path(stage.teacher).exists() or "/" in stage.teacher:
        return stage.teacher
    raise ConfigError(f"stage {stage.name!r}: teacher {stage.teacher!r} is not defined; define it under teachers: "
                      f"(defined: {', '.join(p.teachers) or 'none'}) or give a folder")


def _data(p: PipelineConfig, stage: StageConfig) -> DataConfig:
    data = stage.data if isinstance(stage.data, DataConfig) else p.datasets.get(stage.data)
    if data is not None and not data.train:
        raise ConfigError(f"stage {stage.name!r}: its data has no train file; set train: in the dataset")
    if data is not None:
        return data
    raise ConfigError(f"stage {stage.name!r}: data {stage.data!r} is not defined; define it under datasets: "
                      f"(defined: {', '.join(p.datasets) or 'none'})")


def nest_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Flat technique keys (select_ratio) as their sections (selection: {ratio}), so that a stage's or the command
    line's value of one field overrides the same field, not the whole section."""
    try:
        return nest_flat_spellings(settings)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def stage_folder(p: PipelineConfig, index: int, stage: StageConfig) -> Path:
    return Path(p.output) / STAGES / f"{index + 1:02d}-{stage.name}"


def _students_from(p: PipelineConfig, previous: Path | None) -> dict[str, Any]:
    """The first stage starts from the pipeline's student(s); later ones from the previous stage's output."""
    if previous is None:
        return {"student": p.student, "students": p.students}
    if p.students:
        return {"students": {name: str(previous / name) for name in p.students}}
    return {"student": str(previous)}


def _element_signature(cfg: DistillConfig) -> dict[str, Any]:
    """What progressive distillation varies: the teacher, the data, the objective (kind and losses)."""
    return {"teacher": cfg.teacher, "data": (cfg.data.train, tuple(cfg.data.text_columns or ())),
            "objective": (cfg.objective, cfg.match_loss if cfg.objective == "match" else None,
                          tuple(sorted(loss.name for loss in cfg.losses)))}


def resolve(p: PipelineConfig) -> list[Stage]:
    """Every stage's DistillConfig, and which elements it changes; all errors before anything runs."""
    if not p.output:
        raise ConfigError("no output folder; pass -o DIR")
    if not (p.student or p.students):
        raise ConfigError("the pipeline needs a student (student: or students:, or --student/--students)")
    names = [s.name for s in p.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    stages: list[Stage] = []
    previous_out: Path | None = None
    for i, spec in enumerate(p.stages):
        settings = deep_merge(nest_settings(p.common, "common"), nest_settings(spec.settings, f"stage {spec.name!r}"))
        fields = {**settings, "teacher": _teacher(p, spec, previous_out), "data": _data(p, spec),
                  **_students_from(p, None if spec.restart_student else previous_out),
                  "output": str(stage_folder(p, i, spec)), "seed": p.seed,
                  "device": p.device, "precision": p.precision, "resume": p.resume}
        try:
            cfg = DistillConfig.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'stage'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"stage {spec.name!r}: {problems}") from None
        if cfg.generations > 1:
            raise ConfigError(f"stage {spec.name!r}: generations (born-again) is a run of its own; write the generations "
                              "as stages (teacher: previous, restart_student: true) instead")
        changed = [] if not stages else [k for k, v in _element_signature(cfg).items()
                                          if v != _element_signature(stages[-1].config)[k]]
        if len(changed) > 1 and not spec.allow_multi_change:
            raise ConfigError(f"stage {spec.name!r} changes {' and '.join(changed)} at once; a progressive stage "
                              "changes one of teacher, data, objective: split it, or set allow_multi_change: true")
        stages.append(Stage(spec, cfg, changed))
        previous_out = Path(cfg.output)
    return stages


def preflight(stages: list[Stage]) -> None:
    """Open each stage's teacher config and first data rows now, so a typo in stage 4 does not cost stages 1-3."""
    from kdship.data import load_lm_table, load_table
    from kdship.distill import _teacher_config
    from kdship.models import load_config

    for stage in stages:
        cfg = stage.config
        try:
            if stage.spec.teacher != PREVIOUS:  # (a previous stage's student does not exist yet)
                _teacher_config(cfg)
            if cfg.objective == "clm":
                load_lm_table(cfg.data.train, cfg.data.text_columns, max_samples=2)
            else:
                label = cfg.data.label_column if cfg.train_labelled else None
                load_table(cfg.data.train, cfg.data.text_columns, label, max_samples=2)
            if cfg.selection:
                load_config(cfg.selection.by, "scoring model")
        except KdshipError as e:
            raise type(e)(f"stage {stage.spec.name!r}: {e}") from None


def _prepare_output(p: PipelineConfig, runtime: Runtime) -> None:
    """Every process checks (so all stop on a refusal); rank 0 alone clears."""
    out = Path(p.output)
    if out.exists() and not (p.overwrite or p.resume):
        raise ConfigError(f"output {out} already exists; pass --resume to continue the pipeline or --overwrite")
    runtime.barrier()
    if runtime.is_main and out.exists() and p.overwrite and not p.resume:
        shutil.rmtree(out)
    runtime.barrier()


# Fields a pipeline's stages name in the recipe; on top of it only the rest can be overridden.
PER_STAGE = ("teacher", "data", "objective", "losses", "layer_map", "match_loss")


def distill_recipe(recipe: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run any distill recipe, a single distillation or a progressive pipeline (a recipe with `stages:`), with
    DistillConfig fields as overrides (None leaves the recipe's value), as `kdship distill --recipe` does."""
    from kdship.distill import distill

    if not (recipe and STAGES in read_recipe(recipe)):
        keep_going = overrides.pop("keep_going", None)
        cfg = build_config(DistillConfig, recipe, **overrides)
        if cfg.generations > 1:
            return run_pipeline(born_again(cfg, bool(keep_going)))
        if keep_going:
            raise ConfigError("--keep-going is for pipeline recipes (a recipe with stages:, or generations:); a single "
                              "run has no next stage to keep going to")
        return distill(cfg)
    overrides = drop_unset(overrides)
    per_stage = [k for k in PER_STAGE if k in overrides]
    if per_stage:
        raise ConfigError(f"with a pipeline recipe, {', '.join(per_stage)} belong in the recipe (per stage, or its "
                          "datasets); overrides set students, output and training settings")
    pipeline = build_config(PipelineConfig, recipe, **{k: v for k, v in overrides.items() if k in PIPELINE_FIELDS})
    common = deep_merge(nest_settings(pipeline.common, "common"),
                        {k: v for k, v in overrides.items() if k not in PIPELINE_FIELDS})
    return run_pipeline(pipeline.model_copy(update={"common": common}))


def born_again(cfg: DistillConfig, keep_going: bool = False) -> PipelineConfig:
    """Born-again distillation (Furlanello et al. 2018) as a pipeline: generation 1 learns from the teacher, each
    later generation is a fresh student of the same shape taught by the one before; every generation's metrics
    stand in the pipeline's record."""
    if not cfg.teacher:
        raise ConfigError("generations (born-again) start from a teacher; pass --teacher DIR_OR_HUB_ID")
    given = cfg.model_dump(mode="json", exclude_unset=True, by_alias=True)  # what the user set, as they set it
    settings = {k: v for k, v in given.items() if k in STAGE_SETTINGS and k != "generations"}
    # later generations are fresh students: a folder student starts from its folder again, a spec student from
    # random weights (copying the previous generation's layers would continue it, not start another)
    stages = [{"name": f"generation-{i + 1}", "teacher": cfg.teacher if i == 0 else PREVIOUS,
               "data": cfg.data.model_dump(), "restart_student": i > 0, **({"init_from_teacher": False} if i else {})}
              for i in range(cfg.generations)]
    return PipelineConfig.model_validate({
        "output": cfg.output, "student": cfg.student, "common": settings, "stages": stages, "seed": cfg.seed,
        "device": cfg.device, "precision": cfg.precision, "resume": cfg.resume, "overwrite": cfg.overwrite,
        "keep_going": keep_going})


def run_pipeline(p: PipelineConfig) -> dict[str, Any]:
    from kdship.distill import distill
    from kdship.ui import console

    stages = resolve(p)
    preflight(stages)
    runtime = start_runtime(p.device, p.precision)  # joins a launcher's processes before any file is touched
    _prepare_output(p, runtime)
    out = console()
    done = []
    for i, stage in enumerate(stages):
        folder = Path(stage.config.output)
        changed = ", ".join(stage.changed) or ("nothing (first stage)" if i == 0 else "nothing")
        finished = read_record(folder)
        if finished is not None:  # finished before an interruption: keep it, if it was made with these settings
            _check_same_settings(stage, finished)
            out.print(f"stage {i + 1}/{len(stages)} {stage.spec.name}: already done, kept")
            result = {"output": str(folder), **finished}
        else:
            out.print(f"stage {i + 1}/{len(stages)} {stage.spec.name}: changes {changed}")
            result = distill(stage.config)
        done.append({"name": stage.spec.name, "output": str(folder), "changed": stage.changed,
                     "teacher": stage.config.teacher, "data": stage.config.data.train,
                     "objective": stage.config.objective, "losses": [s.name for s in stage.config.losses],
                     "metrics": _stage_metrics(result, p)})
        _stop_if_collapsed(p, stage, result, last=i == len(stages) - 1)
    final = {name: str(Path(p.output) / name) for name in (p.students or ["student"])}
    record = {"command": "distill-pipeline", "config": to_record(p), "stages": done, "final": final}
    if runtime.is_main:
        _publish_final(p, Path(stages[-1].config.output), done)
        write_record(Path(p.output), record)
    runtime.barrier()
    return {"output": p.output, **record}


def _check_same_settings(stage: Stage, finished: dict[str, Any]) -> None:
    now = {k: v for k, v in to_record(stage.config).items() if k not in START_FLAGS}
    then = {k: v for k, v in finished.get("config", {}).items() if k not in START_FLAGS}
    if then != now:
        differing = sorted(k for k in now if now.get(k) != then.get(k))
        raise ConfigError(f"stage {stage.spec.name!r} was finished with other settings ({', '.join(differing)}); "
                          "pass --overwrite to run the pipeline again from the start")


def _stop_if_collapsed(p: PipelineConfig, stage: Stage, result: dict[str, Any], last: bool) -> None:
    """A stage whose student collapsed gives the next stage nothing to build on: the pipeline stops there (its
    output kept, for a look or a --resume after a fix) unless --keep-going."""
    records = ({name: read_record(Path(result["output"]) / name) or {} for name in p.students} if p.students
               else {"student": result})
    collapsed = {name: r["checks"]["findings"] for name, r in records.items() if r.get("checks", {}).get("collapsed")}
    if not collapsed or last or p.keep_going:
        return
    why = "; ".join(f"{name}: {', '.join(found)}" for name, found in collapsed.items())
    raise CheckFailed(f"stage {stage.spec.name!r} ended with a collapsed student ({why}), so the pipeline stopped "
                      f"there ({stage.config.output}); fix that stage in the recipe (learning rate, steps, losses) and "
                      "rerun with --resume, or pass --keep-going")


def _stage_metrics(result: dict[str, Any], p: PipelineConfig) -> dict[str, Any]:
    if p.students:
        return {name: (read_record(Path(result["output"]) / name) or {}).get("metrics", {}) for name in p.students}
    return result.get("metrics", {})


def _publish_final(p: PipelineConfig, last: Path, stages: list[dict[str, Any]]) -> None:
    """The last stage's student(s), copied to OUT/student (or OUT/<name>) with the whole pipeline in kdship.json."""
    for name in p.students or ["student"]:
        source = last / name if p.students else last
        target = Path(p.output) / name
        with staged_dir(target, overwrite=True) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            record = read_record(tmp) or {}
            write_record(tmp, {**record, "pipeline": {"stages": stages, "config": to_record(p)}})
