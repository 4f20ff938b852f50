"""Communication benchmark (issue 24): bytes moved and accuracy reached with compressed uploads (top-k + int8,
with and without error feedback) and delta-coded downloads, against float32, side by side in one invocation.

Setting: Fashion-MNIST, 10 clients, Dirichlet(0.5) seed 0, the McMahan CNN, E=1, B=32, SGD lr 0.05, evaluation on
the whole 10k test split every round; each configuration is a fresh server and fresh client processes with the
same seeds. --max-samples caps each client's samples (0 = its whole partition: about a minute a round on 2 cores).

Configurations: float32 (uploads and downloads uncompressed); float32 uploads with int8 delta-coded downloads;
topk+int8 uploads at each --ratios with error feedback on and off, all with delta-coded downloads.

Prints one JSON line per round and a summary; --out writes the JSON and a PNG beside it (accuracy per round, and
accuracy against upload bytes per client per round).

    python bench/compression.py --max-samples 2000 --out bench/results/compression.json
    python bench/compression.py --max-samples 2000 --only "float32,0.01 EF on" \
        --out bench/results/compression_headline.json
    python bench/compression.py --max-samples 0 --ratios 0.01 --only "float32,0.01 EF on" \
        --out bench/results/compression_full.json           (the issue's setting: whole partitions, 27 min)
    python bench/compression.py --replot bench/results/compression.json   (the PNG again, from the JSON)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.cluster import Cluster  # noqa: E402


def configurations(ratios: list[float]) -> list[dict[str, Any]]:
    out = [{"name": "float32", "compression": "none", "download": "none"},
           {"name": "float32 up, int8 delta down", "compression": "none", "download": "int8"}]
    for feedback in ("on", "off"):
        for ratio in ratios:
            out.append({"name": f"topk+int8 {ratio:g} EF {feedback}", "compression": "topk+int8", "ratio": ratio,
                        "error_feedback": feedback, "download": "int8"})
    return out


def run(config: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One configuration's rounds, with real processes."""
    with Cluster(tempfile.mkdtemp(prefix="meshfed-bench-compression-")) as cluster:
        cluster.start_server("--dataset", "fashion-mnist", "--model", "cnn", "--num-rounds", str(args.num_rounds),
                             "--min-clients", str(args.num_clients), "--local-epochs", "1", "--lr", "0.05",
                             "--batch-size", "32", "--round-timeout", "1800", "--seed", "0",
                             "--compression", config["compression"], "--topk-ratio", str(config.get("ratio", 0.01)),
                             "--error-feedback", config.get("error_feedback", "on"),
                             "--download-compression", config["download"], "--start")
        cluster.start_clients("c", args.num_clients, "--dataset", "fashion-mnist", "--model", "cnn",
                              "--partition", "dirichlet", "--alpha", "0.5", "--seed", "0",
                              "--num-clients", str(args.num_clients), "--max-samples", str(args.max_samples))
        seen: list[dict[str, Any]] = []
        while len(seen) < args.num_rounds:
            new = cluster.wait_until(lambda: [r for r in cluster.rounds() if r["round"] > len(seen)], 3600,
                                     f"round {len(seen) + 1}", every=1.0)
            for r in new:
                t = r["timings"]
                row = {"config": config["name"], "round": r["round"], "accuracy": r["accuracy"],
                       "clients": r["num_clients"], "seconds": round(r["seconds"], 2),
                       "model_bytes": t["model_bytes"], "upload_bytes_per_client": t["upload_bytes"] / t["uploads"],
                       "download_bytes_per_client": t["download_bytes"] / t["downloads"] if t["downloads"] else None,
                       "delta_downloads": t["delta_downloads"], "train_seconds_max": r["train_seconds"],
                       "client_compress_seconds_max": t["client_compress_max"],
                       "server_update_cpu_ms": 1000 * t["update_cpu_seconds"]}
                print(json.dumps(row), flush=True)
                seen.append(row)
    return seen


def summarise(config: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    model = rounds[0]["model_bytes"]
    up = statistics.mean(r["upload_bytes_per_client"] for r in rounds)
    down = [r["download_bytes_per_client"] for r in rounds[1:] if r["download_bytes_per_client"]]
    return {**config, "final_accuracy": rounds[-1]["accuracy"], "model_bytes": model,
            "upload_bytes_per_client_round": round(up), "upload_ratio": round(model / up, 1),
            "download_bytes_per_client_round_after_1": round(statistics.mean(down)) if down else None,
            "download_ratio_after_1": round(model / statistics.mean(down), 2) if down else None,
            "client_compress_share_of_training": round(max(r["client_compress_seconds_max"] / r["train_seconds_max"]
                                                           for r in rounds), 4),
            "server_update_cpu_ms": round(statistics.mean(r["server_update_cpu_ms"] for r in rounds), 2),
            "round_seconds": round(statistics.mean(r["seconds"] for r in rounds), 2)}


def plot(results: dict[str, list[dict[str, Any]]], summary: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, rounds in results.items():
        left.plot([r["round"] for r in rounds], [100 * r["accuracy"] for r in rounds], marker="o", ms=3,
                  label=name, linestyle="--" if "EF off" in name else "-")
    left.set(xlabel="round", ylabel="test accuracy %", title="accuracy per round")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=7)
    for feedback, marker in (("on", "o"), ("off", "x")):
        points = [s for s in summary if s.get("error_feedback") == feedback]
        right.plot([s["upload_bytes_per_client_round"] for s in points], [100 * s["final_accuracy"] for s in points],
                   marker=marker, label=f"topk+int8, error feedback {feedback}")
        for s in points:
            right.annotate(f"{s['ratio']:g}", (s["upload_bytes_per_client_round"], 100 * s["final_accuracy"]),
                           fontsize=7, xytext=(3, 3), textcoords="offset points")
    for base in (s for s in summary if s["name"] == "float32"):
        right.scatter([base["upload_bytes_per_client_round"]], [100 * base["final_accuracy"]], color="k",
                      label="float32")
    right.set(xscale="log", xlabel="upload bytes per client per round (log)", ylabel="final test accuracy %",
              title="accuracy against bytes (labels: topk ratio)")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--num-rounds", type=int, default=20)
    p.add_argument("--max-samples", type=int, default=0, help="samples per client (0 = its whole partition)")
    p.add_argument("--ratios", default="0.1,0.01,0.001", help="topk ratios, comma-separated")
    p.add_argument("--headline", type=float, default=0.01,
                   help="the topk ratio (EF on) the verdict compares with float32")
    p.add_argument("--only", default="", help="run only the configurations named by, or whose name contains, one of "
                                              "these comma-separated words (e.g. 'float32,EF on')")
    p.add_argument("--out", default=None, help="also write the JSON (and a PNG beside it) here")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of an earlier run's JSON")
    args = p.parse_args()
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        plot(report["rounds"], report["summary"], Path(args.replot).with_suffix(".png"), title(report))
        return
    started = time.monotonic()
    wanted = args.only.split(",") if args.only else [""]
    every = configurations([float(r) for r in args.ratios.split(",")])
    exact = {w for w in wanted if w in {c["name"] for c in every}}  # a whole name selects only that configuration
    configs = [c for c in every if c["name"] in exact or any(w in c["name"] for w in set(wanted) - exact)]
    results = {c["name"]: run(c, args) for c in configs}
    summary = [summarise(c, results[c["name"]]) for c in configs]
    for s in summary:
        print(json.dumps(s), flush=True)
    base = next((s for s in summary if s["name"] == "float32"), None)
    headline = next((s for s in summary if s.get("ratio") == args.headline and s["error_feedback"] == "on"), None)
    verdict = {}
    if base and headline:
        verdict = {"headline": headline["name"], "upload_ratio": headline["upload_ratio"], "upload_target": 100,
                   "accuracy_gap_points": round(100 * (base["final_accuracy"] - headline["final_accuracy"]), 2),
                   "accuracy_target_points": 0.5, "download_ratio_after_1": headline["download_ratio_after_1"],
                   "download_target": 4, "client_compress_share": headline["client_compress_share_of_training"],
                   "client_compress_target": 0.10, "server_update_cpu_ms": headline["server_update_cpu_ms"],
                   "server_update_cpu_ms_float32": base["server_update_cpu_ms"]}
        print(json.dumps({"verdict": verdict}), flush=True)
    report = {"benchmark": "compression", "num_clients": args.num_clients, "num_rounds": args.num_rounds,
              "max_samples_per_client": args.max_samples, "verdict": verdict, "summary": summary,
              "wall_seconds": round(time.monotonic() - started, 1), "rounds": results}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        plot(results, summary, out.with_suffix(".png"), title(report))


def title(report: dict[str, Any]) -> str:
    return (f"Fashion-MNIST, {report['num_clients']} clients, Dir(0.5), McMahan CNN, {report['num_rounds']} rounds"
            + (f", {report['max_samples_per_client']} samples per client" if report["max_samples_per_client"] else ""))


if __name__ == "__main__":
    main()
