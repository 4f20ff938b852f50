"""The edge tier (app/tier.py, app/edge.py): the leader's collection combining edges' partial sums (unit), one
update per client and round across edges (a real redis-server), and whole tiers of real processes behind a real
nginx: protocol-level clients with an edge SIGKILLed mid-round, and real clients training Fashion-MNIST."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import redis
import requests

from app.collection import Collection, arrival_json
from app.registry import Registry, Session
from app.tier import Partial, claim
from app.verify import OpenRound, Verified
from shared.accumulator import Buffer, WeightedSum
from shared.cluster import free_port, loopback_nginx_conf
from shared.errors import UpdateRefused
from shared.protocol import UpdateHeader, encode_weights, sha256_hex
from tests.conftest import ROOT

SPEC = {"w": ((3,), "<f4")}


class FakeTier:
    """The leader tier's seam, without Redis: what the collection announced, and the partials it will gather."""

    def __init__(self, partials: list[Partial]):
        self.partials, self.announced, self.claimed = partials, [], set()

    def announce(self, r: OpenRound, shardable: bool) -> None:
        self.announced.append((r.round, shardable))

    def claim(self, header: UpdateHeader) -> None:
        if header.client_id in self.claimed:
            raise UpdateRefused("replay", "claimed")
        self.claimed.add(header.client_id)

    def gather(self, r: OpenRound) -> list[Partial]:
        return self.partials


def _update(client: str, values: list[float], examples: int = 10) -> Verified:
    payload = encode_weights({"w": np.array(values, np.float32)})
    header = UpdateHeader(run_id="r", round=1, model_version=0, client_id=client, num_examples=examples,
                          payload_sha256=sha256_hex(payload))
    return Verified(header, payload, examples)


def test_the_leader_adds_each_edges_partial_sum_like_one_more_update():
    # the edge's two clients: e1 (10 examples, delta 3) and e2 (30 examples, delta 1): mean 1.5 over 40
    partial = Partial("edge0", {"w": np.full(3, 1.5, np.float32)}, 40.0, [
        {"client_id": "e1", "num_examples": 10, "norm": 5.2, "dot": None, "metrics": {"train_seconds": 1.0},
         "epsilon": 0.0, "age": 0.5},
        {"client_id": "e2", "num_examples": 30, "norm": 1.7, "dot": 0.0, "metrics": {}, "epsilon": 0.0, "age": 0.1}])
    tier = FakeTier([partial])
    collection = Collection(None, tier)
    r = OpenRound("r", 1, 0, frozenset({"c1", "e1", "e2"}), SPEC, 1 << 20)
    collection.open(r, WeightedSum(), {})
    assert tier.announced == [(1, True)]
    assert collection.offer(_update("c1", [0.0, 0.0, 0.0]), False) == "accepted"  # the leader's own client
    with pytest.raises(UpdateRefused, match="replay"):  # claimed in the tier: not again, wherever it goes
        collection.offer(_update("c1", [0.0, 0.0, 0.0]), False)
    collection.remote_arrived("r", 1, "e1")
    collection.remote_arrived("r", 1, "e2")
    collection.remote_arrived("r", 1, "stranger")  # not asked: not counted
    started = time.monotonic()
    collection.wait(time.monotonic() + 30, 0, threading.Event())  # every asked client delivered somewhere
    assert time.monotonic() - started < 5
    arrivals, accumulator, _ = collection.close(0)
    assert [a.client_id for a in arrivals] == ["c1", "e1", "e2"]
    (mean, total), = accumulator.result()
    assert total == 50 and np.allclose(mean["w"], (10 * 0 + 40 * 1.5) / 50)  # = (0*10 + 3*10 + 1*30) / 50
    e1 = next(a for a in arrivals if a.client_id == "e1")
    assert e1.norm == 5.2 and math.isnan(e1.dot) and e1.metrics["train_seconds"] == 1.0
    assert abs(time.monotonic() - e1.metrics["arrived"] - 0.5) < 5  # its age, on this process's clock


def test_an_edge_lost_with_its_updates_is_named_and_a_double_counted_partial_left_out():
    doubled = Partial("edge1", {"w": np.ones(3, np.float32)}, 10.0, [
        {"client_id": "c1", "num_examples": 10, "norm": 1.0, "dot": 0.0, "metrics": {}, "age": 0.0}])
    collection = Collection(None, FakeTier([doubled]))
    collection.open(OpenRound("r", 1, 0, frozenset({"c1", "e9"}), SPEC, 1 << 20), WeightedSum(), {})
    collection.offer(_update("c1", [2.0, 2.0, 2.0]), False)
    collection.remote_arrived("r", 1, "e9")  # its edge took it, then died before handing its sum over
    arrivals, accumulator, _ = collection.close(0)
    assert [a.client_id for a in arrivals] == ["c1"]
    (mean, total), = accumulator.result()
    assert total == 10 and np.allclose(mean["w"], 2.0)  # edge1's sum claims c1 again: left out, not added twice
    assert collection.why()["e9"] == "its update was lost with its edge"


def test_rules_that_need_every_update_are_announced_as_not_sharded():
    tier = FakeTier([])
    Collection(None, tier).open(OpenRound("r", 3, 0, frozenset(), SPEC, 1 << 20), Buffer(), {})
    assert tier.announced == [(3, False)]


def test_arrival_json_carries_its_age_not_a_monotonic_time():
    from app.collection import Arrival
    a = Arrival("c", 5, float("nan"), 0.5, {"arrived": time.monotonic() - 2.0, "payload_bytes": 9.0}, 1.5)
    out = json.loads(json.dumps(arrival_json(a)))
    assert out["norm"] is None and out["metrics"] == {"payload_bytes": 9.0} and 1.9 < out["age"] < 3


def test_a_session_on_a_dead_edge_is_replaced_and_an_edges_sessions_end_with_it():
    registry = Registry()
    assert registry.connect(Session("a", "s1", "f", 1, edge="e0"))
    assert registry.connect(Session("b", "s2", "f", 1, edge="e1"))
    assert not registry.connect(Session("a", "s3", "f", 1, edge="e1"))
    assert not registry.connect(Session("a", "s3", "f", 1, edge="e1"), replace="s2")  # not a's session
    assert registry.connect(Session("a", "s3", "f", 1, edge="e1"), replace="s1")
    assert registry.client_for_sid("s1") is None and registry.get("a").sid == "s3"
    assert sorted(registry.drop_edge("e1")) == ["a", "b"] and registry.count() == 0


def test_sessions_whose_socket_closed_unseen_are_found_and_ended():
    """python-socketio drops the disconnect of a socket that closes while its connect handler runs; the sweep
    finds such sessions by their Engine.IO socket (gone, or closed) and ends them as a disconnect would. Each
    process sweeps only its own sessions."""
    import types

    from app.fl import closed_sessions, sweep_closed
    registry = Registry()
    for cid, sid, edge in [("a", "s1", None), ("b", "s2", None), ("c", "s3", None), ("d", "s4", "e1")]:
        registry.connect(Session(cid, sid, "f", 1, edge=edge))
    engineio = {"s1": "x1", "s2": "x2", "s3": "x3", "s4": "x4"}  # socketio sid -> Engine.IO sid
    sockets = {"x1": types.SimpleNamespace(closed=False), "x2": types.SimpleNamespace(closed=True)}  # x3, x4 gone
    dropped: list[str] = []
    server = types.SimpleNamespace(eio=types.SimpleNamespace(sockets=sockets), manager=types.SimpleNamespace(
        eio_sid_from_sid=lambda sid, ns: engineio.get(sid), disconnect=lambda sid, ns, **_: dropped.append(sid)))
    assert closed_sessions(registry, server) == ["s2", "s3"]  # the leader's own; d is edge e1's
    assert closed_sessions(registry, server, edge="e1") == ["s4"]
    gone: list[tuple[str, str]] = []
    stop = threading.Event()
    sweeper = threading.Thread(target=sweep_closed, args=(registry, server, lambda *a: gone.append(a)),
                               kwargs={"every": 0.05, "stop": stop}, daemon=True)
    sweeper.start()
    wait_until = time.monotonic() + 10
    while len(gone) < 2 and time.monotonic() < wait_until:
        time.sleep(0.05)
    stop.set()
    sweeper.join(5)
    assert not sweeper.is_alive()
    assert sorted(gone) == [("b", "s2"), ("c", "s3")] and sorted(dropped) == ["s2", "s3"]
    assert sorted(s.client_id for s in registry.online()) == ["a", "d"]


@pytest.fixture
def redis_url(cluster):
    if shutil.which("redis-server") is None:
        pytest.fail("Debian's redis-server is required; run `bash .ci/setup.sh`")
    return cluster.start_redis()


def test_one_update_per_client_and_round_across_the_tier(redis_url):
    r = redis.Redis.from_url(redis_url)
    header = _update("c1", [0.0, 0.0, 0.0]).header
    claim(r, header)  # the first edge to take it
    with pytest.raises(UpdateRefused, match="replay: 'c1' already delivered round 1"):
        claim(redis.Redis.from_url(redis_url), header)  # another edge (another connection)
    claim(r, UpdateHeader(**{**header.__dict__, "round": 2}))  # the next round is another matter
    assert 0 < r.ttl("meshfed:tier:delivered:r:1.:c1") <= 600  # marks expire
    with pytest.raises(UpdateRefused, match="queue_unreachable"):  # Redis gone: a 503 to send again, not a 500
        claim(redis.Redis(port=free_port(), socket_timeout=1), header)


def test_a_round_played_again_opens_again_at_an_edge_and_takes_its_clients_again(redis_url):
    """A failed round is played again under its number. Its second opening is a new round at the edges (not
    taken for the one they closed) and a client that delivered in the first may deliver again, once."""
    from app.edge import Bus
    from app.tier import LeaderTier
    leader = LeaderTier(redis_url, lambda *a: None, lambda m: None, lambda e: None)
    collection = Collection(None)  # the edge's
    bus = Bus(redis_url, "e0", collection)
    collection.claim = bus.claim
    bus._beat()  # alive: the leader waits for its sum
    r = OpenRound("r", 1, 0, frozenset({"c1"}), SPEC, 1 << 20)
    for opening in range(2):  # the first opening failed elsewhere (too few replied): round 1 again
        leader.announce(r, shardable=True)
        bus.sync()  # the round message, as the edge's listener applies it
        assert collection.offer(_update("c1", [1.0, 2.0, 3.0 + opening]), False) == "accepted"
        with pytest.raises(UpdateRefused, match="replay"):
            collection.offer(_update("c1", [1.0, 2.0, 3.0]), False)
        threading.Timer(0.5, bus.sync).start()  # the close message, once the leader has sent it
        partial, = leader.gather(r, timeout=10)
        assert [a["client_id"] for a in partial.arrivals] == ["c1"]
        assert np.allclose(partial.mean["w"], [1.0, 2.0, 3.0 + opening])  # this opening's update, not the last


def test_swarm_through_three_edges_with_one_killed_mid_round(tmp_path):
    """150 protocol-level clients behind nginx, spread over 3 edges; edge0 SIGKILLed once a third of round 2 was
    answered. Round 2 completes with the other edges' updates (edge0's are lost: nothing else), edge0's clients
    reconnect through nginx to the others, and round 3 has everybody again."""
    out = tmp_path / "tier.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "swarm.py"), "--clients", "150", "--edges", "3",
                           "--rounds", "3", "--kill-edge-round", "2", "--train-seconds", "4", "--round-timeout", "120",
                           "--idle", "1", "--key-dir", str(tmp_path / "keys"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [1, 2, 3] and report["lost"] == 0
    assert (rounds[1]["asked"], rounds[1]["delivered"]) == (150, 150)
    assert (rounds[3]["asked"], rounds[3]["delivered"]) == (150, 150)  # edge0's clients came back elsewhere
    killed = report["killed_edge"]
    assert killed["round"] == 2 and killed["updates_answered_before"] >= 50
    # what edge0 held when it died is lost; every other update of round 2 reached the model
    assert 150 - killed["updates_answered_before"] <= rounds[2]["delivered"] < 150
    assert report["reconnects"] > 0 and report["edge_updates_accepted"]["edge0"] is None
    assert all(report["edge_updates_accepted"][e] > 100 for e in ("edge1", "edge2"))
    assert report["mass_disconnect"]["answers_after"]


def test_real_clients_train_fashion_mnist_through_two_edges(cluster, redis_url, fmnist, tmp_path):
    """A leader, two edges on gevent (--wsgi gevent, as the README deploys them) and nginx; three real client
    processes (their own keys, real training) reach the edges through nginx, sticky by client id: two rounds
    complete with every client, the edges took the updates and served the models, and a run whose rule needs
    every update (median) is refused with a reason."""
    edge_ports, port = [free_port(), free_port()], free_port()
    cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", "2", "--min-clients", "3",
                         "--eval-limit", "500", "--message-queue", redis_url, "--proxies", "1")
    cluster.wait_ready()
    for i, edge_port in enumerate(edge_ports):
        cluster.start_edge(f"edge{i}", edge_port, redis_url, "--proxies", "1", "--wsgi", "gevent")
    for edge_port in edge_ports:
        cluster.wait_until(lambda: requests.get(f"http://127.0.0.1:{edge_port}/readyz", timeout=5).ok, 60, "an edge")
    conf = loopback_nginx_conf(tmp_path, port, cluster.port, edge_ports)
    cluster.start_program([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-e",
                           str(tmp_path / "nginx-error.log"), "-g", "daemon off;"], "nginx.log")
    front = f"http://127.0.0.1:{port}"
    cluster.wait_until(lambda: requests.get(front + "/healthz", timeout=5).ok, 30, "nginx")
    for i in range(3):
        cluster.clients[f"c{i}"] = cluster._spawn("run_client.py", [
            "--client-id", f"c{i}", "--server-address", front, "--key-dir", "keys", "--dataset", "fashion-mnist",
            "--num-clients", "3", "--client-index", str(i), "--max-samples", "300", "--torch-threads", "1"],
            f"c{i}.log")
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 3, 120, "3 clients through the edges")
    cluster.api("POST", "/api/start", admin=True).raise_for_status()
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 300, "2 rounds through the edges")
    rounds = cluster.rounds()
    assert [(r["round"], sorted(r["clients"])) for r in rounds] == [(1, ["c0", "c1", "c2"]), (2, ["c0", "c1", "c2"])]
    assert all(0.3 < r["accuracy"] <= 1 for r in rounds)  # 900 images, 2 rounds: well above chance (0.1)

    def edge_metric(edge_port: int, name: str) -> float:
        text = requests.get(f"http://127.0.0.1:{edge_port}/metrics", timeout=5).text
        found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0
    accepted = [edge_metric(p, 'meshfed_edge_updates_total{outcome="accepted"}') for p in edge_ports]
    connected = [edge_metric(p, "meshfed_clients_connected") for p in edge_ports]
    assert sum(accepted) == 6 and sum(connected) == 3  # every update and every client went through an edge
    sessions = {c["id"]: c["status"] for c in cluster.api("GET", "/api/clients").json()["clients"]}
    assert sorted(sessions) == ["c0", "c1", "c2"]  # the leader knows them all, wherever they connected
    # an edge passes other requests on as they came: never with its own (admin) credentials
    edge = f"http://127.0.0.1:{edge_ports[0]}"
    assert requests.get(edge + "/api/runs", timeout=10).json()["runs"][0]["status"] == "finished"
    assert requests.post(edge + "/api/stop", timeout=10).status_code == 401
    assert requests.post(edge + "/api/edge/disconnect", json={}, timeout=10).status_code == 401

    # a robust rule does not shard: with every client on an edge, the run finishes at once and says why
    cluster.api("POST", "/api/config", admin=True, json={"strategy": "median", "num_rounds": 1}).raise_for_status()
    run_id = cluster.api("POST", "/api/start", admin=True, json={"new_run": True}).json()["run_id"]
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 60, "the median run to refuse")
    run = next(r for r in cluster.api("GET", "/api/runs").json()["runs"] if r["id"] == run_id)
    assert run["stop_reason"].startswith("not_sharded") and run["completed_round"] == 0


def test_a_challenge_from_one_edge_registers_at_another_once(tmp_path):
    from app.edge import tier_secret
    from app.enrollment import Enrollment
    from shared import crypto
    from shared.errors import RegistrationRefused
    from shared.protocol import signed_registration
    redeemed: set[str] = set()

    def once(challenge: str, ttl: float) -> bool:  # Redis's SET NX, as app/edge.py's Bus.redeem
        fresh = challenge not in redeemed
        redeemed.add(challenge)
        return fresh
    edge_a, edge_b = (Enrollment("enroll", tier_secret("admin"), once) for _ in range(2))
    key = crypto.load_or_create_key(str(tmp_path), "c1")
    registration = signed_registration(key, "c1", 10, edge_a.challenge(), "enroll")
    assert edge_b.admit(registration) == crypto.fingerprint(registration.public_key)
    with pytest.raises(RegistrationRefused, match="used before"):
        edge_a.admit(registration)
    with pytest.raises(RegistrationRefused, match="not this server's"):  # another tier's (admin token's) challenge
        edge_b.admit(signed_registration(key, "c1", 10, Enrollment("enroll", tier_secret("other")).challenge(),
                                         "enroll"))


def test_an_edge_replaces_its_own_closed_session_never_a_live_one(cluster, redis_url, tmp_path):
    """A disconnect whose notice never reached the leader leaves it a session on an edge where that socket is
    closed. The client's next connection through that edge replaces it: the leader names the sid it holds, the
    edge finds it closed and asks again. A second connection while the first is open is refused, as before."""
    import socketio

    from shared import crypto
    from shared.protocol import NAMESPACE
    from tests.rawclient import auth_for
    cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--message-queue", redis_url)
    cluster.wait_ready()
    edge_port = free_port()
    cluster.start_edge("e1", edge_port, redis_url, "--wsgi", "gevent")
    edge = f"http://127.0.0.1:{edge_port}"
    cluster.wait_until(lambda: requests.get(edge + "/readyz", timeout=5).ok, 60, "the edge")
    key = crypto.load_or_create_key(str(tmp_path), "c1")
    pem = crypto.public_pem(key)
    lost = {"edge": "e1", "client_id": "c1", "sid": "closedlongago", "public_key": pem,
            "fingerprint": crypto.fingerprint(pem), "num_examples": 10}
    assert cluster.api("POST", "/api/edge/connect", admin=True, json=lost).ok  # what e1 said before the loss

    assert cluster.status()["clients_online"] == 1
    first, second = socketio.Client(reconnection=False), socketio.Client(reconnection=False)
    try:
        first.connect(edge, namespaces=[NAMESPACE], transports=["websocket"],
                      auth=auth_for(edge, key, "c1", cluster.enrollment_token), wait_timeout=30)
        with pytest.raises(socketio.exceptions.ConnectionError):
            second.connect(edge, namespaces=[NAMESPACE], transports=["websocket"],
                           auth=auth_for(edge, key, "c1", cluster.enrollment_token), wait_timeout=30)
        assert "refused a connection as c1 from 127.0.0.1: already_connected" in \
            (cluster.workdir / "e1.log").read_text()
        assert first.connected and cluster.status()["clients_online"] == 1
    finally:
        first.disconnect()
        second.disconnect()
    # the leader's session is the new one: its disconnect (matched by sid) ends it
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 0, 30, "the leader to hear c1 left")


def test_a_disconnect_the_leader_did_not_hear_is_told_again():
    """An edge that cannot tell the leader a client left keeps the notice (else the leader would keep the session
    and ask that client every round); a 5xx answer counts as not heard."""
    import http.server
    import types

    from app.edge import Edge, Leader
    heard: list[dict] = []

    class LeaderStandIn(http.server.BaseHTTPRequestHandler):
        status = 503

        def do_POST(self) -> None:
            heard.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(LeaderStandIn.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass
    closed = types.SimpleNamespace(edge_id="e1", unsent={}, leader=Leader(f"http://127.0.0.1:{free_port()}", "t"))
    assert not Edge.tell_gone(closed, "c1", "sid1") and closed.unsent == {"sid1": "c1"}  # nobody listens
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LeaderStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        edge = types.SimpleNamespace(edge_id="e1", unsent={},
                                     leader=Leader(f"http://127.0.0.1:{server.server_port}", "t"))
        assert not Edge.tell_gone(edge, "c1", "sid1") and edge.unsent == {"sid1": "c1"}  # 503: not heard
        LeaderStandIn.status = 200
        assert Edge.tell_gone(edge, "c1", "sid1")
        assert heard[-1] == {"edge": "e1", "client_id": "c1", "sid": "sid1"}
    finally:
        server.shutdown()
        server.server_close()
