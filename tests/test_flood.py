"""A flood of hostile requests against a real server with real clients training Fashion-MNIST: 40 kinds of
malformed, forged, oversized, unsigned, altered and cross-origin requests, over 1,000 in all, from another
loopback address (127.0.0.2) than the honest clients. Once while the run waits for clients (the model must not
change), and once during a real round (every honest update must still be accepted; the rate limits must not
drop one).
Then: no 5xx, no request left unanswered, no client charged for what it did not sign, the server's memory
growth reported (test-artifacts/flood.json)."""
from __future__ import annotations

import dataclasses
import json
import socket
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import socketio
import urllib3

from shared import crypto
from shared.protocol import (NAMESPACE, SyncHeader, UpdateHeader, decode_weights, encode_weights,
                             pack_sync, pack_update, sha256_hex)
from tests.conftest import ROOT
from tests.rawclient import auth_for

ATTACKER = "127.0.0.2"   # loopback too, but not the honest clients' source address
PER_KIND = 14            # requests of each kind per phase (40 kinds: 560 a phase)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def frame(magic: bytes, head: bytes, payload: bytes = b"") -> bytes:
    return magic + struct.pack(">I", len(head)) + head + payload


def signed(key, header):
    return dataclasses.replace(header, signature=crypto.sign(key, header.canonical_bytes()))


def hostile_requests(url: str, mallory, status: dict, weights: dict) -> list[tuple[str, str, str, bytes | None, dict]]:
    """(kind, method, path, body, headers) for each kind of hostile request."""
    run, version = status["run_id"], status["model_version"]
    zeros = encode_weights({k: np.zeros_like(v) for k, v in weights.items()})
    minus_global = encode_weights({k: -v for k, v in weights.items()})
    octets = {"Content-Type": "application/octet-stream"}

    def update(client_id="mallory", key=mallory, payload=zeros, **over):
        h = UpdateHeader(run_id=run, round=status["round"] + 1, model_version=version, client_id=client_id,
                         num_examples=10, payload_sha256=sha256_hex(payload))
        return pack_update(signed(key, dataclasses.replace(h, **over)) if key else dataclasses.replace(h, **over),
                           payload)

    def sync(cid, client_id="mallory", key=mallory, payload=zeros, num_examples=10):
        h = SyncHeader(contribution_id=cid, client_id=client_id, base_version=version, local_steps=5,
                       num_examples=num_examples, payload_sha256=sha256_hex(payload))
        return pack_sync(signed(key, h), payload)

    def tamper(body: bytes, old: bytes, new: bytes) -> bytes:
        n = struct.unpack(">I", body[4:8])[0]
        head = body[8:8 + n].replace(old, new)
        return body[:4] + struct.pack(">I", len(head)) + head + body[8 + n:]

    from safetensors.numpy import save
    deep_order = save({"w": np.zeros(2, np.float32)}, metadata={"order": "[" * 50_000 + "]" * 50_000})
    nested = b'{"run_id": ' + b"[" * 60_000 + b"]" * 60_000 + b"}"
    stranger = crypto.generate_key()
    bearer = {"Authorization": "Bearer wrong-token"}
    upd, syn = f"{url}/api/update", f"{url}/api/sync"
    return [
        ("junk", "POST", upd, b"\x00junk" * 50, octets),
        ("bad_magic", "POST", upd, b"XXXX" + update()[4:], octets),
        ("header_length", "POST", upd, b"MFU1\xff\xff\xff\xff{}", octets),
        ("nested_update", "POST", upd, frame(b"MFU1", nested), octets),
        ("nested_sync", "POST", syn, frame(b"MFS1", nested), octets),
        ("round_1e999", "POST", upd, tamper(update(), b'"round": ', b'"round": 1e999, "x": '), octets),
        ("base_1e999", "POST", syn, tamper(sync("s1"), b'"base_version": ', b'"base_version": 1e999, "x": '), octets),
        ("examples_1e19", "POST", syn,
         tamper(sync("s2"), b'"num_examples": 10', b'"num_examples": 10000000000000000000'), octets),
        ("nan_metrics", "POST", upd, tamper(update(), b'"metrics": {}',
                                            b'"metrics": {"prefetched": NaN, "train_seconds": Infinity}'), octets),
        ("forged_as_c0", "POST", upd, update(client_id="c0", key=stranger), octets),
        ("forged_sync_as_c1", "POST", syn, sync("s3", client_id="c1", key=stranger), octets),
        ("unsigned_as_c0", "POST", upd, update(client_id="c0", key=None), octets),
        ("altered_after_signing", "POST", upd, tamper(update(), b'"num_examples": 10', b'"num_examples": 11'), octets),
        ("deep_safetensors", "POST", upd, update(payload=deep_order), octets),
        ("sync_1e15_examples", "POST", syn, sync("s4", num_examples=10 ** 15), octets),
        ("sync_minus_global", "POST", syn, sync("s5", payload=minus_global), octets),
        ("model_superscript", "GET", f"{url}/api/model/²", None, {}),
        ("model_5000_digits", "GET", f"{url}/api/model/{'9' * 5000}", None, {}),
        ("model_int64_overflow", "GET", f"{url}/api/model/99999999999999999999", None, {}),
        ("refusals_minus_1", "GET", f"{url}/api/refusals?limit=-1", None, {}),
        ("refusals_1e20", "GET", f"{url}/api/refusals?limit=1e20", None, {}),
        ("config_no_token", "POST", f"{url}/api/config", b'{"num_rounds": 1}', {"Content-Type": "application/json"}),
        ("config_no_bearer", "POST", f"{url}/api/config", b"{}", {"Authorization": "wrong-token"}),
        ("start_nested", "POST", f"{url}/api/start", b"[" * 10_000 + b"]" * 10_000,
         {"Content-Type": "application/json", **bearer}),
        ("rollback_1e999", "POST", f"{url}/api/rollback", b'{"version": 1e999}',
         {"Content-Type": "application/json", **bearer}),
        ("stop_wrong_token", "POST", f"{url}/api/stop", None, bearer),
        ("login_guess", "POST", f"{url}/login", b"token=guess", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("cross_origin_socket", "GET", f"{url}/socket.io/?EIO=4&transport=polling", None,
         {"Origin": "http://127.0.0.1:1"}),
        ("trace", "TRACE", upd, None, {}),
        ("put_update", "PUT", upd, b"x", octets),
        ("challenge", "GET", f"{url}/api/challenge", None, {}),
        ("status", "GET", f"{url}/api/status", None, {}),
        ("clients", "GET", f"{url}/api/clients", None, {}),
        ("metrics", "GET", f"{url}/metrics", None, {}),
        ("docs", "GET", f"{url}/api/nothing/here", None, {}),
        ("static_traversal", "GET", f"{url}/static/../../app/server.py", None, {}),
    ]


RAW = [  # (kind, request bytes): what an HTTP library would not send
    ("short_body", b"POST /api/update HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nMFU1short"),
    ("length_abc", b"POST /api/update HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("ten_gigabytes", b"POST /api/update HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"),
    ("sync_short_body", b"POST /api/sync HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\nMFS1"),
]


class Flood:
    """Sends hostile requests from ATTACKER and tallies every answer (or the lack of one)."""

    def __init__(self, url: str):
        self.url = url
        self.host, self.port = url.removeprefix("http://").split(":")
        self.pool = urllib3.PoolManager(maxsize=8, source_address=(ATTACKER, 0), retries=False,
                                        timeout=urllib3.Timeout(connect=10, read=60))
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.unanswered: list[str] = []

    def http(self, kind: str, method: str, path: str, body: bytes | None, headers: dict) -> None:
        try:
            r = self.pool.request(method, path, body=body, headers=headers, redirect=False)
            self.statuses[(kind, r.status)] += 1
        except urllib3.exceptions.HTTPError as exc:
            self.unanswered.append(f"{kind}: {exc}")

    def raw(self, kind: str, data: bytes) -> None:
        with socket.create_connection((self.host, int(self.port)), timeout=60, source_address=(ATTACKER, 0)) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        if not reply.startswith(b"HTTP/1."):
            self.unanswered.append(f"{kind}: {reply[:80]!r}")
            return
        self.statuses[(kind, int(reply.split(b" ", 2)[1]))] += 1

    def run(self, requests: list, times: int) -> None:
        jobs = [(self.http, r) for r in requests] + [(self.raw, r) for r in RAW]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for future in [pool.submit(fn, *args) for _ in range(times) for fn, args in jobs]:
                future.result()

    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.unanswered)


def refusals_of(cluster) -> dict[str, dict]:
    return {c["id"]: c["refusals"] for c in cluster.api("GET", "/api/clients").json()["clients"]}


def test_a_flood_changes_nothing_charges_nobody_and_a_real_round_survives_it(cluster, fmnist):
    cluster.start_server("--dataset", "fashion-mnist", "--model", "mlp", "--num-rounds", "1", "--min-clients", "3",
                         "--eval-limit", "1000", "--max-batches", "20", "--round-timeout", "120", "--start")
    cluster.wait_ready()
    mallory = crypto.generate_key()  # an enrolled client turned hostile: it signs with its own key
    sio = socketio.Client(reconnection=False)
    sio.connect(cluster.url, namespaces=[NAMESPACE], transports=["websocket"],
                auth=auth_for(cluster.url, mallory, "mallory", cluster.enrollment_token, num_examples=10))
    sio.disconnect()  # registered, its key pinned; gone before the round, so it is never asked to train

    def honest(i: int) -> None:
        cluster.start_client(f"c{i}", "--dataset", "fashion-mnist", "--model", "mlp", "--partition", "iid",
                             "--num-clients", "3", "--client-index", str(i), "--max-samples", "1000")
    for i in range(2):
        honest(i)
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 2, 120, "two honest clients")
    flood = Flood(cluster.url)
    pid, rss_before = cluster.server.pid, rss_mb(cluster.server.pid)

    # Phase 1: the run waits for a third client, no round runs. Nothing may change the model.
    status = cluster.status()
    weights = decode_weights(cluster.api("GET", "/api/model/latest").content)
    models_before = cluster.api("GET", "/api/models").json()
    requests_ = hostile_requests(cluster.url, mallory, status, weights)
    flood.run(requests_, PER_KIND)
    assert cluster.api("GET", "/api/models").json() == models_before
    assert cluster.status()["state"] == "waiting"

    # Phase 2: the third honest client joins and round 1 runs while the flood goes on until it is done.
    with ThreadPoolExecutor(max_workers=1) as background:
        def keep_flooding() -> None:
            sent = 0
            while sent < PER_KIND or not cluster.rounds():
                flood.run(requests_, 1)
                sent += 1
        done = background.submit(keep_flooding)
        honest(2)
        cluster.wait_until(lambda: cluster.rounds(), 240, "round 1 under the flood")
        done.result()
    round1 = cluster.rounds()[0]
    rss_after = rss_mb(pid)

    fives = {k: n for k, n in flood.statuses.items() if k[1] >= 500}
    report = {"requests": flood.total(), "kinds": len(requests_) + len(RAW), "five_hundreds": sum(fives.values()),
              "unanswered": len(flood.unanswered), "server_rss_mb": {"before": round(rss_before, 1),
                                                                      "after": round(rss_after, 1),
                                                                      "growth": round(rss_after - rss_before, 1)},
              "statuses": {f"{kind} {code}": n for (kind, code), n in sorted(flood.statuses.items())},
              "round": {"clients": round1["clients"], "accuracy": round1["accuracy"]}}
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "flood.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "statuses"}))

    assert flood.total() >= 1000 and fives == {} and flood.unanswered == [], (fives, flood.unanswered[:5])
    assert round1["clients"] == ["c0", "c1", "c2"]  # every honest update accepted, none rate-limited
    assert round1["accuracy"] > 0.4, round1  # mallory's offline -global was merged, clipped: no zeroed model
    assert cluster.api("GET", "/api/mesh").json()["contributions"][0]["merged_version"] == round1["model_version"]
    refusals = refusals_of(cluster)
    assert refusals["c0"] == {} and refusals["c1"] == {}  # forged in their names: charged to the address
    assert set(refusals["mallory"]) <= {"bad_examples", "contribution_limit", "no_open_round", "not_selected",
                                        "stale_round", "malformed", "rate_limited"}, refusals["mallory"]
    assert flood.statuses[("cross_origin_socket", 400)] == sum(n for (k, _), n in flood.statuses.items()
                                                               if k == "cross_origin_socket")  # every one refused
    assert rss_after - rss_before < 300, report["server_rss_mb"]
    assert cluster.api("GET", "/readyz").json()["ready"] is True
