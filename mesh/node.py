"""Mesh mode for one client: when the server is away, keep training and gossip with peers; when it is
back, upload what was learned once (signed, idempotent) and carry on as before.

A MeshNode runs beside client.node.Node:
- an HTTP endpoint (POST /mesh/gossip: a signed model in, this client's signed model out;
  GET /mesh/status: mode, peers, steps, held-out accuracy, refusals as JSON);
- zeroconf discovery (mesh/discovery.py) and static --mesh-peers;
- a supervisor thread: server unreachable for `after` seconds -> mesh mode; in mesh mode one gossip
  step every `interval` seconds (train a few local batches, exchange with `fanout` peers, mix);
  server back -> online mode, then sync the offline contribution (mesh/store.py).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

from mesh.config import MeshConfig
from mesh.discovery import Discovery, Peer, static_peers
from mesh.gossip import choose_peers, mix
from mesh.store import Contribution, OfflineStore
from mesh.trust import Trust
from mesh.wire import MeshRefused, ReplayGuard, open_message, seal
from shared import crypto
from shared.aggregate import apply_delta, subtract
from shared.errors import SyncRefused
from shared.compression import compress
from shared.protocol import SyncHeader, encode_weights, pack_sync, sha256_hex

log = logging.getLogger("meshfed.mesh")
ONLINE, MESH = "online", "mesh"




class MeshNode:
    def __init__(self, cfg: MeshConfig, client_id: str, key: Any, trainer: Any, directory: str | Path,
                 train_lock: threading.Lock, lr: float, batch_size: int, trust_file: str | Path):
        self.cfg, self.client_id, self.key, self.trainer = cfg, client_id, key, trainer
        self.train_lock, self.lr, self.batch_size = train_lock, lr, batch_size
        self.momentum = 0.0  # lr, batch size and momentum follow the server's last round (client/node.py)
        self.sync_compression = "none"  # how an offline contribution's delta travels: the run's dense scheme
        self.fingerprint = crypto.fingerprint(crypto.public_pem(key))
        self.store = OfflineStore(directory)
        self.trust = Trust(trust_file)
        self.replay = ReplayGuard()
        self.mode = ONLINE
        self.contribution: Contribution | None = None
        self.inbox: list[tuple[dict[str, np.ndarray], int, str]] = []  # models peers pushed to us
        self.refusals: Counter[str] = Counter()
        self.accuracy_at_entry: float | None = None
        self.accuracy: float | None = None
        self.synced: list[str] = []
        self.roster_stale = True  # set after every round: whoever trained in it is on the roster
        self._lock = threading.Lock()
        self._rng = random.Random(client_id)
        self._http = requests.Session()
        self._static = static_peers(cfg.static_peers)
        self.server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._serving: threading.Thread | None = None
        self.discovery = Discovery(client_id, self.fingerprint, cfg.host, self.port,
                                   interfaces=list(cfg.interfaces) or None)

    @property
    def gossip_encoding(self) -> str:
        """Models gossip as fp16 in a run that compresses (weights, not deltas: int8 would be too coarse)."""
        return "float32" if self.sync_compression == "none" else "fp16"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, connected: Callable[[], bool], latest_model: Callable[[], tuple[int, dict] | None],
              upload: Callable[[bytes], dict], fetch_roster: Callable[[], dict], report: Callable[[], None],
              stop: threading.Event) -> None:
        """`report` is called every few seconds while online: the client tells the server what its
        mesh sees (peers and their modes), which the dashboard shows live."""
        self._serving = threading.Thread(target=self.server.serve_forever, name="mesh-http", daemon=True)
        self._serving.start()
        self.discovery.start()
        threading.Thread(target=self._supervise, args=(connected, latest_model, upload, fetch_roster, report, stop),
                         name="mesh", daemon=True).start()
        log.info("mesh: gossip endpoint on http://%s:%d", self.cfg.host, self.port)

    def close(self) -> None:
        self.discovery.close()
        if self._serving is not None:  # shutdown() waits for serve_forever, forever if it never ran
            self.server.shutdown()
        self.server.server_close()

    def _supervise(self, connected: Callable[[], bool], latest_model: Callable[[], tuple[int, dict] | None],
                   upload: Callable[[bytes], dict], fetch_roster: Callable[[], dict], report: Callable[[], None],
                   stop: threading.Event) -> None:
        offline_since: float | None = None
        last_step = last_roster = last_sync = last_report = 0.0
        while not stop.wait(0.2):
            now = time.monotonic()
            try:
                if connected():
                    offline_since = None
                    if self.mode == MESH:
                        self._leave()
                    if self.roster_stale or now - last_roster > 30:
                        self.roster_stale = False
                        self.trust.accept_roster(fetch_roster())
                        last_roster = now
                    if now - last_sync > 5:
                        last_sync = now
                        self._sync(upload)
                    if now - last_report > 3:
                        last_report = now
                        report()
                    continue
                offline_since = offline_since or now
                if self.mode == ONLINE and now - offline_since >= self.cfg.after:
                    self._enter(latest_model(), now - offline_since)
                if self.mode == MESH and now - last_step >= self.cfg.interval:
                    last_step = now
                    self._gossip_step()
            except (requests.RequestException, MeshRefused, SyncRefused, ValueError) as exc:
                log.warning("mesh: %s", exc)
            except Exception:  # keep supervising: one bad step must not end the fallback
                log.exception("mesh: unexpected error; carrying on")

    def _enter(self, latest: tuple[int, dict] | None, offline_for: float) -> None:
        contribution = self.store.unsynced()  # what we learned before a restart comes first
        if contribution is None:
            if latest is None:
                return  # never had a global model: nothing to build on yet
            version, weights = latest
            contribution = self.store.begin(version, weights, self.trainer.num_examples)
        with self.train_lock:
            _, accuracy = self.trainer.evaluate(contribution.current)
        with self._lock:
            self.contribution, self.mode, self.inbox = contribution, MESH, []
            self.accuracy_at_entry = self.accuracy = accuracy
        self.discovery.set_model_version(contribution.local_steps, MESH)
        log.info("mesh mode: server unreachable for %.1fs; continuing from global v%d (%d steps so far), "
                 "held-out acc %.4f", offline_for, contribution.base_version, contribution.local_steps, accuracy)

    def _leave(self) -> None:
        with self._lock:
            self.mode = ONLINE
        self.discovery.set_model_version(0, ONLINE)
        log.info("online mode: the server is back")

    # --- gossip ----------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        return self.discovery.peers() + self._static

    def _gossip_step(self) -> None:
        c = self.contribution
        assert c is not None
        with self.train_lock:
            delta, _ = self.trainer.fit(c.current, 1, self.lr, self.batch_size, self.cfg.local_batches,
                                        seed=c.local_steps, momentum=self.momentum)
        trained = apply_delta(c.current, delta)
        received, names = [], []
        for peer in choose_peers(self.peers(), self.cfg.fanout, self._rng):
            got = self._exchange(peer, trained, c)
            if got is not None:
                received.append(got[:2])
                names.append(got[2])
        with self._lock:
            pushed, self.inbox = self.inbox, []
        newest = {sender: (w, n) for w, n, sender in pushed}  # one model per peer: its newest
        newest.update({name: got for name, got in zip(names, received)})
        names = sorted(newest)
        mixed = mix(trained, c.num_examples, [newest[name] for name in names])
        with self.train_lock:
            _, accuracy = self.trainer.evaluate(mixed)
        with self._lock:
            c.current, c.local_steps = mixed, c.local_steps + 1
            c.peers = sorted(set(c.peers) | set(names))
            self.accuracy = accuracy
        self.store.save(c)
        self.discovery.set_model_version(c.local_steps)
        log.info("gossip step %d: mixed with %s, held-out acc %.4f", c.local_steps, ", ".join(names) or "nobody",
                 accuracy)

    def _exchange(self, peer: Peer, weights: dict, c: Contribution) -> tuple[dict, int, str] | None:
        body = seal(self.key, self.client_id, weights, c.base_version, c.local_steps, c.num_examples,
                    self.gossip_encoding)
        try:
            r = self._http.post(f"{peer.address}/mesh/gossip", data=body, timeout=10,
                                headers={"Content-Type": "application/octet-stream"})
        except requests.RequestException as exc:
            log.info("mesh: %s unreachable (%s)", peer.client_id, type(exc).__name__)
            return None
        if r.status_code != 200:
            log.info("mesh: %s answered %d %s", peer.client_id, r.status_code, r.text[:200])
            return None
        try:
            header, theirs = open_message(r.content, self.trust, self.replay, self.cfg.max_bytes)
            _check_like(theirs, weights)
        except MeshRefused as exc:
            self._refused(exc, peer.client_id)
            return None
        return theirs, header.num_examples, header.sender

    def receive(self, body: bytes) -> bytes:
        """Handle one pushed model: verify, queue it for the next mix, answer with ours (signed)."""
        header, theirs = open_message(body, self.trust, self.replay, self.cfg.max_bytes)
        with self._lock:
            c = self.contribution
            if self.mode != MESH or c is None:
                raise MeshRefused("not_in_mesh", "this client is online; gossip resumes when the server is away")
            _check_like(theirs, c.current)
            self.inbox.append((theirs, header.num_examples, header.sender))
            current, steps = c.current, c.local_steps
        return seal(self.key, self.client_id, current, c.base_version, steps, c.num_examples, self.gossip_encoding)

    def _refused(self, exc: MeshRefused, sender: str) -> None:
        with self._lock:
            self.refusals[exc.reason] += 1
        log.warning("mesh: refused a message from %s: %s", sender, exc)

    # --- sync-back -------------------------------------------------------------------------------

    def _sync(self, upload: Callable[[bytes], dict]) -> None:
        c = self.store.unsynced()
        if c is None or c.local_steps == 0:
            if c is not None:
                self.store.mark_synced(c.id)  # nothing learned offline: nothing to send
            return
        scheme = self.sync_compression  # dense: an offline delta has no next round to carry a residual to
        payload = encode_weights(compress(subtract(c.current, c.base), scheme, np.random.default_rng()))
        header = SyncHeader(contribution_id=c.id, client_id=self.client_id, base_version=c.base_version,
                            local_steps=c.local_steps, num_examples=c.num_examples,
                            payload_sha256=sha256_hex(payload), peers=sorted(c.peers), compression=scheme)
        header = replace(header, signature=crypto.sign(self.key, header.canonical_bytes()))
        try:
            reply = upload(pack_sync(header, payload))  # unreachable: kept and retried (RequestException)
        except SyncRefused as exc:
            if exc.reason in SyncRefused.RETRY:
                raise
            log.warning("offline contribution %s dropped: the server refused it (%s)", c.id[:8], exc)
            self._done(c.id, synced=False)
            return
        self._done(c.id, synced=True)
        log.info("synced offline contribution %s (%d steps from v%d, mixed with %s; %d bytes as %s)%s", c.id[:8],
                 c.local_steps, c.base_version, ", ".join(c.peers) or "nobody", len(payload), scheme,
                 " (already merged)" if reply.get("duplicate") else "")

    def _done(self, contribution_id: str, synced: bool) -> None:
        """The contribution left this client (synced, or refused for good): never sent again."""
        self.store.mark_synced(contribution_id)
        with self._lock:
            if synced:
                self.synced.append(contribution_id)
            if self.contribution is not None and self.contribution.id == contribution_id:
                self.contribution = None

    def summary(self) -> dict[str, Any]:
        """What the client reports to the server: its mode and the peers it sees, with theirs."""
        return {"mode": self.mode, "peers": [{"id": p.client_id, "mode": p.mode} for p in self.discovery.peers()]}

    def status(self) -> dict[str, Any]:
        with self._lock:
            c = self.contribution
            return {"client_id": self.client_id, "fingerprint": self.fingerprint, "mode": self.mode,
                    "contribution_id": c.id if c else None, "base_version": c.base_version if c else None,
                    "steps": c.local_steps if c else 0, "mixed_with": c.peers if c else [],
                    "accuracy_at_entry": self.accuracy_at_entry, "accuracy": self.accuracy,
                    "peers": [{"client_id": p.client_id, "address": p.address, "source": p.source,
                               "fingerprint": p.fingerprint} for p in self.peers()],
                    "refusals": dict(self.refusals), "synced": list(self.synced)}


def _check_like(theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> None:
    if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape or theirs[k].dtype != ours[k].dtype
                                           for k in ours):
        raise MeshRefused("shape_mismatch", "the peer's model does not match ours")


def _handler(node: MeshNode) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a peer may take to send its request (a body shorter than announced ends here)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the node logs what matters
            pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Unknown methods are 405 (http.server's 501 says the server is at fault; it is not)."""
            super().send_error(405 if code == 501 else code, message, explain)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path == "/mesh/status":
                self._json(200, node.status())
            else:
                self._json(404, {"error": "not_found", "message": "GET /mesh/status or POST /mesh/gossip"})

        def do_POST(self) -> None:
            if self.path != "/mesh/gossip":
                return self._json(404, {"error": "not_found", "message": "POST /mesh/gossip"})
            given = self.headers.get("Content-Length") or ""
            length = int(given) if given.isascii() and given.isdigit() and len(given) <= 18 else -1
            if not 0 < length <= node.cfg.max_bytes:
                reason = "too_large" if length > 0 else "malformed"
                node._refused(MeshRefused(reason, f"Content-Length {given[:20]!r}"), self.client_address[0])
                return self._json(413 if length > 0 else 400, {
                    "reason": reason, "message": f"send a Content-Length of 1..{node.cfg.max_bytes} bytes"})
            try:
                body = self.rfile.read(length)
                if len(body) < length:
                    raise MeshRefused("malformed", f"the body ended after {len(body)} of {length} bytes")
                reply = node.receive(body)
            except MeshRefused as exc:
                if exc.reason != "not_in_mesh":
                    node._refused(exc, self.client_address[0])
                status = 403 if exc.reason in ("unknown_peer", "key_mismatch") else 409 \
                    if exc.reason == "not_in_mesh" else 400
                return self._json(status, {"reason": exc.reason, "message": str(exc)})
            except OSError:  # the peer went away or stalled past `timeout`: nobody to answer
                return
            self._send(200, reply, "application/octet-stream")

    return Handler
