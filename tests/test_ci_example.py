"""deploy/ci/github-actions.yml, run step by step as a CI runner would (bash, the job's env, a fresh folder) on
the tests' tiny teacher and data: every step after the install must succeed; the first gate writes the baseline,
the next one gates against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "deploy" / "ci" / "github-actions.yml"


def test_the_ci_example_runs_every_step_and_gates_against_the_baseline_it_wrote(teacher_dir, data_dir, tmp_path):
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["distill"]
    assert job["timeout-minutes"] <= 90
    steps = [s for s in job["steps"] if "run" in s and s.get("name") != "install"]
    assert [s["name"] for s in steps] == ["distill", "evaluate", "export", "bench", "report", "gate"]
    (tmp_path / "ci").mkdir()
    # the tests' teacher (2 layers, 32 wide) is too small for a 1-layer student to run 1.2x faster: the speed budget
    # stays, at a ratio this pair reaches
    budgets = (ROOT / "deploy" / "ci" / "budgets.yaml").read_text()
    assert "min_speedup: 1.2" in budgets
    (tmp_path / "ci" / "budgets.yaml").write_text(budgets.replace("min_speedup: 1.2", "min_speedup: 0.5"))
    env = {**os.environ, **job["env"], "TEACHER": str(teacher_dir), "TRAIN": str(data_dir / "train.tsv"),
           "DEV": str(data_dir / "dev.tsv"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(step: dict) -> str:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"step {step['name']}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    for step in steps:
        first_gate = run(step)
    assert (tmp_path / "ci" / "baseline.json").is_file() and (tmp_path / "runs" / "gate.xml").is_file()
    assert "✓ baseline:" not in first_gate  # the first run writes the baseline to commit
    assert "✓ baseline: student accuracy" in run(steps[-1])  # the next run gates against it
