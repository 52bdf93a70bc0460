"""SST-2 distillation benchmark: teacher vs students, and the gain of distillation over hard labels alone.

Pairs (see ../shared/README.md):
- real pretrained: all-MiniLM-L6-v2 fine-tuned on SST-2 as the teacher; a 3-layer student initialised from its
  layers (uniform map: layers 2/4/6), and a 4-layer/312-wide random student;
- paper shape (--paper, GPU): a BERT-base-shape teacher MLM-pretrained on ../shared/data/corpus then fine-tuned on
  SST-2, into 4-layer/312-wide and 6-layer/768-wide students.
Every student is trained twice with the same steps: KD (soft+hard) and hard labels alone.

    python benchmarks/sst2_kd.py --minilm /path/to/minilm [--quick] [--work runs/sst2]

--quick subsamples the training set so the whole run fits a 2-core CPU; the dev set is always complete.
Writes benchmarks/results/sst2_kd[_quick].json (device named) and the log beside it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from common import SHARED, device_name, write_result

from kdship.config import DistillConfig, EvalConfig, LossSpec, TrainConfig
from kdship.distill import distill
from kdship.evaluate import evaluate
from kdship.train import train

HARD_ONLY = [LossSpec(name="ce", weight=1.0)]


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    sst2 = SHARED / "data" / "sst2"
    return {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": args.train_samples}


def run_student(name: str, teacher: Path, student: str, args: argparse.Namespace, kd: bool) -> dict[str, Any]:
    out = args.work / f"{name}-{'kd' if kd else 'hard'}"
    cfg = DistillConfig(teacher=str(teacher), student=student, output=str(out), data=data_config(args),
                        epochs=args.student_epochs, batch_size=32, lr=args.student_lr, overwrite=True,
                        **({} if kd else {"losses": HARD_ONLY}))
    record = distill(cfg)
    report = evaluate(EvalConfig(teacher=str(teacher), student=str(out), data=cfg.data))
    return {"student": student, "losses": [loss.name for loss in cfg.losses], "config": record["config"],
            "accuracy": report["student"]["accuracy"], "retention": report["comparison"]["retention"],
            "agreement": report["comparison"]["agreement"], "parameters": record["student"]["parameters"],
            "train_samples_per_s": record["training"]["samples_per_second"]}


def run_pair(name: str, teacher_cfg: TrainConfig, students: dict[str, str], args: argparse.Namespace) -> dict:
    teacher_record = train(teacher_cfg)
    teacher = Path(teacher_cfg.output)
    teacher_eval = evaluate(EvalConfig(student=str(teacher), data=teacher_cfg.data))
    result = {"teacher": {"source": teacher_cfg.model or teacher_cfg.init, "config": teacher_record["config"],
                          "accuracy": teacher_eval["student"]["accuracy"],
                          "parameters": teacher_record["model"]["parameters"],
                          "train_samples_per_s": teacher_record["training"]["samples_per_second"]},
              "students": {}}
    for label, spec in students.items():
        result["students"][label] = {"kd": run_student(f"{name}-{label}", teacher, spec, args, kd=True),
                                     "hard_only": run_student(f"{name}-{label}", teacher, spec, args, kd=False)}
    return result


def minilm_pair(args: argparse.Namespace) -> dict:
    teacher = TrainConfig(model=str(args.minilm), output=str(args.work / "minilm-teacher"), data=data_config(args),
                          epochs=args.teacher_epochs, batch_size=32, lr=5e-5, overwrite=True)
    return run_pair("minilm", teacher, {"3L-from-teacher": "bert:layers=3",
                                        "4L-312-random": "bert:layers=4,hidden=312,heads=12,ffn=1200"}, args)


def paper_pair(args: argparse.Namespace) -> dict:
    corpus = SHARED / "data" / "corpus" / "general"
    mlm = TrainConfig(init="bert:layers=12,hidden=768,heads=12,ffn=3072", objective="mlm", tokenizer=str(args.minilm),
                      output=str(args.work / "bert-base-mlm"), data={"train": str(corpus), "max_length": 128},
                      max_steps=args.mlm_steps, batch_size=64, lr=1e-4, overwrite=True)
    train(mlm)
    teacher = TrainConfig(model=mlm.output, output=str(args.work / "bert-base-teacher"), data=data_config(args),
                          epochs=args.teacher_epochs, batch_size=32, lr=3e-5, overwrite=True)
    return run_pair("bert-base", teacher, {"4L-312": "bert:layers=4,hidden=312,heads=12,ffn=1200",
                                           "6L-768": "bert:layers=6"}, args)


def print_table(results: dict) -> None:
    from rich.table import Table

    from kdship.ui import console

    table = Table(title=f"SST-2 dev accuracy ({device_name()})")
    for col in ("pair", "model", "KD acc", "hard-only acc", "KD gain", "retention", "agreement", "train samples/s"):
        table.add_column(col)
    for pair, r in results.items():
        table.add_row(pair, "teacher", f"{r['teacher']['accuracy']:.4f}", "", "", "", "",
                      f"{r['teacher']['train_samples_per_s']:.0f}")
        for label, s in r["students"].items():
            kd, hard = s["kd"], s["hard_only"]
            table.add_row("", label, f"{kd['accuracy']:.4f}", f"{hard['accuracy']:.4f}",
                          f"{kd['accuracy'] - hard['accuracy']:+.4f}", f"{kd['retention']:.2%}",
                          f"{kd['agreement']:.2%}", f"{kd['train_samples_per_s']:.0f}")
    console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True, help="folder from ../shared/get-minilm.sh")
    parser.add_argument("--work", type=Path, default=Path("runs/sst2"))
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 4,000 training sentences, 1 epoch")
    parser.add_argument("--paper", action="store_true", help="also the BERT-base-shape pair (GPU)")
    parser.add_argument("--mlm-steps", type=int, default=20000)
    args = parser.parse_args()
    args.train_samples = 4000 if args.quick else None
    args.teacher_epochs = 1 if args.quick else 2
    args.student_epochs = 2 if args.quick else 4
    args.student_lr = 1e-4
    results = {"minilm": minilm_pair(args)}
    if args.paper:
        results["bert-base"] = paper_pair(args)
    print_table(results)
    settings = {"quick": args.quick, "train_samples": args.train_samples or "all (67,349)", "dev_samples": 872,
                "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs}
    path = write_result("sst2_kd_quick" if args.quick else "sst2_kd", {"settings": settings, "results": results})
    print(f"wrote {path}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
