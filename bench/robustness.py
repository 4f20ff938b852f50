"""Robustness benchmark: strategies under Byzantine clients, and FedProx vs FedAvg with slow clients.

Fashion-MNIST, 10 clients (--num-clients), Dirichlet(0.5), McMahan CNN, E=1, B=32, lr 0.05. Clients are simulated
in-process with the code the real system runs (LocalTrainer.fit, client/behaviour.poison,
app/strategy.aggregate); each client keeps --max-samples samples so the 30+ runs fit on 2 cores.
Prints a JSON table and writes a PNG next to --out.

    python bench/robustness.py --rounds 20 --out bench/results/robustness.json
    python bench/robustness.py --rounds 20 --mixing nnm --only clean/fedavg,+nnm --out ...  # median and
        # trimmed mean after nearest-neighbour mixing, next to clean FedAvg
    python bench/robustness.py --rounds 20 --num-clients 15 --mixing nnm --only clean/fedavg,bulyan+nnm \
        --out ...  # Bulyan with f = 3 against 20% attackers (n >= 4f + 3 needs 15 clients)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app import strategy  # noqa: E402
from app.config import RunConfig, update_run_config  # noqa: E402
from app.evaluator import Evaluator  # noqa: E402
from client.behaviour import partial_batches, poison  # noqa: E402
from client.trainer import DataConfig, LocalTrainer  # noqa: E402
from shared.models import build_model, get_weights  # noqa: E402

STRATEGIES = ["fedavg", "multikrum", "median", "trimmed_mean", "bulyan"]
ATTACKS = [("sign_flip", 10.0), ("gaussian", 1.0), ("label_flip", 0.0)]
# --mixing nnm applies to these (Multi-Krum meets the targets as it is). Bulyan tolerates at most
# f = (n - 3) // 4 (1 with 10 clients); mixing with a smaller f than there are attackers would pull an
# attacker into every honest mean, so Bulyan runs with nnm only where f covers the attackers.
MIXED = ("median", "trimmed_mean", "bulyan")


def run(job: dict) -> dict:
    """One simulated run; returns the job with its accuracy per round."""
    torch.set_num_threads(1)
    n, n_bad, slow = job["num_clients"], job.get("attackers", 0), job.get("slow", 0)
    cfg = update_run_config(RunConfig(min_fit_clients=n), job["strategy_config"])
    trainers = [LocalTrainer(DataConfig(dataset="fashion-mnist", partition="dirichlet", alpha=0.5,
                                        num_clients=n, client_index=i, seed=0,
                                        max_samples=job["max_samples"],
                                        flip_labels=job.get("attack") == "label_flip" and i >= n - n_bad))
                for i in range(n)]
    evaluator = Evaluator("fashion-mnist", "cnn", limit=job["eval_limit"])
    weights, state = get_weights(build_model("cnn", (1, 28, 28), seed=0)), {}
    rng = np.random.default_rng(0)
    accuracy = []
    for rnd in range(1, job["rounds"] + 1):
        updates = []
        for i, t in enumerate(trainers):
            budget = partial_batches(t.num_examples, 32, 1, job.get("slowdown", 1.0)) if i < slow else 0
            delta, _ = t.fit(weights, 1, 0.05, 32, budget, seed=rnd, proximal_mu=cfg.proximal_mu)
            if i >= n - n_bad and job.get("attack") != "label_flip":
                delta = poison(delta, job["attack"], job["attack_scale"], rng)
            updates.append((delta, t.num_examples))
        weights, state = strategy.aggregate(cfg, weights, updates, state)
        accuracy.append(round(evaluator(weights)[1], 4))
    return {**job, "accuracy": accuracy, "final": accuracy[-1]}


def labels(mixing: str) -> list[str]:
    """Strategy labels in the table: with --mixing nnm, median, trimmed mean and Bulyan run after NNM."""
    return [f"{s}+nnm" if mixing == "nnm" and s in MIXED else s for s in STRATEGIES]


def jobs(args: argparse.Namespace) -> list[dict]:
    n = args.num_clients
    base = {"rounds": args.rounds, "max_samples": args.max_samples, "eval_limit": args.eval_limit, "num_clients": n}
    out = [{**base, "name": "clean/fedavg", "strategy_config": {"strategy": "fedavg"}}]
    for name, label in list(zip(STRATEGIES, labels(args.mixing)))[1:]:
        out.append({**base, "name": f"clean/{label}", "strategy_config": robust(name, 1, n, args.mixing)})
    for share in (0.2, 0.3):
        k = int(round(share * n))
        for attack, scale in ATTACKS:
            for name, label in zip(STRATEGIES, labels(args.mixing)):
                if label == "bulyan+nnm" and k > (n - 3) // 4:
                    continue
                out.append({**base, "name": f"{int(share * 100)}%/{attack}/{label}", "attackers": k,
                            "attack": attack, "attack_scale": scale, "strategy_config": robust(name, k, n, args.mixing)})
    for name, extra in (("fedavg", {}), ("fedprox", {"proximal_mu": 0.01})):
        out.append({**base, "name": f"slow3/{name}", "slow": 3, "slowdown": 5.0,
                    "strategy_config": {"strategy": name, **extra}})
    return out


def robust(name: str, f: int, n: int, mixing: str = "none") -> dict:
    """Strategy config tolerating f attackers out of n; Bulyan tolerates at most (n-3)//4 (n >= 4f+3).
    With mixing 'nnm', median, trimmed mean and Bulyan first mix each update with its n - f nearest."""
    nnm = {"mixing": "nnm", "byzantine_f": f} if mixing == "nnm" and name in MIXED else {}
    if name in ("fedavg", "median"):
        return {"strategy": name, **nnm}
    if name == "trimmed_mean":
        return {"strategy": name, "trim_beta": max(0.1, f / n), **nnm}
    if name == "bulyan":
        return {"strategy": name, **nnm, "byzantine_f": min(f, (n - 3) // 4)}
    return {"strategy": name, "byzantine_f": f}


def plot(results: list[dict], path: Path, mixing: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["name"]: r["final"] for r in results}
    settings = [s for s in ["clean"] + [f"{s}%/{a}" for s in (20, 30) for a, _ in ATTACKS]
                if any(name.startswith(s + "/") for name in by_name)]  # settings left out with --only: no slot
    slow = [r for r in results if r["name"].startswith("slow3/")]
    fig, axes = plt.subplots(1, 2 if slow else 1, figsize=(15 if slow else 11, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1] if slow else [1]})
    ax = axes[0][0]
    width = 0.16
    for j, name in enumerate(labels(mixing)):
        vals = [100 * by_name.get(f"{s}/{name}", np.nan) for s in settings]
        if not np.isnan(vals).all():  # strategies left out with --only get no bar and no legend entry
            ax.bar(np.arange(len(settings)) + (j - 2) * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(settings)), settings, rotation=20)
    ax.set(ylabel="test accuracy after the last round (%)", title=f"Byzantine robustness, {results[0]['num_clients']} clients, Dirichlet(0.5)")
    ax.axhline(100 * by_name["clean/fedavg"], color="k", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    if slow:
        ax2 = axes[0][1]
        for r in slow:
            ax2.plot(range(1, len(r["accuracy"]) + 1), [100 * a for a in r["accuracy"]], label=r["name"])
        ax2.set(xlabel="round", ylabel="accuracy (%)", title="3 slow clients (1/5 of the work)")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--max-samples", type=int, default=1000, help="samples per client")
    p.add_argument("--eval-limit", type=int, default=2000, help="test samples per evaluation")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mixing", default="none", choices=["none", "nnm"],
                   help="nnm: median and trimmed mean mix each update with its n - f nearest first")
    p.add_argument("--only", default="", help="run only jobs whose name contains one of these (comma-separated)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    todo = [j for j in jobs(args) if any(part in j["name"] for part in args.only.split(","))]
    started = time.monotonic()
    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(run, todo):
            print(json.dumps({"name": r["name"], "final": r["final"], "accuracy": r["accuracy"]}), flush=True)
            results.append(r)
    by_name = {r["name"]: r["final"] for r in results}
    clean = by_name.get("clean/fedavg")
    table = {}
    for r in sorted(results, key=lambda r: r["name"]):
        table[r["name"]] = {"final": r["final"], "vs_clean_fedavg_points": None if clean is None else
                            round(100 * (r["final"] - clean), 2)}
    summary = {"benchmark": "robustness", "mixing": args.mixing, "num_clients": args.num_clients, "rounds": args.rounds,
               "max_samples_per_client": args.max_samples,
               "eval_limit": args.eval_limit, "wall_seconds": round(time.monotonic() - started, 1), "table": table}
    print(json.dumps(summary, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "runs": results}, indent=2))
        if clean is not None:
            plot(results, out.with_suffix(".png"), args.mixing)


if __name__ == "__main__":
    main()
