"""Differential privacy's cost, side by side in one invocation: FedAvg on full Fashion-MNIST (10 clients,
Dirichlet(0.5) seed 0, the McMahan CNN, one local epoch a round, delta 1e-5) without privacy and with DP-SGD
at each budget (Opacus, ghost clipping), every process real. For each budget the noise multiplier is the
smallest whose epsilon, after all rounds, stays within the budget for the client that samples the most (the
one with the fewest examples), computed with meshfed's accountant before the run. Then, if asked, client-level
DP-FedAvg with many small clients (run_client.py --local-clients), a fixed clip against an adaptive one.

    python bench/privacy.py --out bench/results/privacy.json               # 20 rounds: about 70 minutes here
    python bench/privacy.py --rounds 2 --targets 8 --out /tmp/p.json        # a quick look
    python bench/privacy.py --parts client-level --client-level 100 --out bench/results/privacy_client_level.json

Prints one JSON line per round and run, then the summary (also written with --out, and a PNG beside it).
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
from shared.cluster import Cluster  # noqa: E402
from shared.datasets import load_split  # noqa: E402
from shared.partition import partition, train_holdout  # noqa: E402
from shared.privacy import Accountant  # noqa: E402

DELTA = 1e-5


def client_sizes(num_clients: int, alpha: float, seed: int, holdout: float) -> list[int]:
    """Each client's training examples, as the clients will cut them (shared/partition.py)."""
    labels = load_split("fashion-mnist", train=True).labels
    parts = partition(labels, "dirichlet", num_clients, alpha, seed)
    return [len(train_holdout(p, seed=seed + i, fraction=holdout)[0]) for i, p in enumerate(parts)]


def calibrate(target: float, sizes: list[int], batch_size: int, rounds: int, kind: str = "rdp") -> float:
    """The smallest noise multiplier (to 1%) whose epsilon after `rounds` one-epoch rounds stays within target for
    every client: the one with the fewest examples samples the most and spends the most."""
    batches = max(1, -(-min(sizes) // batch_size))
    spent = lambda sigma: Accountant(kind, [[sigma, 1 / batches, batches * rounds]]).epsilon(DELTA)  # noqa: E731
    lo, hi = 0.3, 30.0
    while hi / lo > 1.01:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if spent(mid) <= target else (mid, hi)
    return hi


def step_cost(examples: int, batch_sizes: list[int], threads: int = 2) -> dict[str, Any]:
    """DP-SGD's own cost against plain SGD at the same batch size, one process, the McMahan CNN, one epoch on
    `examples` training images; and what Opacus adds to a client's first DP round (its import, the first step)."""
    import subprocess
    probe = ("import time; t = time.perf_counter(); import opacus; print(time.perf_counter() - t)")
    cold = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    import opacus  # noqa: F401  (imported: the first step below is Opacus's set-up alone)
    import torch
    from client.privacy import dp_sgd
    from shared.datasets import to_tensors
    from shared.models import build_model
    from shared.training import train
    torch.set_num_threads(threads)
    x, y = to_tensors(load_split("fashion-mnist", train=True), np.arange(examples))
    result: dict[str, Any] = {"examples": examples, "threads": threads, "opacus_import_seconds": round(cold, 2)}
    t = time.perf_counter()
    dp = {"lr": 0.5, "seed": 0, "momentum": 0.0, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    dp_sgd(build_model("cnn", (1, 28, 28)), x[:256], y[:256], epochs=1, batch_size=128, max_batches=1, **dp)
    result["first_dp_step_seconds"] = round(time.perf_counter() - t, 2)  # make_private, one batch, its teardown
    for batch in batch_sizes:
        model = build_model("cnn", (1, 28, 28))
        t = time.perf_counter()
        train(model, x, y, epochs=1, lr=0.05, batch_size=batch)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        dp_sgd(build_model("cnn", (1, 28, 28)), x, y, epochs=1, batch_size=batch, max_batches=0, **dp)
        private = time.perf_counter() - t
        result[f"batch_{batch}"] = {"plain_seconds": round(plain, 2), "dp_sgd_seconds": round(private, 2),
                                    "ratio": round(private / plain, 2)}
        print(json.dumps({"step_cost": batch, **result[f"batch_{batch}"]}), flush=True)
    return result


def run(name: str, server: list[str], clients: list[str], args: argparse.Namespace, local_clients: int = 0,
        rounds: int | None = None) -> dict[str, Any]:
    rounds = rounds or args.rounds
    with Cluster(tempfile.mkdtemp(prefix=f"meshfed-privacy-{name}-")) as cluster:
        cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", str(rounds), "--round-timeout", "3600",
                             "--eval-limit", str(args.eval_limit), *server, *([] if local_clients else ["--start"]))
        cluster.wait_ready()
        common = ["--dataset", "fashion-mnist", "--partition", "dirichlet", "--alpha", str(args.alpha), "--seed",
                  str(args.seed)]
        if local_clients:
            cluster.start_clients("c", local_clients, *common, "--num-clients", str(local_clients), *clients)
            # started once all are online, so every round draws its 10% from all of them (q = 0.1, not 10 of 10)
            cluster.wait_until(lambda: cluster.status()["clients_online"] == local_clients, 600, "all clients online",
                               every=2.0)
            cluster.api("POST", "/api/start", admin=True).raise_for_status()
        else:
            for i in range(args.num_clients):
                cluster.start_client(f"c{i}", *common, "--num-clients", str(args.num_clients), "--client-index",
                                     str(i), *clients)
        seen: list[dict[str, Any]] = []
        while len(seen) < rounds and cluster.status()["state"] != "finished":
            new = cluster.wait_until(lambda: [r for r in cluster.rounds() if r["round"] > len(seen)] or
                                     cluster.status()["state"] == "finished", 7200, f"{name}: round {len(seen) + 1}",
                                     every=2.0)
            for r in new if isinstance(new, list) else []:
                privacy = r.get("privacy") or {}
                spent = privacy.get("epsilon") or max(privacy.get("clients", {}).values(), default=None)
                row = {"run": name, "round": r["round"], "asked": r.get("num_selected"), "accuracy": r["accuracy"],
                       "seconds": r["seconds"], "train_seconds": r["train_seconds"], "epsilon": spent,
                       "clip": privacy.get("clip")}
                print(json.dumps(row), flush=True)
                seen.append(row)
    return {"rounds": seen, "accuracy_last": seen[-1]["accuracy"] if seen else None,
            "epsilon_last": seen[-1]["epsilon"] if seen else None,
            "round_seconds_median": statistics.median(r["seconds"] for r in seen) if seen else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--targets", default="8,3", help="DP-SGD budgets, comma-separated (epsilon per client)")
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="DP-SGD's expected batch (the plain run uses 32)")
    p.add_argument("--lr", type=float, default=1.0, help="DP-SGD's client learning rate (the plain run uses 0.05)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD's per-example clip")
    p.add_argument("--eval-limit", type=int, default=0, help="test samples per evaluation (0 = all 10k)")
    p.add_argument("--client-level", type=int, default=0, metavar="N",
                   help="also run client-level DP with N clients (fraction 0.1), fixed vs adaptive clip")
    p.add_argument("--client-level-rounds", type=int, default=20)
    p.add_argument("--cost-examples", type=int, default=4800,
                   help="first, DP-SGD against plain SGD at equal batch size on this many examples (0 = skip)")
    p.add_argument("--parts", default="cost,non-private,dp-sgd,client-level",
                   help="which parts to run, comma-separated (client-level only with --client-level N)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - {"cost", "non-private", "dp-sgd", "client-level"}:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from cost, non-private, dp-sgd, client-level")
    started = time.monotonic()
    holdout = 0.2
    sizes = client_sizes(args.num_clients, args.alpha, args.seed, holdout)
    cost = step_cost(args.cost_examples, [32, args.batch_size]) if args.cost_examples and "cost" in parts else None
    runs: dict[str, Any] = {}
    if "non-private" in parts:
        runs["non-private"] = run("non-private", ["--min-clients", str(args.num_clients), "--lr", "0.05",
                                                  "--batch-size", "32"], [], args)
    for target in [float(t) for t in args.targets.split(",") if t and "dp-sgd" in parts]:
        sigma = calibrate(target, sizes, args.batch_size, args.rounds)
        result = run(f"dp-sgd-eps{target:g}", [
            "--min-clients", str(args.num_clients), "--dp", "sample", "--target-epsilon", str(target),
            "--noise-multiplier", f"{sigma:.4f}", "--max-grad-norm", str(args.max_grad_norm), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--delta", str(DELTA)], [], args)
        runs[f"dp-sgd-eps{target:g}"] = {"target_epsilon": target, "noise_multiplier": sigma, **result}
    if args.client_level and "client-level" in parts:
        # 10% of the N clients asked each round (--min-clients is the floor of those asked, not who must be there)
        for name, adaptive in (("client-level-fixed", []), ("client-level-adaptive", ["--clip-quantile", "0.5"])):
            runs[name] = run(name, ["--min-clients", str(max(1, args.client_level // 10)), "--fraction-fit", "0.1",
                                    "--dp", "client", "--noise-multiplier", "1.0", "--clip-norm", "0.1", *adaptive,
                                    "--lr", "0.05", "--batch-size", "32", "--delta", str(DELTA)],
                             ["--torch-threads", "1"], args, local_clients=args.client_level,
                             rounds=args.client_level_rounds)
    plain = runs.get("non-private", {}).get("round_seconds_median")
    summary = {"benchmark": "privacy", "rounds": args.rounds, "num_clients": args.num_clients, "alpha": args.alpha,
               "delta": DELTA, "client_examples": sizes, "dp_sgd": {"batch_size": args.batch_size, "lr": args.lr,
                                                                    "max_grad_norm": args.max_grad_norm},
               "targets": {"eps8_accuracy": 0.84, "eps3_accuracy": 0.80, "round_time_ratio": 2.5},
               "round_time_ratio": {k: round(v["round_seconds_median"] / plain, 2) for k, v in runs.items()
                                    if plain and v.get("round_seconds_median") and k.startswith("dp-sgd")},
               "step_cost": cost, "wall_seconds": round(time.monotonic() - started, 1), "runs": runs}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        only_client_level = all(name.startswith("client-level") for name in runs)
        n = args.client_level if only_client_level else args.num_clients
        plot(runs, out.with_suffix(".png"), f"Fashion-MNIST, {n} clients"
             f"{f' ({max(1, n // 10)} a round)' if only_client_level else ''}, Dirichlet({args.alpha:g})")


def plot(runs: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        xs = [x["round"] for x in r["rounds"]]
        ax1.plot(xs, [100 * x["accuracy"] for x in r["rounds"]], marker="o", label=name)
        if any(x["epsilon"] for x in r["rounds"]):
            ax2.plot(xs, [x["epsilon"] for x in r["rounds"]], marker="o", label=name)
    ax1.set(xlabel="round", ylabel="test accuracy (%)", title=title)
    ax2.set(xlabel="round", ylabel="epsilon spent (delta 1e-5)", title="privacy spent")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
