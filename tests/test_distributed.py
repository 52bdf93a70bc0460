"""Several processes (torchrun, gloo on CPU), for real: the same global batch gives the losses of one process,
a run killed with kill -9 resumes to the weights of an uninterrupted one, FSDP (teacher or trained model) gives
the losses of DDP, and the techniques' counts add up over processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kdship, kdship_ok
from kdship.trainee import PROJECTIONS_FILE
from test_clm import lm_data, lm_teacher  # noqa: F401 (fixtures)
from test_progressive import teachers  # noqa: F401 (a fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdship"]
# Accelerate's multi-GPU launcher is torch's elastic launch: on a machine without CUDA kdship runs it on gloo
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdship"]


def launch(*args, wait: bool = True, launcher: list[str] = TORCHRUN):
    """`torchrun --nproc-per-node 2 -m kdship ARGS`: its result, or with wait=False the running launcher."""
    cmd = launcher + [str(a) for a in args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode == 0, errors or done.stderr[-3000:]
    return done


def kill_tree(run: subprocess.Popen) -> None:
    """kill -9 the launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    processes = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
    for p in processes:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def record(folder: Path) -> dict:
    return json.loads((folder / "kdship.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def still_student(teacher_dir, tmp_path_factory) -> Path:
    """A 1-layer student without dropout (the teacher's tokenizer and labels): its losses depend on the data
    alone, so 1 and 2 processes can be compared exactly."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers, config.hidden_dropout_prob, config.attention_probs_dropout_prob = 1, 0.0, 0.0
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("still") / "student"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def _distill_args(teacher_dir, student, data_dir, out, batch, *extra):
    return ["distill", "--teacher", teacher_dir, "--student", student, "--data", data_dir / "train.tsv",
            "--eval-data", data_dir / "dev.tsv", "--max-steps", 8, "--batch-size", batch, "--eval-every", 4,
            "--lr", "1e-3", "-o", out, *extra]


def test_two_processes_match_one_process_at_the_same_global_batch(teacher_dir, still_student, data_dir, tmp_path):
    kdship_ok(*_distill_args(teacher_dir, still_student, data_dir, tmp_path / "one", 16))
    launch(*_distill_args(teacher_dir, still_student, data_dir, tmp_path / "two", 8))
    one, two = record(tmp_path / "one")["training"], record(tmp_path / "two")["training"]
    assert (one["processes"], one["per_device_batch"], one["global_batch"]) == (1, 16, 16)
    assert (two["processes"], two["per_device_batch"], two["global_batch"]) == (2, 8, 16)
    assert two["samples_seen"] == one["samples_seen"] == 8 * 16
    # stated tolerance: 1e-4 relative on the losses, 1e-5 absolute on the weights (float sums in another order)
    assert two["loss_first"] == pytest.approx(one["loss_first"], rel=1e-4)
    assert two["loss_last"] == pytest.approx(one["loss_last"], rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert record(tmp_path / "two")["history"] == pytest.approx(record(tmp_path / "one")["history"], abs=1e-6)
    assert not list(tmp_path.glob(".*kdship-run"))  # rank 0 cleaned up
    # accumulation: 2 processes x 8 examples x 2 micro-batches (Accelerate's launcher) as 1 process x 16 x 2
    kdship_ok(*_distill_args(teacher_dir, still_student, data_dir, tmp_path / "one-accumulated", 16, "--grad-accum", 2))
    launch(*_distill_args(teacher_dir, still_student, data_dir, tmp_path / "accelerate", 8, "--grad-accum", 2),
           launcher=ACCELERATE)
    one, two = record(tmp_path / "one-accumulated")["training"], record(tmp_path / "accelerate")["training"]
    assert (two["processes"], two["per_device_batch"], two["global_batch"]) == (2, 8, 32) and one["global_batch"] == 32
    assert two["loss_last"] == pytest.approx(one["loss_last"], rel=1e-4)
    a, b = weights(tmp_path / "one-accumulated"), weights(tmp_path / "accelerate")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _train_args(teacher_dir, data_dir, out, steps, *extra):
    # the teacher's tokenizer and weights: a run started afresh sees exactly what the killed one saw
    return ["train", "--model", teacher_dir, "--data", data_dir / "train.tsv", "--eval-data", data_dir / "dev.tsv",
            "--max-steps", steps, "--batch-size", 8, "--eval-every", 50, "--save-every", 5, "--lr", "1e-3",
            "-o", out, *extra]


def test_a_two_process_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(teacher_dir, data_dir, tmp_path):
    steps = 150
    launch(*_train_args(teacher_dir, data_dir, tmp_path / "straight", steps))
    run = launch(*_train_args(teacher_dir, data_dir, tmp_path / "killed", steps), wait=False)
    checkpoint = tmp_path / ".killed.kdship-run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(run)  # the launcher and both ranks, mid-run
    assert checkpoint.exists() and not (tmp_path / "killed").exists(), "the run ended before it could be killed"
    # another number of processes cannot take over the run
    refused = kdship(*_train_args(teacher_dir, data_dir, tmp_path / "killed", steps), "--resume")
    assert refused.exit_code == 2 and "made by 2 processes, this run has 1" in refused.stderr
    launch(*_train_args(teacher_dir, data_dir, tmp_path / "killed", steps), "--resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = record(tmp_path / "straight"), record(tmp_path / "killed")
    assert resumed["history"] == straight["history"] and resumed["training"]["samples_seen"] == steps * 16
    # the record speaks of the whole run, not of its resumed part
    assert resumed["training"]["loss_first"] == straight["training"]["loss_first"]


def test_fsdp_gives_the_losses_of_ddp_for_a_trained_model_and_for_the_teacher(teacher_dir, data_dir, tmp_path):
    launch(*_train_args(teacher_dir, data_dir, tmp_path / "ddp", 6))
    launch(*_train_args(teacher_dir, data_dir, tmp_path / "fsdp", 6, "--sharding", "fsdp"))
    ddp, fsdp = record(tmp_path / "ddp")["training"], record(tmp_path / "fsdp")["training"]
    assert fsdp["loss_first"] == pytest.approx(ddp["loss_first"], rel=1e-4)
    assert fsdp["loss_last"] == pytest.approx(ddp["loss_last"], rel=1e-4)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")  # gathered from the shards into one file
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # Adam magnifies float-order noise
    # a sharded teacher, run live every step with hidden-state matching, teaches what a replicated one does
    args = lambda out, *x: _distill_args(teacher_dir, "bert:layers=1", data_dir, out, 8, "--teacher-cache", "off",  # noqa: E731
                                         "--loss", "kd", "--loss", "hidden_mse", *x)
    launch(*args(tmp_path / "replicated"))
    launch(*args(tmp_path / "sharded", "--teacher-sharding", "fsdp"))
    rep, shard = record(tmp_path / "replicated")["training"], record(tmp_path / "sharded")["training"]
    assert shard["teacher_forward_calls"] == rep["teacher_forward_calls"] == 2 * 8  # one per batch per process
    assert shard["loss_first"] == pytest.approx(rep["loss_first"], rel=1e-4)
    assert shard["loss_last"] == pytest.approx(rep["loss_last"], rel=1e-4)
    # a sharded student's projections are gathered and saved beside its weights, as a replicated one's are
    launch(*args(tmp_path / "sharded-student", "--sharding", "fsdp"))
    a, b = (load_file(tmp_path / d / PROJECTIONS_FILE) for d in ("replicated", "sharded-student"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_selection_under_two_processes_counts_every_processs_samples(teacher_dir, still_student, data_dir, tmp_path):
    launch(*_distill_args(teacher_dir, still_student, data_dir, tmp_path / "selected", 8, "--select-by", teacher_dir))
    selected = record(tmp_path / "selected")
    # each process scores 16 candidates a step (8 / ratio 0.5) and trains on 8
    assert selected["selection"]["candidates_per_step"] == 16
    assert selected["selection"]["candidates"] == 8 * 2 * 16 and selected["selection"]["selected"] == 8 * 2 * 8
    assert selected["training"]["samples_seen"] == 8 * 2 * 8 and selected["training"]["global_batch"] == 16


def test_fewer_examples_than_processes_is_refused_not_an_endless_loop(teacher_dir, data_dir, tmp_path):
    done = subprocess.run(TORCHRUN + ["distill", "--teacher", str(teacher_dir), "--student", "bert:layers=1", "--data",
                                      str(data_dir / "train.tsv"), "--max-train-samples", "1", "--max-steps", "2",
                                      "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "1 training examples cannot be shared by 2 processes" in done.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_sharding_needs_several_processes(teacher_dir, data_dir, tmp_path):
    result = kdship(*_train_args(teacher_dir, data_dir, tmp_path / "out", 2, "--sharding", "fsdp"))
    assert result.exit_code == 2 and "sharding fsdp shards a model across processes" in result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_a_progressive_pipeline_runs_under_two_processes(teachers, data_dir, tmp_path):
    from test_progressive import THREE_STAGES, _recipe

    recipe = _recipe(tmp_path, teachers, data_dir, THREE_STAGES)
    launch("distill", "--recipe", recipe, "-o", tmp_path / "out")
    pipeline = record(tmp_path / "out")
    assert [s["name"] for s in pipeline["stages"]] == ["general", "teacher", "task"]
    final = record(tmp_path / "out" / "student")
    assert final["training"]["processes"] == 2 and "accuracy" in final["metrics"] and "pipeline" in final


def test_a_top_k_cache_written_by_two_processes_is_one_processes_and_two_processes_train_from_it(lm_teacher, lm_data,
                                                                                                 tmp_path):
    import numpy as np

    args = ["cache-teacher", "--teacher", lm_teacher, "--data", lm_data / "train.txt", "--top-k", 8, "--max-length",
            32, "--batch-size", 16]
    kdship_ok(*args, "-o", tmp_path / "one")
    launch(*args, "-o", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "cache.json").read_text()) for d in ("one", "two"))
    assert one["tokens"] == two["tokens"] and one["mean_tail_mass"] == pytest.approx(two["mean_tail_mass"], abs=1e-4)
    assert np.array_equal(np.load(tmp_path / "one" / "index.npy"), np.load(tmp_path / "two" / "index.npy"))
    rows = lambda d, name: np.load(tmp_path / d / f"{name}-00000.npy").astype(np.float32)  # noqa: E731
    assert np.allclose(rows("one", "log_probs"), rows("two", "log_probs"), atol=2e-3)
    assert (rows("one", "token_ids") == rows("two", "token_ids")).mean() > 0.999  # (near-ties may swap places)

    launch("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
           lm_data / "train.txt", "--loss", "forward_kl", "--max-steps", 4, "--batch-size", 8, "--max-length", 32,
           "--teacher-cache", tmp_path / "two", "-o", tmp_path / "student")
    training = record(tmp_path / "student")["training"]
    assert training["processes"] == 2 and training["teacher_forward_calls"] == 0
    assert training["teacher_topk_cache"]["tokens"] == two["tokens"]
    # a causal-LM teacher sharded with FSDP writes the same cache inside the run (every process as many batches)
    launch("distill", "--teacher", lm_teacher, "--student", "llama:layers=1", "--objective", "clm", "--data",
           lm_data / "train.txt", "--loss", "forward_kl", "--max-steps", 4, "--batch-size", 8, "--max-length", 32,
           "--teacher-cache", "topk:8", "--teacher-sharding", "fsdp", "-o", tmp_path / "sharded")
    sharded = record(tmp_path / "sharded")["training"]
    assert sharded["teacher_topk_cache"]["tokens"] == two["tokens"] and sharded["teacher_read"]
    assert sharded["loss_first"] == pytest.approx(training["loss_first"], rel=1e-3)
