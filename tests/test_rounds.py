"""The round loop's closing step, in one process: a fake transport stands in for Socket.IO and plays
the clients (real keys, signatures and verification; a real Store on disk). Real processes on loopback
are in tests/test_integration.py."""
import threading
import time

import numpy as np
import pytest

from app.config import RunConfig
from app.evaluator import Evaluator
from app.registry import Registry, Session
from app.rounds import RoundLoop
from app.store import Store
from client.node import signed_update
from shared import crypto
from shared.protocol import decode_weights

CLIENTS = ("c0", "c1", "c2")


class ClientsBehindAFakeTransport:
    """Answers every train request at once with a small signed delta, and records what the loop
    announces, checking that an announced model is already committed (durable first)."""

    def __init__(self, store: Store, key_dir):
        self.store, self.loop = store, None
        self.keys = {cid: crypto.load_or_create_key(key_dir, cid) for cid in CLIENTS}
        self.announced: list[tuple[int, bool]] = []  # (version, committed when announced)
        self.requests: list = []

    def send_train(self, client_id, request) -> bool:
        self.requests.append(request)
        weights = decode_weights(self.store.read_model(request.model_version))
        delta = {k: np.full_like(v, 0.01 * (1 + CLIENTS.index(client_id))) for k, v in weights.items()}
        header, payload = signed_update(self.keys[client_id], request, client_id, 100, delta)
        threading.Thread(target=lambda: self.loop.offer(self.loop.authenticate(header, payload)), daemon=True).start()
        return True

    def send_cancel(self, client_id, run_id, round_no) -> None:
        pass

    def publish(self, event, data) -> None:
        pass

    def announce_model(self, version, sha256) -> None:
        row = self.store.get_version(version)
        self.announced.append((version, row is not None and row["sha256"] == sha256))


@pytest.fixture
def loop(tmp_path):
    store = Store(tmp_path / "state")
    registry = Registry()
    transport = ClientsBehindAFakeTransport(store, tmp_path / "keys")
    for cid, key in transport.keys.items():
        pem = crypto.public_pem(key)
        store.pin_client(cid, pem, crypto.fingerprint(pem), 100)
        registry.connect(Session(client_id=cid, sid=f"sid-{cid}", fingerprint="", num_examples=100))
    config = RunConfig(dataset="synthetic", model="mlp", num_rounds=2, min_fit_clients=3, round_timeout=30,
                       momentum=0.5)
    evaluators: list = [lambda cfg: Evaluator(cfg.dataset, cfg.model)]
    transport.loop = RoundLoop(store, registry, transport, lambda cfg: evaluators[0](cfg), config, 1 << 24)
    yield transport.loop, store, transport, evaluators
    store.close()


def wait_inactive(loop, seconds=60):
    deadline = time.monotonic() + seconds
    while loop.status()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loop.status()["active"], loop.status()


def test_each_round_is_committed_before_it_is_announced_and_evaluated_after(loop):
    loop, store, transport, _ = loop
    run_id = loop.start()
    wait_inactive(loop)
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == [1, 2] and all(r["accuracy"] is not None for r in rounds)
    assert transport.announced == [(2, True), (3, True)]  # versions 2 and 3 (1 is the initial model)
    assert loop.global_version == 3 and store.latest_run()["status"] == "finished"
    assert len(transport.requests) == 6 and all(r.momentum == 0.5 for r in transport.requests)  # as configured
    for r in rounds:  # written and committed on the checkpoint thread while the loop evaluated
        t = r["timings"]
        assert t["last_update_arrived"] <= t["closed"] < r["seconds"] and t["committed"] < r["seconds"], t
    # FedAvg of deltas 0.01, 0.02, 0.03 with equal weights: every parameter moved by 0.02 per round
    first, last = (decode_weights(store.read_model(v)) for v in (1, 3))
    assert all(np.allclose(last[k] - first[k], 0.04, atol=1e-6) for k in first)


def test_a_failing_evaluation_still_leaves_the_round_committed_and_stops_the_run(loop):
    loop, store, transport, evaluators = loop

    def broken(cfg):
        def evaluate(weights):
            time.sleep(0.2)  # the checkpoint thread commits meanwhile
            raise RuntimeError("test split unreadable")
        evaluate.initial_weights = Evaluator(cfg.dataset, cfg.model).initial_weights
        return evaluate
    evaluators[0] = broken
    run_id = loop.start()
    wait_inactive(loop)
    run = store.latest_run()
    assert (run["status"], run["stop_reason"], run["completed_round"]) == ("stopped", "error: see the server log", 1)
    assert [r["round"] for r in store.rounds(run_id, evaluated_only=False)] == [1]
    assert transport.announced == [(2, True)] and loop.global_version == 2

