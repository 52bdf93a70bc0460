"""`kdship quickstart`: the embedded default run, fully offline, a few minutes on 2 CPU cores.

Makes the built-in synthetic task (kdship.synthetic), trains a small teacher from a shape spec, distills a student
with half its layers (initialised from the teacher's), evaluates both on the same split, and says where it all is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdship.ui import console

from kdship.config import DistillConfig, EvalConfig, QuickstartConfig, TrainConfig
from kdship.errors import ConfigError

TEACHER_SHAPE = "bert:layers=4,hidden=128,heads=4,ffn=512,max_len=128"
STUDENT_SHAPE = "bert:layers=2"  # teacher's width, so its layers are initialised from every 2nd teacher layer


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
    }


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from kdship.distill import distill
    from kdship.evaluate import evaluate, print_eval
    from kdship.synthetic import write_split
    from kdship.train import train

    root = Path(cfg.output)
    if root.exists() and any(root.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{root} already exists; pass --overwrite to run the quickstart again, or -o elsewhere")
        shutil.rmtree(root)
    out = console()
    out.rule("kdship quickstart: synthetic compositional sentiment task (offline)")
    train_file = write_split(root / "data" / "train.tsv", cfg.train_size, seed=cfg.seed)
    eval_file = write_split(root / "data" / "dev.tsv", cfg.eval_size, seed=cfg.seed + 1)
    configs = quickstart_configs(cfg, root, train_file, eval_file)
    out.print(f"1/3 training the teacher ({TEACHER_SHAPE})")
    teacher = train(configs["teacher"])
    out.print(f"2/3 distilling the student ({STUDENT_SHAPE}, layers from the teacher)")
    student = distill(configs["student"])
    out.print("3/3 evaluating teacher and student on the same split")
    result = evaluate(configs["eval"])
    print_eval(result)
    out.print(f"teacher: {teacher['output']}\nstudent: {student['output']}\ndata:    {train_file.parent}")
    return result
