"""Why random students collapsed under the feature recipes: each loss term beside soft + hard labels, and the two
ways of keeping feature losses from outweighing the prediction losses (a weight that decays to 0, and the
TinyBERT order: features first, then predictions), against task KD alone at the same steps and student.

Teacher: all-MiniLM-L6-v2 (../shared/get-minilm.sh) fine-tuned with kdship train on the first 8,000 SST-2
training sentences; student: random 4L-312; every run one epoch of the same 8,000 sentences (250 steps of 32),
evaluated on SST-2 dev (872) every 50 steps. One JSON (accuracy curves, the final loss terms) with the device named.

    python benchmarks/collapse_diagnosis.py --minilm /path/to/minilm [--work runs/collapse]   (~25 min, 2 CPU cores)"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from common import SHARED, device_name, write_result

from kdship.config import TrainConfig
from kdship.pipeline import distill_recipe, run_pipeline
from kdship.sanity import Baseline
from kdship.train import train

STUDENT = "bert:layers=4,hidden=312,heads=12,ffn=1200"
SAMPLES, BATCH, STEPS = 8000, 32, 250
PREDICTION = [{"name": "kd", "weight": 0.5}, {"name": "ce", "weight": 0.5}]
VARIANTS = {  # name -> losses beside nothing else; the phased run is separate
    "task_kd_only": PREDICTION,
    "kd_ce_hidden_attention": PREDICTION + [{"name": "hidden_mse"}, {"name": "attention_kl"}],
    "kd_ce_attention": PREDICTION + [{"name": "attention_kl"}],
    "kd_ce_hidden": PREDICTION + [{"name": "hidden_mse"}],
    "kd_ce_qkv_relations": PREDICTION + [{"name": "qkv_relations"}],
    "kd_ce_features_decaying": PREDICTION + [{"name": "hidden_mse", "weight": 1.0, "weight_end": 0.0},
                                             {"name": "attention_kl", "weight": 1.0, "weight_end": 0.0}],
    "kd_ce_features_light": PREDICTION + [{"name": "hidden_mse", "weight": 0.1}, {"name": "attention_kl", "weight": 0.1}],
}


def task_data() -> dict[str, Any]:
    sst2 = SHARED / "data" / "sst2"
    return {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": SAMPLES}


def summary(record: dict[str, Any], seconds: float) -> dict[str, Any]:
    curve = [round(h["accuracy"], 4) for h in record["history"]]
    return {"accuracy_curve": curve, "best_accuracy": max(curve), "collapsed": record["checks"]["collapsed"],
            "findings": record["checks"]["findings"], "loss_last": record["training"].get("loss_last"),
            "seconds": round(seconds, 1)}


def one_stage(name: str, losses: list[dict[str, Any]], teacher: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    distill_recipe(None, teacher=str(teacher), student=STUDENT, data=task_data(), losses=losses, epochs=1,
                   batch_size=BATCH, lr=1e-4, temperature=2.0, eval_every=50, output=str(work / name), overwrite=True)
    return summary(json.loads((work / name / "kdship.json").read_text()), time.perf_counter() - started)


def features_then_predictions(teacher: Path, work: Path) -> dict[str, Any]:
    """TinyBERT's order in one pipeline: half the steps on hidden + attention, half on kd + ce."""
    from kdship.config import PipelineConfig

    started = time.perf_counter()
    features = [{"name": "hidden_mse"}, {"name": "attention_kl"}]
    cfg = PipelineConfig(output=str(work / "phased"), student=STUDENT, teachers={"finetuned": str(teacher)},
                         datasets={"task": task_data()}, overwrite=True,
                         common={"batch_size": BATCH, "lr": 1e-4, "warmup_ratio": 0.1, "eval_every": 50,
                                 "temperature": 2.0},
                         stages=[{"name": "intermediate", "teacher": "finetuned", "data": "task",
                                  "objective": "features", "losses": features, "max_steps": STEPS // 2},
                                 {"name": "prediction", "teacher": "finetuned", "data": "task",
                                  "objective": "classify", "losses": PREDICTION, "max_steps": STEPS // 2}])
    run_pipeline(cfg)
    return summary(json.loads((work / "phased" / "student" / "kdship.json").read_text()), time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True, help="folder from ../shared/get-minilm.sh")
    parser.add_argument("--work", type=Path, default=Path("runs/collapse"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.work / "minilm-sst2"
    train(TrainConfig(model=str(args.minilm), data=task_data(), epochs=1, batch_size=32, lr=5e-5,
                      output=str(teacher), overwrite=True))
    teacher_accuracy = json.loads((teacher / "kdship.json").read_text())["metrics"]["accuracy"]
    results = {name: one_stage(name, losses, teacher, args.work) for name, losses in VARIANTS.items()}
    results["features_then_predictions"] = features_then_predictions(teacher, args.work)
    for name, r in results.items():
        print(f"{name}: curve {r['accuracy_curve']} best {r['best_accuracy']:.4f} collapsed {r['collapsed']}")
    dev_labels = [int(line.rsplit("\t", 1)[1]) for line in
                  (SHARED / "data" / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    baseline = Baseline.of(dev_labels, ["0", "1"])
    path = write_result("collapse_diagnosis", {
        "settings": {"student": STUDENT, "train_samples": SAMPLES, "batch": BATCH, "steps": STEPS, "lr": 1e-4,
                     "temperature": 2.0, "eval_every": 50},
        "teacher_accuracy": teacher_accuracy, "majority_rate": baseline.majority_rate, "results": results})
    print(f"wrote {path} ({device_name()})")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
