"""Causal-LM distillation: which token-level loss teaches a small decoder best, at the same steps.

Teacher: a Llama-shape decoder pre-trained here with `kdship train --objective clm` on the unlabeled corpus
(../shared/data/corpus/general), with the byte-level BPE tokenizer that run trains. Students, each from the same
start for every loss:
- half depth: half the teacher's layers, the teacher's width, initialised from every other teacher layer;
- quarter size: half the layers at half the width, random initialisation (about a quarter of the parameters).
Each student is distilled with forward KL, reverse KL and JSD (beta 0.5) alone, and trained on hard labels alone
(the data's next token, no teacher), at the same steps, batch and learning rate. Every model is evaluated with
`kdship eval` on WikiText-2 valid (../shared/data/wikitext2): perplexity, next-token accuracy, agreement of its
top next token with the teacher's, and greedy generations; training throughput and wall time from the records.

The top-K teacher cache: `kdship cache-teacher` writes the teacher's top-64 next tokens for the whole training
set once (its size and build time recorded); the quarter-size student is then trained with forward KL from the
cache, alternately with the live teacher for the same steps (twice each, the median kept) for the speed, and for
the full run for the quality against the live forward-KL run above.

    python benchmarks/clm_distill.py [--quick] [--gpu] [--reuse-teacher]

About 35 minutes for the teacher and 60 for the rest on 2 CPU cores (--quick: a few steps of everything, to
check the script; --reuse-teacher: keep and reuse the teacher of an earlier invocation in --work); --gpu: a
larger teacher and budget for one NVIDIA GPU."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import RESULTS, SHARED, device_name, git_commit, write_result

from kdship.artifacts import read_record
from kdship.config import CacheTeacherConfig, DistillConfig, EvalConfig, TrainConfig
from kdship.distill import distill
from kdship.evaluate import evaluate
from kdship.logit_cache import cache_teacher
from kdship.train import train

CPU = {"teacher": "llama:layers=4,hidden=256,heads=4,kv_heads=2,ffn=768,max_len=256", "vocab": 8000,
       "corpus_lines": 120_000, "teacher_steps": 2000, "teacher_lr": 2e-3, "steps": 300, "lr": 1e-3, "batch": 16,
       "seq": 128, "eval_lines": 1500, "eval_every": 100, "speed_steps": 30,
       "students": {"half_depth": "llama:layers=2", "quarter_size": "llama:layers=2,hidden=128,heads=2,kv_heads=1,ffn=384"}}
GPU = {**CPU, "teacher": "llama:layers=8,hidden=512,heads=8,kv_heads=4,ffn=1536,max_len=512", "vocab": 16000,
       "corpus_lines": 400_000, "teacher_steps": 3000, "steps": 1000, "batch": 64, "seq": 256, "eval_lines": 4000,
       "eval_every": 250, "speed_steps": 200,
       "students": {"half_depth": "llama:layers=4", "quarter_size": "llama:layers=4,hidden=256,heads=4,kv_heads=2,ffn=768"}}
QUICK = {**CPU, "corpus_lines": 3000, "teacher_steps": 10, "steps": 4, "eval_lines": 50, "eval_every": 2, "vocab": 600,
         "speed_steps": 5}
TOP_K = 64
LOSSES = {"forward_kl": [{"name": "forward_kl"}], "reverse_kl": [{"name": "reverse_kl"}],
          "jsd": [{"name": "jsd"}], "hard_labels": [{"name": "ce"}]}


def pretrained_teacher(s: dict[str, Any], work: Path, reuse: bool) -> Path:
    out = work / "teacher"
    if reuse and (out / "kdship.json").exists():
        print(f"teacher: reusing {out}, trained by an earlier invocation (its log is above)", flush=True)
        return out
    train(TrainConfig(init=s["teacher"], objective="clm", vocab_size=s["vocab"], max_steps=s["teacher_steps"],
                      batch_size=s["batch"], lr=s["teacher_lr"], schedule="cosine", warmup_ratio=0.05,
                      eval_every=s["eval_every"] * 2, seed=0, output=str(out), overwrite=True,
                      data={"train": str(SHARED / "data/corpus/general"), "eval": str(wikitext(s, work)),
                            "max_length": s["seq"], "max_train_samples": s["corpus_lines"]}))
    return out


def wikitext(s: dict[str, Any], work: Path) -> Path:
    """WikiText-2 valid without its blank lines and ' = Heading = ' lines, its first eval_lines paragraphs."""
    out = work / "wiki.valid.txt"
    if not out.exists():
        lines = [line.strip() for line in (SHARED / "data/wikitext2/wiki.valid.tokens").read_text().splitlines()
                 if line.strip() and not line.strip().startswith("=")]
        out.write_text("\n".join(lines[:s["eval_lines"]]) + "\n")
    return out


def train_data(s: dict[str, Any]) -> dict[str, Any]:
    return {"train": str(SHARED / "data/corpus/general"), "max_length": s["seq"], "max_train_samples": s["corpus_lines"]}


def distill_student(s: dict[str, Any], teacher: Path, spec: str, loss: str, out: Path, steps: int,
                    eval_data: Path | None, teacher_cache: str = "auto") -> dict[str, Any]:
    return distill(DistillConfig(
        teacher=str(teacher), student=spec, objective="clm", losses=LOSSES[loss], temperature=1.0, jsd_beta=0.5,
        max_steps=steps, batch_size=s["batch"], lr=s["lr"], schedule="cosine", warmup_ratio=0.05,
        eval_every=s["eval_every"] if eval_data else None, seed=0, output=str(out), overwrite=True,
        teacher_cache=teacher_cache, data={**train_data(s), "eval": str(eval_data) if eval_data else None}))


def run_student(s: dict[str, Any], teacher: Path, name: str, spec: str, loss: str, work: Path,
                teacher_cache: str = "auto") -> dict[str, Any]:
    out = work / f"{name}-{loss}"
    started = time.perf_counter()
    distill_student(s, teacher, spec, loss, out, s["steps"], wikitext(s, work), teacher_cache)
    seconds = time.perf_counter() - started
    ev = evaluate(EvalConfig(student=str(out), teacher=str(teacher), data={"eval": str(wikitext(s, work)),
                                                                          "max_length": s["seq"]},
                             generations=3, max_new_tokens=24, output=str(out / "eval.json")))
    record = read_record(out)
    row = {"student": spec, "loss": loss, "parameters": record["student"]["parameters"],
           "tensors_copied_from_teacher": record["student"]["tensors_copied_from_teacher"],
           "perplexity": ev["student"]["perplexity"], "next_token_accuracy": ev["student"]["next_token_accuracy"],
           "perplexity_ratio": ev["comparison"]["perplexity_ratio"],
           "token_agreement": ev["comparison"]["token_agreement"], "seconds": round(seconds, 1),
           "samples_per_second": record["training"]["samples_per_second"],
           "curve": [(h["step"], round(h["perplexity"], 3)) for h in record["history"]],
           "generations": ev["generations"]["samples"]}
    print(f"{name} {loss}: wikitext-2 perplexity {row['perplexity']:.2f} (teacher {ev['teacher']['perplexity']:.2f}, "
          f"ratio {row['perplexity_ratio']:.3f}), agreement {row['token_agreement']:.4f}, "
          f"{row['samples_per_second']:.1f} samples/s, {seconds:.0f} s", flush=True)
    return row | {"teacher_perplexity": ev["teacher"]["perplexity"],
                  "teacher_next_token_accuracy": ev["teacher"]["next_token_accuracy"]}


def topk_cache_effect(s: dict[str, Any], teacher: Path, work: Path, live: dict[str, Any]) -> dict[str, Any]:
    """The top-K cache of the whole training set: its size and build time; the quarter-size student's forward-KL
    training speed from it against the live teacher (alternating, median of two each); its quality after the
    full run against `live` (the same run with the live teacher)."""
    cache = work / f"teacher-top{TOP_K}"
    made = cache_teacher(CacheTeacherConfig(teacher=str(teacher), top_k=TOP_K, batch_size=s["batch"], output=str(cache),
                                            overwrite=True, data=train_data(s)))
    spec = s["students"]["quarter_size"]
    speeds: dict[str, list[float]] = {"live": [], "cached": []}
    for _ in range(2):
        for mode, setting in (("live", "auto"), ("cached", str(cache))):
            result = distill_student(s, teacher, spec, "forward_kl", work / f"speed-{mode}", s["speed_steps"], None,
                                     setting)
            speeds[mode].append(result["training"]["samples_per_second"])
    median = {mode: statistics.median(v) for mode, v in speeds.items()}
    cached = run_student(s, teacher, f"quarter_size_top{TOP_K}_cache", spec, "forward_kl", work, str(cache))
    train_speedup = median["cached"] / median["live"]
    saved_per_run = s["steps"] * s["batch"] * (1 / median["live"] - 1 / median["cached"])
    out = {"k": TOP_K, **{key: made[key] for key in ("tokens", "bytes", "bytes_per_token", "mean_tail_mass",
                                                     "build_seconds")},
           "samples_per_second": {"live": speeds["live"], "cached": speeds["cached"], "median": median},
           "training_speedup": train_speedup,
           "seconds_saved_per_run": saved_per_run,
           "runs_to_repay_build": made["build_seconds"] / saved_per_run if saved_per_run > 0 else None,
           "perplexity": {"live": live["perplexity"], "cached": cached["perplexity"]},
           "perplexity_cached_vs_live": cached["perplexity"] / live["perplexity"],
           "token_agreement": {"live": live["token_agreement"], "cached": cached["token_agreement"]}}
    print(f"top-{TOP_K} cache: {made['tokens']:,} tokens, {made['bytes'] / 2**20:.0f} MiB, built in "
          f"{made['build_seconds']:.0f} s, mean tail mass {made['mean_tail_mass']:.3f}; training "
          f"{train_speedup:.2f}x the live teacher's samples/s; perplexity {cached['perplexity']:.2f} vs "
          f"{live['perplexity']:.2f} live", flush=True)
    return out


def rerun_cache_part(s: dict[str, Any], teacher: Path, work: Path, commit: str) -> None:
    """The top-K cache part again, at this commit, into the earlier JSON; the earlier cache result is kept
    beside it under `topk_cache_earlier`."""
    earlier = json.loads((RESULTS / "clm_distill.json").read_text())
    cache = topk_cache_effect(s, teacher, work, earlier["results"]["quarter_size"]["forward_kl"])
    kept = {k: v for k, v in earlier.items() if k not in ("benchmark", "device", "commit", "date", "versions")}
    path = write_result("clm_distill", {**kept, "commit": earlier["commit"],
                                        "topk_cache_earlier": {**earlier["topk_cache"], "commit": earlier["commit"]},
                                        "topk_cache": {**cache, "commit": commit, "device": device_name()}})
    print(f"wrote {path} ({device_name()})")


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per student: each loss's perplexity against hard labels alone (ratio below 1: the teacher helped)."""
    out = {}
    for name, rows in results.items():
        hard = rows["hard_labels"]["perplexity"]
        out[name] = {loss: {"perplexity_vs_hard_labels": row["perplexity"] / hard} for loss, row in rows.items()
                     if loss != "hard_labels"}
        out[name]["best"] = min(rows, key=lambda loss: rows[loss]["perplexity"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks the script")
    parser.add_argument("--gpu", action="store_true", help="the larger sizes, for one NVIDIA GPU")
    parser.add_argument("--work", type=Path, default=Path("runs/clm_distill"))
    parser.add_argument("--reuse-teacher", action="store_true", help="use the teacher an earlier invocation trained "
                        "in --work (the work folder is kept then)")
    parser.add_argument("--cache-only", action="store_true", help="with --reuse-teacher: only the top-K cache part "
                        "again, merged into the earlier JSON (its live forward-KL run is the comparison)")
    args = parser.parse_args()
    s = QUICK if args.quick else GPU if args.gpu else CPU
    args.work.mkdir(parents=True, exist_ok=True)
    started, commit = time.perf_counter(), git_commit()
    teacher = pretrained_teacher(s, args.work, args.reuse_teacher)
    teacher_record = read_record(teacher)
    print(f"teacher: {teacher_record['model']['parameters']:,} parameters, wikitext-2 perplexity "
          f"{teacher_record['metrics']['perplexity']:.2f} after {teacher_record['training']['steps']} steps", flush=True)
    if args.cache_only:
        return rerun_cache_part(s, teacher, args.work, commit)
    results = {name: {loss: run_student(s, teacher, name, spec, loss, args.work) for loss in LOSSES}
               for name, spec in s["students"].items()}
    cache = topk_cache_effect(s, teacher, args.work, results["quarter_size"]["forward_kl"])
    summary = verdicts(results)
    for name, rows in summary.items():
        print(f"{name}: best {rows['best']}; " + ", ".join(f"{loss} {v['perplexity_vs_hard_labels']:.3f}x hard labels' "
                                                           "perplexity" for loss, v in rows.items() if loss != "best"))
    if args.quick:
        print(f"quick run finished in {time.perf_counter() - started:.0f} s ({device_name()})")
    else:
        path = write_result("clm_distill" + ("_gpu" if args.gpu else ""), {
            "settings": s, "commit": commit, "seconds": round(time.perf_counter() - started, 1),
            "teacher": {"spec": s["teacher"], "parameters": teacher_record["model"]["parameters"],
                        "perplexity_at_best_step": teacher_record["metrics"]["perplexity"],
                        "training": teacher_record["training"]},
            "results": results, "vs_hard_labels": summary, "topk_cache": cache})
        print(f"wrote {path} ({device_name()})")
    if not args.reuse_teacher:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
