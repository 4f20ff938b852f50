"""Framework-overhead benchmark: 10 real client processes, McMahan CNN, 1 training batch per round.

Per round the server records its wall time, the slowest client's training time and its own
evaluation time; overhead = wall - training - evaluation (orchestration, model download, update
upload, signature and array verification, aggregation, checkpointing). The overhead is also split
along the round's timeline, the three parts adding up to it:
  to_last_update  round start -> last update verified, minus the slowest client's training
                  (dispatch, model download if not prefetched, encode + sign, upload, verification)
  closing         last update -> evaluation starts (aggregation)
  publishing      the rest after the server's evaluation (waiting for the commit if the disk is
                  slower than the evaluation, SQLite, events)
Encoding the model, the checkpoint's hash, write and fsync, the anomaly scores, the round's SQLite commit
and the new_model announcement run on the server's checkpoint thread while it evaluates (breakdown
"checkpoint": closing -> committed); clients fetch and evaluate the new model on new_model meanwhile, so
none of it is on the critical path after round 1. The clients are forked by one launcher (run_client.py
--local-clients 10). Also start-up: from launching the processes, and from POST /api/start with clients
connected, to the end of round 1; and first, side by side, start-up and the clients' memory (PSS) with
the ten clients forked by one launcher and started as ten separate processes, with the CPU seconds all
processes spent until then, and what start-up is made of besides meshfed's own work ("floor": importing
PyTorch, the server and a client in fresh interpreters; a client's partition and RSA key in CPU seconds;
PyTorch's import plus one steady round; "floor.cpu": the CPU seconds that start-up cannot do without,
divided by the cores, a lower bound on its wall time). Then, in the same
invocation, the floor (bench/transport_floor.py): the same per-update work with no framework around it,
and the ratio.
--compression none,fp16,int8 repeats all of it per update encoding (shared/compression.py), side by side;
--evaluation inline,background,process per place of the server's evaluation (app/evaluation.py): in the background, a
round's wall time ends at its commit and the next round trains while the model is evaluated, so the round period
(end to end) is compared with the clients' training ("period_over_training"). --max-batches, --batch-size and
--max-samples set the clients' work (the McMahan setting: E=1, B=10, 600 samples a client, the whole test set);
--pin puts the server on a core of its own and the clients on the rest (where both share the cores, evaluating
in the background takes CPU from the training it overlaps).

    python bench/round_overhead.py --compression none,fp16,int8 --out bench/results/round_overhead_compression.json
    python bench/round_overhead.py --skip-startup --evaluation inline,background --eval-limit 0 --max-batches 0 \
        --batch-size 10 --max-samples 600 --num-rounds 10 --out bench/results/round_overhead_evaluation.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.evaluator import Evaluator  # noqa: E402
from bench.transport_floor import measure as measure_floor  # noqa: E402
from client.trainer import DataConfig, LocalTrainer  # noqa: E402
from shared.cluster import Cluster  # noqa: E402
from shared import crypto  # noqa: E402
from shared.compression import COMPRESSIONS, check_scheme  # noqa: E402
from shared.models import get_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DATA = {"dataset": "fashion-mnist", "partition": "iid", "max_samples": 320}  # as start_clients asks


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(procs: list) -> float:
    """User + system CPU seconds used so far by these processes."""
    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs)


def client_processes(cluster: Cluster) -> list[psutil.Process]:
    """Every client process: what the cluster started (launchers) and what those forked."""
    started = [psutil.Process(p.pid) for p in cluster.clients.values()]
    return [proc for p in started for proc in (p, *p.children())]


def start_clients(cluster: Cluster, args: argparse.Namespace, forked: bool) -> None:
    flags = ["--dataset", CLIENT_DATA["dataset"], "--partition", CLIENT_DATA["partition"],
             "--max-samples", str(args.max_samples), "--num-clients", str(args.num_clients)]
    if forked:
        cluster.start_clients("c", args.num_clients, *flags, "--client-index", "0")
    else:
        for i in range(args.num_clients):
            cluster.start_client(f"c-{i}", *flags, "--client-index", str(i))


def measure_startup(args: argparse.Namespace, forked: bool) -> dict[str, float]:
    """Launch to the end of round 1, and the clients' memory then (PSS: shared pages counted once)."""
    with Cluster(tempfile.mkdtemp(prefix="meshfed-startup-")) as cluster:
        launched = time.monotonic()
        cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", "1", "--min-clients", str(args.num_clients),
                             "--max-batches", "1", "--eval-limit", str(args.eval_limit),
                             "--torch-threads", str(args.server_threads), "--start")
        start_clients(cluster, args, forked)
        cluster.wait_until(lambda: cluster.rounds(), 300, "round 1", every=0.05)
        startup = time.monotonic() - launched
        procs = client_processes(cluster)
        cpu = cpu_seconds([cluster.server, *procs])
        pss = sum(p.memory_full_info().pss for p in procs)
        return {"startup_from_launch_s": round(startup, 2), "client_processes": len(procs),
                "clients_pss_mb": round(pss / 2**20), "cpu_s": round(cpu, 2),
                "cores_busy": round(cpu / (psutil.cpu_count() * startup), 2)}


def import_cost(module: str, trials: int = 3) -> tuple[float, float]:
    """(fastest wall seconds, fewest CPU seconds) of `trials` fresh interpreters starting and importing
    `module` (files already in the page cache)."""
    code = f"import resource, {module}; r = resource.getrusage(resource.RUSAGE_SELF); print(r.ru_utime + r.ru_stime)"
    walls, cpus = [], []
    for _ in range(trials):
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        walls.append(time.monotonic() - t)
        cpus.append(float(out))
    return round(min(walls), 3), round(min(cpus), 3)


def cpu_median(fn, trials: int) -> float:
    times = []
    for _ in range(trials):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return round(statistics.median(times), 3)


def measure_startup_floor(args: argparse.Namespace) -> dict[str, float]:
    """What start-up from launch is made of besides meshfed's own work: a client imports PyTorch before
    it can train; the launcher decodes the training split (a client's partition, decoding it alone), and
    each client makes its RSA key (CPU seconds that the machine's cores share)."""
    data = DataConfig(num_clients=args.num_clients, **CLIENT_DATA)
    imports = {name: import_cost(module) for name, module in
               (("torch", "torch"), ("server", "app.server"), ("client", "run_client"))}
    floor = {**{f"import_{name}_s": wall for name, (wall, _) in imports.items()},
             "partition_cpu_s": cpu_median(lambda: LocalTrainer(data), 3),
             "rsa_key_cpu_s": cpu_median(crypto.generate_key, 10), "cores": psutil.cpu_count()}
    floor["keys_cpu_s"] = round(args.num_clients * floor["rsa_key_cpu_s"], 2)
    floor["cpu"] = startup_cpu_floor(args, floor, {f"import_{name}_cpu_s": cpu for name, (_, cpu) in imports.items()})
    return floor


def startup_cpu_floor(args: argparse.Namespace, floor: dict[str, float],
                      imports_cpu: dict[str, float]) -> dict[str, float]:
    """The CPU seconds that launch -> end of round 1 cannot do without, each part at its cheapest (one
    thread, warm): the server's process and the clients' launcher each import what they run, the split is
    decoded once, each client makes its key and trains one batch, the server evaluates once. On the
    machine's cores, perfectly packed, that is a lower bound on start-up's wall time for any system doing
    this work in a server process and client processes, before a byte is sent; torch_only_floor_s is the
    same if those two processes imported nothing but PyTorch (no Flask, Socket.IO, cryptography...)."""
    trainer = LocalTrainer(DataConfig(num_clients=args.num_clients, **CLIENT_DATA))
    weights = get_weights(trainer.model)
    evaluator = Evaluator(CLIENT_DATA["dataset"], "cnn", limit=args.eval_limit)
    cpu = dict(imports_cpu)  # import_{torch,server,client}_cpu_s
    threads = torch.get_num_threads()  # the transport floor's server, in this process, keeps the default
    torch.set_num_threads(1)
    try:
        cpu["train_batch_cpu_s"] = cpu_median(lambda: trainer.fit(weights, 1, 0.05, 32, 1), 5)
        cpu["evaluation_cpu_s"] = cpu_median(lambda: evaluator(weights), 3)
    finally:
        torch.set_num_threads(threads)
    work = (floor["partition_cpu_s"] + floor["keys_cpu_s"] + args.num_clients * cpu["train_batch_cpu_s"]
            + cpu["evaluation_cpu_s"])
    total = cpu["import_server_cpu_s"] + cpu["import_client_cpu_s"] + work
    torch_only = 2 * cpu["import_torch_cpu_s"] + work  # as if both processes imported nothing but PyTorch
    return {**cpu, "total_cpu_s": round(total, 2), "floor_s": round(total / floor["cores"], 2),
            "torch_only_total_cpu_s": round(torch_only, 2), "torch_only_floor_s": round(torch_only / floor["cores"], 2)}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "p90": round(pct(values, 0.9), 4),
            "max": round(max(values), 4)}


def pin(cluster: Cluster) -> None:
    """--pin: the server process (and its evaluation process, evaluation 'process') on the last core, every client
    process (launchers and what they forked, which inherit it) on the other cores."""
    cores = sorted(psutil.Process().cpu_affinity())
    server = psutil.Process(cluster.server.pid)
    for proc in [server, *server.children(recursive=True)]:
        proc.cpu_affinity(cores[-1:])
    for proc in client_processes(cluster):
        proc.cpu_affinity(cores[:-1])


def measure(args: argparse.Namespace, compression: str, evaluation: str = "inline") -> dict:
    """One cluster run (and its floor) with clients encoding updates as `compression` says."""
    with Cluster(tempfile.mkdtemp(prefix="meshfed-overhead-")) as cluster:
        launched = time.monotonic()
        cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", str(args.num_rounds),
                             "--min-clients", str(args.num_clients), "--max-batches", str(args.max_batches),
                             "--batch-size", str(args.batch_size), "--quorum", "1", "--evaluation", evaluation,
                             "--eval-every", str(args.eval_every),
                             "--eval-limit", str(args.eval_limit), "--compression", compression,
                             "--download-compression", args.download_compression,
                             "--torch-threads", str(args.server_threads), "--start")
        start_clients(cluster, args, forked=args.launch == "forked")
        if args.pin:  # the server on the last core, the clients on the others: a server with a CPU of its own
            pin(cluster)
        cluster.wait_until(lambda: cluster.rounds(), 300, "round 1", every=0.05)
        cold_start = time.monotonic() - launched
        if args.pin:
            pin(cluster)  # clients forked since
        procs = [cluster.server, *client_processes(cluster)]
        cpu_before, first = cpu_seconds(procs), len(cluster.rounds())
        cluster.wait_until(lambda: cluster.status()["state"] == "finished", 600, "all rounds", every=0.2)
        # CPU of the server and every client process per round after the first (imports, start-up excluded)
        cpu_per_round = round((cpu_seconds(procs) - cpu_before) / max(1, args.num_rounds - first), 3)
        rounds = cluster.rounds()

        # Warm start: a second run on the same, already connected clients.
        started = time.monotonic()
        cluster.api("POST", "/api/start", admin=True, json={"new_run": True}).raise_for_status()
        cluster.wait_until(lambda: cluster.rounds(), 120, "round 1 of the second run", every=0.02)
        warm_start = time.monotonic() - started
    wall = [r["seconds"] for r in rounds]
    train = [r["train_seconds"] for r in rounds]
    evals = [r["eval_seconds"] or 0.0 for r in rounds]  # none in a round not evaluated (--eval-every)
    inline = [e if evaluation == "inline" else 0.0 for e in evals]  # in the background: not in the round's wall
    overhead = [w - t - e for w, t, e in zip(wall, train, inline)]
    timing = {k: summary([r["timings"][k] for r in rounds]) for k in rounds[0]["timings"] if k != "upload_bytes"}
    # after the last update arrived: aggregation, then publishing (evaluation excluded)
    arrived = [r["timings"]["last_update_arrived"] for r in rounds]
    closed = [r["timings"]["closed"] for r in rounds]
    parts = {"to_last_update": summary([a - t for a, t in zip(arrived, train)]),
             "closing": summary([c - a for c, a in zip(closed, arrived)]),
             "publishing": summary([w - c - e for w, c, e in zip(wall, closed, inline)])}
    timing["checkpoint"] = summary([r["timings"]["committed"] - r["timings"]["closed"] for r in rounds])
    # end-to-end: time between consecutive round ends (includes checkpointing and the next dispatch)
    periods = [b["ended"] - a["ended"] for a, b in zip(rounds, rounds[1:])]
    period_overhead = [p - b["train_seconds"] - e for p, b, e in zip(periods, rounds[1:], inline[1:])]
    floor = measure_floor(args.num_clients, trials=args.num_rounds, compression=compression)
    return {"compression": compression, "evaluation": evaluation, "rounds": len(rounds),
            "upload_mb_per_update": round(statistics.median(r["timings"]["upload_bytes"] / r["num_clients"]
                                                            for r in rounds) / 1e6, 3),
            "round_wall_s": summary(wall), "client_training_s": summary(train),
            "server_evaluation_s": summary(evals), "overhead_s": summary(overhead), "overhead_parts_s": parts,
            "round_period_s": summary(periods), "overhead_per_period_s": summary(period_overhead),
            "period_over_training": round(statistics.median(periods) / statistics.median(train[1:]), 3),
            "breakdown_s": timing, **floor,
            "overhead_over_floor": round(statistics.median(overhead) / floor["floor_s"]["median"], 2),
            "cpu_core_seconds_per_round": cpu_per_round,
            "startup_from_launch_s": round(cold_start, 2),
            "startup_from_start_clients_connected_s": round(warm_start, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--num-rounds", type=int, default=20)
    p.add_argument("--eval-limit", type=int, default=1000, help="server test samples evaluated per round")
    p.add_argument("--eval-every", type=int, default=1, help="the server evaluates every K rounds (and the last)")
    p.add_argument("--compression", default="none",
                   help=f"comma-separated, run one after the other and compared: {','.join(COMPRESSIONS)}")
    p.add_argument("--evaluation", default="inline",
                   help="comma-separated: inline,background,process, compared side by side")
    p.add_argument("--download-compression", default="none", choices=["none", "int8"],
                   help="the server's --download-compression in every run (int8: delta-coded downloads)")
    p.add_argument("--pin", action="store_true", help="the server on the last core, the clients on the others (as a "
                                                      "server with its own CPU; use --server-threads 1)")
    p.add_argument("--max-batches", type=int, default=1, help="each client's batches per round (0 = its whole data)")
    p.add_argument("--batch-size", type=int, default=32, help="B")
    p.add_argument("--max-samples", type=int, default=CLIENT_DATA["max_samples"], help="samples per client")
    p.add_argument("--launch", default="forked", choices=["forked", "separate"],
                   help="clients of the per-encoding runs: forked by one launcher, or ten separate processes")
    p.add_argument("--server-threads", type=int, default=0,
                   help="the server's --torch-threads (0, its default: one per core)")
    p.add_argument("--skip-startup", action="store_true", help="leave out the forked/separate start-up comparison")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    schemes = args.compression.split(",")
    for scheme in schemes:
        check_scheme(scheme)
    startup = {}
    if not args.skip_startup:
        startup = {"forked": measure_startup(args, forked=True), "separate": measure_startup(args, forked=False)}
        for key in ("startup_from_launch_s", "clients_pss_mb"):
            startup[f"{key}_forked_over_separate"] = round(startup["forked"][key] / startup["separate"][key], 2)
        startup["floor"] = measure_startup_floor(args)
    evaluations = args.evaluation.split(",")
    runs = {scheme if len(evaluations) == 1 else f"{scheme}, evaluation {where}": measure(args, scheme, where)
            for scheme in schemes for where in evaluations}
    if startup:  # importing PyTorch, then one steady round: no launch of PyTorch clients ends round 1 sooner
        floor = startup["floor"]
        floor["torch_then_one_round_s"] = round(floor["import_torch_s"] + min(
            r["round_wall_s"]["median"] for r in runs.values()), 2)
        floor["with_data_and_keys_s"] = round(floor["torch_then_one_round_s"] + floor["partition_cpu_s"]
                                              + floor["keys_cpu_s"] / floor["cores"], 2)
    first = next(iter(runs))
    base = runs[first]["overhead_s"]["median"]
    result = {"benchmark": "round_overhead", "num_clients": args.num_clients, "launch": args.launch,
              "download_compression": args.download_compression,
              "server_threads": args.server_threads, "pinned": args.pin,
              "startup": startup, "runs": runs,
              "overhead_median_s": {s: r["overhead_s"]["median"] for s, r in runs.items()},
              f"overhead_vs_{first}": {s: round(r["overhead_s"]["median"] / base, 2) for s, r in runs.items()},
              "period_over_training": {s: r["period_over_training"] for s, r in runs.items()},
              "targets": {"overhead_median_s": 0.1, "startup_s": 3.0},
              "peer_flower_1_42": {"simulation_overhead_s": 0.24, "deployment_round_s": 42,
                                   "startup_s": [13, 72]}}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
