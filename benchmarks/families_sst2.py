"""Every distillation family against plain task KD and hard labels, on SST-2, the same student and the same steps.

Teacher: all-MiniLM-L6-v2 (../shared/get-minilm.sh) fine-tuned here on an SST-2 subset with kdship train. Student:
3 layers initialised from the teacher's layers 2, 4 and 6 (one folder, so every run starts from the same weights).
Each family runs its shipped recipe (pipelines/*.yaml) with only the teacher(s), data and step budget set:
- baselines: hard labels only (kdship train, CE), task KD (task_kd.yaml)
- self-distillation: early exits (early_exit.yaml; with the accuracy/latency curve: kdship eval and kdship bench
  --backend torch --exit-threshold at batch 1), born-again (born_again.yaml, 2 generations of the same steps each)
- online: mutual learning and online ensemble (mutual_learning.yaml beside the teacher's KD, two students: the
  3-layer and a 2-layer one from the teacher's layers)
- multi-teacher: the teacher and a second one fine-tuned on other SST-2 rows, another seed (multi_teacher.yaml)
- curriculum: curriculum.yaml (teacher confidence, root pacing)
- layer-wise progressive: stagewise.yaml (a quarter of the steps per feature stage, the rest on the task)
- teacher-free: mean teacher (mean_teacher.yaml) and virtual teacher (virtual_teacher.yaml), against hard labels
- augmentation: kdship augment (embedding neighbours: MiniLM has no masked-LM head) on a quarter of the subset, then
  task KD on it at the same steps
- cross-task: the raw sentence encoder (trained on other tasks, no classification head) teaching through features
  (cross_task.yaml without kd), against hard labels
Every run: dev accuracy of the shipped (best evaluated) model, retention, wall time, samples/s, the curve.

    python benchmarks/families_sst2.py --minilm DIR [--families a,b,...] [--smoke]

About 80 minutes on 2 CPU cores (--smoke: a few steps of everything, to check the script)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from common import device_name, git_commit, write_result
from seed_claims import PIPELINES, finetuned_teacher, majority_rate, outcome, task_data, timed

from kdship.artifacts import read_record
from kdship.config import PipelineConfig, TrainConfig, build_config, read_recipe
from kdship.pipeline import distill_recipe, run_pipeline
from kdship.train import train

CPU = {"sst2_train": 8000, "teacher_epochs": 1, "steps": 400, "eval_every": 50, "batch": 32, "augment_rows": 2000,
       "augment_copies": 4, "thresholds": [0.6, 0.7, 0.8, 0.9, 0.95, 0.99]}
SMOKE = {**CPU, "sst2_train": 200, "steps": 4, "eval_every": 2, "batch": 8, "augment_rows": 20, "augment_copies": 1,
         "thresholds": [0.6, 0.9]}
FAMILIES = ("baselines", "early_exit", "born_again", "online", "multi_teacher", "curriculum", "stagewise",
            "teacher_free", "augment", "cross_task")


def student_from_teacher(teacher: Path, out: Path, layers: int = 3) -> Path:
    """A student of `layers` layers made of the teacher's (every k-th, DistilBERT-style), saved once: the 3-layer
    one every run starts from (layers 2, 4, 6), and the 2-layer peer (3, 6)."""
    from kdship.models import build_model, config_from_spec, init_from_teacher, load_tokenizer, uniform_layer_map
    from kdship.tokenizer import save_tokenizer

    big = build_model("classify", str(teacher))
    small = build_model("classify", config=config_from_spec(f"bert:layers={layers}", base=big.config),
                        label_names=[big.config.id2label[i] for i in range(big.config.num_labels)])
    init_from_teacher(small, big, uniform_layer_map(layers, big.config.num_hidden_layers))
    small.save_pretrained(out)
    save_tokenizer(load_tokenizer(str(teacher), "teacher"), out, 512)
    return out


class Runner:
    """Runs recipes with this benchmark's teacher, data and budget, and keeps each run's outcome."""

    def __init__(self, s: dict[str, Any], teacher: Path, teacher_accuracy: float, student: Path, work: Path):
        self.s, self.teacher, self.teacher_accuracy, self.student, self.work = s, teacher, teacher_accuracy, student, work
        self.results: dict[str, Any] = {}

    def common(self) -> dict[str, Any]:
        s = self.s
        return {"data": task_data(s), "max_steps": s["steps"], "batch_size": s["batch"], "eval_every": s["eval_every"],
                "overwrite": True, "seed": 0}

    def distill(self, name: str, recipe: str, **settings: Any) -> dict[str, Any]:
        out = self.work / name
        settings = {"teacher": str(self.teacher), "student": str(self.student), **self.common(), **settings}
        seconds = timed(distill_recipe, PIPELINES / recipe, output=str(out), **settings)
        return self.keep(name, out, seconds, recipe)

    def train(self, name: str, recipe: str | None, **settings: Any) -> dict[str, Any]:
        out = self.work / name
        cfg = build_config(TrainConfig, PIPELINES / recipe if recipe else None, model=str(self.student),
                           output=str(out), **{**self.common(), **settings})
        return self.keep(name, out, timed(train, cfg), recipe or "kdship train (CE)")

    def keep(self, name: str, out: Path, seconds: float, recipe: str) -> dict[str, Any]:
        record = read_record(out / "student") if (out / "stages").is_dir() else read_record(out)
        result = {**outcome(record, self.teacher_accuracy, seconds), "recipe": recipe,
                  "samples_per_second": record["training"]["samples_per_second"]}
        self.results[name] = result
        print(f"{name}: accuracy {result['accuracy']:.4f} (retention {result['retention']:.3f}) in {seconds:.0f} s",
              flush=True)
        return result


def baselines(r: Runner) -> None:
    r.train("hard_labels", None, lr=1e-4)
    r.distill("task_kd", "task_kd.yaml")


def early_exit(r: Runner) -> None:
    """Early exits beside task KD; the accuracy at each threshold (kdship eval) and the mean latency there over real
    dev texts one at a time (kdship bench, torch backend, interleaved with the same model through all its layers)."""
    from kdship.bench import bench
    from kdship.config import BenchConfig, EvalConfig
    from kdship.evaluate import evaluate

    r.distill("early_exit", "early_exit.yaml")
    out = r.work / "early_exit"
    dev = task_data(r.s)["eval"]
    curve = evaluate(EvalConfig(student=str(out), data={"eval": dev, "max_length": 64},
                                exit_thresholds=r.s["thresholds"], output=str(r.work / "exit_eval.json")))
    measured = bench(BenchConfig(models=[str(out)], backends=["torch"], batch=[1], seq=[64], threads=2,
                                 exit_thresholds=r.s["thresholds"], max_seconds=5 if r.s["steps"] > 10 else 1))
    r.results["early_exit"]["exits"] = {"curve": curve["student"]["early_exit"],
                                        "latency": measured["early_exit"]["early_exit"]["latency_over_inputs"]}


def born_again(r: Runner) -> None:
    r.distill("born_again", "born_again.yaml", generations=2, keep_going=True)  # a collapse is a result here
    stages = read_record(r.work / "born_again")["stages"]
    r.results["born_again"]["generations"] = [{"name": s["name"], "accuracy": s["metrics"].get("accuracy")}
                                              for s in stages]


def online(r: Runner) -> None:
    two = r.work / "student2-init"
    if not two.exists():
        student_from_teacher(r.teacher, two, layers=2)
    two = str(two)
    for mode in ("mutual", "ensemble"):
        out = r.work / f"peers_{mode}"
        seconds = timed(distill_recipe, PIPELINES / "mutual_learning.yaml", teacher=str(r.teacher),
                        students={"three": str(r.student), "two": two}, peers={"mode": mode},
                        losses=[{"name": "kd", "weight": 0.5}, {"name": "ce", "weight": 0.5}], output=str(out),
                        **r.common())
        for name in ("three", "two"):
            r.keep(f"peers_{mode}_{name}", out / name, seconds, "mutual_learning.yaml")
    out = r.work / "separate_two"  # the 2-layer peer alone, for comparison
    seconds = timed(distill_recipe, PIPELINES / "task_kd.yaml", teacher=str(r.teacher), student=two, output=str(out),
                    **r.common())
    r.keep("task_kd_two_layers", out, seconds, "task_kd.yaml")


def multi_teacher(r: Runner) -> None:
    second = r.work / "teacher-b"
    if not second.exists():  # the same encoder fine-tuned as long on other rows of SST-2, another seed
        data = {**task_data(r.s), "max_train_samples": None}
        cfg = TrainConfig(model=str(r.work.parent / "minilm-input"), data=data, max_steps=max(2, r.s["sst2_train"] // 32),
                          batch_size=32, lr=5e-5, seed=1, output=str(second), overwrite=True)
        train(cfg)
    r.results["second_teacher_accuracy"] = read_record(second)["metrics"]["accuracy"]
    r.distill("multi_teacher", "multi_teacher.yaml", teacher=None, teachers=[str(r.teacher), str(second)])


def curriculum(r: Runner) -> None:
    r.distill("curriculum", "curriculum.yaml")


def stagewise(r: Runner) -> None:
    spec = read_recipe(PIPELINES / "stagewise.yaml")
    quarter = max(1, r.s["steps"] // 4)
    budgets = [quarter, quarter, r.s["steps"] - 2 * quarter]
    spec["stages"] = [{**{k: v for k, v in st.items() if k != "epochs"}, "max_steps": b,
                       **({"train_layers": [0, 1]} if i == 0 else {"train_layers": [2, 3]} if i == 1 else {})}
                      for i, (st, b) in enumerate(zip(spec["stages"], budgets))]
    common = {k: v for k, v in r.common().items() if k not in ("data", "max_steps", "overwrite", "seed")}
    spec.update(teachers={"finetuned": str(r.teacher)}, datasets={"task": task_data(r.s)}, student=str(r.student),
                output=str(r.work / "stagewise"), overwrite=True, common={**spec["common"], **common})
    seconds = timed(run_pipeline, PipelineConfig(**spec).model_copy(update={"keep_going": True}))
    r.keep("stagewise", r.work / "stagewise", seconds, "stagewise.yaml")
    r.results["stagewise"]["stage_steps"] = budgets


def teacher_free(r: Runner) -> None:
    r.train("mean_teacher", "mean_teacher.yaml", lr=1e-4)
    r.train("virtual_teacher", "virtual_teacher.yaml", lr=1e-4)


def augment(r: Runner) -> None:
    from kdship.augment import augment as run_augment
    from kdship.config import AugmentConfig

    out = r.work / "augmented.tsv"
    source = {**task_data(r.s), "max_train_samples": r.s["augment_rows"]}
    facts = run_augment(AugmentConfig(model=str(r.work.parent / "minilm-input"), teacher=str(r.teacher), data=source,
                                      output=str(out), copies=r.s["augment_copies"], method="embedding",
                                      overwrite=True))
    r.distill("augmented_task_kd", "task_kd.yaml", data={**task_data(r.s), "train": str(out),
                                                         "max_train_samples": None})
    r.distill("task_kd_same_rows", "task_kd.yaml", data=source)  # the rows it was made from, without augmentation
    r.results["augmented_task_kd"]["augment"] = {k: facts[k] for k in ("rows", "augmented_rows", "label_counts",
                                                                       "seconds")}


def cross_task(r: Runner) -> None:
    """The raw encoder (no classification head; trained on other tasks) teaches through features only."""
    r.distill("cross_task_features", "cross_task.yaml", teacher=str(r.work.parent / "minilm-input"),
              losses=[{"name": "ce", "weight": 1.0},
                      {"name": "hidden_mse", "weight": 1.0, "weight_end": 0.0, "until": 0.5}])


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Each family's accuracy against the baselines it should beat (points, + = better)."""
    base = {"task_kd": results.get("task_kd", {}).get("accuracy"),
            "hard_labels": results.get("hard_labels", {}).get("accuracy")}
    against = {"mean_teacher": "hard_labels", "virtual_teacher": "hard_labels", "cross_task_features": "hard_labels",
               "augmented_task_kd": "task_kd_same_rows", "peers_mutual_two": "task_kd_two_layers",
               "peers_ensemble_two": "task_kd_two_layers"}
    out = {}
    for name, result in results.items():
        if not isinstance(result, dict) or "accuracy" not in result or name in base:
            continue
        ref = against.get(name, "task_kd")
        ref_accuracy = results.get(ref, {}).get("accuracy") if ref in results else base.get(ref)
        if ref_accuracy is not None:
            out[name] = {"against": ref, "points": round(100 * (result["accuracy"] - ref_accuracy), 2)}
    return out


def earlier_results(families: list[str]) -> dict[str, Any]:
    """The runs of the families not rerun now, from the result file (a rerun of some families keeps the rest)."""
    from common import RESULTS

    path = RESULTS / "families_sst2.json"
    if set(families) == set(FAMILIES) or not path.exists():
        return {}
    import json

    earlier = json.loads(path.read_text())["results"]
    return {k: v for k, v in earlier.items() if k not in ("teacher_accuracy", "majority_rate", "vs_baselines_pt")}


def earlier_invocations(families: list[str]) -> list[dict[str, Any]]:
    from common import RESULTS

    path = RESULTS / "families_sst2.json"
    if set(families) == set(FAMILIES) or not path.exists():
        return []
    import json

    earlier = json.loads(path.read_text())
    return earlier.get("invocations") or [{"families": earlier["settings"].get("families"),
                                           "commit": earlier["settings"].get("commit"),
                                           "seconds": earlier["settings"].get("seconds"), "device": earlier["device"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True, help="folder from ../shared/get-minilm.sh")
    parser.add_argument("--teacher", type=Path, help="MiniLM already fine-tuned on the same SST-2 subset")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--work", type=Path, default=Path("runs/families"))
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything: checks the script runs")
    args = parser.parse_args()
    s = SMOKE if args.smoke else CPU
    work = args.work / "runs"
    work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "minilm-input").exists():
        shutil.copytree(args.minilm, args.work / "minilm-input")
    started, commit = time.perf_counter(), git_commit()
    teacher, teacher_accuracy = finetuned_teacher({**s, "batch": 32}, args.work / "minilm-input", work, args.teacher)
    student = student_from_teacher(teacher, work / "student-init") if not (work / "student-init").exists() \
        else work / "student-init"
    runner = Runner(s, teacher, teacher_accuracy, student, work)
    families = [f for f in args.families.split(",") if f]
    for family in families:
        globals()[family](runner)
    results = {"teacher_accuracy": teacher_accuracy, "majority_rate": majority_rate(), **earlier_results(families),
               **runner.results}
    results["vs_baselines_pt"] = summary(results)
    for name, row in results["vs_baselines_pt"].items():
        print(f"{name:28s} {row['points']:+6.2f} pt vs {row['against']}")
    if args.smoke:
        print(f"smoke run finished in {time.perf_counter() - started:.0f} s ({device_name()})")
    else:
        invocation = {"families": families, "commit": commit, "seconds": round(time.perf_counter() - started, 1),
                      "device": device_name()}
        invocations = earlier_invocations(families) + [invocation]
        # a family rerun on another machine: every machine is named, and each invocation says which families it ran
        devices = "; ".join(dict.fromkeys(i["device"] for i in invocations))
        path = write_result("families_sst2", {"settings": {**s, "student": "3 layers from the teacher (2, 4, 6)"},
                                              "device": devices, "invocations": invocations, "results": results})
        print(f"wrote {path} ({device_name()})")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

