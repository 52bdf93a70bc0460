"""Progressive pipelines, multi-student distillation, teacher-output caching and the feature objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import kdship, kdship_ok


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory):
    """A generic masked-LM teacher, and the same model fine-tuned on the task: one vocabulary, two heads."""
    root = tmp_path_factory.mktemp("teachers")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(line.split("\t")[0] for line in (data_dir / "train.tsv").read_text().splitlines()[1:]))
    kdship_ok("train", "--objective", "mlm", "--init", "bert:layers=2,hidden=32,heads=2,ffn=64,max_len=64",
              "--data", corpus, "--max-steps", 6, "--batch-size", 16, "--vocab-size", 200, "-o", root / "generic")
    kdship_ok("train", "--model", root / "generic", "--data", data_dir / "train.tsv", "--max-steps", 6,
              "--batch-size", 16, "-o", root / "finetuned")
    return root


def _recipe(tmp_path: Path, teachers: Path, data_dir: Path, stages: str, extra: str = "") -> Path:
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(f"""
teachers: {{generic: {teachers / 'generic'}, finetuned: {teachers / 'finetuned'}}}
datasets:
  task: {{train: {data_dir / 'train.tsv'}, eval: {data_dir / 'dev.tsv'}, max_length: 48}}
student: bert:layers=1
common: {{batch_size: 16, max_steps: 3, save_every: 2}}
{extra}
stages:
{stages}""")
    return recipe


THREE_STAGES = """
  - {name: general, teacher: generic, data: task, objective: features, losses: [{name: hidden_mse}, {name: attention_kl}]}
  - {name: teacher, teacher: finetuned, data: task, objective: features, losses: [{name: hidden_mse}, {name: attention_kl}]}
  - {name: task, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}, {name: ce}]}
"""


def test_three_stage_pipeline_end_to_end_and_resume(teachers, data_dir, tmp_path):
    recipe = _recipe(tmp_path, teachers, data_dir, THREE_STAGES)
    out = tmp_path / "progressive"
    kdship_ok("distill", "--recipe", recipe, "-o", out)
    record = json.loads((out / "kdship.json").read_text())
    assert record["command"] == "distill-pipeline"
    assert [s["changed"] for s in record["stages"]] == [[], ["teacher"], ["objective"]]
    assert [Path(s["output"]).name for s in record["stages"]] == ["01-general", "02-teacher", "03-task"]
    stage1 = json.loads((out / "stages" / "01-general" / "config.json").read_text())
    assert stage1["architectures"] == ["BertForMaskedLM"]  # feature stage with the MLM teacher mirrors its head
    final = json.loads((out / "student" / "kdship.json").read_text())
    assert final["pipeline"]["stages"][2]["name"] == "task" and "accuracy" in final["metrics"]
    assert json.loads((out / "student" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]

    # a finished pipeline is not redone; a lost stage is rebuilt on --resume, the others are kept
    kept = (out / "stages" / "01-general" / "model.safetensors").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "stages" / "03-task")
    result = kdship_ok("distill", "--recipe", recipe, "-o", out, "--resume")
    assert "general: already done" in result.stdout and "task: changes objective" in result.stdout
    assert (out / "stages" / "01-general" / "model.safetensors").stat().st_mtime_ns == kept
    assert (out / "stages" / "03-task" / "kdship.json").exists()
    again = kdship("distill", "--recipe", recipe, "-o", out)
    assert again.exit_code == 2 and "--resume" in again.stderr


def test_a_feature_stage_starts_from_the_projections_the_stage_before_trained(teachers, data_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from kdship.trainee import PROJECTIONS_FILE, HiddenProjection

    stages = """
  - {name: general, teacher: generic, data: task, objective: features, losses: [{name: hidden_mse}]}
  - {name: teacher, teacher: finetuned, data: task, objective: features, losses: [{name: hidden_mse}]}
"""
    recipe = _recipe(tmp_path, teachers, data_dir, stages).read_text().replace(
        "student: bert:layers=1", "student: bert:layers=1,hidden=16,heads=2,ffn=32")  # projections not identity
    (tmp_path / "pipeline.yaml").write_text(recipe)
    kdship_ok("distill", "--recipe", tmp_path / "pipeline.yaml", "-o", tmp_path / "out")
    general = tmp_path / "out" / "stages" / "01-general"
    second = json.loads((tmp_path / "out" / "stages" / "02-teacher" / "kdship.json").read_text())
    assert second["student"]["projections_from"] == str(general / PROJECTIONS_FILE)
    fresh = HiddenProjection([0, 1], 16, 32)
    carried = HiddenProjection([0, 1], 16, 32)
    assert carried.load_carried(str(general)) == str(general / PROJECTIONS_FILE)
    saved = load_file(general / PROJECTIONS_FILE)
    assert all(torch.equal(carried.state_dict()[k], saved[k]) for k in saved)
    assert not torch.equal(carried.state_dict()["maps.0.weight"], fresh.state_dict()["maps.0.weight"])
    # other layers or widths than were saved: a fresh projection, said in the record as None
    assert HiddenProjection([1], 16, 32).load_carried(str(general)) is None
    assert HiddenProjection([0, 1], 16, 64).load_carried(str(general)) is None
    (general / PROJECTIONS_FILE).write_bytes(b"not safetensors")
    damaged = kdship("distill", "--teacher", teachers / "finetuned", "--student", general, "--objective", "features",
                     "--loss", "hidden_mse", "--data", data_dir / "train.tsv", "--max-steps", 1, "-o", tmp_path / "d")
    assert damaged.exit_code != 0 and "delete it and the feature projections start fresh" in damaged.stderr
    assert damaged.stderr.count("\n") == 1 and not (tmp_path / "d").exists()


@pytest.mark.parametrize("stages, extra, message", [
    ("""
  - {name: general, teacher: generic, data: task, objective: features, losses: [{name: hidden_mse}]}
  - {name: jump, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}, {name: ce}]}
""", "", "stage 'jump' changes teacher and objective at once"),
    ("""
  - {name: one, teacher: nobody, data: task, objective: features, losses: [{name: hidden_mse}]}
""", "", "stage 'one': teacher 'nobody' is not defined"),
    ("""
  - {name: one, teacher: generic, data: nodata, objective: features, losses: [{name: hidden_mse}]}
""", "", "stage 'one': data 'nodata' is not defined"),
    ("""
  - {name: one, teacher: generic, data: task, objective: mlm, losses: [{name: kd}]}
  - {name: two, teacher: finetuned, data: task, objective: mlm, losses: [{name: kd}]}
""", "", "stage 'two': teacher"),
    ("""
  - {name: one, teacher: finetuned, data: words, objective: features, losses: [{name: hidden_mse}]}
""", "", "stage 'one':"),
    ("""
  - {name: one, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}]}
  - {name: two, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}], select_by: /no/scorer}
""", "", "stage 'two': scoring model /no/scorer not found"),
])
def test_bad_pipelines_are_one_line_errors_before_anything_runs(teachers, data_dir, tmp_path, stages, extra, message):
    (tmp_path / "words.tsv").write_text("words\tlabel\nhello\t1\n")
    recipe = _recipe(tmp_path, teachers, data_dir, stages, extra)
    recipe.write_text(recipe.read_text().replace("datasets:\n", f"datasets:\n  words: {{train: {tmp_path / 'words.tsv'}}}\n"))
    out = tmp_path / "out"
    result = kdship("distill", "--recipe", recipe, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def test_multi_change_is_allowed_when_the_stage_says_so(teachers, data_dir, tmp_path):
    stages = """
  - {name: general, teacher: generic, data: task, objective: features, losses: [{name: hidden_mse}]}
  - {name: task, teacher: finetuned, data: task, objective: classify, losses: [{name: kd}], allow_multi_change: true}
"""
    out = tmp_path / "out"
    kdship_ok("distill", "--recipe", _recipe(tmp_path, teachers, data_dir, stages), "-o", out, "--max-steps", 2)
    record = json.loads((out / "kdship.json").read_text())
    assert record["stages"][1]["changed"] == ["teacher", "objective"]
    assert json.loads((out / "student" / "kdship.json").read_text())["training"]["steps"] == 2


def test_multi_student_shares_one_teacher_forward_and_both_improve(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "multi"
    # (the second student copies one of the teacher's two layers: a full copy would start at the teacher's loss, and
    # whether it "improves" would be dropout noise)
    kdship_ok("distill", "--teacher", teacher_dir, "--students", "bert:layers=1,hidden=16,heads=2,bert:layers=1",
              "--data", data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv", "--loss", "kd:1",
              "--loss", "ce:1", "--loss", "hidden_mse:1", "--max-steps", 40, "--batch-size", 16, "--lr", "1e-3",
              "-o", out)
    index = json.loads((out / "kdship.json").read_text())
    assert set(index["students"]) == {"bert_layers_1_hidden_16_heads_2", "bert_layers_1"}
    for name in index["students"]:
        record = json.loads((out / name / "kdship.json").read_text())
        training = record["training"]
        assert training["teacher_forward_calls"] == 40, "one teacher forward per batch, shared by both students"
        assert training["students_in_pass"] == 2 and not training["teacher_cache"]
        assert training["loss_last"] < training["loss_first"], f"{name} did not improve"
        assert training["student_forward_seconds"] > 0 and training["training_state_mb"] > 0
        assert "accuracy" in record["metrics"] and "agreement" in record["metrics"]
        assert (out / name / "model.safetensors").exists()
    widths = {json.loads((out / n / "config.json").read_text())["hidden_size"] for n in index["students"]}
    assert widths == {16, 32}


def test_teacher_logits_are_cached_when_safe_and_not_otherwise(teacher_dir, data_dir, tmp_path):
    args = ["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
            "--max-steps", 25, "--batch-size", 16]  # 25 x 16: every one of the 400 examples once
    kdship_ok("distill", *args, "-o", tmp_path / "cached")
    cached = json.loads((tmp_path / "cached" / "kdship.json").read_text())["training"]
    assert cached["teacher_cache"] and cached["teacher_forward_calls"] == 0
    kdship_ok("distill", *args, "--teacher-cache", "off", "-o", tmp_path / "live")
    live = json.loads((tmp_path / "live" / "kdship.json").read_text())["training"]
    assert not live["teacher_cache"] and live["teacher_forward_calls"] == 25
    # a run that reads 80 of the 400 examples: caching would run the teacher on 320 it never reads
    kdship_ok("distill", *args, "--max-steps", 5, "-o", tmp_path / "short")
    short = json.loads((tmp_path / "short" / "kdship.json").read_text())["training"]
    assert not short["teacher_cache"] and short["teacher_forward_calls"] == 5
    a = json.loads((tmp_path / "cached" / "kdship.json").read_text())
    b = json.loads((tmp_path / "live" / "kdship.json").read_text())
    assert a["training"]["loss_first"] == pytest.approx(b["training"]["loss_first"], rel=1e-4)


def test_a_resumed_run_records_the_whole_runs_teacher_calls_and_first_losses(teacher_dir, data_dir, tmp_path):
    from test_reverse_selection import _interrupt_after_checkpoint

    args = ["distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
            "--max-steps", 8, "--batch-size", 16, "--save-every", 4, "--teacher-cache", "off"]
    kdship_ok(*args, "-o", tmp_path / "straight")
    _interrupt_after_checkpoint([*args, "-o", tmp_path / "resumed"], tmp_path / ".resumed.kdship-run" / "checkpoint.pt")
    kdship_ok(*args, "-o", tmp_path / "resumed", "--resume")
    straight, resumed = (json.loads((tmp_path / d / "kdship.json").read_text())["training"]
                         for d in ("straight", "resumed"))
    assert resumed["teacher_forward_calls"] == straight["teacher_forward_calls"] == 8
    assert resumed["loss_first"] == pytest.approx(straight["loss_first"], rel=1e-6)
    # the whole run's forward time, not the resumed half's (the run stopped after 4 of its 8 steps)
    assert resumed["student_forward_calls"] == straight["student_forward_calls"] == 8


def test_features_objective_refuses_logit_losses(teacher_dir, data_dir, tmp_path):
    result = kdship("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--objective", "features",
                    "--loss", "kd", "--data", data_dir / "train.tsv", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "drop ['kd']" in result.stderr
