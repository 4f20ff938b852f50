"""An empirical audit of meshfed's privacy: membership inference against the final global model.

Setting (chosen so that a non-private model overfits and an attack has something to find): Fashion-MNIST, 5
clients with 250 training examples each (IID, nothing held out), 5 local epochs a round, 10 rounds, the McMahan
CNN; real server and client processes. The target is client c0: its 250 training examples are the members;
10,000 test-split examples nobody trained on are the non-members.

Two attacks: the loss threshold (Yeom et al. 2018: a lower loss means a member), and difficulty calibration
(Watson et al. 2022: the target model's loss minus a reference model's, the reference trained the same way by
the other four clients alone, so an example that is easy for any model stops looking like a member). For each:
ROC AUC, TPR at 1% and 0.1% FPR, and the lower bound on epsilon the attack proves, ln((TPR - delta) / FPR) at
the best threshold with 95% Clopper-Pearson bounds (TPR's lower, FPR's upper). Each budget's DP-SGD run
(noise multiplier calibrated so c0 stays within it) must give a bound below the accountant's epsilon: a bound
above it would mean a bug, and the audit says so. What the bound is: a heuristic one. Members and non-members
are fixed sets, not examples each included by a coin flip, so it is not the rigorous one-run audit of Steinke et
al. (2023); the members' own distribution (train split) and the non-members' (test split) also differ slightly.
It can catch a gross bug (noise not added, a clip not applied), not prove a guarantee tight. The report of
each run is also posted to its server (POST /api/privacy/audit), whose dashboard shows it.

    python bench/privacy_audit.py --out bench/results/privacy_audit.json    # about 20 minutes here
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.cluster import Cluster  # noqa: E402
from shared.datasets import load_split, to_tensors  # noqa: E402
from shared.models import build_model, set_weights  # noqa: E402
from shared.partition import partition, train_holdout  # noqa: E402
from shared.privacy import Accountant  # noqa: E402
from shared.protocol import decode_weights  # noqa: E402

DELTA = 1e-5
CLIENTS, EXAMPLES, EPOCHS, ROUNDS, BATCH = 5, 250, 5, 10, 50


def members() -> np.ndarray:
    """Client c0's training examples (its partition, as run_client.py cuts it)."""
    labels = load_split("fashion-mnist", train=True).labels
    mine = partition(labels, "iid", CLIENTS, 0.5, 0)[0]
    mine = np.random.default_rng(0).permutation(mine)[:EXAMPLES]
    return train_holdout(mine, seed=0, fraction=0.0)[0]


def calibrate(target: float) -> float:
    """The noise multiplier that keeps c0 within `target` after all its DP-SGD steps."""
    batches = -(-EXAMPLES // BATCH)
    spent = lambda sigma: Accountant("rdp", [[sigma, 1 / batches, batches * EPOCHS * ROUNDS]]).epsilon(DELTA)  # noqa
    lo, hi = 0.3, 100.0
    while hi / lo > 1.01:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if spent(mid) <= target else (mid, hi)
    return hi


def train_federation(clients: range, dp: list[str], label: str) -> tuple[dict[str, np.ndarray], Cluster, Any]:
    """A real federation of `clients`; returns the final global weights and the still running cluster."""
    cluster = Cluster(tempfile.mkdtemp(prefix=f"meshfed-audit-{label}-"))
    cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", str(ROUNDS), "--min-clients", str(len(clients)),
                         "--local-epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "0.05", "--eval-limit",
                         "2000", "--round-timeout", "3600", "--delta", str(DELTA), *dp, "--start")
    for i in clients:
        cluster.start_client(f"c{i}", "--dataset", "fashion-mnist", "--partition", "iid", "--num-clients",
                             str(CLIENTS), "--client-index", str(i), "--max-samples", str(EXAMPLES), "--holdout", "0")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 7200, f"{label}: {ROUNDS} rounds", every=2.0)
    weights = decode_weights(cluster.api("GET", "/api/model/latest").content)
    return weights, cluster, cluster.rounds()


def losses(weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model = build_model("cnn", (1, 28, 28))
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        return torch.cat([torch.nn.functional.cross_entropy(model(x[i:i + 1000]), y[i:i + 1000], reduction="none")
                          for i in range(0, len(x), 1000)]).numpy()


def attack(member_scores: np.ndarray, other_scores: np.ndarray) -> dict[str, float]:
    """An attack whose score is higher for members: AUC, TPR at low FPR, and the epsilon lower bound."""
    scores = np.concatenate([member_scores, other_scores])
    ranks = scores.argsort().argsort() + 1.0
    n, m = len(member_scores), len(other_scores)
    auc = (ranks[:n].sum() - n * (n + 1) / 2) / (n * m)  # Mann-Whitney U
    thresholds = np.unique(scores)
    tp = np.array([(member_scores >= t).sum() for t in thresholds])
    fp = np.array([(other_scores >= t).sum() for t in thresholds])
    tpr, fpr = tp / n, fp / m

    def tpr_at(rate: float) -> float:
        ok = fpr <= rate
        return float(tpr[ok].max()) if ok.any() else 0.0
    tpr_lo = np.where(tp > 0, beta.ppf(0.025, tp, n - tp + 1), 0.0)          # 95% Clopper-Pearson
    fpr_hi = np.where(fp < m, beta.ppf(0.975, fp + 1, m - fp), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.log(np.maximum(tpr_lo - DELTA, 1e-300) / fpr_hi)
        point = np.log(np.maximum(tpr - DELTA, 1e-300) / np.maximum(fpr, 1 / m))
    return {"auc": float(auc), "tpr_at_1pct_fpr": tpr_at(0.01), "tpr_at_0_1pct_fpr": tpr_at(0.001),
            "epsilon_lower_bound": float(max(0.0, bound.max())), "epsilon_point": float(max(0.0, point.max()))}


def audit(label: str, dp: list[str], target: float | None, data: dict[str, Any]) -> dict[str, Any]:
    weights, cluster, rounds = train_federation(range(CLIENTS), dp, label)
    try:
        reference, ref_cluster, _ = train_federation(range(1, CLIENTS), dp, label + "-reference")
        ref_cluster.stop_all()
        x_in, y_in, x_out, y_out = data["members"] + data["others"]
        target_in, target_out = losses(weights, x_in, y_in), losses(weights, x_out, y_out)
        ref_in, ref_out = losses(reference, x_in, y_in), losses(reference, x_out, y_out)
        privacy = cluster.api("GET", "/api/privacy").json()
        epsilon = privacy["latest"]["clients"].get("c0") if target is not None else None
        attacks = {"loss_threshold": attack(-target_in, -target_out),
                   "calibrated": attack(ref_in - target_in, ref_out - target_out)}
        bound = max(a["epsilon_lower_bound"] for a in attacks.values())
        report = {"run_id": cluster.status()["run_id"], "label": label, "target_epsilon": target,
                  "epsilon": epsilon, "delta": DELTA, "accuracy": rounds[-1]["accuracy"],
                  "member_loss_gap": float(np.mean(target_in) - np.mean(target_out)), "attacks": attacks,
                  "consistent": epsilon is None or bound <= epsilon,
                  "setting": {"clients": CLIENTS, "examples": EXAMPLES, "epochs": EPOCHS, "rounds": ROUNDS,
                              "members": len(y_in), "non_members": len(y_out)}}
        cluster.api("POST", "/api/privacy/audit", admin=True, json=report).raise_for_status()
    finally:
        cluster.stop_all()
    print(json.dumps({k: v for k, v in report.items() if k != "setting"}), flush=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="8,3,1", help="DP-SGD budgets to audit besides the non-private run")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    started = time.monotonic()
    train, test = load_split("fashion-mnist", train=True), load_split("fashion-mnist", train=False)
    data = {"members": list(to_tensors(train, members())), "others": list(to_tensors(test))}
    reports = [audit("non-private", [], None, data)]
    for target in [float(b) for b in args.budgets.split(",") if b]:
        sigma = calibrate(target)
        reports.append(audit(f"dp-sgd-eps{target:g}", ["--dp", "sample", "--target-epsilon", str(target),
                                                       "--noise-multiplier", f"{sigma:.4f}", "--max-grad-norm",
                                                       "1.0"], target, data))
    summary = {"benchmark": "privacy_audit", "delta": DELTA, "all_consistent": all(r["consistent"] for r in reports),
               "wall_seconds": round(time.monotonic() - started, 1), "reports": reports}
    print(json.dumps({k: v for k, v in summary.items() if k != "reports"}), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        plot(reports, out.with_suffix(".png"))


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    private = sorted((r for r in reports if r["target_epsilon"]), key=lambda r: r["target_epsilon"])
    plain = next(r for r in reports if r["target_epsilon"] is None)
    xs = [r["target_epsilon"] for r in private]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [100 * r["accuracy"] for r in private], marker="o", label="DP-SGD")
    ax1.axhline(100 * plain["accuracy"], color="gray", linestyle="--", label="non-private")
    ax1.set(xscale="log", xlabel="epsilon (budget)", ylabel="test accuracy (%)", title="accuracy vs epsilon")
    for name in ("loss_threshold", "calibrated"):
        line, = ax2.plot(xs, [r["attacks"][name]["auc"] for r in private], marker="o", label=name)
        ax2.axhline(plain["attacks"][name]["auc"], color=line.get_color(), linestyle="--", alpha=0.5,
                    label=f"{name}, non-private")
    ax2.axhline(0.5, color="black", linewidth=0.8)
    ax2.set(xscale="log", xlabel="epsilon (budget)", ylabel="attack ROC AUC", title="membership inference")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
