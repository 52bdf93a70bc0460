"""The quickstart's whole flow on a smaller built-in task (the README command runs the full-size one)."""

import json

import pytest

from conftest import kdship
from kdship.config import QuickstartConfig
from kdship.quickstart import quickstart


def test_quickstart_makes_data_teacher_student_and_eval(tmp_path):
    root = tmp_path / "qs"
    result = quickstart(QuickstartConfig(output=str(root), train_size=200, eval_size=60))
    assert (root / "data" / "train.tsv").read_text().startswith("sentence\tlabel\n")
    for name in ("teacher", "student"):
        assert (root / name / "model.safetensors").is_file() and (root / name / "kdship.json").is_file()
    report = json.loads((root / "student" / "eval.json").read_text())
    assert report["data"]["n"] == 60 and "comparison" in report
    assert result["student"]["accuracy"] == report["student"]["accuracy"]
    student_record = json.loads((root / "student" / "kdship.json").read_text())
    assert student_record["student"]["layer_map"] == [0, 2, 4]


def test_quickstart_refuses_to_overwrite_without_the_flag(tmp_path):
    (tmp_path / "qs").mkdir()
    (tmp_path / "qs" / "keep.txt").write_text("x")
    result = kdship("quickstart", "-o", tmp_path / "qs")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "qs" / "keep.txt").exists()


@pytest.mark.parametrize("seed", [0, 5])
def test_synthetic_task_is_deterministic_and_balanced(tmp_path, seed):
    from kdship.synthetic import write_split

    a = write_split(tmp_path / "a.tsv", 500, seed).read_text()
    assert a == write_split(tmp_path / "b.tsv", 500, seed).read_text()
    labels = [line.split("\t")[1] for line in a.splitlines()[1:]]
    assert 0.4 < labels.count("positive") / len(labels) < 0.6
