"""Multi-student distillation vs separate runs on SST-2, and general distillation's masked-LM perplexity.
(Progressive and general -> task against task KD alone: seed_claims.py.) Everything goes through kdship's own
library calls; one JSON with the device named.

- Multi-student: the MiniLM-L6 teacher fine-tuned on SST-2; 4L-312 + 6L-768 students in one teacher pass vs two
  separate runs.
- MLM: a small masked-LM teacher trained on ../shared/data/corpus/general, a student general-distilled from it
  (objective mlm), and both models' masked-LM perplexity on ../shared/data/wikitext2/wiki.valid.tokens.

    python benchmarks/multi_student_sst2.py --minilm /path/to/minilm [--quick] [--work runs/multi_student]

--quick sizes everything for a 2-core CPU (subsampled SST-2, few hundred steps); without it, GPU-sized."""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

from common import SHARED, device_name, write_result

from kdship.config import DistillConfig, EvalConfig, TrainConfig
from kdship.distill import distill
from kdship.evaluate import evaluate
from kdship.train import train

STUDENT = "bert:layers=4,hidden=312,heads=12,ffn=1248"
TASK_KD = [{"name": "kd", "weight": 0.5}, {"name": "ce", "weight": 0.5}]


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"train_samples": 4000, "general_samples": 20000, "teacher_epochs": 1, "total_steps": 400,
                "batch": 32, "mlm_teacher_steps": 600, "mlm_student_steps": 300, "wikitext_lines": 400}
    return {"train_samples": None, "general_samples": None, "teacher_epochs": 2, "total_steps": 8000, "batch": 32,
            "mlm_teacher_steps": 20000, "mlm_student_steps": 8000, "wikitext_lines": None}


def task_data(s: dict[str, Any]) -> dict[str, Any]:
    sst2 = SHARED / "data" / "sst2"
    return {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": s["train_samples"]}


def generic_data(s: dict[str, Any]) -> dict[str, Any]:
    return {"train": str(SHARED / "data" / "corpus" / "general"), "max_length": 64,
            "max_train_samples": s["general_samples"]}


def accuracy(student: Path, teacher: Path, data: dict[str, Any]) -> dict[str, float]:
    report = evaluate(EvalConfig(teacher=str(teacher), student=str(student), data=data))
    return {"accuracy": report["student"]["accuracy"], "teacher_accuracy": report["teacher"]["accuracy"],
            **report["comparison"]}


def multi_vs_separate(s: dict[str, Any], teacher: str, work: Path) -> dict[str, Any]:
    students = {"4L312": STUDENT, "6L768": "bert:layers=6,hidden=768,heads=12,ffn=3072"}
    common = {"teacher": teacher, "data": task_data(s), "max_steps": s["total_steps"], "batch_size": s["batch"],
              "lr": 1e-4, "losses": TASK_KD, "teacher_cache": "off", "overwrite": True}  # teacher runs every step
    started = time.perf_counter()
    distill(DistillConfig(students=students, output=str(work / "multi"), **common))
    multi_seconds = time.perf_counter() - started
    separate_seconds, result = 0.0, {}
    for name, spec in students.items():
        started = time.perf_counter()
        distill(DistillConfig(student=spec, output=str(work / f"separate-{name}"), **common))
        separate_seconds += time.perf_counter() - started
        result[name] = {"multi": accuracy(work / "multi" / name, Path(teacher), task_data(s))["accuracy"],
                        "separate": accuracy(work / f"separate-{name}", Path(teacher), task_data(s))["accuracy"]}
    return {"accuracy": result, "multi_seconds": multi_seconds, "separate_seconds": separate_seconds,
            "speedup": separate_seconds / multi_seconds}


def mlm_perplexity(s: dict[str, Any], minilm: Path, work: Path) -> dict[str, Any]:
    from kdship.data import load_table, tokenize
    from kdship.evaluate import mlm_loss
    from kdship.runtime import pick_device
    from kdship.models import build_model, load_tokenizer
    from kdship.run import mlm_collator_for

    wiki = work / "wiki.valid.txt"
    lines = [line.strip() for line in (SHARED / "data" / "wikitext2" / "wiki.valid.tokens").read_text().splitlines()
             if len(line.split()) > 8 and not line.startswith(" =")]
    wiki.write_text("\n".join(lines[: s["wikitext_lines"]] if s["wikitext_lines"] else lines))
    teacher = work / "mlm-teacher"
    train(TrainConfig(init="bert:layers=4,hidden=256,heads=4,ffn=1024", tokenizer=str(minilm), objective="mlm",
                      data=generic_data(s), max_steps=s["mlm_teacher_steps"], batch_size=s["batch"], lr=5e-4,
                      output=str(teacher), overwrite=True))
    student = work / "mlm-student"
    distill(DistillConfig(teacher=str(teacher), student="bert:layers=2", objective="mlm", data=generic_data(s),
                          losses=[{"name": "kd"}, {"name": "hidden_mse"}], max_steps=s["mlm_student_steps"],
                          batch_size=s["batch"], lr=5e-4, output=str(student), overwrite=True))
    tokenizer = load_tokenizer(str(teacher), "teacher")
    cfg = TrainConfig(init="bert:layers=1", objective="mlm")
    encoded = tokenize(tokenizer, load_table(str(wiki), None, None), 128, None)
    device = pick_device("auto")
    out = {}
    for name, folder in (("teacher", teacher), ("student", student)):
        model = build_model("mlm", source=str(folder)).to(device)
        loss = mlm_loss(model, tokenizer, encoded, 64, device, mlm_collator_for(cfg, tokenizer))
        out[name] = {"mlm_loss": loss, "perplexity": math.exp(loss)}
    return {"wikitext2_valid_lines": len(encoded.features), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True, help="folder from ../shared/get-minilm.sh")
    parser.add_argument("--work", type=Path, default=Path("runs/multi_student"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the models (export_sst2.py can use them)")
    args = parser.parse_args()
    s = sizes(args.quick)
    args.work.mkdir(parents=True, exist_ok=True)
    finetuned = args.work / "minilm-sst2"
    train(TrainConfig(model=str(args.minilm), data=task_data(s), epochs=s["teacher_epochs"], batch_size=32, lr=5e-5,
                      output=str(finetuned), overwrite=True))
    results = {"multi_student": multi_vs_separate(s, str(finetuned), args.work),
               "mlm_general_distillation": mlm_perplexity(s, args.minilm, args.work)}
    print(results)
    path = write_result("multi_student_sst2_quick" if args.quick else "multi_student_sst2",
                        {"settings": {**s, "student": STUDENT, "quick": args.quick}, "results": results})
    print(f"wrote {path} ({device_name()})")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
