"""Aggregation throughput over n updates of the McMahan CNN (1,663,370 parameters).

Times FedAvg (shared.aggregate.weighted_average), coordinate median, trimmed mean and Krum for n = 10,
50, 100, and reports FedAvg's achieved bandwidth (bytes of updates read per second) next to a plain
numpy copy of the same bytes on this machine, as a ratio. Prints JSON.

    python bench/aggregation_throughput.py --out bench/results/aggregation_throughput.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from shared import aggregate as agg  # noqa: E402
from shared.models import build_model, get_weights  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,50,100")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    like = get_weights(build_model("cnn", (1, 28, 28)))
    rng = np.random.default_rng(0)
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        updates = [({k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in like.items()}, int(m))
                   for m in rng.integers(100, 1000, n)]
        nbytes = sum(a.nbytes for w, _ in updates for a in w.values())
        x = np.stack([agg.flatten(w) for w, _ in updates])          # (n, d) as the robust strategies see it
        src = np.concatenate([a.ravel() for w, _ in updates for a in w.values()])
        dst = np.empty_like(src)
        t_copy = best_of(lambda: np.copyto(dst, src), args.repeat)
        t_fedavg = best_of(lambda: agg.weighted_average(updates), args.repeat)
        row = {"n": n, "update_mb": round(nbytes / n / 1e6, 2),
               "fedavg_s": round(t_fedavg, 4), "fedavg_gb_s": round(nbytes / t_fedavg / 1e9, 2),
               "numpy_copy_gb_s": round(nbytes / t_copy / 1e9, 2),
               "fedavg_vs_copy": round(t_copy / t_fedavg, 3),
               "median_s": round(best_of(lambda: agg.coordinate_median(x), 1), 3),
               "trimmed_mean_s": round(best_of(lambda: agg.trimmed_mean(x, 0.1), 1), 3),
               "krum_s": round(best_of(lambda: agg.multikrum(x, max(1, n // 5), 1), 1), 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
    summary = {"benchmark": "aggregation_throughput", "parameters": int(sum(v.size for v in like.values())),
               "targets": {"fedavg_vs_copy": 0.5, "krum_100_s": 5.0}, "results": results}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
