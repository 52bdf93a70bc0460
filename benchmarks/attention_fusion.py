"""What fusing attention buys: ONNX Runtime's transformer optimizer applied to the dynamo-exported graph (its
attention patterns are not recognised: LayerNorm/GELU fusions only) vs to the TorchScript-exported graph with eager
attention (what `kdship export --to ort-opt` uses: Attention and EmbedLayerNormalization fused too). Same model,
same ORT session settings, measured side by side in one run.

    python benchmarks/attention_fusion.py --minilm /path/to/minilm [--work runs/fusion]"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from common import SHARED, device_name, write_result

from kdship.bench import measure
from kdship.config import BenchConfig, ExportConfig, TrainConfig
from kdship.export import export
from kdship.exporters import onnxruntime_runner
from kdship.train import train


def p50_ms(path: Path, batch: int, seq: int, threads: int) -> float:
    """p50 of one graph through kdship bench's runner and timing loop, on real-length padded inputs."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, seq * 3 // 4:] = 0  # a quarter of padding, as in a length-bucketed batch
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    timing = BenchConfig(models=[str(path)], min_runs=40, max_seconds=30)
    return measure(onnxruntime_runner(path, threads=threads), feeds, timing)["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/fusion"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sst2 = SHARED / "data" / "sst2"
    model = args.work / "minilm-sst2"
    train(TrainConfig(model=str(args.minilm), data={"train": str(sst2 / "train.tsv"), "eval": str(sst2 / "dev.tsv"),
                                                    "max_train_samples": 2000}, max_steps=60, output=str(model),
                      overwrite=True))
    artifact = args.work / "artifact"
    result = export(ExportConfig(student=str(model), to=["onnx", "ort-opt"], output=str(artifact), eval_samples=256,
                                 overwrite=True))
    from onnxruntime.transformers import optimizer

    import json

    shape = json.loads((model / "config.json").read_text())
    unfused = optimizer.optimize_model(str(artifact / "model.onnx"), model_type="bert",
                                       num_heads=shape["num_attention_heads"], hidden_size=shape["hidden_size"])
    unfused.save_model_to_file(str(args.work / "dynamo_optimized.onnx"))
    graphs = {"dynamo graph, optimized": args.work / "dynamo_optimized.onnx",
              "torchscript graph, optimized (ort-opt)": artifact / "model_optimized.onnx"}
    fusions = {"dynamo graph, optimized": {k: v for k, v in unfused.get_fused_operator_statistics().items() if v},
               "torchscript graph, optimized (ort-opt)": result["variants"]["ort-opt"]["details"]["fused_operators"]}
    rows = []
    for batch in (1, 32):
        times = {name: p50_ms(path, batch, 128, args.threads) for name, path in graphs.items()}
        base, fused = times.values()
        rows.append({"batch": batch, "seq": 128, "p50_ms": times, "speedup": base / fused})
        print(f"batch {batch} seq 128: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()) +
              f" -> {base / fused:.2f}x")
    path = write_result("attention_fusion", {"model": "all-MiniLM-L6-v2 + SST-2 head", "threads": args.threads,
                                             "fusions": fusions,
                                             "parity_ort_opt_max_abs": result["variants"]["ort-opt"]["parity"]["max_abs"],
                                             "results": rows})
    print(f"wrote {path} ({device_name()})")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
