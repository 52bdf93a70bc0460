"""Tiny real models and data, made in the tests: no hub, no shared files needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdship.cli import app
from kdship.synthetic import write_split

TINY_TEACHER = "bert:layers=2,hidden=32,heads=2,ffn=64,max_len=64"


@pytest.fixture(autouse=True)
def _offline_user_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """All user state in a temp dir, and no network: a test that reaches for the hub fails."""
    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def kdship(*args: str):
    """Run the real CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def kdship_ok(*args: str):
    result = kdship(*args)
    assert result.exit_code == 0, result.output
    return result


def kdship_process(args: list[str]) -> subprocess.Popen:
    """The real CLI in its own process, so that it can be killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: bitwise-comparable arithmetic
    return subprocess.Popen([sys.executable, "-m", "kdship.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def sigkill_after_first_checkpoint(run: subprocess.Popen, out: Path, settle_s: float) -> None:
    """Kill `run` (writing to `out`) with SIGKILL once it has checkpointed and trained on for `settle_s`."""
    checkpoint = out.with_name(f".{out.name}.kdship-run") / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(settle_s)  # let it run on past the checkpoint, so the kill lands mid-training
    assert run.poll() is None, "the run ended before it could be killed; raise --max-steps"
    run.send_signal(signal.SIGKILL)
    run.wait()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_split(root / "train.tsv", 400, seed=1, compositional=False)  # learnable in a few seconds
    write_split(root / "dev.tsv", 120, seed=2, compositional=False)
    return root


@pytest.fixture(scope="session")
def teacher_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT classifier trained for a few steps with `kdship train`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("models") / "teacher"
    kdship_ok("train", "--init", TINY_TEACHER, "--data", data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv",
              "--max-steps", 200, "--batch-size", 16, "--lr", "2e-3", "--eval-every", 50, "--max-length", 48, "--vocab-size", 200,
              "-o", out)
    return out


@pytest.fixture(scope="session")
def artifact(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every CPU ONNX variant of the tiny teacher, made with `kdship export`."""
    out = tmp_path_factory.mktemp("export") / "artifact"
    kdship_ok("export", teacher_dir, "--to", "onnx,ort-opt,fp16", "--to", "int8", "--to", "int8-static", "-o", out)
    return out
