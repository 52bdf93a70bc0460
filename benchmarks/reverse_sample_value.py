"""The reverse-distillation and sample-value runs of benchmarks/seed_claims.py (parts c and d, sized there), each
against the same run without the technique:

(1) masked-LM pre-training of a larger model from scratch, with and without reverse warm-up from a smaller model
    trained first: steps (and wall time) to reach a target eval MLM loss, and the loss at equal steps;
(2) a dual-tower (bi-encoder) matching model trained from scratch with in-batch negatives, with and without reverse
    warm-up from a smaller bi-encoder trained first; pairs are the two halves of IMDB reviews (which half belongs to
    which review), scored by recall@1 among 1,000 held-out pairs;
(3) fine-tuning MiniLM on SST-2 with and without sample-value selection (a small fine-tuned model scores samples):
    steps to a target dev accuracy, and final accuracy.
Ratios are reported as they come out, whichever way."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common import SHARED

from kdship.artifacts import read_record
from kdship.config import DistillConfig, TrainConfig
from kdship.distill import distill
from kdship.train import train


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


def sample_value(s: dict[str, Any], minilm: Path, teacher: Path, work: Path) -> dict[str, Any]:
    """`teacher`: MiniLM fine-tuned on the same SST-2 subset, distilled into the small model that scores."""
    sst2 = SHARED / "data" / "sst2"
    data = {"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"), "max_length": 64,
            "max_train_samples": s["sst2_train"]}
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
