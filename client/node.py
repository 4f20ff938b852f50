"""The client's connection to the server: register over Socket.IO, train on request, post signed updates.

Control arrives on /fl; the model is fetched and the update posted over HTTP (shared/protocol.py).
python-socketio reconnects by itself (with backoff) when the server goes away and comes back.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import requests
import socketio

from client.behaviour import Behaviour, partial_batches, poison
from client.config import NodeConfig
from client.privacy import BudgetExhausted, ClientPrivacy, privatize
from client.secagg import SecureSession
from client.feedback import ErrorFeedback
from client.downloads import ModelDownloads
from client.patient import RECONNECT, PatientClient, http_session
from client.trainer import LocalTrainer
from mesh.config import trust_path
from shared import crypto
from shared.compression import COMPRESSIONS, SPARSE, compress
from shared.errors import SyncRefused
from shared.protocol import (EV_CANCEL, EV_CLIENT_STATUS, EV_NEW_MODEL, EV_SECAGG, EV_TRAIN, EV_WELCOME, NAMESPACE,
                             TrainRequest, UpdateHeader, encode_weights, pack_update, sha256_hex,
                             signed_registration)
from shared.secagg import SecAggError
from shared.training import Cancelled

log = logging.getLogger("meshfed.client")


class _EngineIONoise(logging.Filter):
    """python-engineio's client logs a lost connection as an ERROR ('packet queue is empty, aborting'); the node
    says it in words ('disconnected from the server; reconnecting'), so that line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "packet queue is empty, aborting"


logging.getLogger("engineio.client").addFilter(_EngineIONoise())
# Registration refusals that retrying cannot fix (app/enrollment.py): the client exits with a message. A refused
# enrollment token is not one: the operator may fix the server's (restarting it with the token its clients have),
# so the client keeps retrying, saying why.
FATAL_REFUSALS = ("bad_registration", "protocol_version", "key_mismatch", "bad_public_key")
TOKEN_RETRY_SECONDS = 10.0
UNREACHABLE_LOG_SECONDS = 60.0  # "server not reachable" is logged once a minute, while the client retries
PROGRESS_SECONDS = 2.0  # how often a training client reports its batches done (the dashboard table's beat)


def signed_update(key: Any, request: TrainRequest, client_id: str, num_examples: int, delta: dict,
                  metrics: dict[str, float] | None = None, epsilon: float = 0.0,
                  feedback: ErrorFeedback | None = None) -> tuple[UpdateHeader, bytes]:
    """Compress the delta as the request says (a top-k one with `feedback`'s residual, if it asks for error
    feedback), encode, hash and sign: (header, payload) for pack_update. `epsilon` is the privacy this client
    spent in the run (signed: the server relies on it)."""
    rng, started = np.random.default_rng(), time.perf_counter()
    if feedback is not None and request.compression in SPARSE and request.error_feedback:
        arrays = feedback.compress(request.run_id, delta, request.compression, request.topk_ratio, rng)
    else:
        arrays = compress(delta, request.compression, rng, request.topk_ratio)
    metrics = {**(metrics or {}), "compress_seconds": time.perf_counter() - started}  # advisory, not signed
    payload = encode_weights(arrays)
    header = UpdateHeader(run_id=request.run_id, round=request.round, model_version=request.model_version,
                          client_id=client_id, num_examples=num_examples, payload_sha256=sha256_hex(payload),
                          epsilon=epsilon, metrics=metrics or {})
    return dataclasses.replace(header, signature=crypto.sign(key, header.canonical_bytes())), payload


def sync_scheme(compression: str) -> str:
    """How an offline contribution travels in a run that compresses updates with `compression`: the same dense
    scheme, or int8 for a top-k run (an offline delta is sent once: it has no next round for a residual)."""
    return "int8" if compression in SPARSE else compression if compression in ("fp16", "int8") else "none"


class Node:
    """One client process: Socket.IO for control, HTTP for weights, one worker thread for training."""

    def __init__(self, config: NodeConfig, trainer: LocalTrainer, behaviour: Behaviour = Behaviour()):
        self.config, self.trainer, self.behaviour = config, trainer, behaviour
        self._rng = np.random.default_rng(behaviour.seed)
        self._process = psutil.Process()  # one object: cpu_percent measures between its calls
        self.key = crypto.load_or_create_key(config.key_dir, config.client_id)
        self.fingerprint = crypto.fingerprint(crypto.public_pem(self.key))
        self.http = http_session()
        # Names the sender (unverified; the signature is what counts). The shipped nginx.conf routes
        # requests carrying it to the leader when several server processes share the load.
        self.http.headers["X-Meshfed-Client"] = config.client_id
        if config.ca_cert:
            self.http.verify = config.ca_cert  # python-engineio reuses it for wss:// as well
        # requests lets $REQUESTS_CA_BUNDLE override Session.verify; each request passes it explicitly
        self._verify: str | bool = config.ca_cert or True
        self.sio = PatientClient(reconnection=True, reconnection_attempts=0, http_session=self.http, **RECONNECT)
        self._requests: queue.Queue[TrainRequest] = queue.Queue()
        self._cancelled: set[tuple[str, int]] = set()
        self.fatal: str | None = None
        self._stop = threading.Event()  # run()'s: set by SIGTERM/SIGINT (run_client.py); training checks it
        self._token_refused = False  # the last connection was refused for its enrollment token: retry slowly
        self._unreachable_said: float | None = None  # when "server not reachable" was last logged (monotonic)
        self.stats = {"accepted": 0, "refused": 0}
        self.sio.on("connect", self._on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self._on_disconnect, namespace=NAMESPACE)
        self.sio.on("connect_error", self._on_connect_error, namespace=NAMESPACE)
        self.sio.on(EV_WELCOME, self._on_welcome, namespace=NAMESPACE)
        self.sio.on(EV_TRAIN, self._on_train, namespace=NAMESPACE)
        self.sio.on(EV_CANCEL, self._on_cancel, namespace=NAMESPACE)
        self.sio.on(EV_NEW_MODEL, self._on_new_model, namespace=NAMESPACE)
        self.sio.on(EV_SECAGG, self._on_secagg, namespace=NAMESPACE)
        self._secagg_inbox: dict[tuple[str, int, str], dict[str, Any]] = {}  # (run, round, stage) -> message
        self._secagg_cond = threading.Condition()
        self.train_lock = threading.Lock()  # the trainer's model is shared by rounds and mesh steps
        self._eval_lock = threading.Lock()  # the held-out evaluation of announced models, one at a time
        self._state = "idle"
        self.mesh: Any = None  # mesh.node.MeshNode with --enable-mesh
        self._evaluated: tuple[str, dict[str, float]] | None = None  # (model sha256, its held-out metrics)
        self.models = ModelDownloads(self.http, config.server_address, config.http_timeout, self._verify)
        self.privacy = ClientPrivacy(Path(config.key_dir) / f"{config.client_id}.privacy.json")
        self.feedback = ErrorFeedback(Path(config.key_dir) / f"{config.client_id}.residual.safetensors")
        if config.mesh is not None:  # zeroconf and the mesh load only when it is on
            from mesh.node import MeshNode
            self.mesh = MeshNode(config.mesh, config.client_id, self.key, trainer,
                                 f"{config.key_dir}/{config.client_id}.mesh", self.train_lock,
                                 lr=config.lr or 0.05, batch_size=config.batch_size or 32,
                                 trust_file=trust_path(config.key_dir, config.client_id))

    # --- Socket.IO handlers: record and return; the worker thread does the work ------------------

    def _on_connect(self) -> None:
        self._token_refused = False
        self._unreachable_said = None
        log.info("connected to %s", self.config.server_address)

    def _on_disconnect(self, *_: Any) -> None:
        log.warning("disconnected from the server; reconnecting in the background")

    def _on_connect_error(self, data: Any) -> None:
        message = data.get("message", str(data)) if isinstance(data, dict) else str(data)
        if message.startswith(FATAL_REFUSALS):
            self.fatal = message
        self._token_refused = message.startswith("bad_enrollment_token")
        if self._token_refused:
            log.warning("the server refused our enrollment token; retrying every %.0f s until it takes it (give "
                        "this client the server's token: --enrollment-token-file or MESHFED_ENROLLMENT_TOKEN)",
                        TOKEN_RETRY_SECONDS)
        elif message == "Connection error":  # python-socketio's word for "nothing answered"
            said = self._unreachable_said
            if said is None or time.monotonic() - said >= UNREACHABLE_LOG_SECONDS:  # said once a minute, not
                log.warning("server %s not reachable; still trying", self.config.server_address)  # every retry
                self._unreachable_said = time.monotonic()
        else:
            log.warning("connection refused: %s", message)

    def _on_welcome(self, data: dict[str, Any]) -> None:
        log.info("registered as %s (%s), %s", data.get("client_id"), data.get("fingerprint"),
                 f"run {data['run_id']}" if data.get("run_id") else "no run started yet")

    def _on_train(self, data: dict[str, Any]) -> None:
        request = TrainRequest.from_dict(data)
        self.models.coded = request.download_compression != "none"  # from here on, new models too
        self._cancelled.discard((request.run_id, request.round))  # a round played again asks afresh
        self._requests.put(request)
        with self._secagg_cond:  # a secure round we wait in is over: the server has moved on
            self._secagg_cond.notify_all()

    def _on_cancel(self, data: dict[str, Any]) -> None:
        self._cancelled.add((str(data.get("run_id")), int(data.get("round", -1))))
        with self._secagg_cond:
            self._secagg_cond.notify_all()

    def _on_secagg(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("round"), int):
            with self._secagg_cond:
                self._secagg_inbox = {k: v for k, v in self._secagg_inbox.items() if k[1] >= data["round"] - 1}
                self._secagg_inbox[(str(data.get("run_id")), data["round"], str(data.get("stage")))] = data
                self._secagg_cond.notify_all()

    def _on_new_model(self, data: dict[str, Any]) -> None:
        """A round's model is committed: fetch it and evaluate it on our held-out split now, while the
        server evaluates it too, so the next round starts training at once. Mesh clients also refresh
        the roster (everyone who trained in that round is on it)."""
        if self.mesh is not None:
            self.mesh.roster_stale = True

        def prefetch() -> None:
            try:
                if hasattr(os, "setpriority"):  # background work yields the CPU to training and serving
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
                self.evaluate_global(int(data["version"]), str(data.get("sha256", "")))
            except (requests.RequestException, KeyError, ValueError, TypeError) as exc:
                log.info("could not prefetch model %s: %s", data.get("version"), exc)
        threading.Thread(target=prefetch, daemon=True).start()

    def evaluate_global(self, version: int, sha256: str = "") -> dict[str, float]:
        """Held-out loss and accuracy of global model `version` (federated evaluation), computed once, on a model
        of its own: a round that asks to train meanwhile (a server evaluating in the background asks for the
        next round as soon as it announces the model) does not wait for it."""
        sha256, weights = self.fetch_model(version, sha256)
        with self._eval_lock:
            if self._evaluated is None or self._evaluated[0] != sha256:
                started = time.perf_counter()
                loss, accuracy = self.trainer.evaluate_apart(weights)
                self._evaluated = (sha256, {"eval_loss": loss, "eval_accuracy": accuracy,
                                            "eval_seconds": time.perf_counter() - started})
            return self._evaluated[1]

    # --- main loop -------------------------------------------------------------------------------

    def auth(self) -> dict[str, Any]:
        """The Socket.IO auth of each (re)connect: a registration signed over a fresh server challenge, which
        proves this client holds its key (app/enrollment.py). Without a challenge the server says why."""
        try:
            r = self.http.get(f"{self.config.server_address}/api/challenge", timeout=10, verify=self._verify)
            challenge = str(r.json()["challenge"]) if r.ok else "unavailable"
        except (requests.RequestException, ValueError, KeyError, TypeError):
            challenge = "unavailable"
        return signed_registration(self.key, self.config.client_id, self.trainer.num_examples, challenge,
                                   self.config.enrollment_token).to_dict()

    def connect(self, stop: threading.Event) -> bool:
        """Connect, retrying with backoff until it works, a fatal refusal, or stop; True if connected."""
        delay = 0.5
        while not stop.is_set():
            try:
                self.sio.connect(self.config.server_address, namespaces=[NAMESPACE], auth=self.auth,
                                 headers={"X-Meshfed-Client": self.config.client_id},
                                 transports=["websocket"])
                return True
            except socketio.exceptions.ConnectionError as exc:
                if self.fatal:
                    log.error("the server refused this client: %s", self.fatal)
                    return False
                if self._token_refused:
                    stop.wait(TOKEN_RETRY_SECONDS)
                    continue
                wait = delay * random.uniform(0.5, 1.5)  # clients that failed together retry apart
                log.info("server not reachable (%s); retrying in %.1fs", exc, wait)
                stop.wait(wait)
                delay = min(delay * 2, 5.0)
        return False

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve train requests until stop is set; returns a process exit code."""
        stop = self._stop = stop or threading.Event()
        if self.mesh is not None:  # before connecting: a client restarted during an outage gossips on
            self.mesh.start(connected=lambda: self.sio.connected, latest_model=self.models.latest,
                            upload=self.upload_sync, fetch_roster=self.fetch_roster,
                            report=lambda: self._emit_status(self._state), stop=stop)
        if not self.connect(stop):
            return 2 if self.fatal else 0
        try:
            while not stop.is_set():
                if self.fatal:
                    log.error("the server refused this client: %s", self.fatal)
                    return 2
                try:
                    request = self._requests.get(timeout=0.5)
                except queue.Empty:
                    continue
                while not self._requests.empty():  # only the newest request matters
                    request = self._requests.get_nowait()
                if (request.run_id, request.round) in self._cancelled:
                    continue
                try:
                    self.handle(request)
                except Exception:  # a bug in one round must not end the client: say it, wait for the next
                    log.exception("round %d failed; waiting for the next request", request.round)
        finally:
            self.sio.disconnect()
            if self.mesh is not None:
                self.mesh.close()
        return 0

    def handle(self, request: TrainRequest) -> None:
        """Fetch the model, train, sign and post the update; log the server's verdict."""
        received = time.perf_counter()
        b = self.behaviour
        if request.compression not in COMPRESSIONS:  # a newer server's scheme: training would be wasted
            log.error("round %d skipped: the server asks for compression %r; this client knows %s (upgrade it)",
                      request.round, request.compression, ", ".join(COMPRESSIONS))
            return
        if b.dropout_prob and self._rng.random() < b.dropout_prob:
            log.info("round %d: dropping out (simulated, p=%.2f)", request.round, b.dropout_prob)
            return
        self._state = "training"  # no status message: the server marked us training when it asked (send_train)
        status: dict[str, Any] = {}
        try:
            secure = self.secure_setup(request) if request.secure_aggregation != "none" else None
            if request.partition and self.trainer.repartition(request.partition, request.alpha):
                log.info("re-partitioned as %s (alpha %s): %d training samples", request.partition, request.alpha,
                         self.trainer.num_examples)
            downloads = self.models.downloads
            model_sha256, global_weights = self.fetch_model(request.model_version, request.model_sha256)
            fetch_seconds, prefetched = time.perf_counter() - received, self.models.downloads == downloads
            c = self.config
            epochs, batch_size = c.local_epochs or request.local_epochs, c.batch_size or request.batch_size
            max_batches = partial_batches(self.trainer.num_examples, batch_size, epochs, b.slowdown,
                                          request.max_batches)
            batches = epochs * -(-self.trainer.num_examples // batch_size)  # what training will do (expected,
            batches = min(batches, max_batches) if max_batches else batches  # with DP-SGD's Poisson batches)
            if self.mesh is not None:  # mesh steps train like the server's last round asked
                self.mesh.lr, self.mesh.batch_size = c.lr or request.lr, batch_size
                self.mesh.momentum = request.momentum
                self.mesh.sync_compression = sync_scheme(request.compression)
            private = request.dp in ("sample", "local")
            if private:  # a round past the budget is not trained at all (BudgetExhausted, below)
                self.privacy.plan(request, self.trainer.num_examples, epochs, batch_size, max_batches)
            with self.train_lock:
                # The held-out evaluation of this model runs on new_model, on a model of its own, if it was
                # announced (not a run's initial model); its metrics go with the update if it is done by now.
                done = self._evaluated
                evaluated = done[1] if done and done[0] == model_sha256 else {}
                delta, metrics = self.trainer.fit(
                    global_weights, epochs, c.lr or request.lr, batch_size, max_batches, seed=request.round,
                    proximal_mu=request.proximal_mu, momentum=request.momentum,
                    dp_sgd=(request.noise_multiplier, request.max_grad_norm) if request.dp == "sample" else None,
                    cancel=self._training_ticker(request, batches))
            epsilon = 0.0
            if private:  # spent once trained, recorded before the update leaves
                if request.dp == "local":
                    delta = privatize(delta, request, self._rng)
                event = (request.noise_multiplier, metrics.pop("sample_rate"), metrics.pop("steps")) \
                    if request.dp == "sample" else (request.local_epsilon,)
                epsilon = self.privacy.record(request, event)
            delta = poison(delta, b.attack, b.attack_scale, self._rng)
            if b.delay:
                time.sleep(b.delay)
            metrics.update(evaluated, **self._resources(), fetch_seconds=fetch_seconds, prefetched=float(prefetched))
            version, size, coded = self.models.last
            if version == request.model_version:  # the bytes this round's model took to download
                metrics.update(download_bytes=float(size), delta_download=float(coded))
            if secure is not None:
                verdict = self.post_secure(request, secure, delta, metrics, received, epsilon)
            else:
                verdict = self.post_update(request, delta, metrics, received, epsilon)
            log.info("round %d: trained %d batches in %.2fs, global model's held-out acc %s -> %s", request.round,
                     metrics["batches"], metrics["train_seconds"], metrics.get("eval_accuracy", "not evaluated"),
                     verdict)
        except BudgetExhausted as exc:  # the server stops asking a client whose budget is spent
            log.warning("round %d not trained: %s", request.round, exc)
            status = {"privacy": {"exhausted": True, "epsilon": self.privacy.spent(request)}}
        except requests.RequestException as exc:
            log.warning("round %d lost: server unreachable (%s)", request.round, exc)
        except SecAggError as exc:  # we send nothing more this round; the server recovers us as a dropout
            log.warning("round %d: secure aggregation: %s", request.round, exc)
        except Cancelled as exc:  # within one batch of a cancel (the round ended without us) or SIGTERM
            log.info("round %d: training %s: %s", request.round, exc,
                     "stopping" if self._stop.is_set() else "the server ended the round")
        finally:
            self._emit_status("idle", **status)

    # --- secure aggregation (client/secagg.py; app/secagg.py has the stages) -----------------------------

    def secure_setup(self, request: TrainRequest) -> SecureSession:
        """Stages 1 and 2: advertise our keys, check the roster, share our secrets, open our neighbours' shares."""
        if request.secure_aggregation != "secagg+":
            raise SecAggError(f"the server asks for {request.secure_aggregation!r}; this client knows secagg+ "
                              "(upgrade it)")
        session = SecureSession(self.key, self.config.client_id, request.run_id, request.round)
        self._secagg_send(session.keys_message())
        self._secagg_send(session.on_roster(self._secagg_wait(request, "roster", request.deadline_s)))
        session.on_shares(self._secagg_wait(request, "shares", request.deadline_s))
        return session

    def post_secure(self, request: TrainRequest, session: SecureSession, delta: dict, metrics: dict[str, float],
                    received: float, epsilon: float) -> str:
        """Stages 3 and 4: post our masked input, then reveal the shares the server asks for."""
        masked, clipped = session.masked_input(delta, self._rng)
        if clipped:
            log.info("round %d: %d coordinates clipped to the secure range +-%g", request.round, clipped,
                     session.roster["clip"])
        payload = encode_weights(masked)
        header = UpdateHeader(run_id=request.run_id, round=request.round, model_version=request.model_version,
                              client_id=self.config.client_id, num_examples=session.roster["weight"],
                              payload_sha256=sha256_hex(payload), epsilon=epsilon)
        header = dataclasses.replace(header, signature=crypto.sign(self.key, header.canonical_bytes()))
        now = time.perf_counter()
        header = dataclasses.replace(header, metrics={**metrics, "total_seconds": now - received})
        verdict = self._post(pack_update(header, payload))
        if verdict == "accepted":
            self._secagg_send(session.on_reveal(self._secagg_wait(request, "reveal", request.deadline_s)))
        return verdict

    def _secagg_send(self, message: dict[str, Any]) -> None:
        try:
            ack = self.sio.call(EV_SECAGG, message, namespace=NAMESPACE, timeout=30)
        except socketio.exceptions.SocketIOError as exc:
            raise SecAggError(f"could not send the {message['stage']} message: {exc}") from None
        if not isinstance(ack, dict) or ack.get("accepted") is not True:
            raise SecAggError(f"the server refused our {message['stage']} message: "
                              f"{ack.get('reason') if isinstance(ack, dict) else ack}")

    def _secagg_wait(self, request: TrainRequest, stage: str, timeout: float) -> dict[str, Any]:
        key, deadline = (request.run_id, request.round, stage), time.monotonic() + max(timeout, 1.0)
        with self._secagg_cond:
            while key not in self._secagg_inbox:
                if (request.run_id, request.round) in self._cancelled or not self._requests.empty():
                    raise SecAggError("the round went on without us")
                if time.monotonic() >= deadline:
                    raise SecAggError(f"no {stage} message from the server in {timeout:.0f}s")
                self._secagg_cond.wait(timeout=0.5)
            return self._secagg_inbox.pop(key)

    def fetch_model(self, version: int, sha256: str = "") -> tuple[str, dict]:
        """(sha256, weights) of global model `version` (client/downloads.py)."""
        return self.models.fetch(version, sha256)

    def upload_sync(self, body: bytes) -> dict[str, Any]:
        """POST an offline contribution; returns the server's reply, or raises SyncRefused with its reason
        (or a RequestException when the server cannot be reached)."""
        r = self.http.post(f"{self.config.server_address}/api/sync", data=body, timeout=self.config.http_timeout,
                           verify=self._verify, headers={"Content-Type": "application/octet-stream"})
        reply = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if not r.ok:
            raise SyncRefused(str(reply.get("reason", r.status_code)), str(reply.get("message", "")))
        return reply

    def fetch_roster(self) -> dict[str, Any]:
        r = self.http.get(f"{self.config.server_address}/api/roster", timeout=self.config.http_timeout,
                          verify=self._verify)
        r.raise_for_status()
        return r.json()

    def sign_update(self, request: TrainRequest, delta: dict, metrics: dict[str, float],
                    received: float | None = None, epsilon: float = 0.0) -> bytes:
        """Encode, hash, sign: the exact bytes POSTed to /api/update. With `received` (perf_counter when
        the request came) the advisory metrics also get prepare_seconds and total_seconds."""
        started = time.perf_counter()
        header, payload = signed_update(self.key, request, self.config.client_id, self.trainer.num_examples,
                                        delta, metrics, epsilon, self.feedback)
        if received is not None:  # metrics are not signed (canonical_bytes leaves them out)
            now = time.perf_counter()
            header = dataclasses.replace(header, metrics={**header.metrics, "prepare_seconds": now - started,
                                                          "total_seconds": now - received})
        return pack_update(header, payload)

    def post_update(self, request: TrainRequest, delta: dict, metrics: dict[str, float],
                    received: float | None = None, epsilon: float = 0.0) -> str:
        """Sign and post; a top-k update's residual (error feedback) is kept only once the server took it."""
        try:
            verdict = self._post(self.sign_update(request, delta, metrics, received, epsilon))
        except BaseException:
            self.feedback.discard()
            raise
        self.feedback.commit() if verdict == "accepted" or verdict.startswith("late") else self.feedback.discard()
        return verdict

    def _post(self, body: bytes) -> str:
        r = self.http.post(f"{self.config.server_address}/api/update", data=body, timeout=self.config.http_timeout,
                           verify=self._verify,
                           headers={"Content-Type": "application/octet-stream",
                                    "X-Meshfed-Client": self.config.client_id})
        reply = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if r.status_code == 202:
            return f"late: straggler {reply.get('straggler')}"
        if r.ok:
            self.stats["accepted"] += 1
            return "accepted"
        self.stats["refused"] += 1
        return f"refused ({reply.get('message', r.status_code)})"

    def _resources(self) -> dict[str, float]:
        """This process's CPU % since the previous call, and its resident memory."""
        return {"cpu_percent": self._process.cpu_percent(interval=None),
                "memory_mb": self._process.memory_info().rss / 2**20}

    def _training_ticker(self, request: TrainRequest, total: int) -> Callable[[], bool]:
        """What training calls before each batch: counts it, reports progress (batches done of `total`) with the
        status at most every PROGRESS_SECONDS, and says whether to stop (SIGTERM, or the round ended without us)."""
        done, last = 0, time.monotonic()

        def tick() -> bool:
            nonlocal done, last
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                self._emit_status("training", progress={"round": request.round, "done": done, "total": total})
            done += 1
            return self._stop.is_set() or (request.run_id, request.round) in self._cancelled
        return tick

    def _emit_status(self, state: str, **extra: Any) -> None:
        self._state = state
        mesh = {"mesh": self.mesh.summary()} if self.mesh is not None else {}
        try:
            self.sio.emit(EV_CLIENT_STATUS, {"state": state, "num_examples": self.trainer.num_examples,
                                             **self._resources(), **mesh, **extra}, namespace=NAMESPACE)
        except socketio.exceptions.SocketIOError:
            pass  # not connected right now; the next status will tell
