"""`kdship bench`: latency (p50/p90/p99/mean/min) and throughput of several models side by side, per backend,
batch size and sequence length, in one run, so speedups are ratios measured together. Writes bench.json (device,
CPU, threads, versions, every figure) and bench.csv."""

from __future__ import annotations

import csv
import io
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdship.models import under_weights_policy
from kdship.artifacts import atomic_write_json, atomic_write_text, library_versions, read_record, staged_dir
from kdship.backends import BACKENDS, get_backend, model_file
from kdship.manifest import read_manifest
from kdship.config import BenchConfig, to_record
from kdship.errors import ConfigError, DataError, ModelError


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(threads: int | None) -> dict[str, Any]:
    import torch

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    info["device"] = info["gpu"] or f"CPU: {info['cpu']}"
    return info


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def measure(run: Any, feeds: dict[str, np.ndarray], cfg: BenchConfig) -> dict[str, Any]:
    """Warm up, then time runs in rounds of min_runs until the p50 settles or the time bound is reached. Every
    backend's runner returns host arrays, so a timed call ends when the device has finished: no extra sync."""
    started = time.perf_counter()
    warm = 0
    while warm < 3 or time.perf_counter() - started < cfg.warmup_s:
        run(feeds)
        warm += 1
    times: list[float] = []
    previous_p50 = None
    deadline = time.perf_counter() + cfg.max_seconds
    while True:
        for _ in range(cfg.min_runs):
            t0 = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - t0)
        p50 = float(np.median(times))
        settled = previous_p50 is not None and abs(p50 - previous_p50) <= cfg.settle * previous_p50
        if settled or time.perf_counter() > deadline:
            break
        previous_p50 = p50
    batch, seq = feeds["input_ids"].shape
    stats = percentiles(times)
    return {**stats, "runs": len(times), "settled": settled, "warmup_runs": warm,
            "sequences_per_s": batch / (stats["mean_ms"] / 1000), "tokens_per_s": batch * seq / (stats["mean_ms"] / 1000)}


class Inputs:
    """Token ids of an exact (batch, seq) shape: real eval texts (`real`; with `auto` when the model's record names
    them), else random. What was used is in every row."""

    def __init__(self, folder: Path, names: list[str], vocab_size: int, kind: str):
        self.names = names
        self.vocab_size = vocab_size
        self.real = _real_ids(folder) if kind != "random" else None
        if kind == "real" and self.real is None:
            raise DataError(f"--inputs real: {folder} names no eval data that can be read (its kdship.json has none, "
                            "or the file moved); pass --inputs auto or random")

    def feeds(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch * 10_000 + seq)
        if self.real is not None:
            rows = [self.real[i % len(self.real)] for i in range(batch)]
            ids = np.stack([np.resize(r, seq) for r in rows])  # real tokens, repeated to the exact length
        else:
            ids = rng.integers(5, self.vocab_size, size=(batch, seq))
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, seq), dtype=np.int64)}
        if "token_type_ids" in self.names:
            feeds["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
        return feeds


def _real_ids(folder: Path) -> list[np.ndarray] | None:
    from kdship.data import load_table
    from kdship.errors import DataError
    from kdship.models import load_tokenizer

    record = read_record(folder) or {}
    source = (record.get("data", {}).get("eval") or {}).get("source")
    if not source or not Path(source).exists():
        return None
    try:
        texts = load_table(source, None, None, 256).texts
    except DataError:
        return None
    tokenizer = load_tokenizer(str(folder), "model")
    return [np.asarray(ids) for ids in tokenizer([" ".join(t) for t in texts])["input_ids"]]


def _model_folder_for_torch(folder: Path) -> Path:
    """The torch backends need weights: an artifact points back at the student it was exported from."""
    manifest = read_manifest(folder)
    if manifest and not any(folder.glob("*.safetensors")):
        source = Path(manifest["source"]["student"])
        if not source.is_dir():
            raise ModelError(f"{folder} was exported from {source}, which is gone; bench the model folder itself")
        return source
    return folder


def resolve(folder: Path, backend_name: str, seqs: list[int], verify: bool = True) -> Path:
    """The file (or model folder) a backend runs for this model; checked for every pair before measuring."""
    from kdship.models import load_config, max_tokens

    backend = get_backend(backend_name)
    source = _model_folder_for_torch(folder) if not backend.variants else folder
    longest = max_tokens(max(seqs), load_config(str(folder), "model"))
    if longest < max(seqs):
        raise ConfigError(f"--seq {max(seqs)} is longer than {folder.name} takes ({longest} tokens); lower --seq")
    return model_file(source, backend, None, verify)


def model_inputs(folder: Path, cfg: BenchConfig) -> Inputs:
    """The model's input names and ids, made once per model and shared by every backend."""
    from kdship.exporters.onnx_export import input_names_for
    from kdship.models import load_config, load_tokenizer

    config = load_config(str(folder), "model")
    names = input_names_for(load_tokenizer(str(folder), "model"), config)
    return Inputs(folder, names, config.vocab_size, cfg.inputs)


def bench_model(folder: Path, backend_name: str, path: Path, inputs: Inputs, cfg: BenchConfig) -> list[dict[str, Any]]:
    backend = get_backend(backend_name)
    _reset_gpu_peak()
    before = rss_mb()
    run = backend.load(path, cfg.threads)
    rows = []
    for seq in cfg.seq:
        for batch in cfg.batch:
            result = measure(run, inputs.feeds(batch, seq), cfg)
            rows.append({"model": folder.name, "path": str(folder), "backend": backend_name, "file": path.name,
                         "batch": batch, "seq": seq, "inputs": "real" if inputs.real is not None else "random",
                         **result, "rss_mb": rss_mb(), "rss_model_mb": rss_mb() - before,
                         "gpu_allocated_mb": _gpu_allocated_mb()})
    return rows


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_allocated_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    """Each row's throughput relative to the baseline model at the same backend, batch and sequence."""
    base = {(r["backend"], r["batch"], r["seq"]): r for r in rows if r["model"] == baseline}
    for r in rows:
        ref = base.get((r["backend"], r["batch"], r["seq"]))
        r["speedup_vs_baseline"] = r["sequences_per_s"] / ref["sequences_per_s"] if ref else None


def model_facts(folder: Path) -> dict[str, Any]:
    record = read_record(folder) or {}
    manifest = read_manifest(folder) or {}
    role = record.get("command")
    return {"name": folder.name, "path": str(folder), "command": role,
            "parameters": (record.get("student") or record.get("model") or {}).get("parameters"),
            "metrics": record.get("metrics"), "exported": list(manifest.get("variants", {}))}


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@under_weights_policy
def bench(cfg: BenchConfig) -> dict[str, Any]:
    from kdship.backends import load_all

    load_all()
    unknown = [b for b in cfg.backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend {unknown[0]!r}; valid backends: {', '.join(BACKENDS)}")
    folders = [Path(m) for m in cfg.models]
    for folder in folders:
        if not folder.is_dir():
            raise ModelError(f"{folder} not found; bench an artifact (kdship export) or a model folder")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models are named alike ({', '.join(names)}); results are keyed by folder name, so "
                          "give folders with distinct names")
    if cfg.output:
        from kdship.artifacts import check_output_dir

        check_output_dir(Path(cfg.output), cfg.overwrite)
    plan = [(folder, backend, resolve(folder, backend, cfg.seq, cfg.verify)) for folder in folders for backend in cfg.backends]
    inputs = {folder: model_inputs(folder, cfg) for folder in folders}
    rows = [row for folder, backend, path in plan for row in bench_model(folder, backend, path, inputs[folder], cfg)]
    add_speedups(rows, folders[0].name)
    result = {"kind": "kdship-bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **device_info(cfg.threads), "versions": library_versions(), "config": to_record(cfg),
              "baseline": folders[0].name, "models": [model_facts(f) for f in folders], "results": rows}
    if cfg.output:
        with staged_dir(Path(cfg.output), cfg.overwrite) as out:
            atomic_write_json(out / "bench.json", result)
            atomic_write_text(out / "bench.csv", _csv(rows))
        result["output"] = cfg.output
    return result


def print_bench(result: dict[str, Any]) -> None:
    from rich.table import Table

    from kdship.ui import console

    title = f"kdship bench on {result['device']} ({result['threads']} threads); speedup vs {result['baseline']}"
    table = Table(title=title)
    for col in ("model", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "seq/s",
                "tokens/s", "speedup", "runs"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in result["results"]:
        speedup = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else ""
        table.add_row(r["model"], r["backend"], str(r["batch"]), str(r["seq"]), f"{r['p50_ms']:.3f}",
                      f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}", f"{r['min_ms']:.3f}",
                      f"{r['sequences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", speedup,
                      f"{r['runs']}{'' if r['settled'] else '*'}")
    out = console()
    out.print(table)
    if not all(r["settled"] for r in result["results"]):
        out.print("* p50 had not settled within --max-seconds; treat those figures with care")
    if result.get("output"):
        out.print(f"wrote {result['output']}/bench.json and bench.csv")
