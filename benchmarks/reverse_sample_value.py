"""Reverse distillation and sample-value selection, each against the same run without it.

(1) masked-LM pre-training of a larger model from scratch, with and without reverse warm-up from a smaller model
    trained first: steps (and wall time) to reach a target eval MLM loss, and the loss at equal steps;
(2) fine-tuning MiniLM on SST-2 with and without sample-value selection (a small fine-tuned model scores samples):
    steps to reach a target dev accuracy, and final accuracy;
(3) a dual-tower (bi-encoder) matching model trained from scratch with in-batch negatives, with and without reverse
    warm-up from a smaller bi-encoder trained first; pairs are the two halves of IMDB reviews (which half belongs to
    which review), scored by recall@1 among 1,000 held-out pairs.
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
    if quick:  # CPU-sized: an 8,000-token WordPiece vocabulary trained on the corpus keeps the MLM head small
        # MLM from scratch sits on the unigram plateau (loss ~7.3) for the first few hundred steps: the small model
        # gets 3,000 steps so it has something beyond unigram statistics to pass on
        return {"small": "bert:layers=2,hidden=128,heads=2,ffn=512", "large": "bert:layers=4,hidden=256,heads=4,ffn=1024",
                "small_steps": 3000, "large_steps": 1500, "reverse_steps": 675, "mlm_eval_every": 50, "corpus": 100000,
                "eval_every": 25, "sst2_train": 4000, "finetune_steps": 200, "pairs": 12000, "match_steps": 600,
                "batch": 32}
    return {"small": "bert:layers=4,hidden=312,heads=12,ffn=1200", "large": "bert:layers=12,hidden=768,heads=12,ffn=3072",
            "small_steps": 20000, "large_steps": 20000, "reverse_steps": 9000, "mlm_eval_every": 500, "corpus": None,
            "eval_every": 500, "sst2_train": None, "finetune_steps": 4000, "pairs": 49000, "match_steps": 6000,
            "batch": 64}


def first_step_reaching(history: list[dict[str, Any]], key: str, target: float, higher: bool) -> int | None:
    for entry in history:
        if (entry[key] >= target) if higher else (entry[key] <= target):
            return entry["step"]
    return None


def timed_train(cfg: TrainConfig) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    train(cfg)
    return read_record(Path(cfg.output)), time.perf_counter() - started


def compare_runs(runs: dict[str, tuple[dict[str, Any], float]], key: str, target: float, higher: bool,
                 baseline: str) -> dict[str, Any]:
    """Steps and seconds to the target, final and best value, and the curve of each run; the steps ratio
    baseline / other."""
    best = max if higher else min
    result: dict[str, Any] = {}
    for name, (record, seconds) in runs.items():
        result[name] = {"steps_to_target": first_step_reaching(record["history"], key, target, higher),
                        "seconds": round(seconds, 1), f"final_{key}": record["history"][-1][key],
                        f"best_{key}": best(h[key] for h in record["history"]),
                        "curve": [(h["step"], round(h[key], 4)) for h in record["history"]]}
    other = next(n for n in runs if n != baseline)
    a, b = result[baseline]["steps_to_target"], result[other]["steps_to_target"]
    return {f"target_{key}": target, **result, f"steps_ratio_{baseline}_over_{other}": a / b if a and b else None}


def reverse_warmup(s: dict[str, Any], work: Path) -> dict[str, Any]:
    corpus = str(SHARED / "data" / "corpus" / "general")
    wiki = work / "wiki.txt"
    lines = [line for line in (SHARED / "data" / "wikitext2" / "wiki.valid.tokens").read_text().splitlines()
             if len(line.split()) > 8 and not line.startswith(" =")]
    wiki.write_text("\n".join(lines[:300]))
    data = {"train": corpus, "eval": str(wiki), "max_length": 64, "max_train_samples": s["corpus"]}
    small = work / "small-mlm"  # trains the WordPiece tokenizer on the corpus; the large runs reuse it
    train(TrainConfig(init=s["small"], objective="mlm", data=data, lr=1e-3, max_steps=s["small_steps"],
                      batch_size=s["batch"], eval_every=s["mlm_eval_every"], output=str(small), overwrite=True))
    common = {"init": s["large"], "tokenizer": str(small), "objective": "mlm", "data": data, "lr": 5e-4,
              "max_steps": s["large_steps"], "batch_size": s["batch"], "eval_every": s["mlm_eval_every"],
              "overwrite": True}
    runs = {"plain": timed_train(TrainConfig(**common, output=str(work / "large-plain"))),
            "reverse": timed_train(TrainConfig(**common, output=str(work / "large-reverse"),
                                               reverse={"from": str(small), "steps": s["reverse_steps"]}))}
    small_loss = read_record(small)["metrics"]["mlm_loss"]
    target = max(small_loss, min(h["mlm_loss"] for h in runs["plain"][0]["history"]))  # reachable by the plain run
    return {"small_model_mlm_loss": small_loss, **compare_runs(runs, "mlm_loss", target, False, "plain")}


def sample_value(s: dict[str, Any], minilm: Path, work: Path) -> dict[str, Any]:
    sst2 = SHARED / "data" / "sst2"
    data = {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": s["sst2_train"]}
    teacher = work / "minilm-sst2"
    train(TrainConfig(model=str(minilm), data=data, epochs=1, batch_size=32, lr=5e-5, output=str(teacher),
                      overwrite=True))
    small = work / "small-sst2"  # 2 of the teacher's layers, distilled: the small fine-tuned model that scores
    distill(DistillConfig(teacher=str(teacher), student="bert:layers=2", data=data, max_steps=s["finetune_steps"],
                          batch_size=32, lr=1e-4, output=str(small), overwrite=True))
    common = {"model": str(minilm), "data": data, "max_steps": s["finetune_steps"], "batch_size": 32, "lr": 5e-5,
              "eval_every": s["eval_every"], "overwrite": True}
    runs = {"plain": timed_train(TrainConfig(**common, output=str(work / "ft-plain"))),
            "selected": timed_train(TrainConfig(**common, output=str(work / "ft-selected"),
                                                selection={"by": str(small), "ratio": 0.5}))}
    target = 0.97 * max(h["accuracy"] for h in runs["plain"][0]["history"])
    result = compare_runs(runs, "accuracy", target, True, "plain")
    result["selected"]["selection"] = runs["selected"][0]["selection"]
    return {"small_model_accuracy": read_record(small)["metrics"].get("accuracy"), **result}


def review_halves(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(first half, second half) of IMDB reviews of at least 40 words, split at a word boundary."""
    import gzip
    import random

    with gzip.open(SHARED / "data" / "corpus" / "movies" / "imdb_unsup.txt.gz", "rt", encoding="utf-8") as f:
        reviews = [line.split() for line in f if len(line.split()) >= 40]
    random.Random(seed).shuffle(reviews)
    return [(" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:])) for w in reviews[:n]]


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2"])
        writer.writerows(pairs)
    return str(path)


def reverse_matching(s: dict[str, Any], minilm: Path, work: Path) -> dict[str, Any]:
    pairs = review_halves(s["pairs"] + 1000)
    data = {"train": write_pairs(work / "pairs-train.csv", pairs[1000:]),
            "eval": write_pairs(work / "pairs-dev.csv", pairs[:1000]), "max_length": 64}
    common = {"tokenizer": str(minilm), "objective": "match", "data": data, "lr": 5e-4, "max_steps": s["match_steps"],
              "batch_size": s["batch"], "eval_every": s["eval_every"], "overwrite": True}
    small = work / "small-match"
    train(TrainConfig(**common, init=s["small"], output=str(small)))
    large = {**common, "init": s["large"]}
    runs = {"plain": timed_train(TrainConfig(**large, output=str(work / "match-plain"))),
            "reverse": timed_train(TrainConfig(**large, output=str(work / "match-reverse"),
                                               reverse={"from": str(small), "steps": int(0.45 * s["match_steps"])}))}
    small_recall = read_record(small)["metrics"]["recall_at_1"]
    target = min(small_recall, max(h["recall_at_1"] for h in runs["plain"][0]["history"]))
    return {"small_model_recall_at_1": small_recall, **compare_runs(runs, "recall_at_1", target, True, "plain")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/reverse"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    s = sizes(args.quick)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"reverse_warmup_mlm": reverse_warmup(s, args.work),
               "reverse_warmup_matching": reverse_matching(s, args.minilm, args.work),
               "sample_value_selection": sample_value(s, args.minilm, args.work)}
    for part, r in results.items():
        print(part, {k: v for k, v in r.items() if not isinstance(v, dict)})
    path = write_result("reverse_sample_value_quick" if args.quick else "reverse_sample_value",
                        {"settings": {**s, "quick": args.quick}, "results": results})
    print(f"wrote {path} ({device_name()})")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
