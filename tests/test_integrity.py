"""Integrity under attack (one enrolled client, or anyone on the network), item by item: offline contributions
cannot zero the model, advisory fields cannot stop the run, registration proves the key, refusals are charged
only to verified senders, the dashboard's socket and forms resist cross-site use, malformed input gets a 4xx,
secrets stay out of logs and `ps`, and rate limits hold. Flask's and Flask-SocketIO's test clients drive the
handlers here; tests/test_flood.py does it with real processes."""
from __future__ import annotations

import dataclasses
import json
import re
import time

import numpy as np
import pytest

from app import create_app
from app.config import RunConfig, ServerConfig
from app.enrollment import CHALLENGE_SECONDS, Enrollment
from app.ratelimit import RateLimited, RateLimits
from app.refusals import Refusal, RefusalLedger
from app.store import Store
from shared import crypto
from shared.aggregate import cap_total, clip_to_norm, staleness_weight, update_norm
from shared.errors import ConfigError, RegistrationRefused
from shared.protocol import (NAMESPACE, SyncHeader, UpdateHeader, encode_weights, pack_sync, pack_update,
                             sha256_hex, signed_registration)

ADMIN, ENROLL = "admin-secret", "enroll-secret"


@pytest.fixture
def app(tmp_path):
    app = create_app(ServerConfig(state_dir=str(tmp_path / "state"), admin_token=ADMIN, enrollment_token=ENROLL,
                                  run=RunConfig(dataset="synthetic", model="mlp")))
    yield app
    loop = app.extensions["meshfed"].runs
    if loop.status()["active"]:
        loop.stop()
        loop.wait_inactive(10)
    app.extensions["meshfed"].store.close()


@pytest.fixture(scope="module")
def key():
    return crypto.generate_key()


def connect(app, key, cid, num_examples=50, **over):
    challenge = app.test_client().get("/api/challenge").get_json()["challenge"]
    auth = {**signed_registration(key, cid, num_examples, challenge, ENROLL).to_dict(), **over}
    return app.extensions["meshfed"].socketio.test_client(app, namespace=NAMESPACE, auth=auth)


def admin(client, method, path, **kwargs):
    return client.open(path, method=method, headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)


def sync_body(key, delta, client_id="a", cid="k1", base=1, num_examples=50):
    payload = encode_weights(delta)
    header = SyncHeader(contribution_id=cid, client_id=client_id, base_version=base, local_steps=3,
                        num_examples=num_examples, payload_sha256=sha256_hex(payload))
    return pack_sync(dataclasses.replace(header, signature=crypto.sign(key, header.canonical_bytes())), payload)


def post(client, path, body):
    return client.post(path, data=body, content_type="application/octet-stream")


def model_sha(client):
    return client.get("/api/model/latest").headers["X-Model-SHA256"]


# --- 1. offline contributions cannot zero the model --------------------------------------------------------

def test_a_sync_cannot_claim_more_examples_than_registered_nor_write_anything_first(app, key):
    assert connect(app, key, "a", num_examples=50).is_connected(NAMESPACE)
    client = app.test_client()
    assert admin(client, "POST", "/api/start").status_code == 200
    loop, before = app.extensions["meshfed"].runs, model_sha(client)
    minus_global = {k: -v for k, v in loop.model.weights.items()}
    offline = loop.store.offline_dir
    r = post(client, "/api/sync", sync_body(key, minus_global, num_examples=10 ** 15))
    assert (r.status_code, r.get_json()["reason"]) == (400, "bad_examples") and "1..50" in r.get_json()["message"]
    huge = sync_body(key, minus_global).replace(b'"num_examples": 50', b'"num_examples": 10000000000000000000')
    r = post(client, "/api/sync", huge)
    assert (r.status_code, r.get_json()["reason"]) == (400, "malformed")
    assert list(offline.iterdir()) == [] and model_sha(client) == before
    assert post(client, "/api/sync", sync_body(key, minus_global)).get_json()["accepted"] is True
    r = post(client, "/api/sync", sync_body(key, minus_global, cid="k2"))  # a second one from the same base
    assert (r.status_code, r.get_json()["reason"]) == (409, "contribution_limit")
    assert len(list(offline.iterdir())) == 1


def test_merges_are_staleness_weighted_clipped_and_capped_per_client():
    assert staleness_weight(100, 0) == 100 and staleness_weight(100, 3) == 50
    delta = {"w": np.full(4, 3.0, np.float32)}  # norm 6
    clipped = clip_to_norm(delta, 1.5)
    assert np.isclose(update_norm(clipped), 1.5) and np.allclose(clipped["w"], 0.75)
    assert clip_to_norm(delta, 10.0) is delta
    assert cap_total([60.0, 60.0], 100) == [50.0, 50.0] and cap_total([10.0, 20.0], 100) == [10.0, 20.0]


# The round-level check (an offline -global under median, clipped, seen as a row) is in tests/test_rounds.py.


# --- 2. advisory fields cannot stop the run; nothing non-finite is served -------------------------------------

def test_non_finite_values_are_served_as_null_and_json_stays_standard(app):
    store = app.extensions["meshfed"].store
    client = app.test_client()
    admin(client, "POST", "/api/start")
    run_id = app.extensions["meshfed"].runs.run_id
    row = {"round": 1, "accuracy": 0.5, "loss": float("inf"), "num_clients": 1, "num_selected": 1, "num_refused": 0,
           "seconds": float("nan"), "train_seconds": 1.0, "eval_seconds": 0.1, "clients": ["a"],
           "timings": {"x": float("inf")}}
    store.commit_round(run_id, 1, store.write_checkpoint(encode_weights({"w": np.zeros(2, np.float32)})), 1, row)
    text = client.get("/api/metrics").get_data(as_text=True)
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} served"))
    assert "NaN" not in text and "Infinity" not in text
    stored = store.rounds(run_id)[0]  # and nothing non-finite was stored either
    assert stored["loss"] is None and stored["seconds"] is None and stored["timings"] == {"x": None}


# --- 3. registration proves possession of the key; one live session per id ----------------------------------

def test_registration_without_the_private_key_is_refused(app, key):
    victim_pem = crypto.public_pem(key)
    impostor = crypto.generate_key()
    challenge = app.test_client().get("/api/challenge").get_json()["challenge"]
    forged = signed_registration(impostor, "victim", 999, challenge, ENROLL)
    forged = dataclasses.replace(forged, public_key=victim_pem)  # the victim's public key, the impostor's signature
    socketio = app.extensions["meshfed"].socketio
    assert not socketio.test_client(app, namespace=NAMESPACE, auth=forged.to_dict()).is_connected(NAMESPACE)
    assert app.extensions["meshfed"].store.client("victim") is None  # nothing pinned, nothing changed


def test_a_second_live_session_for_an_id_is_refused_not_preferred(app, key):
    first = connect(app, key, "c1")
    assert first.is_connected(NAMESPACE)
    second = connect(app, key, "c1")
    assert not second.is_connected(NAMESPACE)
    registry = app.extensions["meshfed"].registry
    assert registry.get("c1") is not None and first.is_connected(NAMESPACE)
    first.disconnect(namespace=NAMESPACE)
    assert connect(app, key, "c1").is_connected(NAMESPACE)  # once the first is gone


def test_challenges_are_this_servers_fresh_and_single_use(key):
    enrollment = Enrollment(ENROLL)

    def reason(challenge, now=None, token=ENROLL, signer=key):
        r = signed_registration(signer, "c1", 10, challenge, token)
        with pytest.raises(RegistrationRefused) as info:
            enrollment.admit(r, now=now)
        return info.value.reason

    good = enrollment.challenge()
    assert enrollment.admit(signed_registration(key, "c1", 10, good, ENROLL))
    assert reason(good) == "bad_challenge"  # replayed
    assert reason(Enrollment(ENROLL).challenge()) == "bad_challenge"  # another server's (or before a restart)
    assert reason(enrollment.challenge(), now=time.time() + CHALLENGE_SECONDS + 10) == "bad_challenge"  # stale
    assert reason("x.²³.y") == "bad_challenge"
    assert reason(enrollment.challenge(), token="wrong") == "bad_enrollment_token"


@pytest.mark.parametrize("change", ["ed25519", "infinity", "2**63", "huge_exponent", "deep"])
def test_hostile_registrations_are_refused_at_once_with_a_reason(app, key, change):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    def pem(k) -> str:
        return k.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    odd_exponent = rsa.RSAPublicNumbers((1 << 100) + 1, key.public_key().public_numbers().n).public_key()
    odd_pem = odd_exponent.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    over = {"ed25519": {"public_key": pem(ed25519.Ed25519PrivateKey.generate())},
            "infinity": {"num_examples": float("inf")}, "2**63": {"num_examples": 2 ** 63},
            "huge_exponent": {"public_key": odd_pem},
            "deep": {"client_id": {"a": [[[[[[]]]]]]}}}[change]
    started = time.monotonic()
    client = connect(app, key, "c1", **over)
    assert not client.is_connected(NAMESPACE) and time.monotonic() - started < 2


# --- 4. refusals are charged only to verified senders ---------------------------------------------------------

def test_forged_updates_are_charged_to_the_address_never_to_the_client_they_name(app, key):
    assert connect(app, key, "victim").is_connected(NAMESPACE)
    client = app.test_client()
    payload = encode_weights({"w": np.zeros(2, np.float32)})
    header = UpdateHeader(run_id="r", round=1, model_version=1, client_id="victim", num_examples=5,
                          payload_sha256=sha256_hex(payload))
    forged = pack_update(dataclasses.replace(header, signature=crypto.sign(crypto.generate_key(),
                                                                            header.canonical_bytes())), payload)
    for _ in range(30):
        assert post(client, "/api/update", forged).get_json()["reason"] == "bad_signature"
        post(client, "/api/update", b"MFU1junk")
    victim = next(c for c in client.get("/api/clients").get_json()["clients"] if c["id"] == "victim")
    assert victim["refusals"] == {} and victim["reputation"] == 0.5
    addresses = client.get("/api/refusals").get_json()["addresses"]
    assert addresses[0]["refusals"] == {"bad_signature": 30, "malformed": 30}
    monitor = app.extensions["meshfed"].monitor
    assert not [a for a in monitor.snapshot()["alerts"] if "victim" in a["message"]]


def test_the_refusal_tables_stay_bounded_and_cost_one_transaction_per_flush(tmp_path):
    store = Store(tmp_path)
    ledger = RefusalLedger(store)
    calls = []
    original = store._execute
    store._execute = lambda *statements: (calls.append(len(statements)), original(*statements))[1]
    for i in range(6000):
        ledger.add(Refusal("malformed", "junk", address=f"10.0.{i // 250}.{i % 250}"))
    ledger.flush()
    assert len(calls) == 1
    counts = store._query("SELECT COUNT(DISTINCT subject) AS n FROM refusal_counts WHERE verified = 0")[0]["n"]
    assert counts == 4096 and len(store.refusals(5000)) == 1000
    store.close()


# --- 5. the dashboard against cross-site use ---------------------------------------------------------------

def csrf_token(browser) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").get_data(as_text=True)).group(1)


def test_login_and_logout_need_the_csrf_token(app):
    browser = app.test_client()
    assert browser.post("/login", data={"token": ADMIN}).status_code == 400  # no CSRF token: refused
    assert browser.get("/").status_code == 302
    assert browser.post("/login", data={"token": ADMIN, "csrf_token": csrf_token(browser)}).status_code == 302
    assert browser.get("/").status_code == 200
    assert browser.post("/logout").status_code == 400  # a cross-site form cannot log the admin out either
    assert browser.get("/").status_code == 200


def test_logout_revokes_the_session_its_copied_cookie_and_its_sockets(app):
    browser = app.test_client()
    browser.get(f"/?token={ADMIN}")
    cookie = browser.get_cookie("session").value
    socketio = app.extensions["meshfed"].socketio
    live = socketio.test_client(app, namespace="/dashboard", flask_test_client=browser)
    assert live.is_connected("/dashboard")
    page = browser.get("/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert browser.post("/logout", data={"csrf_token": token}).status_code == 302
    assert not live.is_connected("/dashboard")
    thief = app.test_client()
    thief.set_cookie("session", cookie)  # a copy of the cookie from before the logout
    assert thief.get("/").status_code == 302
    assert not socketio.test_client(app, namespace="/dashboard", flask_test_client=thief).is_connected("/dashboard")


def test_security_headers_and_a_secure_cookie_over_tls(app, tmp_path):
    r = app.test_client().get("/login")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "Secure" not in app.test_client().get(f"/?token={ADMIN}").headers["Set-Cookie"]
    assert "Secure" in app.test_client().get(f"/?token={ADMIN}", base_url="https://x").headers["Set-Cookie"]
    proxied = create_app(ServerConfig(state_dir=str(tmp_path / "p"), admin_token=ADMIN, enrollment_token=ENROLL,
                                      proxies=1, run=RunConfig(dataset="synthetic", model="mlp")))
    r = proxied.test_client().get(f"/?token={ADMIN}", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in r.headers["Set-Cookie"]  # TLS ended at the proxy in front
    proxied.extensions["meshfed"].store.close()


# --- 6. input that used to produce a 500 ------------------------------------------------------------------

@pytest.mark.parametrize("path,status", [("/api/model/²", 404), ("/api/model/" + "9" * 5000, 404),
                                         ("/api/model/99999999999999999999", 404), ("/api/model/-1", 404),
                                         ("/api/refusals?limit=abc", 400), ("/api/refusals?limit=1e20", 400),
                                         ("/api/refusals?limit=-1", 400), ("/api/nothing", 404)])
def test_odd_paths_and_parameters_get_a_json_4xx(app, path, status):
    r = app.test_client().get(path)
    assert r.status_code == status and r.is_json and r.get_json()["message"]


@pytest.mark.parametrize("body", [b"[1]", b'"x"', b"[" * 5000 + b"]" * 5000, b'{"new_run": "yes"}', b'{"new_rn": 1}',
                                  b'{"version": 1e999}', b"\xff"])
def test_odd_json_bodies_get_a_json_400(app, body):
    client = app.test_client()
    for path in ("/api/start", "/api/rollback", "/api/config"):
        r = admin(client, "POST", path, data=body, content_type="application/json")
        assert r.status_code == 400 and r.is_json, (path, body[:20], r.status_code, r.get_data()[:200])


def test_config_numbers_out_of_any_range_are_field_errors(app):
    client = app.test_client()
    r = admin(client, "POST", "/api/config", data=b'{"num_rounds": 1e308, "seed": -0.5}',
              content_type="application/json")
    assert r.status_code == 400 and set(r.get_json()["fields"]) == {"num_rounds", "seed"}
    r = admin(client, "POST", "/api/config", data=b'{"lr": 1e400}', content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"] == "bad_request"


# --- 7. secrets -------------------------------------------------------------------------------------------

def test_tokens_come_from_files_or_the_environment_and_a_flag_warns(tmp_path, capsys, monkeypatch):
    import run_server
    (tmp_path / "admin").write_text("from-a-file\n")
    monkeypatch.setenv("MESHFED_ENROLLMENT_TOKEN", "from-the-env")
    args = run_server.parse_args(["--admin-token-file", str(tmp_path / "admin"), "--state-dir", str(tmp_path / "s")])
    assert (args.admin_token, args.enrollment_token) == ("from-a-file", "from-the-env")
    assert "ps" not in capsys.readouterr().err
    run_server.parse_args(["--admin-token", "visible", "--state-dir", str(tmp_path / "s")])
    assert "visible to every user in `ps`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_server.parse_args(["--admin-token-file", str(tmp_path / "missing")])
    assert "cannot read" in capsys.readouterr().err


# --- 8. rate limits ---------------------------------------------------------------------------------------

def test_rate_limit_rules_parse_count_and_refuse():
    limits = RateLimits({"login-per-address": "3/minute", "sync-per-client": "off"})
    for _ in range(3):
        limits.hit("login-per-address", "10.0.0.1")
    with pytest.raises(RateLimited) as info:
        limits.hit("login-per-address", "10.0.0.1")
    assert info.value.reason == "rate_limited" and info.value.retry_after >= 1
    limits.hit("login-per-address", "10.0.0.2")  # another address has its own allowance
    for _ in range(1000):
        limits.hit("sync-per-client", "c1")
    assert limits.limited["login-per-address"] == 1
    assert limits.per_minute()["login-per-address"] == 3 and limits.per_minute()["sync-per-client"] == 0
    for bad in ({"nope": "1/minute"}, {"login-per-address": "often"}):
        with pytest.raises(ConfigError):
            RateLimits(bad)


def test_a_limit_lets_a_burst_through_then_its_rate_and_forgets_idle_keys(monkeypatch):
    from app import ratelimit
    clock = [1000.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ratelimit, "PRUNE_EVERY", 8)
    limits = RateLimits({"login-per-address": "4/minute"})
    for _ in range(4):  # N at once
        limits.hit("login-per-address", "a")
    with pytest.raises(RateLimited) as info:
        limits.hit("login-per-address", "a")
    assert info.value.retry_after == pytest.approx(15.0)  # a minute's 4: one every 15 s
    clock[0] += 15.0
    limits.hit("login-per-address", "a")  # one has drained
    with pytest.raises(RateLimited):
        limits.hit("login-per-address", "a")
    clock[0] += 61.0  # every bucket drained: the next sweep forgets them
    for address in "bcd":
        limits.hit("login-per-address", address)
    assert set(limits._due) == {("login-per-address", k) for k in "bcd"}


def test_over_the_limit_is_429_with_retry_after_and_counted_on_metrics(tmp_path, key):
    app = create_app(ServerConfig(state_dir=str(tmp_path), admin_token=ADMIN, enrollment_token=ENROLL,
                                  rate_limits=(("login-per-address", "2/minute"), ("update-per-address", "5/minute"),
                                               ("update-per-client", "1/minute")),
                                  run=RunConfig(dataset="synthetic", model="mlp")))
    browser = app.test_client()
    token = csrf_token(browser)
    codes = [browser.post("/login", data={"token": "guess", "csrf_token": token}).status_code for _ in range(4)]
    assert codes == [401, 401, 429, 429]
    assert connect(app, key, "c1").is_connected(NAMESPACE)
    payload = encode_weights({"w": np.zeros(2, np.float32)})
    header = UpdateHeader(run_id="r", round=1, model_version=1, client_id="c1", num_examples=5,
                          payload_sha256=sha256_hex(payload))
    signed = pack_update(dataclasses.replace(header, signature=crypto.sign(key, header.canonical_bytes())), payload)
    replies = [post(browser, "/api/update", signed) for _ in range(6)]
    reasons = [r.get_json()["reason"] for r in replies]
    assert reasons == ["no_open_round"] + ["rate_limited"] * 5, reasons
    assert replies[1].status_code == 429 and int(replies[1].headers["Retry-After"]) >= 1
    client = next(c for c in browser.get("/api/clients").get_json()["clients"] if c["id"] == "c1")
    # requests 2-5: over c1's 1/minute (verified: its own); request 6: over the address's 5/minute (not c1's)
    assert client["refusals"] == {"no_open_round": 1, "rate_limited": 4}
    metrics = browser.get("/metrics").get_data(as_text=True)
    assert 'meshfed_rate_limit_per_minute{rule="login-per-address"} 2.0' in metrics
    assert 'meshfed_rate_limited_total{rule="update-per-client"} 4.0' in metrics
    assert 'meshfed_rate_limited_total{rule="update-per-address"} 1.0' in metrics
    app.extensions["meshfed"].store.close()
