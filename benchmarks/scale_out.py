"""Scale-out benchmark: the same distillation on 1 process and on N processes (torchrun; gloo on CPU, NCCL on
GPUs) at the same global batch, and optionally the 1-process throughput of an older kdship checkout (before the
training-core change) on the same run.

Teacher: all-MiniLM-L6-v2 (../shared/get-minilm.sh) fine-tuned on SST-2 sentences; student: 3 of its layers
(uniform map), KD + hard labels from the cached teacher logits; dev accuracy on the full SST-2 dev set. Each
configuration runs `--rounds` times, interleaved (A B C A B C), so a burst of load hits every configuration alike;
samples/s is the training loop's (kdship.json), wall time includes start-up and the teacher pass.

    python benchmarks/scale_out.py --minilm runs/minilm [--processes 2] [--before /path/to/old/checkout]

Writes benchmarks/results/scale_out.json (device named) and the log beside it."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import SHARED, write_result

ROOT = Path(__file__).resolve().parents[1]


def kdship_command(args: list[str], processes: int, source: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    if processes == 1:  # the CLI's entry point, which older checkouts (without kdship/__main__.py) have too
        return [sys.executable, "-c", "from kdship.cli import main; main()", *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "kdship", *args], env


def run(args: list[str], processes: int = 1, source: Path = ROOT, log: Any = None) -> float:
    cmd, env = kdship_command(args, processes, source)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if log:
        log.write(f"$ PYTHONPATH={source} {' '.join(cmd)}\n{done.stdout[-2000:]}\n")
        log.flush()
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds


def distill_args(s: argparse.Namespace, teacher: Path, out: Path, per_device_batch: int) -> list[str]:
    sst2 = SHARED / "data" / "sst2"
    return ["distill", "--teacher", str(teacher), "--student", "bert:layers=3", "--data", str(sst2 / "train.tsv"),
            "--eval-data", str(sst2 / "dev.tsv"), "--max-train-samples", str(s.train_samples), "--max-length", "64",
            "--batch-size", str(per_device_batch), "--max-steps", str(s.steps), "--eval-every", str(s.steps // 2),
            "--lr", "1e-4", "--seed", "0", "--device", s.device, "-o", str(out), "--overwrite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--before", type=Path, help="an older kdship checkout: its 1-process throughput beside")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale_out")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    s = parser.parse_args()
    s.work.mkdir(parents=True, exist_ok=True)
    log_path = Path(__file__).resolve().parent / "results" / "scale_out.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        teacher = s.work / "teacher"
        sst2 = SHARED / "data" / "sst2"
        run(["train", "--model", str(s.minilm), "--data", str(sst2 / "train.tsv"), "--eval-data",
             str(sst2 / "dev.tsv"), "--max-train-samples", str(s.train_samples), "--max-length", "64",
             "--batch-size", "32", "--epochs", "1", "--lr", "5e-5", "--seed", "0", "--device", s.device,
             "-o", str(teacher), "--overwrite"], log=log)
        configs = {"1_process": (1, ROOT), f"{s.processes}_processes": (s.processes, ROOT)}
        if s.before:
            configs = {"1_process_before": (1, s.before), **configs}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for r in range(s.rounds):
            for name, (processes, source) in configs.items():
                out = s.work / f"{name}-{r}"
                wall = run(distill_args(s, teacher, out, s.global_batch // processes), processes, source, log)
                record = json.loads((out / "kdship.json").read_text())
                runs[name].append({"wall_seconds": round(wall, 1), **{k: record["training"].get(k) for k in (
                    "samples_per_second", "train_seconds", "processes", "per_device_batch", "global_batch",
                    "loss_first", "loss_last")}, "accuracy": record["metrics"].get("accuracy")})
    summary = {name: {"samples_per_second_median": statistics.median(x["samples_per_second"] for x in rs),
                      "wall_seconds_median": statistics.median(x["wall_seconds"] for x in rs),
                      "accuracy": [x["accuracy"] for x in rs]} for name, rs in runs.items()}
    one = summary["1_process"]["samples_per_second_median"]
    ratios = {name: round(v["samples_per_second_median"] / one, 3) for name, v in summary.items()}
    teacher_record = json.loads((s.work / "teacher" / "kdship.json").read_text())
    path = write_result("scale_out", {"settings": {k: str(v) for k, v in vars(s).items()},
                                      "teacher_accuracy": teacher_record["metrics"].get("accuracy"),
                                      "runs": runs, "summary": summary, "throughput_vs_1_process": ratios})
    print(json.dumps({"summary": summary, "throughput_vs_1_process": ratios}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
