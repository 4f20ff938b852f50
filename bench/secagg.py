"""Secure aggregation's cost, side by side with plain rounds in one invocation.

  correctness  the server's unmasked sum against the plain sum of the clients' quantised inputs, bit for bit,
               with 0%, 10% and 30% of 10 clients gone after sharing keys (the McMahan CNN's 1.66M parameters;
               server and clients in this process, tests/secagg_harness.py)
  unmask       the server's CPU seconds to reveal and unmask one round, for n = 10, 50, 100 clients and 0% / 30%
               dropout, and per mask it removes (a self-mask per survivor, a pairwise mask per dropped client and
               surviving neighbour: at most n + dropped * k), per parameter: O(n k d) is flat there; and the
               share of rounds that survive that dropout (Monte Carlo over the round's neighbour graph)
  training     Fashion-MNIST, 10 clients, Dirichlet(0.5), the McMahan CNN, plain FedAvg then secagg+, same seeds,
               every process real: accuracy at each round, round time, bytes uploaded per client and the key and
               share traffic per client
  scale        round time with 50 clients (--local-clients 50, 5 local batches), plain then secagg+

    python bench/secagg.py --out bench/results/secagg.json       # 20 rounds: about 30 minutes here
    python bench/secagg.py --rounds 2 --parts correctness,training --out /tmp/s.json

Prints one JSON line per measurement, then the summary (also written with --out, and a PNG beside it).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared import secagg  # noqa: E402
from shared.cluster import Cluster  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.protocol import encode_weights  # noqa: E402
from tests.secagg_harness import simulate  # noqa: E402

PARTS = ("correctness", "unmask", "training", "scale")


def cnn_deltas(n: int, seed: int = 0) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """n client updates the size and spread of the McMahan CNN's (N(0, 0.01^2) per coordinate)."""
    weights = {k: v.detach().numpy() for k, v in build_model("cnn", (1, 28, 28)).state_dict().items()}
    rng = np.random.default_rng(seed)
    deltas = {f"c{i:03d}": {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}
              for i in range(n)}
    return deltas, {cid: int(rng.integers(300, 6000)) for cid in deltas}


def correctness() -> dict[str, Any]:
    deltas, weights = cnn_deltas(10)
    out = {}
    for share in (0.0, 0.1, 0.3):
        gone = set(sorted(deltas)[:round(share * 10)])
        o = simulate(deltas, weights, drop_after_shares=gone)
        survivors = [c for c in deltas if c not in gone]
        total = sum(weights[c] for c in survivors)
        exact = np.concatenate([sum(weights[c] * deltas[c][k].astype(np.float64) for c in survivors).reshape(-1)
                                / total for k in sorted(deltas["c000"])])
        row = {"dropout": share, "dropped": len(gone), "recovered": o.round.stats["recovered"],
               "bit_for_bit": bool(np.array_equal(o.unmasked, o.plain_sum)),
               "max_abs_error_of_mean": float(np.abs(o.mean["flat"] - exact).max())}
        print(json.dumps({"part": "correctness", **row}), flush=True)
        out[f"{share:.0%}"] = row
    return out


def survival(r: Any, share: float, draws: int = 2000) -> float:
    """The share of rounds that complete when a uniformly random `share` of the round's clients drop after
    sharing keys (Monte Carlo over the round's own neighbour graph and thresholds)."""
    rng, clients = np.random.default_rng(1), sorted(r.graph)
    k = round(share * len(clients))
    return float(np.mean([secagg.survives(r.graph, set(rng.choice(clients, k, replace=False)), r.threshold)
                          for _ in range(draws)]))


def unmask() -> list[dict[str, Any]]:
    rows = []
    for n in (10, 50, 100):
        deltas, weights = cnn_deltas(n, seed=n)
        d = sum(v.size for v in deltas["c000"].values())
        for share in (0.0, 0.3):
            gone = set(sorted(deltas)[:round(share * n)])
            o = simulate(deltas, weights, drop_after_shares=gone)
            s, k = o.round.stats, max(len(v) for v in o.round.graph.values())
            alive = set(o.round.survivors)  # masks removed: a self-mask per survivor, and per dropped client one
            masks = len(alive) + sum(len(alive & set(o.round.graph[u])) for u in gone)  # per surviving neighbour
            row = {"n": n, "dropout": share, "k": k, "threshold": max(o.round.threshold(c) for c in o.round.graph),
                   "abandoned": o.abandoned, "bit_for_bit": bool(np.array_equal(o.unmasked, o.plain_sum)),
                   "rounds_surviving_this_dropout": survival(o.round, share),
                   "server_unmask_cpu_seconds": round(o.unmask_cpu_seconds, 3), "masks_removed": masks,
                   "ns_per_mask_per_parameter": round(1e9 * o.unmask_cpu_seconds / (masks * d), 3),
                   "client_mask_seconds_max": round(o.client_seconds, 3),
                   "key_and_share_bytes_per_client": round(sum(s["bytes"].values()) / n)}
            print(json.dumps({"part": "unmask", **row}), flush=True)
            rows.append(row)
    return rows


def run(name: str, server: list[str], clients: list[str], args: argparse.Namespace, num_clients: int,
        rounds: int, local: bool = False) -> dict[str, Any]:
    with Cluster(tempfile.mkdtemp(prefix=f"meshfed-secagg-{name}-")) as cluster:
        cluster.start_server("--dataset", "fashion-mnist", "--model", "cnn", "--num-rounds", str(rounds),
                             "--round-timeout", "3600", "--min-clients", str(num_clients), "--lr", "0.05",
                             "--batch-size", "32", "--eval-limit", str(args.eval_limit), *server)
        cluster.wait_ready()
        common = ["--dataset", "fashion-mnist", "--model", "cnn", "--partition", "dirichlet", "--alpha",
                  str(args.alpha), "--seed", str(args.seed), "--num-clients", str(num_clients), *clients]
        if local:
            cluster.start_clients("c", num_clients, *common, "--torch-threads", "1")
        else:
            for i in range(num_clients):
                cluster.start_client(f"c{i}", *common, "--client-index", str(i))
        cluster.wait_until(lambda: cluster.status()["clients_online"] == num_clients, 900, "all clients online",
                           every=1.0)
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        seen: list[dict[str, Any]] = []
        while len(seen) < rounds:
            new = cluster.wait_until(lambda: [r for r in cluster.rounds() if r["round"] > len(seen)], 7200,
                                     f"{name}: round {len(seen) + 1}", every=1.0)
            for r in new:
                s = r.get("secure") or {}
                row = {"run": name, "round": r["round"], "accuracy": r["accuracy"], "seconds": round(r["seconds"], 3),
                       "clients": len(r["clients"]),
                       "upload_bytes_per_client": round(r["timings"]["upload_bytes"] / len(r["clients"])),
                       **({"key_and_share_bytes_per_client": round(sum(s["bytes"].values()) / s["advertised"]),
                           "stage_seconds": s["seconds"], "unmask_cpu_seconds": round(s["unmask_cpu_seconds"], 3)}
                          if s else {})}
                print(json.dumps(row), flush=True)
                seen.append(row)
    later = seen[1:] or seen  # round 1 includes every client's first model download and warm-up
    return {"rounds": seen, "accuracy_last": seen[-1]["accuracy"],
            "round_seconds_median": statistics.median(r["seconds"] for r in later),
            "upload_bytes_per_client": statistics.median(r["upload_bytes_per_client"] for r in seen),
            **({"key_and_share_bytes_per_client": statistics.median(r["key_and_share_bytes_per_client"]
                                                                    for r in seen)}
               if "key_and_share_bytes_per_client" in seen[0] else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=0, help="test samples per evaluation (0 = all 10k)")
    p.add_argument("--scale-clients", type=int, default=50)
    p.add_argument("--scale-rounds", type=int, default=4)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    started = time.monotonic()
    model = {k: v.detach().numpy() for k, v in build_model("cnn", (1, 28, 28)).state_dict().items()}
    float32 = len(encode_weights(model))
    ring = len(encode_weights({k: v.astype(np.uint32) for k, v in model.items()}))
    summary: dict[str, Any] = {
        "benchmark": "secagg", "rounds": args.rounds, "alpha": args.alpha, "seed": args.seed,
        "targets": {"accuracy_gap_points": 0.3, "bytes_ratio": 1.1, "round_time_ratio_10": 1.5},
        "cnn_payload_bytes": {"float32": float32, "masked_uint32": ring, "ratio": round(ring / float32, 4)}}
    if "correctness" in parts:
        summary["correctness"] = correctness()
    if "unmask" in parts:
        summary["unmask"] = unmask()
    runs: dict[str, Any] = {}
    if "training" in parts:
        for name, extra in (("plain", []), ("secagg+", ["--secure-aggregation", "secagg+"])):
            runs[name] = run(name, extra, [], args, 10, args.rounds)
        plain, secure = runs["plain"], runs["secagg+"]
        summary["training"] = {
            "accuracy_gap_points": round(100 * (plain["accuracy_last"] - secure["accuracy_last"]), 2),
            "round_time_ratio": round(secure["round_seconds_median"] / plain["round_seconds_median"], 3),
            "upload_bytes_ratio": round(secure["upload_bytes_per_client"] / plain["upload_bytes_per_client"], 4),
            "with_keys_and_shares_ratio": round((secure["upload_bytes_per_client"] +
                                                 secure["key_and_share_bytes_per_client"]) /
                                                plain["upload_bytes_per_client"], 4)}
    if "scale" in parts:
        n = args.scale_clients
        for name, extra in ((f"plain-{n}", []), (f"secagg+-{n}", ["--secure-aggregation", "secagg+"])):
            runs[name] = run(name, [*extra, "--max-batches", "5", "--eval-limit", "1000"], [], args, n,
                             args.scale_rounds, local=True)
        summary["scale"] = {"clients": n, "round_time_ratio": round(
            runs[f"secagg+-{n}"]["round_seconds_median"] / runs[f"plain-{n}"]["round_seconds_median"], 3)}
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("unmask", "correctness")}), flush=True)
    summary["runs"] = runs
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        plot(summary, out.with_suffix(".png"))


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("plain", "secagg+"):
        if name in summary["runs"]:
            r = summary["runs"][name]["rounds"]
            ax1.plot([x["round"] for x in r], [100 * x["accuracy"] for x in r], marker="o", label=name)
    ax1.set(xlabel="round", ylabel="test accuracy (%)",
            title=f"Fashion-MNIST, 10 clients, Dirichlet({summary['alpha']:g}), CNN")
    for share in (0.0, 0.3):
        rows = [x for x in summary.get("unmask", []) if x["dropout"] == share]
        ax2.plot([x["n"] for x in rows], [x["server_unmask_cpu_seconds"] for x in rows], marker="o",
                 label=f"{share:.0%} dropped after sharing keys")
    ax2.set(xlabel="clients in the round", ylabel="server CPU seconds to unmask", title="unmasking, McMahan CNN")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
