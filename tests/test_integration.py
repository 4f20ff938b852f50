"""Real server and client processes on 127.0.0.1: learning, failures, crash-resume, bad updates."""
from __future__ import annotations

import json
import queue
import signal
import time

import numpy as np
import pytest
import requests
import socketio

from shared import crypto
from shared.protocol import EV_TRAIN, NAMESPACE, decode_weights, sha256_hex
from tests.rawclient import auth_for, signed_update, with_raw_metrics

SMALL_FMNIST = ["--dataset", "fashion-mnist", "--partition", "iid"]


def start_clients(cluster, n, *extra):
    for i in range(n):
        cluster.start_client(f"c{i}", *SMALL_FMNIST, "--num-clients", str(n), "--client-index", str(i), *extra)


def verify_all_versions(cluster):
    """Every stored version downloads, matches its recorded sha256 and decodes without pickle."""
    listing = cluster.api("GET", "/api/models").json()
    for row in listing["versions"]:
        r = cluster.api("GET", f"/api/model/{row['version']}")
        assert r.status_code == 200
        assert sha256_hex(r.content) == row["sha256"] == r.headers["X-Model-SHA256"]
        assert decode_weights(r.content)["conv1.weight"].shape == (32, 1, 5, 5)
    return listing


def test_three_clients_learn_fashion_mnist_and_every_version_verifies(cluster, fmnist):
    cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", "3", "--min-clients", "3",
                         "--eval-limit", "2000", "--start")
    start_clients(cluster, 3, "--max-samples", "1500")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 240, "3 rounds")
    rounds = cluster.rounds()
    acc = [r["accuracy"] for r in rounds]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["num_clients"] == 3 for r in rounds)
    assert acc[0] > 0.3, acc           # chance is 0.1
    assert acc[2] > acc[0], acc        # and it keeps learning
    # After round 1 every client had fetched the new model on new_model, while the server evaluated it.
    assert [r["timings"]["prefetched"] for r in rounds] == [0, 3, 3]
    listing = verify_all_versions(cluster)
    assert [v["source"] for v in listing["versions"]] == ["init", "round", "round", "round"]

    # Rollback to the round-1 model: a new version with the same bytes becomes the global model.
    v1 = rounds[0]["model_version"]
    assert cluster.api("POST", "/api/rollback", json={"version": v1}).status_code == 401
    r = cluster.api("POST", "/api/rollback", admin=True, json={"version": v1})
    assert r.status_code == 200, r.text
    new = r.json()["model_version"]
    latest = cluster.api("GET", "/api/model/latest")
    assert latest.headers["X-Model-Version"] == str(new)
    assert latest.content == cluster.api("GET", f"/api/model/{v1}").content
    clients = cluster.api("GET", "/api/clients").json()["clients"]
    assert {c["id"] for c in clients} == {"c0", "c1", "c2"} and all(c["accepted"] == 3 for c in clients)


def test_client_and_server_killed_mid_run_the_run_still_completes(cluster, fmnist):
    server_args = ["--dataset", "fashion-mnist", "--num-rounds", "5", "--min-clients", "2", "--quorum", "0.5",
                   "--round-timeout", "120", "--eval-limit", "1000"]
    cluster.start_server(*server_args, "--start")
    start_clients(cluster, 3, "--max-samples", "2500")

    # SIGKILL c2 while it trains in round 1: the round closes on the other two, long before the deadline.
    def open_with_all_three():
        open_round = cluster.status().get("open_round") or {}
        return open_round if open_round.get("selected") == ["c0", "c1", "c2"] else None

    killed_in = cluster.wait_until(open_with_all_three, 120, "a round that asks all three clients")["round"]
    cluster.kill(cluster.clients["c2"], signal.SIGKILL)
    first = cluster.wait_until(lambda: [r for r in cluster.rounds() if r["round"] == killed_in], 120,
                               f"round {killed_in} to close")[0]
    assert first["num_selected"] == 3 and first["num_clients"] == 2
    assert first["seconds"] < 60, first  # closed because c2 vanished, not at the 120 s deadline

    # SIGKILL the server after the next round (mid-run), restart it on the same state dir.
    cluster.wait_until(lambda: len(cluster.rounds()) >= killed_in + 1, 120, f"round {killed_in + 1}")
    before = cluster.api("GET", "/api/models").json()["versions"]
    cluster.kill(cluster.server, signal.SIGKILL)
    restart_at = time.monotonic()
    cluster.start_server(*server_args)  # no --start: it resumes the interrupted run by itself
    cluster.wait_ready()
    status = cluster.status()
    resumed_from = status["round"]
    assert status["run_id"] == first["run_id"] and resumed_from >= 2

    # The surviving clients reconnect by themselves; the run finishes all 5 rounds.
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 300, "the resumed run to finish")
    rounds = cluster.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert {r["run_id"] for r in rounds} == {first["run_id"]}
    after = cluster.api("GET", "/api/models").json()["versions"]
    assert [v["sha256"] for v in after[:len(before)]] == [v["sha256"] for v in before]  # no version lost
    verify_all_versions(cluster)
    assert set(rounds[-1]["clients"]) == {"c0", "c1"}
    assert time.monotonic() - restart_at < 200


def test_bad_updates_are_refused_with_reasons_and_change_nothing(cluster, tmp_path):
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "2", "--min-clients", "1",
                         "--quorum", "1", "--round-timeout", "120", "--max-update-mb", "2", "--start")
    cluster.wait_ready()
    key, wrong_key = crypto.generate_key(), crypto.generate_key()
    requests_q: queue.Queue = queue.Queue()
    sio = socketio.Client(reconnection=False)
    sio.on(EV_TRAIN, requests_q.put, namespace=NAMESPACE)
    sio.connect(cluster.url, namespaces=[NAMESPACE], transports=["websocket"],
                auth=auth_for(cluster.url, key, "evil", cluster.enrollment_token))
    try:
        req = requests_q.get(timeout=60)
        base = cluster.api("GET", f"/api/model/{req['model_version']}")
        weights = decode_weights(base.content)
        zeros = {k: np.zeros_like(v) for k, v in weights.items()}

        def post(body):
            return requests.post(cluster.url + "/api/update", data=body, timeout=30,
                                 headers={"X-Meshfed-Client": "evil"})

        def refused(body, reason, status=400):
            r = post(body)
            assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
            assert reason in r.json()["message"]

        nan = {**zeros, "net.1.weight": np.full_like(zeros["net.1.weight"], np.nan)}
        shape = {**zeros, "net.1.bias": np.zeros(7, np.float32)}
        refused(signed_update(wrong_key, req, zeros, "evil"), "bad_signature")  # nobody verified: round open
        refused(b"MFU1" + b"\0" * (20 << 20), "too_large", 413)  # 10x the 2 MB limit
        refused(b"junk", "malformed")
        assert cluster.status()["open_round"]["round"] == 1
        # A verified refusal: the client will not resend, so the round closes without it at once (here for
        # want of a quorum) and is played again: a new request for round 1, from the same model.
        for bad, reason in ((nan, "non_finite"), (shape, "shape_mismatch"), (zeros, "bad_examples")):
            refused(signed_update(key, req, bad, "evil", num_examples=0 if reason == "bad_examples" else 10),
                    reason)
            again = requests_q.get(timeout=60)
            assert (again["round"], again["model_version"]) == (1, req["model_version"])
            req = again

        # Nothing changed: same global version and bytes, server up, round 1 open again.
        latest = cluster.api("GET", "/api/model/latest")
        assert latest.headers["X-Model-SHA256"] == base.headers["X-Model-SHA256"]
        assert cluster.status()["open_round"]["round"] == 1

        # Accepted, with advisory metrics that used to kill the round loop (int(NaN)) and the dashboard's JSON:
        # the bad values are dropped with notes, the round goes on.
        good1 = with_raw_metrics(signed_update(key, req, zeros, "evil"),
                                 b'{"prefetched": NaN, "train_seconds": Infinity, "batches": 3}')
        reply = post(good1)
        assert reply.status_code == 200 and len(reply.json()["notes"]) == 2, reply.text
        req2 = requests_q.get(timeout=60)
        assert req2["round"] == 2
        refused(good1, "stale_round", 409)  # replay of round 1 in round 2
        good2 = signed_update(key, req2, zeros, "evil")
        assert post(good2).status_code == 200
        cluster.wait_until(lambda: cluster.status()["state"] == "finished", 60, "round 2 to close")
        refused(good2, "no_open_round", 409)  # replay after the run ended
        served = cluster.api("GET", "/api/metrics").text
        rounds = json.loads(served, parse_constant=lambda name: pytest.fail(f"{name} served"))["rounds"]
        assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["train_seconds"] == 0
    finally:
        sio.disconnect()

    # Charged to evil: only what its own signature vouches for. The forged signature, the oversized body and
    # the junk are the source address's (nobody signed them), whatever client id they claimed.
    evil = next(c for c in cluster.api("GET", "/api/clients").json()["clients"] if c["id"] == "evil")
    assert evil["accepted"] == 2
    assert evil["refusals"] == {"non_finite": 1, "shape_mismatch": 1, "bad_examples": 1, "stale_round": 1,
                                "no_open_round": 1}
    unverified = cluster.api("GET", "/api/refusals").json()["addresses"]
    assert unverified == [{"address": "127.0.0.1", "refusals": {"bad_signature": 1, "too_large": 1, "malformed": 1},
                           "last": unverified[0]["last"]}]

    # /metrics of the real server, read with Prometheus' own text parser.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(cluster.api("GET", "/metrics").text)}
    refused = {(s.labels["reason"], s.labels["verified"]): s.value for s in families["meshfed_updates_refused"].samples
               if s.name == "meshfed_updates_refused_total"}
    assert refused[("bad_signature", "false")] == 1 and refused[("too_large", "false")] == 1
    assert refused[("non_finite", "true")] == 1 and sum(refused.values()) == 8
    assert families["meshfed_rounds_completed"].samples[0].value == 2
    received = families["meshfed_http_received_bytes"].samples[0].value
    assert 0 < received < 20 << 20  # the 20 MB body was refused by its Content-Length, never read
    assert cluster.api("GET", "/readyz").json()["ready"] is True

    # Same client id, another key: the real client process is refused and exits with a reason.
    impostor = cluster.start_client("evil", "--dataset", "synthetic", "--model", "mlp", "--key-dir", "other-keys")
    assert impostor.wait(timeout=90) == 2
    assert "key_mismatch" in (cluster.workdir / "evil.log").read_text()


def _fedadam_run(cluster, kill_after: int | None) -> list[str]:
    """4 rounds of fedadam on 2 clients; optionally SIGKILL the server mid-run and restart it.
    Returns the sha256 of each round's model."""
    args = ["--dataset", "synthetic", "--model", "mlp", "--strategy", "fedadam", "--server-lr", "0.05",
            "--num-rounds", "4", "--min-clients", "2", "--quorum", "1", "--eval-limit", "200"]
    cluster.start_server(*args, "--start")
    for i in range(2):
        cluster.start_client(f"c{i}", "--dataset", "synthetic", "--model", "mlp", "--partition", "iid",
                             "--num-clients", "2", "--client-index", str(i), "--max-samples", "400", "--delay", "1.5")
    if kill_after is not None:
        cluster.wait_until(lambda: len(cluster.rounds()) >= kill_after, 120, f"round {kill_after}")
        cluster.kill(cluster.server, signal.SIGKILL)  # round kill_after + 1 is in flight (clients delay 1.5 s)
        cluster.start_server(*args)
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 180, "4 rounds")
    versions = {v["version"]: v["sha256"] for v in cluster.api("GET", "/api/models").json()["versions"]}
    return [versions[r["model_version"]] for r in cluster.rounds()]


def test_resumed_fedadam_run_matches_an_uninterrupted_one(tmp_path):
    from shared.cluster import Cluster

    with Cluster(tmp_path / "straight") as straight:
        expected = _fedadam_run(straight, kill_after=None)
    with Cluster(tmp_path / "crashed") as crashed:
        got = _fedadam_run(crashed, kill_after=2)
        assert "resuming run" in (crashed.workdir / "server.log").read_text()
    assert len(expected) == 4 and len(set(expected)) == 4
    assert got == expected  # same seeds, restored optimiser state: the same models, bit for bit


def test_async_rounds_close_at_min_updates_and_merge_stragglers(cluster):
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "8", "--min-clients", "3",
                         "--min-updates", "2", "--stragglers", "merge", "--max-staleness", "5",
                         "--round-timeout", "60", "--eval-limit", "200", "--start")
    for i in range(3):  # c0, c1 answer in ~0.5 s; c2 always ~2.5 s late
        cluster.start_client(f"c{i}", "--dataset", "synthetic", "--model", "mlp", "--partition", "iid",
                             "--num-clients", "3", "--client-index", str(i), "--max-samples", "300",
                             "--delay", "3" if i == 2 else "0.5")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "8 rounds")
    rounds = cluster.rounds()
    assert all(r["num_clients"] == 2 and r["num_selected"] == 3 for r in rounds)
    assert all("c2" not in r["clients"] for r in rounds)
    assert all(r["seconds"] < 2.5 for r in rounds[1:]), [r["seconds"] for r in rounds]  # never waited for c2
    merged = [r["stragglers"]["c2"] for r in rounds if "c2" in r["stragglers"]]
    assert merged and all(m["merged"] and 1 <= m["staleness"] <= 5 for m in merged), merged
    c2 = next(c for c in cluster.api("GET", "/api/clients").json()["clients"] if c["id"] == "c2")
    assert c2["refusals"] == {}  # late is not bad


def test_a_refused_update_does_not_hold_the_round_until_its_deadline(cluster):
    """c2 sends infinite deltas: each is refused (non_finite) and, as clients do not resend, the round closes with
    the other two instead of waiting out its 600 s deadline."""
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "3", "--min-clients", "3",
                         "--round-timeout", "600", "--eval-limit", "200", "--start")
    for i in range(3):
        cluster.start_client(f"c{i}", "--dataset", "synthetic", "--model", "mlp", "--partition", "iid",
                             "--num-clients", "3", "--client-index", str(i), "--max-samples", "300",
                             *(["--attack", "scale", "--attack-scale", "inf"] if i == 2 else []))
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 300, "3 rounds, none held by c2")
    rounds = cluster.rounds()
    assert [r["clients"] for r in rounds] == [["c0", "c1"]] * 3 and all(r["num_selected"] == 3 for r in rounds)
    assert all(r["seconds"] < 600 for r in rounds)
    c2 = next(c for c in cluster.api("GET", "/api/clients").json()["clients"] if c["id"] == "c2")
    assert c2["refusals"] == {"non_finite": 3}, c2["refusals"]


def test_a_client_refused_for_its_token_keeps_retrying_until_the_server_takes_it(cluster):
    """A wrong enrollment token is the operator's to fix, on either side: the client says so and retries, and
    connects on its own once the server is restarted with the token it has."""
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--min-clients", "1")
    cluster.wait_ready()
    cluster.enrollment_token = "the-clients-token"  # not the server's
    client = cluster.start_client("c0", *synthetic, "--max-samples", "100")
    log = cluster.workdir / "c0.log"
    cluster.wait_until(lambda: log.read_text().count("the server refused our enrollment token") >= 2, 60,
                       "the client to retry its refused token")
    assert client.poll() is None and cluster.status()["clients_online"] == 0
    cluster.kill(cluster.server)
    cluster.start_server(*synthetic, "--min-clients", "1")  # same state dir, now with the client's token
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 1, 60, "the client to connect by itself")
    assert client.poll() is None


def test_sigterm_and_the_dashboards_stop_end_local_training_within_a_batch(cluster):
    """Local training asks, before each batch, whether the round is still on: SIGTERM (the process is stopping)
    and a run stopped from the dashboard (the server cancels the round) end minutes of it within a batch."""
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "3", "--min-clients", "2", "--round-timeout", "600", "--start")
    minutes = ["--local-epochs", "5000", "--max-samples", "1000", "--partition", "iid", "--num-clients", "2"]
    clients = [cluster.start_client(f"c{i}", *synthetic, *minutes, "--client-index", str(i)) for i in range(2)]
    cluster.wait_until(lambda: len((cluster.status()["open_round"] or {}).get("selected", [])) == 2, 120,
                       "a round asking both clients")
    def progress() -> dict[str, dict]:
        return {c["id"]: c["progress"] for c in cluster.api("GET", "/api/clients").json()["clients"]}
    first = cluster.wait_until(lambda: (p := progress()) and all(p.values()) and p, 30, "both to report progress")
    time.sleep(3)  # both are deep in local training now, reporting batches done every 2 s
    later = progress()
    for cid in ("c0", "c1"):  # 800 training examples each (1000, 20% held out), batches of 32, 5000 epochs
        assert first[cid]["round"] == 1 and later[cid]["total"] == 5000 * 25
        assert 0 < first[cid]["done"] < later[cid]["done"] < later[cid]["total"]
    started = time.monotonic()
    cluster.kill(clients[0], signal.SIGTERM)  # waits for it to exit
    assert time.monotonic() - started < 5 and clients[0].returncode == 0
    assert "training stopped after" in (cluster.workdir / "c0.log").read_text()
    assert cluster.api("POST", "/api/stop", admin=True).ok
    cluster.wait_until(lambda: "the server ended the round" in (cluster.workdir / "c1.log").read_text(), 10,
                       "c1 to stop training when the run stopped")
    assert clients[1].poll() is None  # it stopped the round, not itself


def test_median_after_nnm_learns_with_an_attacker_and_bad_mixing_is_refused(cluster):
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "3", "--min-clients", "5",
                         "--strategy", "median", "--mixing", "nnm", "--byzantine-f", "1", "--eval-limit", "500",
                         "--anomaly-z", "1.5", "--start")  # of 5 z-scores none can exceed 2 (= sqrt(5 - 1))
    for i in range(5):  # c4 sends -10 x its delta every round
        cluster.start_client(f"c{i}", "--dataset", "synthetic", "--model", "mlp", "--partition", "iid",
                             "--num-clients", "5", "--client-index", str(i), "--max-samples", "300",
                             *(["--attack", "sign_flip", "--attack-scale", "10"] if i == 4 else []))
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 180, "3 rounds")
    rounds = cluster.rounds()
    assert all(r["num_clients"] == 5 for r in rounds)
    assert rounds[-1]["accuracy"] > 0.5, [r["accuracy"] for r in rounds]  # chance is 0.1
    # the anomaly scores (norms taken as updates arrive) single out the attacker, and only it, every round
    assert all(list(r["flagged"]) == ["c4"] and r["flagged"]["c4"]["norm_z"] > 1.5 for r in rounds), rounds
    flagged = {c["id"]: c["flagged"] for c in cluster.api("GET", "/api/clients").json()["clients"]}
    assert flagged == {"c0": 0, "c1": 0, "c2": 0, "c3": 0, "c4": 3}, flagged
    config = cluster.api("GET", "/api/config").json()
    assert (config["strategy"], config["mixing"]) == ("median", "nnm")

    r = cluster.api("POST", "/api/config", admin=True, json={"strategy": "fedavg", "mixing": "nnm"})
    assert r.status_code == 400 and "mixing" in r.json()["fields"], r.text
    assert cluster.api("GET", "/api/config").json()["strategy"] == "median"  # nothing changed, server up


def test_int8_compressed_updates_are_a_quarter_of_the_bytes_and_still_learn(cluster, fmnist):
    cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", "3", "--min-clients", "2",
                         "--compression", "int8", "--eval-limit", "2000", "--start")
    start_clients(cluster, 2, "--max-samples", "1500")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 240, "3 rounds")
    rounds = cluster.rounds()
    model_bytes = len(cluster.api("GET", "/api/model/latest").content)  # float32, 6.65 MB
    per_update = [r["timings"]["upload_bytes"] / r["num_clients"] for r in rounds]
    assert all(r["num_clients"] == 2 for r in rounds)
    assert all(0.24 * model_bytes < b < 0.26 * model_bytes for b in per_update), (per_update, model_bytes)
    acc = [r["accuracy"] for r in rounds]
    assert acc[0] > 0.3 and acc[2] > acc[0], acc
    assert all(c["refusals"] == {} and c["accepted"] == 3 for c in cluster.api("GET", "/api/clients").json()["clients"])


def test_a_round_waits_for_min_available_clients_and_asks_fraction_fit_of_them(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "2", "--min-available", "4", "--min-clients", "1",
                         "--fraction-fit", "0.5", "--eval-limit", "200", "--max-batches", "3", "--start")

    def client(i: int) -> None:
        cluster.start_client(f"c{i}", *synthetic, "--partition", "iid", "--num-clients", "4", "--client-index",
                             str(i), "--max-samples", "200")
    for i in range(3):
        client(i)
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 3, 60, "three clients")
    time.sleep(3)  # three of the four it waits for: no round starts, though it asks only two
    status = cluster.status()
    assert status["state"] == "waiting" and status["open_round"] is None and not cluster.rounds()
    assert (status["waiting_for"], status["clients_online"]) == (4, 3)  # what it waits for, said
    assert "waiting for clients: 3/4 connected" in (cluster.workdir / "server.log").read_text()
    client(3)
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "two rounds")
    assert cluster.status()["waiting_for"] is None
    rounds = cluster.rounds()
    assert [r["num_selected"] for r in rounds] == [2, 2] and all(len(r["clients"]) == 2 for r in rounds)


def test_background_evaluation_every_other_round_with_real_processes(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "3", "--min-clients", "2", "--eval-limit", "300",
                         "--max-batches", "3", "--evaluation", "background", "--eval-every", "2", "--start")
    for i in range(2):
        cluster.start_client(f"c{i}", *synthetic, "--partition", "iid", "--num-clients", "2", "--client-index",
                             str(i), "--max-samples", "200")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "three rounds")
    rounds = cluster.rounds()
    assert [(r["round"], r["evaluated"], r["accuracy"] is None) for r in rounds] == \
        [(1, 0, True), (2, 1, False), (3, 1, False)]  # every 2nd round, and the last
    assert cluster.status()["config"]["evaluation"] == "background"
    metrics = cluster.api("GET", "/metrics").text
    assert f"meshfed_accuracy {rounds[-1]['accuracy']}" in metrics and "meshfed_rounds_completed_total 3.0" in metrics
