"""Speed of the teacher vs 4-layer/312-wide and 6-layer/768-wide students on every backend available here, measured
side by side in one `kdship bench` run. Speed does not depend on the weights, so the models are built at their
shapes (BERT-base teacher: 12 layers, 768 wide) with the all-MiniLM-L6-v2 tokenizer, exported with `kdship export`
(parity checked on SST-2 dev texts) and benchmarked on real SST-2 token ids. Accuracy is sst2_kd.py's job.

    python benchmarks/bench_sst2.py --minilm /path/to/minilm [--quick] [--work runs/bench-sst2]

Writes benchmarks/results/bench_sst2[_quick].json (device named) with every figure and the speedups per backend at
each model's best batch size (throughput)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import SHARED, device_name, write_result

from kdship.backends import load_all
from kdship.bench import bench, print_bench
from kdship.config import BenchConfig, ExportConfig
from kdship.export import export
from kdship.models import build_model, config_from_spec, load_tokenizer

SHAPES = {"teacher-bert-base": "bert:layers=12,hidden=768,heads=12,ffn=3072",
          "student-4L-312": "bert:layers=4,hidden=312,heads=12,ffn=1200",
          "student-6L-768": "bert:layers=6,hidden=768,heads=12,ffn=3072"}
LABELS = ["negative", "positive"]


def make_model(name: str, spec: str, tokenizer, work: Path) -> Path:
    config = config_from_spec(spec)
    config.vocab_size = len(tokenizer)
    folder = work / name
    build_model("classify", config=config, label_names=LABELS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def best_batch_speedups(rows: list[dict], baseline: str) -> dict[str, dict[str, float]]:
    """Per backend and model: its best throughput over batch sizes, divided by the teacher's best."""
    out: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        best = {}
        for r in rows:
            if r["backend"] == backend:
                best[r["model"]] = max(best.get(r["model"], 0.0), r["sequences_per_s"])
        out[backend] = {m: v / best[baseline] for m, v in best.items() if m != baseline}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, required=True, help="folder from ../shared/get-minilm.sh")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-sst2"))
    parser.add_argument("--quick", action="store_true", help="CPU-sized: batch 1,8,32 at seq 128, 5 s per point")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    tokenizer = load_tokenizer(str(args.minilm), "tokenizer")
    dev = str(SHARED / "data" / "sst2" / "dev.tsv")
    artifacts = []
    for name, spec in SHAPES.items():
        folder = make_model(name, spec, tokenizer, args.work)
        out = args.work / f"{name}-artifact"
        export(ExportConfig(student=str(folder), to=["onnx", "ort-opt"], output=str(out), eval_data=dev,
                            eval_samples=128, max_length=128, max_accuracy_drop=1.0))
        artifacts.append(str(out))
    available = [name for name, b in load_all().items() if b.available() is None and name in
                 ("torch", "ort-cpu", "ort-cuda", "tensorrt")]
    cfg = BenchConfig(models=artifacts, backends=available, seq=[128],
                      batch=[1, 8, 32] if args.quick else [1, 8, 32, 64, 256], warmup_s=1.0,
                      max_seconds=5 if args.quick else 10, inputs="random")
    result = bench(cfg)
    print_bench(result)
    speedups = best_batch_speedups(result["results"], result["baseline"])
    for backend, ratios in speedups.items():
        print(f"{backend}: " + ", ".join(f"{m} {v:.2f}x" for m, v in ratios.items()) + f" ({device_name()})")
    name = "bench_sst2_quick" if args.quick else "bench_sst2"
    path = write_result(name, {"settings": {"shapes": SHAPES, "backends": available, "quick": args.quick},
                               "best_batch_speedups": speedups, "bench": result})
    print(f"wrote {path}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
