"""`kdship quickstart`: the embedded default run, fully offline, a few minutes on 2 CPU cores.

Makes the built-in synthetic task (kdship.synthetic), trains a small teacher from a shape spec, distills a student
with half its layers (initialised from the teacher's), evaluates both on the same split, exports both (ONNX,
optimised, INT8, each checked against PyTorch), benchmarks them side by side, gates the result
against the example budgets it writes beside it, and writes the report with the verdict."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdship.artifacts import atomic_write_text
from kdship.ui import console

from kdship.config import (BenchConfig, DistillConfig, EvalConfig, ExportConfig, GateConfig, QuickstartConfig,
                           ReportConfig, TrainConfig)
from kdship.errors import ConfigError

TEACHER_SHAPE = "bert:layers=4,hidden=128,heads=4,ffn=512,max_len=128"
STUDENT_SHAPE = "bert:layers=2"  # teacher's width, so its layers are initialised from every 2nd teacher layer
EXPORTS = ["onnx", "ort-opt", "int8"]
BUDGETS = """# Example budgets for `kdship gate` (the quickstart checks its own run with them).
min_accuracy: 0.85          # student accuracy on the eval split
min_retention: 0.95         # student accuracy / teacher accuracy
max_accuracy_drop: 0.02     # per exported variant, vs the PyTorch student
speed:
  - {backend: ort-cpu, batch: 8, seq: 32, min_speedup: 1.2}   # student vs teacher throughput, same run
"""


def quickstart_configs(cfg: QuickstartConfig, root: Path, train_file: Path, eval_file: Path) -> dict[str, Any]:
    data = {"train": str(train_file), "eval": str(eval_file), "max_length": 64}
    common = {"data": data, "batch_size": 32, "seed": cfg.seed, "device": cfg.device, "save_every": 50}
    return {
        "teacher": TrainConfig(init=TEACHER_SHAPE, output=str(root / "teacher"), epochs=4, lr=5e-4, vocab_size=200,
                               **common),
        "student": DistillConfig(teacher=str(root / "teacher"), student=STUDENT_SHAPE, output=str(root / "student"),
                                 epochs=3, lr=5e-4, **common),
        "eval": EvalConfig(teacher=str(root / "teacher"), student=str(root / "student"), data=data,
                           device=cfg.device),
        "exports": [ExportConfig(student=str(root / name), to=EXPORTS, output=str(root / f"{name}-artifact"))
                    for name in ("teacher", "student")],
        "bench": BenchConfig(models=[str(root / "teacher-artifact"), str(root / "student-artifact")],
                             backends=["ort-cpu"], batch=[1, 8, 32], seq=[32], warmup_s=0.5, max_seconds=3,
                             output=str(root / "bench")),
        "report": ReportConfig(runs=[str(root)], output=str(root / "report.html"),
                               title="kdship quickstart (synthetic task)"),
        # The quickstart checks an install, not a machine: a speed point measured unstable (a busy machine) is
        # reported in the bench table and the report, but does not fail it. `kdship gate` refuses it by default.
        "gate": GateConfig(budgets=str(root / "budgets.yaml"), runs=[str(root)], junit=str(root / "gate.xml"),
                           json_out=str(root / "gate.json"), allow_unstable=True),
    }


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from kdship.bench import bench, print_bench
    from kdship.distill import distill
    from kdship.evaluate import evaluate, print_eval
    from kdship.export import export
    from kdship.gate import gate, print_gate, raise_if_failed
    from kdship.report import report
    from kdship.synthetic import write_split
    from kdship.train import train

    from kdship.runtime import pick_device

    pick_device(cfg.device)  # a device that is not here stops the run before anything is written
    root = Path(cfg.output)
    if root.exists() and any(root.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{root} already exists; pass --overwrite to run the quickstart again, or -o elsewhere")
        shutil.rmtree(root)
    out = console()
    out.rule("kdship quickstart: synthetic compositional sentiment task (offline)")
    train_file = write_split(root / "data" / "train.tsv", cfg.train_size, seed=cfg.seed)
    eval_file = write_split(root / "data" / "dev.tsv", cfg.eval_size, seed=cfg.seed + 1)
    atomic_write_text(root / "budgets.yaml", BUDGETS)
    configs = quickstart_configs(cfg, root, train_file, eval_file)
    out.print(f"1/7 training the teacher ({TEACHER_SHAPE})")
    train(configs["teacher"])
    out.print(f"2/7 distilling the student ({STUDENT_SHAPE}, layers from the teacher)")
    distill(configs["student"])
    out.print("3/7 evaluating teacher and student on the same split")
    result = evaluate(configs["eval"])
    print_eval(result)
    out.print(f"4/7 exporting both ({', '.join(EXPORTS)}), each checked against PyTorch")
    for export_cfg in configs["exports"]:
        export(export_cfg)
    out.print("5/7 benchmarking teacher and student side by side (ONNX Runtime, CPU)")
    measured = bench(configs["bench"])
    print_bench(measured)
    if not all(r["stable"] for r in measured["results"]):
        out.print("note: this machine was busy during the bench; the quickstart's gate accepts unstable speed rows, "
                  "`kdship gate` refuses them unless given --allow-unstable")
    out.print("6/7 gating the run against budgets.yaml")
    verdict = gate(configs["gate"])
    print_gate(verdict)
    out.print("7/7 writing the report (with the gate's verdict)")
    written = report(configs["report"])
    out.rule("done")
    for label, path in (("report", written["output"]), ("teacher", root / "teacher"), ("student", root / "student"),
                        ("artifact", root / "student-artifact"), ("bench", root / "bench"),
                        ("gate", root / "gate.xml"), ("data", train_file.parent)):
        out.print(f"{label:9s} {path}")
    raise_if_failed(verdict)  # a quickstart whose own budgets fail is a broken install: exit 1
    return {**result, "report": written["output"], "gate": verdict}
