"""Can a busy machine fool `kdship bench`? The quickstart's teacher and student artifacts benched with the
quickstart's settings, on a quiet machine and with a CPU-bound job running beside it, alternately (quiet, busy,
quiet, busy, ...). With interleaved measurement every speedup should stay above 1x, the rows the bench trusts
(stable) should fall within each other's 95% intervals, and the rows it marks unstable are counted.

    python benchmarks/bench_under_load.py --quickstart kdship-quickstart [--repeats 2]

Writes benchmarks/results/bench_under_load.json (device named); run it with `| tee
benchmarks/results/bench_under_load.log` for the log beside it."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

from common import write_result

from kdship.bench import bench
from kdship.quickstart import QuickstartConfig, quickstart_configs


def burn(stop_at: float) -> None:
    """A CPU-bound job: one core busy until stop_at."""
    x = 0
    while time.time() < stop_at:
        x = (x * 1103515245 + 12345) % 2**31


def run_bench(root: Path, busy: bool) -> dict[str, Any]:
    cfg = quickstart_configs(QuickstartConfig(output=str(root)), root, root / "data" / "train.tsv",
                             root / "data" / "dev.tsv")["bench"].model_copy(update={"output": None})
    burner = None
    if busy:
        burner = multiprocessing.Process(target=burn, args=(time.time() + 600,), daemon=True)
        burner.start()
    try:
        result = bench(cfg)
    finally:
        if burner:
            burner.terminate()
            burner.join()
    rows = [r for r in result["results"] if r["model"] != result["baseline"]]
    return {"busy": busy, "load_average": result["load_average"],
            "points": [{"batch": r["batch"], "seq": r["seq"], "speedup": r["speedup_vs_baseline"],
                        "ci95": r["speedup_ci95"], "stable": r["stable"], "unstable_reasons": r["unstable_reasons"],
                        "teacher_p50_ms": next(t["p50_ms"] for t in result["results"] if t["model"] ==
                                               result["baseline"] and t["batch"] == r["batch"]),
                        "student_p50_ms": r["p50_ms"]} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished kdship quickstart folder")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = [run_bench(args.quickstart, busy) for _ in range(args.repeats) for busy in (False, True)]
    points = [p for r in runs for p in r["points"]]
    batches = sorted({p["batch"] for p in points})
    overlap = {}
    for b in batches:  # do the repeats the bench trusted agree with each other?
        intervals = [p["ci95"] for p in points if p["batch"] == b and p["stable"]]
        overlap[b] = max(lo for lo, _ in intervals) <= min(hi for _, hi in intervals) if intervals else None
    summary = {"slowest_speedup": min(p["speedup"] for p in points),
               "student_ever_slower": any(p["speedup"] < 1 for p in points),
               "unstable_rows": sum(not p["stable"] for p in points), "rows": len(points),
               "intervals_overlap_per_batch": overlap}
    path = write_result("bench_under_load", {"runs": runs, "summary": summary})
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
