"""One-shot demo: a server and N clients as separate processes on 127.0.0.1, one line per round,
then a report (report.json + accuracy/loss PNG). Every process it starts is stopped, also on Ctrl-C.

    python run_demo.py --dataset fashion-mnist --num-clients 3 --num-rounds 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from app.evaluation import MODES as EVALUATION_MODES
from shared.cluster import Cluster, free_port

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")  # the built-in ones (plug-ins: run_server.py)
PROGRESS_SECONDS = 5.0  # at most one progress line this often while a round runs


def plot(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy and loss per round, side by side, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in rounds if r["accuracy"] is not None]  # --eval-every skips rounds
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [100 * r["accuracy"] for r in rounds], marker="o")
    ax1.set(xlabel="round", ylabel="test accuracy (%)", title="global model accuracy")
    ax2.plot(xs, [r["loss"] for r in rounds], marker="o", color="tab:red")
    ax2.set(xlabel="round", ylabel="test loss", title="global model loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="dataset root (default $MESHFED_DATA_DIR or ./data)")
    p.add_argument("--num-clients", type=int, default=3)
    p.add_argument("--num-rounds", type=int, default=5)
    p.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"],
                   help="cnn: McMahan et al.'s CNN (a CIFAR CNN for 32x32 colour); mlp: their 2NN")
    p.add_argument("--local-epochs", type=int, default=1, help="E, each client's passes over its data per round")
    p.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.0, help="client SGD momentum")
    p.add_argument("--batch-size", type=int, default=32, help="B, each client's minibatch")
    p.add_argument("--fraction-fit", type=float, default=1.0,
                   help="C, the share of connected clients asked each round (at least one)")
    p.add_argument("--min-available", type=int, default=0,
                   help="a round starts only when this many clients are connected (0 = every demo client)")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, the initial model and the selection")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of each client's samples kept for its local evaluation (0 for a paper's setting)")
    p.add_argument("--max-samples", type=int, default=0, help="samples per client (0 = whole partition)")
    p.add_argument("--eval-limit", type=int, default=0, help="server test samples (0 = whole test split)")
    p.add_argument("--eval-every", type=int, default=1, help="the server evaluates every K rounds and the last")
    p.add_argument("--evaluation", default="inline", choices=EVALUATION_MODES,
                   help="background: the server evaluates each model while the next round trains; process: the "
                        "same, in a child process")
    p.add_argument("--port", type=int, default=5000, help="server port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--report-dir", default="demo-report")
    p.add_argument("--work-dir", default=None, help="state, keys and logs (default: a fresh temp dir)")
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy (see run_server.py --help)")
    p.add_argument("--byzantine-f", type=int, default=0, help="attackers the strategy tolerates (Krum, Bulyan)")
    p.add_argument("--malicious", type=int, default=0, help="make the last K clients attackers")
    p.add_argument("--attack", default="sign_flip", help="their attack: sign_flip scale gaussian label_flip")
    p.add_argument("--dp", default="none", choices=["none", "sample", "client", "local"],
                   help="differential privacy: DP-SGD on the clients, DP-FedAvg on the server, or local noise")
    p.add_argument("--target-epsilon", type=float, default=0.0, help="the privacy budget (0 = none)")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="DP's sigma (sample, client)")
    p.add_argument("--secure-aggregation", default="none", choices=["none", "secagg+"],
                   help="secagg+: the server learns only the sum of each round's updates")
    p.add_argument("--keep-open", action="store_true", help="keep the server up after the last round")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp work dir (logs, state) after a good run")
    args = p.parse_args(argv)
    rules = {"--num-clients": (args.num_clients >= 1, "at least 1"), "--num-rounds": (args.num_rounds >= 1,
             "at least 1"), "--local-epochs": (args.local_epochs >= 1, "at least 1"),
             "--batch-size": (args.batch_size >= 1, "at least 1"), "--lr": (args.lr > 0, "above 0"),
             "--alpha": (args.alpha > 0, "above 0"), "--max-samples": (args.max_samples >= 0, "0 or more"),
             "--eval-limit": (args.eval_limit >= 0, "0 or more"), "--eval-every": (args.eval_every >= 1,
             "at least 1"), "--round-timeout": (args.round_timeout >= 1,
             "at least 1 (seconds)"), "--port": (0 <= args.port <= 65535, "from 0 to 65535"),
             "--target-epsilon": (args.target_epsilon >= 0, "0 (no budget) or more"),
             "--noise-multiplier": (args.noise_multiplier > 0, "above 0"),
             "--momentum": (0 <= args.momentum < 1, "from 0 to below 1"),
             "--fraction-fit": (0 < args.fraction_fit <= 1, "above 0 and at most 1"),
             "--min-available": (0 <= args.min_available <= args.num_clients,
                                 f"from 0 to --num-clients ({args.num_clients})"),
             "--holdout": (0 <= args.holdout < 1, "from 0 to below 1"),
             "--malicious": (0 <= args.malicious <= args.num_clients, f"from 0 to --num-clients ({args.num_clients})")}
    for flag, (ok, what) in rules.items():
        if not ok:
            p.error(f"{flag} must be {what}")
    return args


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pick_port(wanted: int) -> int:
    """`wanted` if it is free on 127.0.0.1, else any free port (said so): another meshfed, or anything else,
    may hold it, and the demo must not drive someone else's server."""
    if wanted == 0:
        return free_port()
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            port = free_port()
            print(f"port {wanted} is taken (another meshfed, or another program); using {port}", flush=True)
            return port


def server_reason(workdir: Path) -> str:
    """The last error the server logged (its one-line reason), or where to look."""
    log = workdir / "server.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    errors = [line for line in lines if line.startswith("error") or " ERROR " in line or "Error:" in line]
    return (errors or lines or [f"no log in {log}"])[-1].strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.work_dir or tempfile.mkdtemp(prefix="meshfed-demo-"))
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # run the cleanup below on SIGTERM too
    def fail(why: str) -> int:  # one line, no traceback
        print(f"error: {' '.join(why.split())} (logs in {workdir})", file=sys.stderr)
        return 1

    try:
        code = demo(args, workdir, report_dir)
    except RuntimeError as exc:  # a process exited
        return fail(f"{exc.args[0].split(';')[0]}: {server_reason(workdir)}")
    except TimeoutError as exc:
        return fail(str(exc))
    except requests.HTTPError as exc:
        reply = exc.response.json() if exc.response.headers.get("Content-Type", "").startswith("application/json") \
            else {}
        return fail(f"the server refused to start the run: {reply.get('message', exc)}")
    if code == 0 and not args.work_dir and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)  # a temp dir of logs and checkpoints nobody asked to keep
        print(f"removed {workdir} (--keep-logs keeps the logs)", flush=True)
    elif code == 0:
        print(f"logs and state: {workdir}", flush=True)
    return code


def wait_for_round(cluster: Cluster, round_no: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rounds from `round_no` on once there are any; meanwhile a line of progress, when it changes (at most
    every PROGRESS_SECONDS): clients coming online, then their batches done this round."""
    deadline, said, last = time.monotonic() + args.round_timeout * 2, "", 0.0
    seen: dict[str, dict[str, int]] = {}  # each client's latest progress this round
    while time.monotonic() < deadline:
        try:
            rows = [r for r in cluster.rounds() if r["round"] >= round_no]
            if rows:
                return rows
            line = progress_line(cluster, round_no, args.num_clients, seen)
        except requests.RequestException:
            line = said  # the server is busy or restarting: say nothing new
        if cluster.server is not None and cluster.server.poll() is not None:
            raise RuntimeError(f"server exited with {cluster.server.returncode}")
        if line != said and time.monotonic() - last >= PROGRESS_SECONDS:
            print(line, flush=True)
            said, last = line, time.monotonic()
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {args.round_timeout * 2:.0f}s waiting for round {round_no}")


def round_line(r: dict[str, Any], num_rounds: int) -> str:
    """One round's line; a partial round says who did not deliver and why (e.g. a missed deadline)."""
    why = "".join(f", {cid} {reason}" for cid, reason in r.get("why_dropped", {}).items())
    quality = f"accuracy {100 * r['accuracy']:6.2f}%  loss {r['loss']:.4f}" if r["accuracy"] is not None \
        else "(not evaluated this round)"
    return (f"round {r['round']:>3}/{num_rounds}  {quality}  "
            f"{r['seconds']:6.2f}s  clients {r['num_clients']}/{r['num_selected']}{':' + why[1:] if why else ''}")


def progress_line(cluster: Cluster, round_no: int, num_clients: int, seen: dict[str, dict[str, int]]) -> str:
    """The round's state and clients online, or how many clients train and the share of the round's batches
    done (a client that stopped reporting has finished its batches)."""
    status = cluster.status()
    training = {c["id"]: c["progress"] for c in cluster.api("GET", "/api/clients").json()["clients"]
                if c.get("progress") and c["progress"]["round"] == round_no}
    for cid in seen.keys() - training.keys():
        seen[cid] = {**seen[cid], "done": seen[cid]["total"]}
    seen.update(training)
    if not seen:
        return f"  round {round_no}: {status['state']}, clients online {status['clients_online']}/{num_clients}"
    done, total = sum(p["done"] for p in seen.values()), sum(p["total"] for p in seen.values())
    return (f"  round {round_no}: {len(training)} of {len(seen)} client{'s' * (len(seen) != 1)} training, "
            f"{100 * done / total:.0f}% of the round's batches done")


def demo(args: argparse.Namespace, workdir: Path, report_dir: Path) -> int:
    # the processes run in the work dir: a relative default would point into it, not where the demo was started
    data_dir = str(Path(args.data_dir or os.environ.get("MESHFED_DATA_DIR") or "data").resolve())
    with Cluster(workdir, port=pick_port(args.port)) as cluster:
        cluster.start_server("--dataset", args.dataset, "--model", args.model, "--num-rounds", str(args.num_rounds),
                             "--min-available", str(args.min_available or args.num_clients),
                             "--min-clients", str(max(1, math.ceil(args.fraction_fit * args.num_clients))),
                             "--fraction-fit", str(args.fraction_fit), "--seed", str(args.seed),
                             "--local-epochs", str(args.local_epochs), "--momentum", str(args.momentum),
                             "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                             "--eval-limit", str(args.eval_limit), "--eval-every", str(args.eval_every),
                             "--evaluation", args.evaluation, "--round-timeout", str(args.round_timeout),
                             "--strategy", args.strategy, "--byzantine-f", str(args.byzantine_f), "--dp", args.dp,
                             "--target-epsilon", str(args.target_epsilon), "--noise-multiplier",
                             str(args.noise_multiplier), "--secure-aggregation", args.secure_aggregation,
                             "--data-dir", data_dir)
        # One launcher forks the clients after a single import of torch (run_client.py --local-clients):
        # client-0..; the last --malicious ones are a second launcher's, attacker-0..
        honest = args.num_clients - args.malicious
        for prefix, first, count, attack in (("client", 0, honest, []),
                                             ("attacker", honest, args.malicious, ["--attack", args.attack])):
            if count:
                cluster.start_clients(prefix, count, "--dataset", args.dataset, "--model", args.model,
                                      "--partition", args.partition, "--seed", str(args.seed),
                                      "--holdout", str(args.holdout),
                                      "--alpha", str(args.alpha), "--num-clients", str(args.num_clients),
                                      "--client-index", str(first), "--max-samples", str(args.max_samples), *attack,
                                      "--data-dir", data_dir)
        cluster.wait_ready()
        print(f"dashboard: {cluster.url}/   (admin token {cluster.admin_token}; logs in {workdir})", flush=True)
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        started = now_iso()
        printed: list[dict[str, Any]] = []
        try:
            while len(printed) < args.num_rounds:
                rows = wait_for_round(cluster, len(printed) + 1, args)
                for r in rows:
                    print(round_line(r, args.num_rounds), flush=True)
                printed.extend(rows)
                if cluster.status()["state"] == "finished":
                    break
        except KeyboardInterrupt:
            print("interrupted; stopping every process", flush=True)
            return 130
        status = cluster.status()
        clients = cluster.api("GET", "/api/clients").json()["clients"]
        report = {"run_id": status["run_id"], "started": started, "finished": now_iso(),
                  "dataset": args.dataset, "num_clients": args.num_clients, "partition": args.partition,
                  "alpha": args.alpha, "holdout": args.holdout, "settings": status["config"],
                  "train_examples": {c["id"]: c["num_examples"] for c in clients},
                  "rounds": [{"round": r["round"], "accuracy": r["accuracy"],
                              "loss": None if r["loss"] is None else round(r["loss"], 6),
                              "num_clients": r["num_clients"], "num_selected": r["num_selected"],
                              "seconds": round(r["seconds"], 3)} for r in printed]}
        path = report_dir / "report.json"
        if path.exists():
            print(f"replacing the previous report in {report_dir} (--report-dir keeps reports apart)", flush=True)
        path.write_text(json.dumps(report, indent=2))
        plot(printed, report_dir / "accuracy_loss.png",
             f"meshfed: {args.dataset}, {args.num_clients} clients, {args.partition}")
        print(f"report: {report_dir / 'report.json'}, plot: {report_dir / 'accuracy_loss.png'}", flush=True)
        if args.keep_open:
            print(f"server stays up at {cluster.url}/ ; Ctrl-C to stop", flush=True)
            try:
                cluster.server.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
