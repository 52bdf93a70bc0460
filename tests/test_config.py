"""Configs: defaults < recipe < flags, strict keys, readable errors, every shipped recipe valid."""

from pathlib import Path

import pytest

from kdship.config import DistillConfig, EvalConfig, TrainConfig, build_config, to_record
from kdship.errors import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_recipe_overrides_defaults_and_flags_override_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.001\nepochs: 2\ndata: {max_length: 64}\n")
    cfg = build_config(DistillConfig, recipe, epochs=5, data={"train": "x.tsv", "max_length": None})
    assert (cfg.lr, cfg.epochs, cfg.data.max_length, cfg.data.train) == (0.001, 5, 64, "x.tsv")
    assert cfg.batch_size == DistillConfig().batch_size


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {trian: x.tsv}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.trian'; valid keys: train, eval"):
        build_config(DistillConfig, recipe)


def test_out_of_range_values_name_the_field():
    with pytest.raises(ConfigError, match=r"lr: Input should be greater than 0 \(got -1"):
        build_config(DistillConfig, lr=-1)
    with pytest.raises(ConfigError, match=r"losses.0.name: unknown loss 'klx'"):
        build_config(DistillConfig, losses=[{"name": "klx"}])


def test_bad_yaml_and_missing_recipe_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(DistillConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        build_config(DistillConfig, tmp_path / "missing.yaml")


def test_train_needs_exactly_one_model_source():
    with pytest.raises(ConfigError, match="exactly one of model"):
        build_config(TrainConfig)
    assert build_config(TrainConfig, init="bert:layers=2").init == "bert:layers=2"


@pytest.mark.parametrize("recipe", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe, tmp_path):
    """Single-run recipes parse as their command's config; pipelines also pass the stage validator."""
    from kdship.config import PipelineConfig, TrainConfig, read_recipe
    from kdship.pipeline import resolve

    text = read_recipe(recipe)
    if "stages" in text:
        stages = resolve(build_config(PipelineConfig, recipe, output=str(tmp_path / "out")))
        assert all(len(s.changed) <= 1 or s.spec.allow_multi_change for s in stages)
    elif recipe.name in TRAIN_RECIPES:
        assert build_config(TrainConfig, recipe, **TRAIN_RECIPES[recipe.name])
    else:
        assert build_config(DistillConfig, recipe, **DISTILL_RECIPES.get(recipe.name, {})).losses


# kdship train recipes, with the flags their usage line gives on the command line
TRAIN_RECIPES = {"reverse_warmup.yaml": {"init": "bert:layers=2", "reverse": {"from": "runs/small-mlm"}},
                 "reverse_warmup_match.yaml": {"init": "bert:layers=2", "reverse": {"from": "runs/small-match"}},
                 "sample_value.yaml": {"model": "runs/large-base", "selection": {"by": "runs/small-sst2"}},
                 "mean_teacher.yaml": {"model": "runs/model"}, "virtual_teacher.yaml": {"model": "runs/model"}}
DISTILL_RECIPES = {"mutual_learning.yaml": {"students": ["4L312", "6L384"]}}


def test_technique_settings_are_nested_and_old_flat_recipes_keep_loading(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("reverse_from: runs/small\nreverse_steps: 5\nreverse_hidden: 0.5\nselect_by: runs/s\n"
                   "select_ratio: 0.25\n")
    cfg = build_config(TrainConfig, old, init="bert:layers=2")
    assert to_record(cfg)["reverse"] == {"from": "runs/small", "steps": 5, "schedule": "linear", "temperature": 2.0,
                                         "start": 1.0, "hidden_weight": 0.5}
    assert cfg.selection.by == "runs/s" and cfg.selection.ratio == 0.25 and cfg.selection.mode == "topk"
    # a flag of the nested spelling overrides one field of the recipe's section, not the section
    assert build_config(TrainConfig, old, init="bert:layers=2", reverse={"steps": 7}).reverse.hidden_weight == 0.5
    with pytest.raises(ConfigError, match=r"selection.by \(--select-by\) is required once any selection setting is given"):
        build_config(DistillConfig, selection={"ratio": 0.5})


def test_flat_and_nested_spellings_that_disagree_or_a_section_that_is_no_mapping_are_refused(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("select_by: A\nselection: {by: B}\n")
    with pytest.raises(ConfigError, match="select_by and selection.by are both set"):
        build_config(DistillConfig, both)
    bad = tmp_path / "bad.yaml"
    bad.write_text("selection: foo\nselect_ratio: 0.5\n")
    with pytest.raises(ConfigError, match="selection must be a mapping"):
        build_config(DistillConfig, bad)


def test_pipeline_flags_override_one_field_of_a_flat_common_section(tmp_path):
    from kdship.config import PipelineConfig
    from kdship.pipeline import nest_settings, resolve

    recipe = tmp_path / "p.yaml"
    recipe.write_text("student: bert:layers=1\ncommon: {select_by: S, select_ratio: 0.3}\nstages:\n"
                      "  - {name: one, teacher: T/x, data: {train: d.tsv}, select_mode: weighted}\n")
    p = build_config(PipelineConfig, recipe, output=str(tmp_path / "out"))
    from kdship.config import deep_merge

    p = p.model_copy(update={"common": deep_merge(nest_settings(p.common, "common"), {"selection": {"ratio": 0.7}})})
    selection = resolve(p)[0].config.selection
    assert (selection.by, selection.ratio, selection.mode) == ("S", 0.7, "weighted")


def test_the_python_api_names_stay_callable():
    import kdship
    import kdship.distill
    import kdship.train

    assert callable(kdship.distill_recipe) and callable(kdship.train.train) and callable(kdship.distill.distill)


def test_stage_settings_follow_distill_config_fields():
    from kdship.config import STAGE_SETTINGS

    assert {"selection", "teacher_sharding", "sharding", "losses", "select_by"} <= set(STAGE_SETTINGS)
    assert not {"teacher", "data", "output", "student", "reverse_from"} & set(STAGE_SETTINGS)


def test_eval_config_requires_a_student():
    with pytest.raises(ConfigError, match="student: Field required"):
        build_config(EvalConfig)


def test_student_names_become_folder_safe_and_report_output_is_html():
    from kdship.config import ReportConfig

    named = build_config(DistillConfig, students={"../up": "4L312", "ok": "2L64"}).students
    assert named == {"up": "4L312", "ok": "2L64"}  # names are folders under the output: no escaping it
    with pytest.raises(ConfigError, match="give the HTML path"):
        build_config(ReportConfig, runs=["runs"], output="report.md")  # would overwrite its own Markdown
