"""Handlers without a network: Flask's test client and Flask-SocketIO's test client."""

import pytest

from app import create_app
from app.config import RunConfig, ServerConfig
from shared import crypto
from shared.cluster import wait_until
from shared.protocol import NAMESPACE, signed_registration

ADMIN, ENROLL = "admin-secret", "enroll-secret"


@pytest.fixture
def app(tmp_path):
    cfg = ServerConfig(state_dir=str(tmp_path / "state"), admin_token=ADMIN, enrollment_token=ENROLL,
                       run=RunConfig(dataset="synthetic", model="mlp"))
    app = create_app(cfg)
    yield app
    app.extensions["meshfed"].store.close()


@pytest.fixture(scope="module")
def key():
    return crypto.generate_key()


def registration(app, key, client_id, enrollment_token=ENROLL, num_examples=10, challenge=None, **over):
    """A signed registration as a client makes it: over a fresh challenge from GET /api/challenge."""
    if challenge is None:
        challenge = app.test_client().get("/api/challenge").get_json()["challenge"]
    auth = signed_registration(key, client_id, num_examples, challenge, enrollment_token).to_dict()
    return {**auth, **over}


def sio_client(app, auth):
    socketio = app.extensions["meshfed"].socketio
    return socketio.test_client(app, namespace=NAMESPACE, auth=auth)


def register(app, key, client_id, **kwargs):
    return sio_client(app, registration(app, key, client_id, **kwargs))


@pytest.mark.parametrize("path", ["/api/start", "/api/stop", "/api/config", "/api/rollback"])
def test_changes_need_the_admin_token(app, path):
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.post(path, json={}, headers=headers)
        assert r.status_code == 401
        assert "admin token" in r.get_json()["message"]


def test_reads_are_open_and_json(app):
    client = app.test_client()
    assert client.get("/api/status").get_json()["state"] == "idle"
    assert client.get("/api/config").get_json()["dataset"] == "synthetic"
    assert client.get("/api/metrics").get_json()["rounds"] == []
    r = client.get("/api/model/99")
    assert r.status_code == 404 and "GET /api/models" in r.get_json()["message"]


def test_invalid_config_gets_field_errors_and_changes_nothing(app):
    client = app.test_client()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = client.post("/api/config", json={"num_rounds": -1, "lr": "x"}, headers=auth)
    assert r.status_code == 400
    assert set(r.get_json()["fields"]) == {"num_rounds", "lr"}
    assert client.get("/api/config").get_json()["num_rounds"] == RunConfig().num_rounds
    r = client.post("/api/config", json={"num_rounds": 9}, headers=auth)
    assert r.status_code == 200 and r.get_json()["num_rounds"] == 9


def test_stop_without_a_run_is_a_conflict(app):
    r = app.test_client().post("/api/stop", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 409 and "no run" in r.get_json()["message"]


def test_registration_needs_the_enrollment_token(app, key):
    assert not register(app, key, "c1", enrollment_token="wrong").is_connected(NAMESPACE)
    assert not sio_client(app, {**registration(app, key, "c1"), "client_id": "bad id!"}).is_connected(NAMESPACE)
    assert not sio_client(app, {**registration(app, key, "c1"), "public_key": "junk"}).is_connected(NAMESPACE)
    ok = register(app, key, "c1")
    assert ok.is_connected(NAMESPACE)
    assert any(m["name"] == "welcome" for m in ok.get_received(NAMESPACE))


def test_key_is_pinned_on_first_registration(app, key):
    first = register(app, key, "c1")
    assert first.is_connected(NAMESPACE)
    first.disconnect(namespace=NAMESPACE)
    assert not register(app, crypto.generate_key(), "c1").is_connected(NAMESPACE)
    assert register(app, key, "c1").is_connected(NAMESPACE)


def test_unsigned_garbage_update_is_refused_with_a_reason(app):
    r = app.test_client().post("/api/update", data=b"hello", headers={"X-Meshfed-Client": "c9"})
    assert r.status_code == 400 and r.get_json()["reason"] == "malformed"


def test_start_after_stop_resumes_with_the_edited_config(app):

    client = app.test_client()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    loop = app.extensions["meshfed"].runs
    run_id = client.post("/api/start", headers=auth).get_json()["run_id"]
    assert client.post("/api/stop", headers=auth).status_code == 200
    assert loop.wait_inactive(10)
    assert client.post("/api/config", json={"lr": 0.2, "num_rounds": 7}, headers=auth).status_code == 200
    assert client.post("/api/start", headers=auth).get_json()["run_id"] == run_id  # resumed
    assert client.get("/api/config").get_json()["lr"] == 0.2
    assert loop.store.latest_run()["config"]["num_rounds"] == 7  # the stored run took the edit
    client.post("/api/stop", headers=auth)
    assert loop.wait_inactive(10)
    client.post("/api/config", json={"model": "cnn"}, headers=auth)  # another model: no resume
    new_id = client.post("/api/start", headers=auth).get_json()["run_id"]
    assert new_id != run_id and loop.store.latest_run()["config"]["model"] == "cnn"
    client.post("/api/stop", headers=auth)


def test_a_client_its_connected_peers_see_in_mesh_mode_is_shown_as_mesh(app, key):
    a = register(app, key, "a")
    b = register(app, crypto.generate_key(), "b")
    register(app, crypto.generate_key(), "c").disconnect(NAMESPACE)
    b.disconnect(NAMESPACE)  # b lost the server; a still sees it over zeroconf, in mesh mode
    a.emit("client_status", {"state": "idle", "mesh": {"mode": "online", "peers": [{"id": "b", "mode": "mesh"}]}},
           namespace=NAMESPACE)
    rows = {c["id"]: c for c in app.test_client().get("/api/clients").get_json()["clients"]}
    assert (rows["a"]["status"], rows["b"]["status"], rows["c"]["status"]) == ("idle", "mesh", "offline")
    assert rows["a"]["mesh_peers"] == ["b"]


def test_offline_contributions_are_verified_kept_once_and_change_nothing_yet(app):
    import dataclasses

    import numpy as np

    from shared.protocol import SyncHeader, encode_weights, pack_sync, sha256_hex

    key = crypto.generate_key()
    assert register(app, key, "a", num_examples=50).is_connected(NAMESPACE)
    client, auth = app.test_client(), {"Authorization": f"Bearer {ADMIN}"}
    assert client.post("/api/start", headers=auth).status_code == 200  # initial model v1; waits for clients
    loop = app.extensions["meshfed"].runs
    before = client.get("/api/model/latest").headers["X-Model-SHA256"]

    def body(delta: dict, cid: str = "k1", base: int = 1, signer=key, client_id: str = "a") -> bytes:
        payload = encode_weights(delta)
        header = SyncHeader(contribution_id=cid, client_id=client_id, base_version=base, local_steps=7,
                            num_examples=50, payload_sha256=sha256_hex(payload), peers=["b"])
        return pack_sync(dataclasses.replace(header, signature=crypto.sign(signer, header.canonical_bytes())), payload)

    zeros = {k: np.zeros_like(v) for k, v in loop.model.weights.items()}
    nan = {k: np.full_like(v, np.nan) for k, v in zeros.items()}
    post = lambda data: client.post("/api/sync", data=data, content_type="application/octet-stream")  # noqa: E731
    refusals = [(post(body(zeros, signer=crypto.generate_key())), "bad_signature"),
                (post(body(zeros, base=99)), "wrong_version"),
                (post(body(nan)), "non_finite"),
                (post(body({"w": np.zeros(3, np.float32)})), "shape_mismatch"),
                (post(b"MFS1junk"), "malformed")]
    assert [(r.status_code >= 400, r.get_json()["reason"]) for r, _ in refusals] == [(True, w) for _, w in refusals]
    first, again = post(body(zeros)), post(body(zeros))
    assert first.get_json() == {"accepted": True, "duplicate": False, "merged_version": None}
    assert again.get_json()["duplicate"] is True
    mesh = client.get("/api/mesh").get_json()
    assert [(c["client_id"], c["local_steps"], c["merged_version"]) for c in mesh["contributions"]] == [("a", 7, None)]
    assert mesh["edges"] == [["a", "b"]]
    assert client.get("/api/model/latest").headers["X-Model-SHA256"] == before  # merged by the next round only
    client.post("/api/stop", headers=auth)
    assert loop.wait_inactive(10)  # the loop records the stop first


def _killed_after_committing_round_1(tmp_path, num_rounds: int, finished: str | None) -> tuple[ServerConfig, str]:
    """A state dir as a server SIGKILLed between committing round 1's model and evaluating it leaves it:
    the run 'running' (or `finished`, if round 1 was the last), round 1 stored without an accuracy."""
    from shared.protocol import encode_weights
    cfg = ServerConfig(state_dir=str(tmp_path / "state"), admin_token=ADMIN, enrollment_token=ENROLL,
                       run=RunConfig(dataset="synthetic", model="mlp", num_rounds=num_rounds))
    first = create_app(cfg)
    loop, store = first.extensions["meshfed"].runs, first.extensions["meshfed"].store
    run_id = loop.start()
    loop.stop()
    assert loop.wait_inactive(10)
    weights = {k: v + 0.01 for k, v in loop.model.weights.items()}  # what round 1's aggregation produced
    row = {"round": 1, "accuracy": None, "loss": None, "num_clients": 1, "num_selected": 1, "num_refused": 0,
           "seconds": 1.0, "train_seconds": 0.5, "eval_seconds": None, "clients": ["c0"]}
    version = store.commit_round(run_id, 1, store.write_checkpoint(encode_weights(weights)), loop.global_version, row,
                                 finished)
    if finished is None:
        store.set_run_status(run_id, "running")  # as the killed server left it
    store.close()
    assert version == 2
    return cfg, run_id


def test_a_finished_runs_last_round_left_unevaluated_is_evaluated_in_the_background(tmp_path):
    """SIGKILL between committing the last round and evaluating it: the run is finished, so nothing
    resumes; the restarted server evaluates that model without making start-up wait for it."""
    cfg, _ = _killed_after_committing_round_1(tmp_path, num_rounds=1, finished="max_rounds")
    second = create_app(cfg)
    meshfed = second.extensions["meshfed"]
    spawned: list = []
    meshfed.runs._spawn = spawned.append  # hold the background task to see start-up did not run it
    assert not meshfed.runs.resume_if_interrupted() and len(spawned) == 1
    assert second.test_client().get("/api/metrics").get_json()["rounds"] == []  # not evaluated yet
    spawned[0]()
    rounds = second.test_client().get("/api/metrics").get_json()["rounds"]
    assert [r["round"] for r in rounds] == [1] and 0 <= rounds[0]["accuracy"] <= 1 and rounds[0]["loss"] > 0
    assert meshfed.store.latest_run()["status"] == "finished"
    meshfed.store.close()


def test_a_round_committed_but_not_evaluated_is_hidden_then_evaluated_on_restart(tmp_path):
    """SIGKILL between committing a round's model and evaluating it: the round counts (the run
    resumes after it), /api/metrics leaves it out until the restarted server has evaluated it."""
    cfg, run_id = _killed_after_committing_round_1(tmp_path, num_rounds=5, finished=None)
    second = create_app(cfg)
    client = second.extensions["meshfed"]
    assert client.store.rounds(run_id) == [] and len(client.store.rounds(run_id, evaluated_only=False)) == 1
    assert client.runs.resume_if_interrupted()
    wait_until(lambda: client.store.rounds(run_id), 20, "round 1 evaluated after the restart", every=0.05)
    rounds = second.test_client().get("/api/metrics").get_json()["rounds"]
    client.runs.stop()
    assert [r["round"] for r in rounds] == [1] and rounds[0]["model_version"] == 2
    assert 0 <= rounds[0]["accuracy"] <= 1 and rounds[0]["loss"] > 0
    assert client.store.get_version(2)["accuracy"] == rounds[0]["accuracy"]
    assert client.runs.run.completed >= 1  # resumed after round 1, not before it
    assert client.runs.wait_inactive(10)
    client.store.close()


def test_the_client_table_is_built_only_while_a_dashboard_watches(app):
    from dashboard.events import push_clients
    meshfed = app.extensions["meshfed"]
    assert not push_clients(meshfed.socketio, meshfed)  # nobody watches this process, and no queue to others
    browser = app.test_client()
    browser.get(f"/?token={ADMIN}")
    live = meshfed.socketio.test_client(app, namespace="/dashboard", flask_test_client=browser)
    assert live.is_connected("/dashboard") and push_clients(meshfed.socketio, meshfed)
    assert any(m["name"] == "clients_update" for m in live.get_received("/dashboard"))
    live.disconnect(namespace="/dashboard")
    assert not push_clients(meshfed.socketio, meshfed)
