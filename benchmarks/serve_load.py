"""Bounded load test of `kdship serve` on loopback: N concurrent clients for S seconds, with and without
server-side dynamic batching. Reports throughput, p50/p99 latency and the error count (must be 0).

    python benchmarks/serve_load.py ARTIFACT [--clients 32] [--seconds 20] [--texts-per-request 1]

Writes benchmarks/results/serve_load.json (device named). Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from common import device_name, write_result

SENTENCES = ["a gripping , moving film", "the plot was dull and the acting was worse", "not bad at all",
             "although the pacing felt slow , the ending was superb", "the most tedious two hours of the year"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(artifact: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    flags = ["--batching", "--max-batch", "64", "--max-wait-ms", "5"] if batching else ["--no-batching"]
    proc = subprocess.Popen([sys.executable, "-m", "kdship.cli", "serve", str(artifact), "--port", str(port),
                             "--threads", "1", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-500:]}")


def client(url: str, stop_at: float, per_request: int, latencies: list[float], errors: list[str]) -> None:
    with httpx.Client(timeout=30) as http:
        i = 0
        while time.perf_counter() < stop_at:
            texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(per_request)]
            started = time.perf_counter()
            try:
                response = http.post(f"{url}/v1/classify", json={"texts": texts})
                ok = response.status_code == 200
            except httpx.HTTPError as e:
                ok, response = False, e
            latencies.append(time.perf_counter() - started) if ok else errors.append(str(response))
            i += 1


def load(url: str, clients: int, seconds: float, per_request: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(url, stop_at, per_request, latencies, errors))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "requests_per_s": len(latencies) / seconds,
            "texts_per_s": len(latencies) * per_request / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--texts-per-request", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for mode, batching in (("dynamic_batching", True), ("no_batching", False)):
        proc, url = start(args.artifact, batching)
        try:
            results[mode] = load(url, args.clients, args.seconds, args.texts_per_request)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        r = results[mode]
        print(f"{mode:17s} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"errors {r['errors']}")
    speedup = results["dynamic_batching"]["requests_per_s"] / results["no_batching"]["requests_per_s"]
    print(f"dynamic batching throughput / no batching: {speedup:.2f}x ({device_name()})")
    settings = {"artifact": str(args.artifact), "clients": args.clients, "seconds": args.seconds,
                "texts_per_request": args.texts_per_request, "server_threads": 1}
    path = write_result("serve_load", {"settings": settings, "results": results,
                                       "batching_throughput_ratio": speedup})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
