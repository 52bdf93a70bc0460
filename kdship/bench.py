"""`kdship bench`: latency (p50/p90/p99/mean/min) and throughput of several models side by side, per backend,
batch size and sequence length, in one run, so speedups are ratios measured together. Writes bench.json (device,
CPU, threads, versions, every figure) and bench.csv."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdship.artifacts import (atomic_write_json, atomic_write_text, library_versions, read_record, recorded_source,
                              staged_dir)
from kdship.backends import BACKENDS, get_backend, model_file
from kdship.manifest import read_manifest
from kdship.config import BenchConfig, to_record
from kdship.errors import ConfigError, DataError, ModelError, not_a_folder
from kdship.measure import instability, interleaved, ratio_interval
from kdship.early_exit import ExitRunner, exit_distribution
from kdship.models import under_weights_policy


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

    source = recorded_source(read_record(folder) or {}, "eval", folder)
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


def measure_point(runners: dict[str, Any], feeds: dict[str, dict[str, np.ndarray]], cfg: BenchConfig,
                  baseline: str) -> dict[str, dict[str, Any]]:
    """Every model of one (backend, batch, seq) point, timed in interleaved rounds: each model's latencies, its
    throughput from the median round, and its speedup over the baseline as the median of per-round ratios with a
    95% interval. Every runner returns host arrays, so a timed call ends when the device has finished."""
    calls = {name: functools.partial(run, feeds[name]) for name, run in runners.items()}
    timings = interleaved(calls, cfg.min_runs, cfg.min_rounds, cfg.max_seconds, cfg.warmup_s, cfg.settle)
    batch, seq = next(iter(feeds.values()))["input_ids"].shape
    base = timings[baseline].round_medians if baseline in timings else None
    figures = {}
    for name, t in timings.items():
        ratio = ratio_interval(base, t.round_medians) if base is not None else None
        reasons = instability(ratio or (1.0, 1.0, 1.0), t.round_medians)
        per_call = float(np.median(t.round_medians))
        figures[name] = {**percentiles(list(t.calls)), "runs": len(t.calls), "rounds": len(t.rounds),
                         "round_medians_ms": [round(float(m) * 1000, 4) for m in t.round_medians],
                         "sequences_per_s": batch / per_call, "tokens_per_s": batch * seq / per_call,
                         "speedup_vs_baseline": ratio[0] if ratio else None,
                         "speedup_ci95": [ratio[1], ratio[2]] if ratio else None,
                         "stable": not reasons, "unstable_reasons": reasons}
    return figures


def bench_backend(backend_name: str, models: list[tuple[Path, Path]], inputs: dict[Path, "Inputs"],
                  cfg: BenchConfig, baseline: str) -> list[dict[str, Any]]:
    """One backend: every model loaded, then each point measured with all of them side by side."""
    backend = get_backend(backend_name)
    _reset_gpu_peak()
    runners, loaded_mb, measured = {}, {}, []  # measured: (row name, folder, file, exit threshold)
    for folder, path in models:
        before = rss_mb()
        runners[folder.name] = backend.load(path, cfg.threads)
        measured.append((folder.name, folder, path, None))
        thresholds = _exit_thresholds(folder, cfg)
        exits_model = ExitRunner.load_model(path, cfg.threads) if thresholds else None  # one copy for all thresholds
        for threshold in thresholds:  # the same model, stopping rows at their first sure exit
            name = f"{folder.name}@exit{threshold:g}"
            runners[name] = ExitRunner(exits_model, threshold, cfg.exit_criterion)
            measured.append((name, folder, path, threshold))
        loaded_mb[folder.name] = rss_mb() - before
    rows = []
    for seq in cfg.seq:
        for batch in cfg.batch:
            feeds = {name: inputs[folder].feeds(batch, seq) for name, folder, _, _ in measured}
            figures = measure_point(runners, feeds, cfg, baseline)
            for name, folder, path, threshold in measured:
                exits = {} if threshold is None else {"exit_threshold": threshold, "exit_criterion": cfg.exit_criterion,
                                                      "exit_distribution": exit_distribution(
                                                          torch.from_numpy(runners[name].last_exits),
                                                          runners[name].model.config.num_hidden_layers)}
                rows.append({"model": name, "path": str(folder.resolve()), "backend": backend_name, "file": path.name,
                             "batch": batch, "seq": seq, "inputs": "real" if inputs[folder].real is not None else
                             "random", **figures[name], **exits, "rss_mb": rss_mb(),
                             "rss_model_mb": loaded_mb[folder.name], "gpu_allocated_mb": _gpu_allocated_mb()})
    return rows


def _exit_thresholds(folder: Path, cfg: BenchConfig) -> list[float]:
    """The thresholds to measure this model at: cfg's, when the model has early exits."""
    from kdship.early_exit import early_exit_settings
    from kdship.models import load_config

    if not cfg.exit_thresholds or not early_exit_settings(load_config(str(folder), "model")):
        return []
    return cfg.exit_thresholds


def exit_curves(folders: list[Path], cfg: BenchConfig) -> dict[str, Any]:
    """Per model with early exits: accuracy, mean exit layer and exit distribution at each threshold, on the
    labelled eval data its record names (accuracy does not depend on the batch: each row's exit is its own)."""
    curves = {}
    for folder in folders:
        if not _exit_thresholds(folder, cfg):
            continue
        source = recorded_source(read_record(folder) or {}, "eval", folder)
        if not source or not Path(source).exists():
            curves[folder.name] = {"not_measured": "the model's record names no eval data that can be read"}
            continue
        curves[folder.name] = _exit_curve_on(folder, source, cfg)
    return curves


def _exit_curve_on(folder: Path, source: str, cfg: BenchConfig) -> dict[str, Any]:
    from kdship.data import Encoded, encode_labels, iterate_batches, load_table, model_inputs as batch_inputs, tokenize
    from kdship.early_exit import exit_curve, exit_latency
    from kdship.models import load_tokenizer, max_tokens

    record = read_record(folder) or {}
    data = record.get("config", {}).get("data", {})
    model = ExitRunner.load_model(folder, cfg.threads)
    try:  # the whole eval set at the length the model was trained on: what eval and serve see, not the bench's shape
        table = load_table(source, data.get("text_columns"), data.get("label_column", "label"))
    except DataError:
        return {"not_measured": f"{source} has no labels"}
    tokenizer = load_tokenizer(str(folder), "model")
    length = record.get("data", {}).get("max_length") or data.get("max_length") or 128
    encoded = tokenize(tokenizer, table, max_tokens(length, model.config), None)
    labels = torch.tensor(encode_labels(table.raw_labels, [str(model.config.id2label[i]) for i in
                                                           range(model.config.num_labels)], table.source))
    device = next(model.parameters()).device
    batches, order = [], []
    for indices, batch in iterate_batches(tokenizer, encoded, 64):
        batches.append({k: v.to(device) for k, v in batch_inputs(batch).items()})
        order += indices
    curve = exit_curve(model, batches, labels[torch.tensor(order)], cfg.exit_thresholds, cfg.exit_criterion)
    singles = [{k: v.to(device) for k, v in batch_inputs(batch).items()}
               for _, batch in iterate_batches(tokenizer, Encoded(encoded.features[:LATENCY_INPUTS], None), 1)]
    latency = exit_latency(model, singles, cfg.exit_thresholds, cfg.exit_criterion)
    return {"data": source, "n": len(order), **curve, "latency_over_inputs": latency}


LATENCY_INPUTS = 200  # eval texts timed one at a time for the early-exit latency (each run at every threshold)


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_allocated_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def model_facts(folder: Path) -> dict[str, Any]:
    record = read_record(folder) or {}
    manifest = read_manifest(folder) or {}
    role = record.get("command")
    return {"name": folder.name, "path": str(folder.resolve()), "command": role,
            "parameters": (record.get("student") or record.get("model") or {}).get("parameters"),
            "metrics": record.get("metrics"), "exported": list(manifest.get("variants", {}))}


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # exit rows add some
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@contextlib.contextmanager
def pinned(cpus: list[int] | None):
    """Run on these cores (all the process may use when None); the caller's affinity is put back afterwards.
    Yields the cores measured on."""
    usable = os.sched_getaffinity(0)
    if cpus and not set(cpus) <= usable:
        raise ConfigError(f"--cpus {','.join(map(str, cpus))}: this process may use cores "
                          f"{','.join(map(str, sorted(usable)))} only")
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield sorted(cpus or usable)
    finally:
        os.sched_setaffinity(0, usable)


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
            raise ModelError(f"{not_a_folder(folder)}; bench an artifact folder (kdship export) or a model folder")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models are named alike ({', '.join(names)}); results are keyed by folder name, so "
                          "give folders with distinct names")
    if cfg.output:
        from kdship.artifacts import check_output_dir

        check_output_dir(Path(cfg.output), cfg.overwrite)
    plan = {backend: [(folder, resolve(folder, backend, cfg.seq, cfg.verify)) for folder in folders]
            for backend in cfg.backends}  # every (model, backend) checked before anything is measured
    if cfg.exit_thresholds is not None and not any(_exit_thresholds(f, cfg) for f in folders):
        raise ConfigError("--exit-threshold: none of the models has early exits; bench a model made with --exits "
                          "(its folder, with --backend torch)")
    inputs = {folder: model_inputs(folder, cfg) for folder in folders}
    load_before = os.getloadavg()
    with pinned(cfg.cpus) as affinity:
        rows = [row for backend, models in plan.items() for row in bench_backend(backend, models, inputs, cfg,
                                                                                  folders[0].name)]
    result = {"kind": "kdship-bench/2", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **device_info(cfg.threads), "cpu_affinity": affinity,
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
              "versions": library_versions(), "config": to_record(cfg), "baseline": folders[0].name,
              "models": [model_facts(f) for f in folders], "results": rows}
    curves = exit_curves(folders, cfg)
    if curves:
        result["early_exit"] = curves
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
    for col in ("model", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "min ms", "seq/s", "tokens/s",
                "speedup (95% interval)", "rounds"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in result["results"]:
        speedup = (f"{r['speedup_vs_baseline']:.2f}x ({r['speedup_ci95'][0]:.2f}-{r['speedup_ci95'][1]:.2f})"
                   if r["speedup_vs_baseline"] else "")
        table.add_row(r["model"], r["backend"], str(r["batch"]), str(r["seq"]), f"{r['p50_ms']:.3f}",
                      f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['min_ms']:.3f}", f"{r['sequences_per_s']:.1f}",
                      f"{r['tokens_per_s']:.0f}", speedup + ("" if r["stable"] else " unstable"), str(r["rounds"]))
    out = console()
    out.print(table)
    unstable = [r for r in result["results"] if not r["stable"]]
    if unstable:
        out.print(f"unstable ({len(unstable)} rows): {unstable[0]['unstable_reasons'][0]}, ...; the machine was busy "
                  "or the point too short: rerun with a longer --max-seconds, or on a quieter machine")
    for name, curve in result.get("early_exit", {}).items():
        out.print(_exit_table(name, curve))
    if result.get("output"):
        out.print(f"wrote {result['output']}/bench.json and bench.csv")


def _exit_table(name: str, curve: dict[str, Any]) -> Any:
    from rich.table import Table

    if "not_measured" in curve:
        return f"{name}: exit accuracy not measured ({curve['not_measured']})"
    latency = {p["threshold"]: p for p in curve["latency_over_inputs"]["thresholds"]}
    table = Table(title=f"{name}: early exit on {curve['n']} eval rows ({curve['criterion']}; all layers: accuracy "
                        f"{curve['final_accuracy']:.4f}, {curve['latency_over_inputs']['all_layers_mean_ms']:.2f} ms "
                        f"mean over {curve['latency_over_inputs']['inputs']} texts one at a time)")
    for col in ("threshold", "accuracy", "mean exit layer", "layers saved", "mean ms", "speedup (95% interval)",
                "stops per layer"):
        table.add_column(col, justify="right")
    for point in curve["curve"]:
        at = latency[point["threshold"]]
        table.add_row(f"{point['threshold']:g}", f"{point['accuracy']:.4f}", f"{point['mean_exit_layer']:.2f}",
                      f"{point['layers_saved']:.0%}", f"{at['mean_ms']:.2f}",
                      f"{at['speedup_vs_all_layers']:.2f}x ({at['speedup_ci95'][0]:.2f}-{at['speedup_ci95'][1]:.2f})",
                      " ".join(f"{k}:{v:.0%}" for k, v in point["exit_distribution"].items()))
    return table
