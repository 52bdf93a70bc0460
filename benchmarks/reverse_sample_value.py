"""Reverse distillation and sample-value selection, each against the same run without it.

(1) masked-LM pre-training of a larger model from scratch, with and without reverse warm-up from a smaller model
    trained first: steps (and wall time) to reach a target eval MLM loss, and the loss at equal steps;
(2) fine-tuning on SST-2 with and without sample-value selection (a small fine-tuned model scores samples):
    steps to reach a target dev accuracy, and final accuracy.
Ratios are reported as they come out, whichever way.

    python benchmarks/reverse_sample_value.py --minilm /path/to/minilm [--quick] [--work runs/reverse]"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from common import SHARED, device_name, write_result

from kdship.artifacts import read_record
from kdship.config import DistillConfig, TrainConfig
from kdship.distill import distill
from kdship.train import train


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"small": "bert:layers=2,hidden=128,heads=2,ffn=512", "large": "bert:layers=4,hidden=256,heads=4,ffn=1024",
                "small_steps": 600, "large_steps": 600, "reverse_steps": 270, "eval_every": 50, "corpus": 30000,
                "sst2_train": 4000, "finetune_steps": 250, "batch": 32}
    return {"small": "bert:layers=4,hidden=312,heads=12,ffn=1200", "large": "bert:layers=12,hidden=768,heads=12,ffn=3072",
            "small_steps": 20000, "large_steps": 20000, "reverse_steps": 9000, "eval_every": 500, "corpus": None,
            "sst2_train": None, "finetune_steps": 4000, "batch": 64}


def first_step_reaching(history: list[dict[str, Any]], key: str, target: float, higher: bool) -> int | None:
    for entry in history:
        if (entry[key] >= target) if higher else (entry[key] <= target):
            return entry["step"]
    return None


def timed_train(cfg: TrainConfig) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    train(cfg)
    return read_record(Path(cfg.output)), time.perf_counter() - started


def reverse_warmup(s: dict[str, Any], minilm: Path, work: Path) -> dict[str, Any]:
    corpus = str(SHARED / "data" / "corpus" / "general")
    wiki = work / "wiki.txt"
    lines = [line for line in (SHARED / "data" / "wikitext2" / "wiki.valid.tokens").read_text().splitlines()
             if len(line.split()) > 8 and not line.startswith(" =")]
    wiki.write_text("\n".join(lines[:300]))
    data = {"train": corpus, "eval": str(wiki), "max_length": 64, "max_train_samples": s["corpus"]}
    common = {"init": s["large"], "tokenizer": str(minilm), "objective": "mlm", "data": data, "lr": 5e-4,
              "max_steps": s["large_steps"], "batch_size": s["batch"], "eval_every": s["eval_every"], "overwrite": True}
    small = work / "small-mlm"
    train(TrainConfig(**{**common, "init": s["small"], "max_steps": s["small_steps"]}, output=str(small)))
    plain, plain_s = timed_train(TrainConfig(**common, output=str(work / "large-plain")))
    warm, warm_s = timed_train(TrainConfig(**common, output=str(work / "large-reverse"), reverse_from=str(small),
                                           reverse_steps=s["reverse_steps"]))
    small_loss = read_record(small)["metrics"]["mlm_loss"]
    target = max(small_loss, min(h["mlm_loss"] for h in plain["history"]))  # reachable by the plain run
    result = {}
    for name, record, seconds in (("plain", plain, plain_s), ("reverse", warm, warm_s)):
        step = first_step_reaching(record["history"], "mlm_loss", target, higher=False)
        result[name] = {"steps_to_target": step, "seconds": seconds, "final_mlm_loss": record["history"][-1]["mlm_loss"],
                        "curve": [(h["step"], h["mlm_loss"]) for h in record["history"]]}
    a, b = result["plain"]["steps_to_target"], result["reverse"]["steps_to_target"]
    return {"target_mlm_loss": target, "small_model_mlm_loss": small_loss, **result,
            "steps_ratio_plain_over_reverse": a / b if a and b else None}


def sample_value(s: dict[str, Any], minilm: Path, work: Path) -> dict[str, Any]:
    sst2 = SHARED / "data" / "sst2"
    data = {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": s["sst2_train"]}
    teacher = work / "minilm-sst2"
    train(TrainConfig(model=str(minilm), data=data, epochs=1, batch_size=32, lr=5e-5, output=str(teacher),
                      overwrite=True))
    small = work / "small-sst2"
    distill(DistillConfig(teacher=str(teacher), student="bert:layers=2", data=data, max_steps=s["finetune_steps"],
                          batch_size=32, lr=1e-4, output=str(small), overwrite=True))
    common = {"model": str(minilm), "data": data, "max_steps": s["finetune_steps"], "batch_size": 32, "lr": 5e-5,
              "eval_every": s["eval_every"], "overwrite": True}
    plain, plain_s = timed_train(TrainConfig(**common, output=str(work / "ft-plain")))
    picked, picked_s = timed_train(TrainConfig(**common, output=str(work / "ft-selected"), select_by=str(small),
                                               select_ratio=0.5))
    target = 0.97 * max(h["accuracy"] for h in plain["history"])
    result = {}
    for name, record, seconds in (("plain", plain, plain_s), ("selected", picked, picked_s)):
        result[name] = {"steps_to_target": first_step_reaching(record["history"], "accuracy", target, higher=True),
                        "seconds": seconds, "final_accuracy": record["history"][-1]["accuracy"],
                        "best_accuracy": max(h["accuracy"] for h in record["history"]),
                        "curve": [(h["step"], h["accuracy"]) for h in record["history"]]}
    result["selected"]["selection"] = picked["selection"]
    a, b = result["plain"]["steps_to_target"], result["selected"]["steps_to_target"]
    return {"target_accuracy": target, "small_model_accuracy": read_record(small)["metrics"].get("accuracy"),
            **result, "steps_ratio_plain_over_selected": a / b if a and b else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/reverse"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    s = sizes(args.quick)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"reverse_warmup": reverse_warmup(s, args.minilm, args.work),
               "sample_value_selection": sample_value(s, args.minilm, args.work)}
    for part, r in results.items():
        print(part, {k: v for k, v in r.items() if not isinstance(v, dict)})
    path = write_result("reverse_sample_value_quick" if args.quick else "reverse_sample_value",
                        {"settings": {**s, "quick": args.quick}, "results": results})
    print(f"wrote {path} ({device_name()})")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
