"""The quickstart's whole flow on a smaller built-in task (the README command runs the full-size one)."""

import json

import pytest

from conftest import kdship
from kdship.config import QuickstartConfig
from kdship.errors import CheckFailed
from kdship.quickstart import quickstart


def test_quickstart_runs_every_stage_and_its_gate_has_teeth(tmp_path):
    """On a task too small to learn, every stage still runs and writes its output, and the gate fails the run."""
    root = tmp_path / "qs"
    with pytest.raises(CheckFailed, match="student accuracy"):
        quickstart(QuickstartConfig(output=str(root), train_size=200, eval_size=60))
    assert (root / "data" / "train.tsv").read_text().startswith("sentence\tlabel\n")
    for name in ("teacher", "student"):
        assert (root / name / "model.safetensors").is_file() and (root / name / "kdship.json").is_file()
        assert {"model.onnx", "model_optimized.onnx", "model_int8.onnx", "manifest.json"} <= {
            p.name for p in (root / f"{name}-artifact").iterdir()}
    report = json.loads((root / "student" / "eval.json").read_text())
    assert report["data"]["n"] == 60 and "comparison" in report
    assert json.loads((root / "student" / "kdship.json").read_text())["student"]["layer_map"] == [0, 2, 4]
    bench = json.loads((root / "bench" / "bench.json").read_text())
    assert {r["model"] for r in bench["results"]} == {"teacher-artifact", "student-artifact"}
    assert "data:image/png;base64," in (root / "report.html").read_text()
    gate = json.loads((root / "gate.json").read_text())
    assert not gate["passed"] and (root / "gate.xml").is_file() and (root / "budgets.yaml").is_file()


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
