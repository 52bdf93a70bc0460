"""benchmarks/gpu/verify.sh --dry-run: the GPU verification script is well-formed and every part runs (tiny
models, CPU paths) and writes its JSON, so the one call a GPU session gets is not spent finding a typo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_verification_dry_run_writes_every_part(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "verify.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    parts = {p.stem.removeprefix("gpu_verify_"): json.loads(p.read_text()) for p in tmp_path.glob("gpu_verify_*.json")}
    assert set(parts) == {"environment", "tests", "export", "bench", "distill"}
    assert all(p["dry_run"] for p in parts.values())
    assert "onnxruntime-gpu" in parts["environment"]["missing"]  # a CPU machine says what a GPU run would need
    assert parts["export"]["result"]["student/onnx"]["passed"]
    rows = parts["bench"]["result"]["ort-cpu"]
    assert {r["model"] for r in rows} == {"teacher-onnx", "student-onnx"} and all("speedup_ci95" in r for r in rows)
    distill = parts["distill"]["result"]
    assert distill["samples_per_second_median"]["after"] > 0 and len(distill["rounds"]["after"]) == 2
    before = (ROOT / "benchmarks" / "gpu" / "before" / "kdship").is_dir()  # carried only to the GPU machine
    assert isinstance(distill["after_over_before"], float) == before
