"""The round loop in one process: a fake transport stands in for Socket.IO and plays the clients (real keys,
signatures and verification; a real Store on disk). Every path of a round: quorum failure and replay, the
deadline, Krum's retry, stragglers dropped, selection, the target accuracy, the streaming sum. Real processes
on loopback are in tests/test_integration.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.collection import select_clients
from app.config import RunConfig
from app.evaluation import MAX_PENDING
from app.evaluator import Evaluator
from app.registry import Registry, Session
from app.rounds import RoundLoop
from app.runs import Runs
from app.store import Store
from app.verify import authenticate
from client.node import signed_update
from shared import crypto
from shared.accumulator import Buffer, WeightedSum
from shared.aggregate import weighted_average
from shared.protocol import decode_weights

CLIENTS = ("c0", "c1", "c2")


class ClientsBehindAFakeTransport:
    """Answers train requests with a small signed delta (client k adds 0.01 * (k + 1) to every weight), and
    records what the loop announces, checking that an announced model is already committed (durable first).
    `silent[cid]` = how many requests cid ignores; `late[cid]` = seconds it answers after."""

    def __init__(self, store: Store, key_dir):
        self.store, self.rounds, self.merge = store, None, False
        self.keys = {cid: crypto.load_or_create_key(key_dir, cid) for cid in CLIENTS}
        self.announced: list[tuple[int, bool]] = []  # (version, committed when announced)
        self.requests: list = []
        self.silent: dict[str, int] = {}
        self.late: dict[str, float] = {}
        self.outcomes: list[str] = []

    def send_train(self, client_id, request) -> bool:
        self.requests.append((client_id, request))
        if self.silent.get(client_id, 0) > 0:
            self.silent[client_id] -= 1
            return True
        weights = decode_weights(self.store.read_model(request.model_version))
        delta = {k: np.full_like(v, 0.01 * (1 + CLIENTS.index(client_id))) for k, v in weights.items()}
        header, payload = signed_update(self.keys[client_id], request, client_id, 100, delta)

        def deliver() -> None:
            time.sleep(self.late.get(client_id, 0.0))
            try:
                verified = authenticate(self.rounds.store, header, payload)
                self.outcomes.append(self.rounds.collection.offer(verified, self.merge))
            except Exception as exc:  # noqa: BLE001 - recorded for the test to read (or the test is over)
                self.outcomes.append(f"refused: {exc}")
        threading.Thread(target=deliver, daemon=True).start()
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
    """(runs, store, transport, evaluators): three clients online; runs configured per test with set_config."""
    store = Store(tmp_path / "state")
    registry = Registry()
    transport = ClientsBehindAFakeTransport(store, tmp_path / "keys")
    for cid, key in transport.keys.items():
        pem = crypto.public_pem(key)
        store.pin_client(cid, pem, crypto.fingerprint(pem), 100)
        registry.connect(Session(client_id=cid, sid=f"sid-{cid}", fingerprint="", num_examples=100))
    evaluators: list = [lambda cfg: Evaluator(cfg.dataset, cfg.model)]
    rounds = RoundLoop(store, registry, transport, lambda cfg: evaluators[0](cfg), 1 << 24)
    transport.rounds = rounds
    runs = Runs(rounds, RunConfig(dataset="synthetic", model="mlp", num_rounds=2, min_fit_clients=3, round_timeout=30,
                                  momentum=0.5))
    yield runs, store, transport, evaluators
    if runs.run.active:
        runs.stop()
    runs.wait_inactive(30)
    store.close()


def finished(runs, seconds=60):
    assert runs.wait_inactive(seconds), runs.status()
    return runs.store.latest_run()


def moved(store, first: int, last: int) -> float:
    """How far every weight moved from version `first` to `last` (they all move alike here)."""
    a, b = (decode_weights(store.read_model(v)) for v in (first, last))
    steps = {float(np.round(np.mean(b[k] - a[k]), 6)) for k in a}
    assert len(steps) == 1, steps
    return steps.pop()


def test_each_round_is_committed_before_it_is_announced_and_evaluated_after(loop):
    runs, store, transport, _ = loop
    run_id = runs.start()
    finished(runs)
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == [1, 2] and all(r["accuracy"] is not None for r in rounds)
    assert transport.announced == [(2, True), (3, True)]  # versions 2 and 3 (1 is the initial model)
    assert runs.global_version == 3 and store.latest_run()["status"] == "finished"
    assert len(transport.requests) == 6 and all(r.momentum == 0.5 for _, r in transport.requests)
    for r in rounds:  # written and committed on the checkpoint thread while the loop evaluated
        t = r["timings"]
        assert t["last_update_arrived"] <= t["closed"] < r["seconds"] and t["committed"] < r["seconds"], t
    # FedAvg of deltas 0.01, 0.02, 0.03 with equal weights: every parameter moved by 0.02 per round
    assert moved(store, 1, 3) == pytest.approx(0.04, abs=1e-6)


def test_a_failing_evaluation_still_leaves_the_round_committed_and_stops_the_run(loop):
    runs, store, transport, evaluators = loop

    def broken(cfg):
        def evaluate(weights, progress=None):
            time.sleep(0.2)  # the checkpoint thread commits meanwhile
            raise RuntimeError("test split unreadable")
        evaluate.initial_weights = Evaluator(cfg.dataset, cfg.model).initial_weights
        return evaluate
    evaluators[0] = broken
    run_id = runs.start()
    run = finished(runs)
    assert (run["status"], run["stop_reason"], run["completed_round"]) == ("stopped", "error: see the server log", 1)
    assert [r["round"] for r in store.rounds(run_id, evaluated_only=False)] == [1]
    assert transport.announced == [(2, True)] and runs.global_version == 2


def test_a_round_short_of_its_quorum_is_played_again_with_every_client(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 1, "quorum": 1.0, "round_timeout": 1})
    transport.silent["c2"] = 1  # ignores the first request: 2 of 3 at the deadline, quorum 3
    run_id = runs.start()
    finished(runs)
    asked = [cid for cid, r in transport.requests if r.round == 1]
    assert sorted(asked) == ["c0", "c0", "c1", "c1", "c2", "c2"]  # round 1 asked twice
    (row,) = store.rounds(run_id)
    assert row["clients"] == ["c0", "c1", "c2"] and moved(store, 1, 2) == pytest.approx(0.02, abs=1e-6)


def test_a_round_closes_at_its_deadline_with_the_quorum_and_names_who_dropped(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 1, "quorum": 0.5, "round_timeout": 1})
    transport.silent["c2"] = 99
    run_id = runs.start()
    finished(runs)
    (row,) = store.rounds(run_id)
    assert row["clients"] == ["c0", "c1"] and row["num_selected"] == 3 and row["seconds"] >= 1
    assert moved(store, 1, 2) == pytest.approx(0.015, abs=1e-6)  # mean of 0.01 and 0.02
    assert {c["id"]: c["dropouts"] for c in store.clients()} == {"c0": 0, "c1": 0, "c2": 1}


def test_krum_short_of_updates_after_a_dropout_retries_the_round(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 1, "quorum": 0.5, "round_timeout": 1, "strategy": "krum", "byzantine_f": 0})
    transport.silent["c2"] = 1  # 2 updates the first time: krum needs n > 2f + 2 = 2
    run_id = runs.start()
    finished(runs)
    (row,) = store.rounds(run_id)
    assert row["clients"] == ["c0", "c1", "c2"]
    assert len([1 for _, r in transport.requests if r.round == 1]) == 6


def test_stragglers_are_recorded_and_dropped_when_so_configured(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 2, "min_updates": 2, "stragglers": "drop", "max_staleness": 2})
    transport.late.update(c0=0.4, c1=0.4, c2=0.7)  # c2 answers round 1 after it closed, while round 2 runs
    run_id = runs.start()
    finished(runs)
    first, second = store.rounds(run_id)
    assert first["clients"] == second["clients"] == ["c0", "c1"]
    assert "straggler_dropped" in transport.outcomes
    assert second["stragglers"]["c2"] == {"round": 1, "staleness": 1, "merged": False}
    assert moved(store, 1, 3) == pytest.approx(0.03, abs=1e-6)  # 0.015 per round: c2's deltas never merged


def test_a_run_stops_once_it_reaches_its_target_accuracy(loop):
    runs, store, transport, evaluators = loop
    real = evaluators[0]

    def confident(cfg):
        evaluate = real(cfg)

        def scored(weights, progress=None):
            loss, _ = evaluate(weights)
            return loss, 0.9
        scored.initial_weights = evaluate.initial_weights
        return scored
    evaluators[0] = confident
    runs.set_config({"num_rounds": 5, "target_accuracy": 0.8})
    run_id = runs.start()
    run = finished(runs)
    assert (run["status"], run["stop_reason"], run["completed_round"]) == ("finished", "target_accuracy", 1)
    assert len(store.rounds(run_id)) == 1


def test_selection_takes_a_fraction_between_min_and_max_with_the_runs_seed():
    online = [f"c{i:02d}" for i in range(20)]
    pick = lambda **kw: select_clients(online, RunConfig(**{"min_fit_clients": 1, **kw}), "run", 1)  # noqa: E731
    assert len(pick(fraction_fit=0.3)) == 6 and len(pick(fraction_fit=0.01)) == 1
    assert len(pick(fraction_fit=0.01, min_fit_clients=4)) == 4
    assert len(pick(fraction_fit=1.0, max_fit_clients=5)) == 5
    assert pick(fraction_fit=0.3) == pick(fraction_fit=0.3)  # the same seed, run and round: the same clients
    assert pick(fraction_fit=0.3) != pick(fraction_fit=0.3, seed=1)
    assert select_clients(online, RunConfig(fraction_fit=0.3), "run", 2) != pick(fraction_fit=0.3)
    assert pick(fraction_fit=0.3) == sorted(pick(fraction_fit=0.3)) and set(pick(fraction_fit=0.3)) <= set(online)


def test_the_streaming_sum_is_fedavg_in_any_arrival_order_and_keeps_one_copy():
    """Any order gives FedAvg to float32 rounding; two updates give the same bits in either order (the product
    and the sum are rounded separately), which keeps two-client runs reproducible (test_integration)."""
    rng = np.random.default_rng(0)
    updates = [({"w": rng.standard_normal((300, 200)).astype(np.float32), "b": rng.standard_normal(200).astype(
        np.float32)}, int(n)) for n in rng.integers(50, 5000, 7)]
    expected = weighted_average(updates)
    results = []
    for order in (range(7), reversed(range(7)), [3, 0, 6, 1, 5, 2, 4]):
        acc = WeightedSum()
        for i in order:
            acc.add(*updates[i], key=str(i))
        (mean, total), = acc.result()
        results.append(mean)
        assert total == sum(n for _, n in updates) and len(acc) == 7
        for k in expected:
            np.testing.assert_allclose(mean[k], expected[k], rtol=1e-5, atol=1e-6)
    assert sum(a.nbytes for a in acc._sum.values()) == 4 * (300 * 200 + 200)  # one float32 copy, not one per update
    pair = []
    for order in ((0, 1), (1, 0)):
        acc = WeightedSum()
        for i in order:
            acc.add(*updates[i], key=str(i))
        pair.append(acc.result()[0][0])
    assert all(np.array_equal(pair[0][k], pair[1][k]) for k in pair[0])
    buffered = Buffer()
    for i in (2, 0, 1):
        buffered.add(*updates[i], key=f"c{i}")
    assert [n for _, n in buffered.result()] == [updates[0][1], updates[1][1], updates[2][1]]  # by key


def test_an_offline_minus_global_cannot_drag_the_round_and_robust_rules_see_it(loop):
    """A client syncs delta = -global (what zeroed the model before issue 22's fix). Under median, the round's
    three fresh updates (every weight +0.01, +0.02, +0.03) and the offline delta are four rows: the offline one
    is there (robust rules see it), clipped to the fresh updates' median norm: the model moves by hundredths."""
    import dataclasses

    from shared.aggregate import clip_to_norm, update_norm
    from shared.protocol import SyncHeader, encode_weights, sha256_hex

    runs, store, transport, _ = loop
    registry = runs.rounds.registry
    for cid in CLIENTS:
        registry.disconnect(f"sid-{cid}")  # nobody online: the run waits while the contribution arrives
    runs.set_config({"num_rounds": 1, "strategy": "median"})
    runs.start()
    first = decode_weights(store.read_model(1))
    minus_global = {k: -v for k, v in first.items()}
    payload = encode_weights(minus_global)
    h = SyncHeader(contribution_id="k1", client_id="c0", base_version=1, local_steps=3, num_examples=100,
                   payload_sha256=sha256_hex(payload))
    h = dataclasses.replace(h, signature=crypto.sign(transport.keys["c0"], h.canonical_bytes()))
    assert runs.rounds.offer_contribution(authenticate(store, h, payload))["accepted"]
    for cid in CLIENTS:
        registry.connect(Session(client_id=cid, sid=f"sid-{cid}", fingerprint="", num_examples=100))
    runs.notify()
    finished(runs)
    last = decode_weights(store.read_model(runs.global_version))
    fresh = [{k: np.full_like(v, 0.01 * (i + 1)) for k, v in first.items()} for i in range(3)]
    clipped = clip_to_norm(minus_global, float(np.median([update_norm(d) for d in fresh])))
    for k in first:
        rows = np.stack([d[k] for d in fresh] + [clipped[k]])
        assert np.allclose(last[k] - first[k], np.median(rows, axis=0), atol=1e-6), k
    step = update_norm({k: last[k] - first[k] for k in first})
    assert step <= update_norm(fresh[1]) and update_norm(last) > 0.9 * update_norm(first)  # nowhere near zero
    assert store.contributions()[0]["merged_version"] == runs.global_version


def slow_evaluators(evaluators, seconds, accuracy=None):
    """Evaluation that takes `seconds` (and scores `accuracy` if given): long beside a round of these clients."""
    real = evaluators[0]

    def slow(cfg):
        evaluate = real(cfg)

        def scored(weights, progress=None):
            time.sleep(seconds)
            loss, acc = evaluate(weights)
            return loss, acc if accuracy is None else accuracy
        scored.initial_weights = evaluate.initial_weights
        return scored
    evaluators[0] = slow


def test_background_evaluation_overlaps_the_next_round_and_records_every_round_in_order(loop):
    runs, store, transport, evaluators = loop
    slow_evaluators(evaluators, 1.0)
    runs.set_config({"num_rounds": 4, "evaluation": "background", "eval_every": 2})
    run_id = runs.start()
    run = finished(runs)
    assert (run["status"], run["stop_reason"], run["completed_round"]) == ("finished", "max_rounds", 4)
    rounds = store.rounds(run_id)  # the run ended only after its last evaluation
    assert [(r["round"], r["evaluated"]) for r in rounds] == [(1, 0), (2, 1), (3, 0), (4, 1)]
    assert [r["accuracy"] is None for r in rounds] == [True, False, True, False]
    assert all(r["eval_seconds"] >= 1.0 for r in rounds if r["evaluated"])
    # each round's time ends at its commit: the 1 s evaluations ran while the next round trained
    assert all(r["seconds"] < 1.0 for r in rounds), [r["seconds"] for r in rounds]
    ends = [r["ended"] for r in rounds]
    assert ends[3] - ends[0] < 2.0  # four rounds committed in less than two evaluations' time
    assert store.get_version(rounds[3]["model_version"])["accuracy"] == rounds[3]["accuracy"]


def test_inline_evaluation_every_k_rounds_skips_the_others_and_evaluates_the_last(loop):
    runs, store, transport, evaluators = loop
    runs.set_config({"num_rounds": 3, "eval_every": 2})
    run_id = runs.start()
    finished(runs)
    rounds = store.rounds(run_id)
    assert [(r["round"], r["evaluated"], r["accuracy"] is None) for r in rounds] == \
        [(1, 0, True), (2, 1, False), (3, 1, False)]


def test_a_target_reached_in_background_evaluation_ends_the_run_at_the_next_round(loop):
    runs, store, transport, evaluators = loop
    slow_evaluators(evaluators, 0.3, accuracy=0.9)
    runs.set_config({"num_rounds": 20, "evaluation": "background", "target_accuracy": 0.8})
    run_id = runs.start()
    run = finished(runs)
    assert (run["status"], run["stop_reason"]) == ("finished", "target_accuracy")
    # round 1 reached it; evaluation is slower than these rounds, so up to MAX_PENDING + 1 more were committed
    assert 1 <= run["completed_round"] <= 2 + MAX_PENDING
    assert all(r["accuracy"] == 0.9 for r in store.rounds(run_id))  # every committed round evaluated


def test_a_failing_background_evaluation_stops_the_run_and_leaves_the_round_for_the_restart(loop):
    runs, store, transport, evaluators = loop

    def broken(cfg):
        def evaluate(weights, progress=None):
            raise RuntimeError("test split unreadable")
        evaluate.initial_weights = Evaluator(cfg.dataset, cfg.model).initial_weights
        return evaluate
    evaluators[0] = broken
    runs.set_config({"num_rounds": 5, "evaluation": "background"})
    run_id = runs.start()
    run = finished(runs)
    assert (run["status"], run["stop_reason"]) == ("stopped", "error: see the server log")
    assert store.rounds(run_id) == []  # nothing evaluated: hidden from the metrics
    pending = store.rounds(run_id, evaluated_only=False)
    assert pending and all(r["evaluated"] is None for r in pending)
    evaluators[0] = lambda cfg: Evaluator(cfg.dataset, cfg.model)  # the test split is back
    runs.rounds.evaluate_unevaluated(run_id, runs.run.config)  # what a restarted server does
    evaluated = store.rounds(run_id)
    assert [r["round"] for r in evaluated] == [r["round"] for r in pending]
    assert all(0 <= r["accuracy"] <= 1 for r in evaluated)


def test_min_available_is_awaited_for_wait_timeout_then_the_round_asks_those_connected(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 1, "min_available_clients": 5, "min_fit_clients": 2, "wait_timeout": 1.0})
    started = time.monotonic()
    run_id = runs.start()
    finished(runs)
    assert time.monotonic() - started >= 1.0  # it waited for the five first
    assert [(r["num_selected"], len(r["clients"])) for r in store.rounds(run_id)] == [(3, 3)]


def test_past_wait_timeout_a_round_still_never_starts_with_fewer_than_min_clients(loop):
    runs, store, transport, _ = loop
    runs.set_config({"num_rounds": 1, "min_fit_clients": 4, "wait_timeout": 0.2})
    runs.start()
    time.sleep(1.5)
    status = runs.status()
    assert (status["state"], status["waiting_for"], status["clients_online"]) == ("waiting", 4, 3)
    assert not transport.requests
