"""The floor under bench/round_overhead.py: the same per-update work with no framework around it.

N client processes, released together, each train one batch with the client's own code
(LocalTrainer.fit), then compress, encode, hash and sign the delta (the client's `signed_update`) and POST
it; a bare threaded werkzeug server (no Flask, no Socket.IO, no round loop, no SQLite) reads each body and runs
the real server's checks (unpack, signature, sha256, names/shapes/dtypes/finite); when all N are in,
it averages them (FedAvg). floor = time to the last verified update - slowest training + FedAvg:
what moving and checking N updates (full precision, or --compression fp16|int8) costs on this machine,
whatever the framework.

    python bench/transport_floor.py --trials 20 [--compression int8]   # or from round_overhead.py
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
import torch
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.verify import check_arrays, check_signature  # noqa: E402
from client.node import signed_update  # noqa: E402
from client.trainer import DataConfig, LocalTrainer  # noqa: E402
from shared import crypto  # noqa: E402
from shared.aggregate import weighted_average  # noqa: E402
from shared.compression import COMPRESSIONS  # noqa: E402
from shared.models import build_model, get_weights  # noqa: E402
from shared.protocol import TrainRequest, pack_update, unpack_update  # noqa: E402

MAX_BYTES = 64 * 1024 * 1024


def _client(index: int, num_clients: int, url: str, barrier, results, keys, compression: str) -> None:  # noqa: ANN001
    """One client process: train one batch, sign and POST the delta, once per trial."""
    torch.set_num_threads(1)
    trainer = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=num_clients,
                                      client_index=index, max_samples=320), "cnn")
    weights = get_weights(trainer.model)
    key = crypto.generate_key()
    keys.put((f"c{index}", crypto.public_pem(key)))
    http = requests.Session()
    for trial in itertools.count():  # until the parent kills us
        barrier.wait()
        started = time.perf_counter()
        delta, _ = trainer.fit(weights, 1, 0.05, 32, 1, seed=trial)
        trained = time.perf_counter() - started
        header, payload = signed_update(key, TrainRequest("floor", trial, 1, 1, 0.05, 32, compression=compression), f"c{index}",
                                        trainer.num_examples, delta)
        r = http.post(f"{url}/update", data=pack_update(header, payload), timeout=60,
                      headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        results.put(trained)


class FloorServer:
    """A threaded werkzeug server that verifies updates like app/api.py + app/verify.py."""

    def __init__(self, spec: dict, keys: dict[str, str], compression: str):
        self.spec, self.keys, self.compression = spec, keys, compression
        self.arrived: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.round = 0

        def app(environ, start_response):  # noqa: ANN001, ANN202
            request = Request(environ)
            header, payload = unpack_update(request.get_data(cache=False))
            check_signature(header, payload, self.keys.get(header.client_id))
            delta = check_arrays(payload, self.spec, MAX_BYTES, self.compression)
            with self.lock:
                self.arrived.append((time.monotonic(), delta))
            return Response(json.dumps({"accepted": True}), mimetype="application/json")(environ, start_response)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def measure(num_clients: int = 10, trials: int = 20, compression: str = "none") -> dict:
    """Median and p90 of the floor over `trials` rounds (the first, warm-up round left out)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    spec = {k: (tuple(v.shape), v.dtype.str) for k, v in get_weights(build_model("cnn", (1, 28, 28))).items()}
    ctx = mp.get_context("spawn")
    barrier, results, key_queue = ctx.Barrier(num_clients + 1), ctx.Queue(), ctx.Queue()
    server = FloorServer(spec, {}, compression)
    procs = [ctx.Process(target=_client, args=(i, num_clients, server.url, barrier, results, key_queue, compression),
                         daemon=True)
             for i in range(num_clients)]
    for p in procs:
        p.start()
    try:
        server.keys.update(key_queue.get(timeout=300) for _ in range(num_clients))
        floors, to_last, fedavg = [], [], []
        for trial in range(trials + 1):
            server.round, server.arrived = trial, []
            barrier.wait(timeout=300)
            released = time.monotonic()
            trained = [results.get(timeout=120) for _ in range(num_clients)]
            while len(server.arrived) < num_clients:
                time.sleep(0.001)
            last = max(t for t, _ in server.arrived)
            started = time.monotonic()
            weighted_average([(d, 320) for _, d in server.arrived])
            aggregate = time.monotonic() - started
            if trial:  # the first round pays connection set-up and first-use costs
                to_last.append(last - released - max(trained))
                fedavg.append(aggregate)
                floors.append(to_last[-1] + aggregate)
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
        server.server.shutdown()
    return {"floor_s": _summary(floors), "floor_to_last_update_s": _summary(to_last), "floor_fedavg_s": _summary(fedavg)}


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(values), 4),
            "p90": round(ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--compression", default="none", choices=COMPRESSIONS)
    args = p.parse_args()
    print(json.dumps({"benchmark": "transport_floor", "num_clients": args.num_clients, "compression": args.compression,
                      **measure(args.num_clients, args.trials, args.compression)}, indent=2))


if __name__ == "__main__":
    main()
