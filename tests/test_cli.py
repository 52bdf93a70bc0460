"""The real CLI end to end on tiny models: artifacts, eval, resume after kill -9, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEACHER, kdship, kdship_ok, kdship_process, sigkill_after_first_checkpoint

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "kdship.json"}


def test_help_is_instant_and_lists_every_command():
    code = "import sys, kdship.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "kdship.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("train", "distill", "eval", "list", "quickstart"):
        assert name in out.stdout


def test_list_losses():
    out = kdship_ok("list", "losses").stdout
    for name in ("kd", "ce", "hidden_mse", "hidden_cos", "attention_kl"):
        assert name in out


def test_train_writes_a_save_pretrained_dir_with_its_record(teacher_dir, data_dir):
    assert {p.name for p in teacher_dir.iterdir()} == MODEL_FILES
    record = json.loads((teacher_dir / "kdship.json").read_text())
    assert record["command"] == "train"
    assert record["config"]["init"] == TINY_TEACHER
    assert record["data"]["train"]["fingerprint"].startswith("sha256:")
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["training"]["steps"] == 200
    assert record["metrics"]["accuracy"] > 0.75  # it learnt the task (chance is 0.5)
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert not list(teacher_dir.parent.glob(".teacher*")), "the run folder is removed once the output is in place"


def test_distill_and_eval_end_to_end(teacher_dir, data_dir, tmp_path):
    student = tmp_path / "student"
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
              "--eval-data", data_dir / "dev.tsv", "--max-steps", 40, "--batch-size", 16, "--lr", "1e-3", "-o", student)
    assert {p.name for p in student.iterdir()} == MODEL_FILES
    record = json.loads((student / "kdship.json").read_text())
    assert record["student"]["layer_map"] == [0, 2]
    assert record["student"]["tensors_copied_from_teacher"] > 0
    assert record["teacher"]["weights_sha256"] and record["teacher"]["command"] == "train"
    assert [loss["name"] for loss in record["config"]["losses"]] == ["kd", "ce"]
    assert 0 <= record["metrics"]["agreement"] <= 1

    result = kdship_ok("eval", "--teacher", teacher_dir, "--student", student, "--data", data_dir / "dev.tsv")
    assert "retention" in result.stdout
    report = json.loads((student / "eval.json").read_text())
    t, s = report["teacher"], report["student"]
    assert report["comparison"]["retention"] == pytest.approx(s["accuracy"] / t["accuracy"])
    assert set(s) >= {"accuracy", "macro_f1", "ece", "per_class"}
    assert sum(row["support"] for row in s["per_class"].values()) == 120
    assert s["accuracy"] > 0.6  # the student learnt the task, not chance (0.5)


def test_feature_distillation_into_a_narrower_random_student(teacher_dir, data_dir, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "task_kd_features.yaml"
    student = tmp_path / "narrow"
    kdship_ok("distill", "--recipe", recipe, "--teacher", teacher_dir, "--student", "bert:layers=1,hidden=16,heads=1",
              "--data", data_dir / "train.tsv", "--max-steps", 6, "--batch-size", 16, "-o", student)
    record = json.loads((student / "kdship.json").read_text())
    assert record["student"]["tensors_copied_from_teacher"] == 0  # widths differ: random init, projections learn
    assert json.loads((student / "config.json").read_text())["hidden_size"] == 16
    assert record["training"]["steps"] == 6


def test_a_classifier_distils_from_unlabeled_text_when_only_the_teacher_is_read(teacher_dir, data_dir, tmp_path):
    """A transfer set (Hinton et al. 2015): plain text, no labels; kd alone teaches a random student the task."""
    rows = (data_dir / "train.tsv").read_text().splitlines()[1:]
    text = tmp_path / "unlabeled.txt"
    text.write_text("\n".join(row.rsplit("\t", 1)[0] for row in rows))
    student = tmp_path / "from-text"
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1,hidden=16,heads=1", "--data", text,
              "--eval-data", data_dir / "dev.tsv", "--loss", "kd:1", "--max-steps", 150, "--batch-size", 16,
              "--lr", "2e-3", "-o", student)
    record = json.loads((student / "kdship.json").read_text())
    assert record["student"]["tensors_copied_from_teacher"] == 0
    assert not record["data"]["train"]["labels_read"] and record["data"]["eval"]["labels_read"]
    assert record["metrics"]["accuracy"] > 0.7  # chance is 0.5: the teacher's predictions alone taught it
    result = kdship("distill", "--teacher", teacher_dir, "--student", "bert:layers=1,hidden=16,heads=1", "--data",
                    text, "--loss", "kd:1", "--loss", "ce:1", "--max-steps", 2, "-o", tmp_path / "with-ce")
    assert result.exit_code != 0 and "plain text without labels" in result.output and "--loss kd:1" in result.output
    assert "Traceback" not in result.output


def test_mlm_pretraining_and_mlm_distillation(data_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line.split("\t")[0] for line in (data_dir / "train.tsv").read_text().splitlines()[1:]))
    teacher = tmp_path / "mlm-teacher"
    kdship_ok("train", "--objective", "mlm", "--init", "bert:layers=2,hidden=32,heads=2,ffn=64", "--data", corpus,
              "--eval-data", corpus, "--max-eval-samples", 50, "--max-steps", 8, "--batch-size", 16, "-o", teacher)
    assert json.loads((teacher / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert "mlm_loss" in json.loads((teacher / "kdship.json").read_text())["metrics"]
    student = tmp_path / "mlm-student"
    kdship_ok("distill", "--objective", "mlm", "--teacher", teacher, "--student", "bert:layers=1", "--data", corpus,
              "--loss", "kd:1", "--loss", "hidden_mse:1:0", "--max-steps", 4, "--batch-size", 16, "-o", student)
    assert json.loads((student / "kdship.json").read_text())["config"]["losses"][1]["weight_end"] == 0


def _distill_args(teacher_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher_dir), "--student", "bert:layers=1", "--data",
            str(data_dir / "train.tsv"), "--eval-data", str(data_dir / "dev.tsv"), "--max-steps", "300",
            "--batch-size", "8", "--save-every", "5", "--eval-every", "50", "--lr", "5e-4", "-o", str(out), *extra]


def test_resume_after_kill_reaches_the_same_weights_and_metrics(teacher_dir, data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    reference = kdship_process(_distill_args(teacher_dir, data_dir, straight))
    victim = kdship_process(_distill_args(teacher_dir, data_dir, resumed))
    sigkill_after_first_checkpoint(victim, resumed, settle_s=0.3)
    assert not resumed.exists(), "a killed run leaves no output folder"

    again = kdship(*_distill_args(teacher_dir, data_dir, resumed))
    assert again.exit_code == 2 and "--resume" in again.stderr

    finished = kdship_process(_distill_args(teacher_dir, data_dir, resumed, "--resume"))
    assert finished.wait() == 0, finished.stderr.read()
    assert reference.wait() == 0, reference.stderr.read()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "kdship.json").read_text()) for d in (straight, resumed))
    assert ra["metrics"] == rb["metrics"] and ra["history"] == rb["history"]


# ---- bad input: one line, exit 2, nothing left behind --------------------------------------------------------------


def _assert_user_error(result, message: str, out: Path | None = None) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_inputs_are_one_line_errors(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    train = data_dir / "train.tsv"
    three_labels = tmp_path / "three.tsv"
    three_labels.write_text("sentence\tlabel\na\t0\nb\t1\nc\t2\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("losses: [\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("temprature: 3\n")
    cases = [
        (["--teacher", tmp_path / "missing", "--student", "bert:layers=1", "--data", train], "not found"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", tmp_path / "nope.tsv"], "not found"),
        (["--teacher", teacher_dir, "--student", "bort:layers=1", "--data", train], "unknown model type 'bort'"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", train, "--loss", "kl"], "unknown loss"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", three_labels], "has 2 labels but"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", empty], "holds no examples"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", train, "-r", bad_yaml], "not valid YAML"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", train, "-r", unknown_key],
         "unknown key 'temprature'"),
        (["--teacher", teacher_dir, "--student", "bert:layers=1", "--data", train, "--layer-map", "0,9"], "layer_map"),
    ]
    for args, message in cases:
        _assert_user_error(kdship("distill", *args, "--max-steps", 1, "-o", out), message, out)


def test_tokenizer_mismatch_is_caught_before_training(teacher_dir, data_dir, tmp_path):
    other = tmp_path / "other-vocab"
    corpus = tmp_path / "other.tsv"
    corpus.write_text("sentence\tlabel\n" + "".join(f"zebra{i} quokka{i}\t{i % 2}\n" for i in range(50)))
    kdship_ok("train", "--init", "bert:layers=1,hidden=32,heads=2,vocab=100", "--data", corpus, "--max-steps", 1,
              "--vocab-size", 100, "-o", other)
    out = tmp_path / "out"
    result = kdship("distill", "--teacher", teacher_dir, "--student", other, "--data", data_dir / "train.tsv",
                    "--max-steps", 1, "-o", out)
    _assert_user_error(result, "different tokenizer", out)


def test_existing_output_is_not_overwritten_without_overwrite(teacher_dir, data_dir):
    result = kdship("train", "--init", TINY_TEACHER, "--data", data_dir / "train.tsv", "-o", teacher_dir)
    _assert_user_error(result, "--overwrite")
    assert (teacher_dir / "model.safetensors").exists()


def test_eval_of_a_model_without_labels_head_and_missing_data(teacher_dir, tmp_path):
    _assert_user_error(kdship("eval", "--student", teacher_dir), "no eval data")
    _assert_user_error(kdship("eval", "--student", tmp_path / "nope", "--data", "x.tsv"), "not found")


def _option_help(output: str) -> dict[str, str]:
    """--option -> its help text, from rich's wrapped option table."""
    helps: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0].startswith("--"):
            current, helps[cells[0]] = cells[0], " ".join(cells[1:])
        elif current and cells and not line.startswith(("╭", "╰")):
            helps[current] += " " + " ".join(cells)
    return helps


def test_version_short_help_and_the_defaults_a_run_gets_in_help():
    from importlib.metadata import version

    assert kdship_ok("--version").output.strip() == f"kdship {version('kdship')}"
    assert "distill [OPTIONS]" in kdship_ok("distill", "-h").output
    distill = _option_help(kdship_ok("distill", "--help").output)
    # options are None on the command line (a recipe's value must win over an unset flag), yet help shows the
    # default of the typed config that a run without a recipe gets
    assert "[default: (2.0)]" in distill["--temperature"] and "[default: (3.0)]" in distill["--epochs"]
    assert "1e-4 pretrained, 5e-4 random" in distill["--lr"]  # no single default: it says how it is chosen
    assert "[default: (5e-05)]" in _option_help(kdship_ok("train", "--help").output)["--lr"]
    assert "--install-completion" in kdship_ok("--help").output


def test_eval_names_its_model_as_the_other_commands_do(teacher_dir, data_dir, tmp_path):
    kdship_ok("eval", teacher_dir, "--data", data_dir / "dev.tsv", "-o", tmp_path / "a.json")
    kdship_ok("eval", "--student", teacher_dir, "--data", data_dir / "dev.tsv", "-o", tmp_path / "b.json")  # old
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["student"] == b["student"]
    missing = kdship("eval", "--data", data_dir / "dev.tsv")
    assert missing.exit_code == 2 and "kdship eval STUDENT" in missing.output
