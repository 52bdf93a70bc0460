"""Driver of benchmarks/gpu/verify.sh (see there). Each part runs on its own and writes its JSON; a part that
cannot run here says why instead of failing the rest."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

NEEDED = {"onnxruntime-gpu": "onnxruntime-gpu==1.31.*", "tensorrt": "tensorrt>=10", "tensorrt-rtx": "tensorrt-rtx"}
FULL = {"teacher": "bert:layers=12,hidden=768,heads=12,ffn=3072,max_len=512", "student": "4L312",
        "batch": [1, 8, 64, 256], "seq": [128], "distill_steps": 200, "distill_rounds": 3, "rows": 4000,
        "exports": ["onnx", "fp16", "aoti", "tensorrt"], "backends": ["torch", "torch-compile", "ort-cuda", "tensorrt",
                                                                  "aoti"]}
DRY = {"teacher": "bert:layers=2,hidden=64,heads=2,ffn=128,max_len=64", "student": "bert:layers=1",
       "batch": [1, 4], "seq": [16], "distill_steps": 4, "distill_rounds": 2, "rows": 200, "exports": ["onnx"], "backends": ["ort-cpu"]}


def environment() -> dict[str, Any]:
    import importlib.util

    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0))}
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    have = {"onnxruntime-gpu": "CUDAExecutionProvider" in info["onnxruntime_providers"],
            "tensorrt": importlib.util.find_spec("tensorrt") is not None,
            "tensorrt-rtx": importlib.util.find_spec("tensorrt_rtx") is not None}
    info["missing"] = {name: f"pip install '{NEEDED[name]}'" for name, ok in have.items() if not ok}
    if info.get("capability") and info["capability"][0] == 9:
        info["notes"] = ["TensorRT-RTX does not support Hopper (sm_90): its engines are not built here"]
    return info


def make_models(s: dict[str, Any], work: Path) -> dict[str, Path]:
    from kdship.config import DistillConfig, TrainConfig
    from kdship.distill import distill
    from kdship.synthetic import write_split
    from kdship.train import train

    train_file = write_split(work / "data" / "train.tsv", s["rows"], seed=0)
    dev_file = write_split(work / "data" / "dev.tsv", 256, seed=1)
    data = {"train": str(train_file), "eval": str(dev_file), "max_length": max(s["seq"])}
    train(TrainConfig(init=s["teacher"], output=str(work / "teacher"), max_steps=2, batch_size=8, vocab_size=2000,
                      data=data, overwrite=True))
    distill(DistillConfig(teacher=str(work / "teacher"), student=s["student"], output=str(work / "student"),
                          max_steps=2, batch_size=8, data=data, overwrite=True))
    return {"teacher": work / "teacher", "student": work / "student"}


def part_tests(s: dict[str, Any], work: Path, dry: bool) -> dict[str, Any]:
    if dry:
        return {"not_run": "dry run: the GPU-guarded tests skip on a CPU"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "tensorrt or cuda or aoti", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    return {"returncode": done.returncode, "tail": done.stdout[-3000:]}


def part_export(s: dict[str, Any], work: Path, models: dict[str, Path]) -> dict[str, Any]:
    from kdship.config import ExportConfig
    from kdship.export import export

    results: dict[str, Any] = {}
    for role, folder in models.items():
        for target in s["exports"]:
            out = work / f"{role}-{target}"
            try:
                manifest = export(ExportConfig(student=str(folder), to=[target], output=str(out), overwrite=True))
                results[f"{role}/{target}"] = manifest["variants"][target]["parity"]
            except Exception as e:  # a variant that cannot be built here is a finding, not a crash of the script
                results[f"{role}/{target}"] = {"not_run": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return results


def part_bench(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from kdship.bench import bench
    from kdship.config import BenchConfig

    results: dict[str, Any] = {}
    for backend in s["backends"]:
        variant = {"torch": "onnx", "torch-compile": "onnx", "ort-cuda": "fp16", "ort-cpu": "onnx"}.get(backend, backend)
        folders = [work / f"{role}-{variant}" for role in ("teacher", "student")]
        if not all((f / "manifest.json").exists() for f in folders):
            results[backend] = {"not_run": f"the {variant} export did not succeed (see export JSON)"}
            continue
        try:
            r = bench(BenchConfig(models=[str(f) for f in folders], backends=[backend], batch=s["batch"],
                                  seq=s["seq"], max_seconds=5, warmup_s=0.5))
            results[backend] = [{k: row[k] for k in ("model", "batch", "seq", "p50_ms", "p99_ms", "sequences_per_s",
                                                     "speedup_vs_baseline", "speedup_ci95", "stable")}
                                for row in r["results"]]
        except Exception as e:
            results[backend] = {"not_run": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return results


BEFORE = ROOT / "benchmarks" / "gpu" / "before"  # git-ignored: `git archive 1553960 kdship exporters`, carried along
BEFORE_COMMIT = "1553960"  # the last commit before the training-core change (issue 11)
DISTILL_ROUND = """
import json, sys
from kdship.config import DistillConfig
from kdship.distill import distill
r = distill(DistillConfig.model_validate(json.loads(sys.argv[1])))["training"]
print("RESULT " + json.dumps({k: r.get(k) for k in ("samples_per_second", "train_seconds", "steps", "loss_first",
                                                   "loss_last")}))
"""


def part_distill(s: dict[str, Any], work: Path, models: dict[str, Path]) -> dict[str, Any]:
    """1-process distillation throughput of this checkout and, when carried in benchmarks/gpu/before/, of the code
    before the training-core change, in alternating rounds (each a fresh process on the same settings)."""
    data = {"train": str(work / "data" / "train.tsv"), "max_length": max(s["seq"])}
    settings = {"teacher": str(models["teacher"]), "student": s["student"], "data": data, "max_steps":
                s["distill_steps"], "batch_size": 32, "teacher_cache": "off", "overwrite": True, "seed": 0}
    sources = {"after": ROOT} | ({f"before_{BEFORE_COMMIT}": BEFORE} if (BEFORE / "kdship").is_dir() else {})
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    for r in range(s["distill_rounds"]):
        for name, source in (sources.items() if r % 2 == 0 else reversed(sources.items())):
            cfg = json.dumps({**settings, "output": str(work / f"throughput-{name}-{r}")})
            run = subprocess.run([sys.executable, "-c", DISTILL_ROUND, cfg], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(source)}, cwd=work)
            if run.returncode:
                raise RuntimeError(f"{name}: {run.stderr[-1500:]}")
            rounds[name].append(json.loads(next(line for line in run.stdout.splitlines()
                                                if line.startswith("RESULT "))[7:]))
    import statistics

    medians = {name: statistics.median(x["samples_per_second"] for x in rs) for name, rs in rounds.items()}
    before = next((v for k, v in medians.items() if k.startswith("before")), None)
    return {"rounds": rounds, "samples_per_second_median": medians,
            "after_over_before": round(medians["after"] / before, 3) if before else
            f"not measured: carry `git archive {BEFORE_COMMIT} kdship exporters` unpacked in {BEFORE}"}


CARRIED_SHARED = ROOT / "benchmarks" / "gpu" / "shared"  # git-ignored: ../shared's data and MiniLM, carried along


def part_seed_claims(work: Path, dry: bool) -> dict[str, Any]:
    """benchmarks/seed_claims.py at its GPU budget (--smoke on a dry run), on the data carried beside the checkout;
    its own JSON is benchmarks/results/seed_claims_gpu.json."""
    shared = CARRIED_SHARED if (CARRIED_SHARED / "data" / "sst2").is_dir() else ROOT.parent / "shared"
    minilm = shared / "minilm"
    if not (shared / "data" / "sst2").is_dir() or not (minilm / "config.json").exists():
        raise RuntimeError(f"needs ../shared's data and all-MiniLM-L6-v2 (get-minilm.sh) at {CARRIED_SHARED}: copy "
                           "data/{sst2,corpus,wikitext2} and minilm/ there and carry the folder")
    command = [sys.executable, str(ROOT / "benchmarks" / "seed_claims.py"), "--minilm", str(minilm),
               "--work", str(work / "seed_claims"), "--smoke" if dry else "--gpu"]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KDSHIP_SHARED": str(shared)})
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return {"claims": [line for line in run.stdout.splitlines() if line.startswith(("held", "NOT held"))]}


def part_clm(work: Path, dry: bool) -> dict[str, Any]:
    """benchmarks/clm_distill.py at its GPU budget (--quick on a dry run), on the corpus and WikiText-2 carried
    beside the checkout; its own JSON is benchmarks/results/clm_distill_gpu.json."""
    shared = CARRIED_SHARED if (CARRIED_SHARED / "data" / "corpus").is_dir() else ROOT.parent / "shared"
    if not (shared / "data" / "corpus").is_dir() or not (shared / "data" / "wikitext2").is_dir():
        raise RuntimeError(f"needs ../shared's data/corpus and data/wikitext2 at {CARRIED_SHARED}: copy them there "
                           "and carry the folder")
    command = [sys.executable, str(ROOT / "benchmarks" / "clm_distill.py"), "--work", str(work / "clm"),
               "--quick" if dry else "--gpu"]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KDSHIP_SHARED": str(shared)})
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return {"summary": [line for line in run.stdout.splitlines() if ": best " in line or "cache:" in line]}


def run_part(name: str, fn: Callable[[], Any], out: Path, env: dict[str, Any], dry: bool) -> None:
    started = time.perf_counter()
    try:
        payload = {"result": fn()}
    except Exception:
        payload = {"not_run": traceback.format_exc(limit=3)[-2000:]}
    payload |= {"part": name, "device": env.get("gpu") or "CPU (no GPU)", "dry_run": dry,
                "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d")}
    (out / f"gpu_verify_{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"{name}: {'not run' if 'not_run' in payload else 'done'} in {payload['seconds']} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="kdship GPU verification (see verify.sh)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and CPU paths: checks the script")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default benchmarks/results, dry: a temp dir)")
    parser.add_argument("--seed-claims", action="store_true", help="only benchmarks/seed_claims.py at its GPU "
                        "budget (a second call: it does not fit beside the rest in one)")
    parser.add_argument("--clm", action="store_true", help="only benchmarks/clm_distill.py at its GPU budget (a "
                        "third call)")
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="kdship-verify-")) if args.dry_run else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kdship-verify-work-"))
    env = environment()
    (out / "gpu_verify_environment.json").write_text(json.dumps({"dry_run": args.dry_run, **env}, indent=1) + "\n")
    print(f"environment: {env.get('gpu', 'no GPU')}; missing: {', '.join(env['missing']) or 'nothing'}", flush=True)
    if not env["cuda"] and not args.dry_run:
        print("no CUDA device here: run with --dry-run to check the script on a CPU", flush=True)
        sys.exit(2)
    if args.seed_claims:
        run_part("seed_claims", lambda: part_seed_claims(work, args.dry_run), out, env, args.dry_run)
        return
    if args.clm:
        run_part("clm", lambda: part_clm(work, args.dry_run), out, env, args.dry_run)
        return
    models = make_models(s, work)
    run_part("tests", lambda: part_tests(s, work, args.dry_run), out, env, args.dry_run)
    run_part("export", lambda: part_export(s, work, models), out, env, args.dry_run)
    run_part("bench", lambda: part_bench(s, work), out, env, args.dry_run)
    run_part("distill", lambda: part_distill(s, work, models), out, env, args.dry_run)
    print(f"wrote {out}/gpu_verify_*.json", flush=True)


if __name__ == "__main__":
    main()
