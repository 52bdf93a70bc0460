"""bench, report and gate on tiny models: every bench field, a report whose plots render in a real browser, and a
gate that passes, fails with a readable ✗ line and exit 1, refuses bad budgets with exit 2, and writes JUnit XML."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import kdship, kdship_ok

ROW_FIELDS = {"model", "backend", "batch", "seq", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "runs",
              "sequences_per_s", "tokens_per_s", "speedup_vs_baseline", "rss_mb", "rss_model_mb", "gpu_allocated_mb",
              "stable", "unstable_reasons", "speedup_ci95", "rounds", "round_medians_ms", "file"}


@pytest.fixture(scope="module")
def runs(teacher_dir, artifact, data_dir, tmp_path_factory):
    """A run folder as a user would have it: teacher, student + eval, the student's artifact, a bench."""
    root = tmp_path_factory.mktemp("runs")
    student = root / "student"
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
              "--eval-data", data_dir / "dev.tsv", "--max-steps", 10, "--batch-size", 16, "-o", student)
    kdship_ok("eval", "--teacher", teacher_dir, "--student", student, "--data", data_dir / "dev.tsv")
    kdship_ok("export", student, "--to", "onnx,int8", "-o", root / "student-artifact")
    kdship_ok("bench", artifact, root / "student-artifact", "--backend", "ort-cpu", "--backend", "torch",
              "--batch", "1,4", "--seq", "16", "--warmup-s", "0", "--min-runs", "5", "--max-seconds", "1",
              "-o", root / "bench")
    return root


def test_bench_writes_every_field_for_torch_and_ort_cpu(runs):
    bench = json.loads((runs / "bench" / "bench.json").read_text())
    assert {"device", "cpu", "threads", "versions", "config", "baseline", "models", "results"} <= set(bench)
    rows = bench["results"]
    assert len(rows) == 2 * 2 * 2  # models x backends x batch sizes
    assert all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["backend"] for r in rows} == {"ort-cpu", "torch"}
    assert all(r["runs"] >= 5 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert all(r["tokens_per_s"] == pytest.approx(r["sequences_per_s"] * 16) for r in rows)
    baseline = [r for r in rows if r["model"] == bench["baseline"]]
    assert all(r["speedup_vs_baseline"] == pytest.approx(1.0) for r in baseline)
    # interleaved: every model of a point ran the same number of rounds, the interval holds the median
    assert all(r["rounds"] >= 6 and len(r["round_medians_ms"]) == r["rounds"] for r in rows)
    assert all(r["speedup_ci95"][0] <= r["speedup_vs_baseline"] <= r["speedup_ci95"][1] for r in rows)
    assert {"before", "after"} == set(bench["load_average"]) and bench["cpu_affinity"]
    csv_lines = (runs / "bench" / "bench.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "p99_ms" in csv_lines[0]


def test_bench_bad_inputs(runs, tmp_path):
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"")  # a folder without config.json
    for args, message in [
        (["bench", tmp_path / "weights-only", "--backend", "torch"], "could not be loaded"),
        (["bench", tmp_path / "missing"], "not found"),
        (["bench", runs / "student-artifact", "--backend", "onnx-gpu"], "valid backends: ort-cpu"),
        (["bench", runs / "student-artifact", "--backend", "ort-cuda"], "not available here"),
        (["bench", runs / "student-artifact", "--backend", "aoti", "--seq", "16"], "no variant that backend 'aoti' runs"),
        (["bench", runs / "student-artifact", "--seq", "16,128"], "--seq 128 is longer than student-artifact takes"),
        (["bench", runs / "student-artifact", runs / "student-artifact"], "two models are named alike"),
        (["bench", runs / "student-artifact", "--batch", "1,x"], "not a comma-separated list of integers"),
        (["bench", runs / "student-artifact", "--batch", "0"], "positive integers"),
    ]:
        result = kdship(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_report_holds_tables_plots_and_recipes(runs, tmp_path):
    out = tmp_path / "report.html"
    kdship_ok("report", runs, "-o", out)
    page = out.read_text()
    for heading in ("Accuracy", "Student per class", "Export parity: student-artifact", "Speed: bench",
                    "Accuracy vs latency", "Recipes"):
        assert heading in page
    assert page.count("data:image/png;base64,") == 5  # latency + throughput for 2 backends, and the Pareto plot
    md = (tmp_path / "report.md").read_text()
    assert "| metric | teacher | student |" in md and "report_assets/pareto.png" in md
    assert sorted(p.name for p in (tmp_path / "report_assets").iterdir()) == [
        "latency_ort-cpu_seq16.png", "latency_torch_seq16.png", "pareto.png", "throughput_ort-cpu_seq16.png",
        "throughput_torch_seq16.png"]
    # what a reader needs to trust a figure: p90 and runs, the benched file, the tolerance each ✓ means
    assert "| p90 ms | p99 ms | runs |" in md and "model_optimized.onnx" in md and "max abs ≤ 1e-04" in md


def test_report_shows_the_gates_verdict_and_training_curves(runs, teacher_dir, data_dir, tmp_path):
    kdship_ok("distill", "--teacher", teacher_dir, "--student", "bert:layers=1", "--data", data_dir / "train.tsv",
              "--eval-data", data_dir / "dev.tsv", "--max-steps", 6, "--eval-every", 2, "--batch-size", 16,
              "-o", tmp_path / "curved")
    (tmp_path / "budgets.yaml").write_text("min_retention: 0.0\nmin_accuracy: 0.999\n")
    kdship("gate", runs, "--budgets", tmp_path / "budgets.yaml", "--json", tmp_path / "gated" / "gate.json")
    kdship_ok("report", runs, tmp_path / "gated", tmp_path / "curved", "-o", tmp_path / "report.html")
    md = (tmp_path / "report.md").read_text()
    assert "### Gate: FAILED (" in md and "| ✗ | student accuracy |" in md and "| ✓ | student retention |" in md
    assert "report_assets/training_curves.png" in md


def test_accuracy_axis_is_at_least_five_points_tall():
    from kdship.report import accuracy_axis

    low, high = accuracy_axis([0.9975, 0.9988])
    assert high <= 1.0 and high - low >= 0.05 and low <= 0.9975
    assert accuracy_axis([0.4, 0.9]) == pytest.approx((0.35, 0.95))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian package 'chromium'); .ci/run installs it")
def test_report_renders_its_plots_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "report.html"
    kdship_ok("report", runs, "-o", out)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-plots-rendered="5/5"' in dom, dom[-500:]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a page with tables and plots, not a blank one


def _budgets(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    return path


def test_gate_passes_and_writes_junit_and_json(runs, tmp_path, artifact):
    budgets = _budgets(tmp_path, """
min_accuracy: 0.3
min_agreement: 0.3
max_accuracy_drop: 0.5
max_model_mb: 50
speed:
  - {backend: ort-cpu, batch: 1, seq: 16, max_p99_ms: 10000, min_speedup: 0.01}
""")
    # --allow-unstable: these tests are about budgets; a busy test machine may mark the tiny bench unstable (the
    # refusal itself is tested in test_measure.py)
    result = kdship_ok("gate", runs, "--budgets", budgets, "--junit", tmp_path / "gate.xml", "--json",
                       tmp_path / "gate.json", "--allow-unstable")
    assert "✓ student accuracy" in result.stdout and "0 failed" in result.stdout
    suite = ET.parse(tmp_path / "gate.xml").getroot()
    assert suite.tag == "testsuite" and int(suite.get("tests")) >= 6 and suite.get("failures") == "0"
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is True


def test_gate_fails_an_impossible_budget_with_exit_1_and_a_readable_line(runs, tmp_path):
    budgets = _budgets(tmp_path, "speed:\n  - {backend: ort-cpu, batch: 4, seq: 16, max_p99_ms: 0.000001}\n")
    result = kdship("gate", runs, "--budgets", budgets, "--junit", tmp_path / "gate.xml", "--allow-unstable")
    assert result.exit_code == 1
    assert "✗ student-artifact ort-cpu b4 s16 p99_ms:" in result.stdout and "(limit <= 1e-06)" in result.stdout
    failure = ET.parse(tmp_path / "gate.xml").getroot().find("testcase/failure")
    assert failure is not None and "limit <= 1e-06" in failure.get("message")


@pytest.mark.parametrize("text, message", [
    ("min_accuracy: 1.5\n", "min_accuracy: Input should be less than or equal to 1"),
    ("min_acc: 0.5\n", "unknown key 'min_acc'"),
    ("speed:\n  - {backend: ort-cpu, batch: 1, seq: 16}\n", "a speed budget needs a limit"),
    ("speed:\n  - {backend: ort-cuda, batch: 1, seq: 16, max_p99_ms: 1}\n", "no bench result"),
    ("{}\n", "sets no budget"),
])
def test_gate_refuses_bad_budgets_with_exit_2(runs, tmp_path, text, message):
    result = kdship("gate", runs, "--budgets", _budgets(tmp_path, text))
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_gate_baseline_round_trip(runs, tmp_path):
    budgets = _budgets(tmp_path, "min_accuracy: 0.0\nbaseline_tolerance: {accuracy: 0.0, latency_ratio: 1000}\n")
    baseline = tmp_path / "baseline.json"
    kdship_ok("gate", runs, "--budgets", budgets, "--baseline", baseline, "--update-baseline")
    facts = json.loads(baseline.read_text())["facts"]
    assert "student accuracy" in facts and any(k.endswith("p99_ms") for k in facts)
    result = kdship_ok("gate", runs, "--budgets", budgets, "--baseline", baseline)
    assert "✓ baseline: student accuracy" in result.stdout
    facts["student accuracy"] = 1.01  # a better committed baseline: the run now regresses against it
    baseline.write_text(json.dumps({"kind": "kdship-baseline/1", "facts": facts}))
    assert kdship("gate", runs, "--budgets", budgets, "--baseline", baseline).exit_code == 1
