"""Every CPU export variant of an SST-2 student: accuracy on the full dev set vs PyTorch, parity figures and file
sizes, from one `kdship export` run (speed is bench_sst2.py's job).

    python benchmarks/export_sst2.py --student runs/progressive/a_task_kd_only/student [--work runs/export-sst2]

The student comes from sst2_kd.py / multi_student_sst2.py (--keep). Writes benchmarks/results/export_sst2.json."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import SHARED, device_name, write_result

from kdship.config import ExportConfig
from kdship.export import export

VARIANTS = ["onnx", "ort-opt", "fp16", "int8", "int8-static"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/export-sst2"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    artifact = args.work / "artifact"
    sst2 = SHARED / "data" / "sst2"
    manifest = export(ExportConfig(student=str(args.student), to=VARIANTS, output=str(artifact), eval_samples=872,
                                   eval_data=str(sst2 / "dev.tsv"), calib_data=str(sst2 / "train.tsv"),
                                   max_accuracy_drop=1.0, allow_mismatch=True))  # measure, do not gate, here
    variants = {}
    for name, v in manifest["variants"].items():
        p = v["parity"]
        variants[name] = {"file": v["file"], "precision": v["precision"], "mb": (artifact / v["file"]).stat().st_size
                          / 2**20, "max_abs": p["max_abs"], "agreement": p["agreement"], "accuracy": p["accuracy"],
                          "pytorch_accuracy": p["pytorch_accuracy"], "accuracy_delta": -p["accuracy_drop"],
                          "passed_default_bounds": p["passed"]}
    for name, v in variants.items():
        print(f"{name:12s} acc {v['accuracy']:.4f} (delta {v['accuracy_delta']:+.4f}) agreement {v['agreement']:.4f} "
              f"max|diff| {v['max_abs']:.2e} {v['mb']:.1f} MB")
    path = write_result("export_sst2", {"student": str(args.student), "variants": variants, "dev_samples": 872})
    print(f"wrote {path} ({device_name()})")


if __name__ == "__main__":
    main()
