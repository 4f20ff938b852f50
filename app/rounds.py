"""The federated round loop: select, ask, collect until quorum or deadline, aggregate, evaluate,
persist, publish. No Flask here: the transport and the thread spawner are handed in.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Protocol

import numpy as np

from app.config import RunConfig, update_run_config
from app.evaluator import Evaluator
from app.refusals import Refusal, RefusalLedger
from app.registry import Registry
from app.store import Store
from app.verify import OpenRound, check_arrays, check_examples, check_round, check_signature
from app import strategy
from shared.aggregate import cap_total, clip_to_norm, flag_anomalies, staleness_weight, update_norm
from shared.errors import MeshfedError, UpdateRefused
from shared.models import weight_spec
from shared.protocol import SyncHeader, TrainRequest, UpdateHeader, decode_weights, encode_weights

log = logging.getLogger("meshfed.rounds")


class Transport(Protocol):
    """The one seam between the loop and the network (Socket.IO in app/fl.py; a fake in unit tests)."""

    def send_train(self, client_id: str, request: TrainRequest) -> bool: ...
    def send_cancel(self, client_id: str, run_id: str, round_no: int) -> None: ...
    def publish(self, event: str, data: dict[str, Any]) -> None: ...
    def announce_model(self, version: int, sha256: str) -> None: ...


class Conflict(MeshfedError):
    """The action does not fit the loop's current state (e.g. Start while running)."""


MAX_CONTRIBUTIONS_PER_BASE = 1  # offline contributions a client may make from one global version


@dataclass(frozen=True)
class Verified:
    """An update or offline contribution whose signature checked out against its sender's pinned key.
    Only RoundLoop.authenticate makes one; from there on, refusals are charged to the sender."""

    header: UpdateHeader | SyncHeader
    payload: bytes
    registered_examples: int  # what the sender registered with (signed): the bound of its examples


@dataclass(frozen=True)
class Pending:
    """A delta waiting to join the next aggregation: a straggler's update or an offline contribution."""

    client_id: str
    delta: dict[str, np.ndarray]
    num_examples: int
    base_version: int          # the global version the delta was trained from (its staleness: versions since)
    cap: int                   # the client's registered examples: its merges' total weight per round
    contribution_id: str = ""  # set for offline contributions (recorded as merged with the round)


class RoundLoop:
    """Owns the global model and the run; thread-safe entry points for handlers."""

    def __init__(self, store: Store, registry: Registry, transport: Transport,
                 evaluator_for: Callable[[RunConfig], Evaluator], run_config: RunConfig, max_update_bytes: int,
                 spawn: Callable[[Callable[[], None]], Any] | None = None):
        self.store, self.registry, self.transport = store, registry, transport
        self.evaluator_for = evaluator_for  # RunConfig -> Evaluator of its dataset and model
        self.max_update_bytes = max_update_bytes
        self._spawn = spawn or self._thread_spawn
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._active = False
        self.state = "idle"                  # idle | waiting | training | aggregating | stopped | finished
        self.run_id: str | None = None
        self.run_config = run_config
        self.round = 0                       # the round being played, or the last completed one
        self._open: OpenRound | None = None
        self._delivered: dict[str, tuple[dict[str, np.ndarray], int, dict[str, float]]] = {}
        self._gone: set[str] = set()
        self._round_refusals = 0
        # closed rounds still accepting stragglers: round -> (what it accepted, who delivered or was late)
        self._closed: dict[int, tuple[OpenRound, set[str]]] = {}
        self._late: dict[str, dict[str, Any]] = {}  # stragglers seen since the last round closed
        self._late_updates: list[Pending] = []  # stragglers to merge into the next aggregation
        self._stop_reason = "stopped by operator"
        self.global_version: int | None = None
        self._global_bytes: bytes | None = None
        self._global_sha256: str | None = None
        self._global: dict[str, np.ndarray] = {}
        self._strategy_state: dict[str, np.ndarray] = {}  # saved with every checkpoint (app/strategy.py)
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.refusals = RefusalLedger(store)
        self._load_latest()

    @staticmethod
    def _thread_spawn(fn: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=fn, daemon=True, name="round-loop")
        thread.start()
        return thread

    # --- the global model ------------------------------------------------------------------------

    def _load_latest(self) -> None:
        """Adopt the stored run and newest model version, if any (after a restart)."""
        run = self.store.latest_run()
        if run is not None:
            self.run_id, self.round = run["id"], run["completed_round"]
            self.run_config = update_run_config(RunConfig(), run["config"])
            self.state = run["status"] if run["status"] != "running" else "stopped"
        latest = self.store.latest_version()
        if latest is not None:
            self._set_global(latest["version"], self.store.read_model(latest["version"]))
            state = self.store.read_state(latest["version"])
            self._strategy_state = decode_weights(state) if state else {}

    def _set_global(self, version: int, data: bytes, weights: dict[str, np.ndarray] | None = None) -> None:
        """Adopt stored `version` (its bytes, and weights if already decoded) as the global model."""
        self.global_version, self._global_bytes = version, data
        self._global_sha256 = self.store.get_version(version)["sha256"]  # hashed once, when it was stored
        self._global = weights if weights is not None else decode_weights(data)

    def global_model(self) -> tuple[int | None, bytes | None, str | None]:
        """(version, encoded bytes, sha256) of the current global model, served from memory."""
        with self._cond:
            return self.global_version, self._global_bytes, self._global_sha256

    # --- control ---------------------------------------------------------------------------------

    def set_config(self, changes: dict[str, Any]) -> RunConfig:
        with self._cond:
            if self._active:
                raise Conflict("the run configuration cannot change while a run is active; stop it first")
            self.run_config = update_run_config(self.run_config, changes)
            return self.run_config

    def start(self, new_run: bool = False) -> str:
        """Resume the stored run if it has rounds left (unless new_run), else begin a new one."""
        with self._cond:
            if self._active:
                raise Conflict("a run is already active; stop it before starting another")
            run = self.store.latest_run()
            # A stopped run resumes with the configuration as edited since, unless the edit changed
            # what the model is (dataset, model): then only a new run makes sense.
            resumable = (run is not None and run["status"] in ("running", "stopped")
                         and run["completed_round"] < self.run_config.num_rounds
                         and (run["config"]["dataset"], run["config"]["model"])
                         == (self.run_config.dataset, self.run_config.model))
            if resumable and not new_run:
                self.run_id, self.round = run["id"], run["completed_round"]
                self.store.set_run_status(self.run_id, "running", config=self.run_config.to_dict())
                log.info("resuming run %s after round %d", self.run_id, self.round)
            else:
                self.run_id, self.round = uuid.uuid4().hex[:12], 0
                self.store.create_run(self.run_id, self.run_config.to_dict())
                weights = self.evaluator_for(self.run_config).initial_weights(self.run_config.seed)
                data = encode_weights(weights)
                version = self.store.add_version(data, "init", run_id=self.run_id)
                self._set_global(version, data)
                self._strategy_state = {}
                log.info("new run %s, initial model version %d", self.run_id, version)
            self._active, self.state = True, "waiting"
            self._closed, self._late, self._late_updates = {}, {}, []
            self._stop.clear()
        self.transport.publish("training_started", {"run_id": self.run_id, "round": self.round})
        self._thread = self._spawn(self._run)
        return self.run_id

    def resume_if_interrupted(self) -> bool:
        """Start again if the stored run was active when the server died."""
        run = self.store.latest_run()
        if run is not None and run["status"] == "running":
            self.start()
            return True
        if run is not None:  # in the background: start-up does not wait seconds for the test set
            run_id = run["id"]
            self._spawn(lambda: self._evaluate_unevaluated(run_id))
        return False

    def _evaluate_unevaluated(self, run_id: str) -> None:
        """The server died between committing a round and evaluating it: evaluate that model now."""
        rounds = self.store.rounds(run_id, evaluated_only=False)
        if not rounds or rounds[-1]["accuracy"] is not None or rounds[-1]["model_version"] != self.global_version:
            return
        row, weights, t_eval = rounds[-1], self._global, time.monotonic()  # a new run may replace _global
        row["loss"], row["accuracy"] = self.evaluator_for(self.run_config)(weights)
        row["eval_seconds"] = time.monotonic() - t_eval
        self.store.record_evaluation(run_id, row["round"], row["model_version"], row)
        log.info("round %d evaluated after the restart: accuracy %.4f", row["round"], row["accuracy"])

    def stop(self, reason: str = "stopped by operator") -> None:
        with self._cond:
            if not self._active:
                raise Conflict("no run is active")
            self._stop_reason = reason
            self._stop.set()
            self._cond.notify_all()

    def rollback(self, version: int) -> int:
        """Make a copy of stored `version` the new global model; returns the new version number."""
        with self._cond:
            if self._active:
                raise Conflict("stop the run before rolling back")
            if self.store.get_version(version) is None:
                raise KeyError(version)
            data = self.store.read_model(version)
            row = self.store.get_version(version)
            new = self.store.add_version(data, "rollback", run_id=self.run_id, parent=version,
                                         accuracy=row["accuracy"], loss=row["loss"])
            self._set_global(new, data)
            self._strategy_state = {}  # server-optimiser moments belong to the abandoned trajectory
        self.transport.publish("status_update", self.status())
        return new

    def alive(self) -> bool:
        """False only if a run is active but its thread has died."""
        thread = getattr(self, "_thread", None)
        return not self._active or thread is None or thread.is_alive()

    def notify(self) -> None:
        """Wake the loop (a client connected)."""
        with self._cond:
            self._cond.notify_all()

    def client_gone(self, client_id: str) -> None:
        """A client disconnected: the open round stops waiting for it."""
        with self._cond:
            self._gone.add(client_id)
            self._cond.notify_all()

    # --- updates ---------------------------------------------------------------------------------

    def authenticate(self, header: UpdateHeader | SyncHeader, payload: bytes) -> Verified:
        """Check the signature against the sender's pinned key; UpdateRefused (nobody charged) if it fails."""
        client = self.store.client(header.client_id)
        check_signature(header, payload, client["public_key"] if client else None)
        return Verified(header, payload, int(client["num_examples"] or 0))

    def offer(self, update: Verified) -> str:
        """Add a verified update to the open round ('accepted'), or handle it as a straggler
        ('straggler_merged' / 'straggler_dropped'), or raise UpdateRefused (model untouched)."""
        header = update.header
        assert isinstance(header, UpdateHeader)
        check_examples(header.num_examples, update.registered_examples)
        with self._cond:
            open_round = self._open
            late = self._closed.get(header.round)
            if late is not None and (header.client_id in late[1] or (open_round and open_round.round == header.round)):
                late = None  # already counted there, or the round is being played again: it goes to the open one
            if late is None:
                check_round(header, open_round, set(self._delivered))
        if late is not None:
            check_round(header, late[0], late[1])  # run, version, asked: as in its own round
            return self._straggler(update, check_arrays(update.payload, late[0].spec, late[0].max_bytes,
                                                        late[0].compression))
        delta = check_arrays(update.payload, open_round.spec, open_round.max_bytes, open_round.compression)
        norm = update_norm(delta)  # for the anomaly scores and merge clipping, while the delta is in the cache
        with self._cond:  # the round may have closed while we decoded
            check_round(header, self._open, set(self._delivered))
            metrics = {**header.metrics, "arrived": time.monotonic(), "payload_bytes": len(update.payload),
                       "norm": norm}
            self._delivered[header.client_id] = (delta, header.num_examples, metrics)
            self._cond.notify_all()
        if header.notes:
            log.info("update from %s: %s", header.client_id, "; ".join(header.notes))
        return "accepted"  # counted in the client's record when its round commits

    def _straggler(self, update: Verified, delta: dict[str, np.ndarray]) -> str:
        """Record a late update from an asked client; merge it into the next aggregation if configured."""
        header = update.header
        with self._cond:
            closed = self._closed.get(header.round)
            if closed is None or header.client_id in closed[1]:
                raise UpdateRefused("stale_round", f"round {header.round} no longer takes late updates")
            closed[1].add(header.client_id)
            merge = self.run_config.stragglers == "merge"
            if merge:
                self._late_updates.append(Pending(header.client_id, delta, header.num_examples, header.model_version,
                                                  update.registered_examples))
            self._late[header.client_id] = {"round": header.round, "base_version": header.model_version,
                                            "merged": merge}
        log.info("straggler from %s for round %d: %s", header.client_id, header.round,
                 "merged into the next aggregation" if merge else "dropped")
        return "straggler_merged" if merge else "straggler_dropped"

    def offer_contribution(self, contribution: Verified) -> dict[str, Any]:
        """Keep a verified offline contribution for the next aggregation (mesh sync-back).

        Policy (FedAsync/FedBuff-style): the delta joins the next round's aggregation with weight
        num_examples / sqrt(1 + staleness), staleness = versions the global model moved since its base,
        clipped to the median norm of that round's fresh updates; one client's merges in a round weigh
        at most its registered examples, and it may make MAX_CONTRIBUTIONS_PER_BASE per base version.
        Idempotent by contribution_id; everything is checked before anything is written, and the delta
        is kept on disk until merged, so a crash loses nothing.
        """
        header = contribution.header
        assert isinstance(header, SyncHeader)
        known = self.store.contribution(header.contribution_id)
        if known is not None:
            if known["client_id"] != header.client_id:
                raise UpdateRefused("replay", "that contribution id belongs to another client")
            return {"accepted": True, "duplicate": True, "merged_version": known["merged_version"]}
        check_examples(header.num_examples, contribution.registered_examples)
        if self.store.get_version(header.base_version) is None:
            raise UpdateRefused("wrong_version", f"base version {header.base_version} is not stored here")
        made = self.store.count_contributions(header.client_id, header.base_version)
        if made >= MAX_CONTRIBUTIONS_PER_BASE:
            raise UpdateRefused("contribution_limit", f"{header.client_id!r} already made {made} contribution(s) "
                                                      f"from version {header.base_version}; train from a newer one")
        with self._cond:
            spec = weight_spec(self._global)
        check_arrays(contribution.payload, spec, self.max_update_bytes)
        if not self.store.add_contribution(header, contribution.payload):
            return {"accepted": True, "duplicate": True, "merged_version": None}
        self.store.record_accepted(header.client_id, self.round)
        log.info("offline contribution %s from %s: base v%d, %d local steps, mixed with %s; merged with the "
                 "next aggregation", header.contribution_id[:8], header.client_id, header.base_version,
                 header.local_steps, ", ".join(header.peers) or "nobody")
        self.transport.publish("mesh_update", self.mesh_view())
        with self._cond:
            self._cond.notify_all()
        return {"accepted": True, "duplicate": False, "merged_version": None}

    def mesh_view(self) -> dict[str, Any]:
        """Offline contributions and who gossiped with whom (the dashboard's mesh panel)."""
        rows = self.store.contributions()
        edges = sorted({tuple(sorted((r["client_id"], p))) for r in rows for p in r["peers"]})
        return {"contributions": [{k: r[k] for k in ("id", "client_id", "base_version", "local_steps",
                                                     "num_examples", "peers", "received", "merged_version",
                                                     "staleness", "weight")} for r in rows],
                "edges": [list(e) for e in edges]}

    def _pending_contributions(self) -> list[Pending]:
        """Stored offline contributions that fit the current model."""
        pending = []
        spec = weight_spec(self._global)
        for row in self.store.contributions(pending_only=True):
            try:
                delta = check_arrays(self.store.read_contribution(row), spec, self.max_update_bytes)
            except (UpdateRefused, OSError) as exc:  # e.g. a new run with another model: stays pending, visible
                log.warning("offline contribution %s cannot be merged into this model: %s", row["id"][:8], exc)
                continue
            client = self.store.client(row["client_id"])
            pending.append(Pending(row["client_id"], delta, row["num_examples"], row["base_version"],
                                   int(client["num_examples"] or 0) if client else 0, row["id"]))
        return pending

    def _staleness(self, base_version: int) -> int:
        """Model versions the global model moved since `base_version` (the one count of staleness)."""
        return (self.global_version or 0) - base_version

    def _weigh(self, pending: list[Pending], max_norm: float) -> list[tuple[dict[str, np.ndarray], float]]:
        """(delta, weight) of each pending merge: staleness-weighted, clipped to max_norm (the median norm of
        the round's fresh updates), and one client's merges capped together at its registered examples."""
        weights = [staleness_weight(p.num_examples, self._staleness(p.base_version)) for p in pending]
        for client in {p.client_id for p in pending}:
            mine = [i for i, p in enumerate(pending) if p.client_id == client]
            for i, w in zip(mine, cap_total([weights[i] for i in mine], pending[mine[0]].cap)):
                weights[i] = w
        return [(clip_to_norm(p.delta, max_norm), w) for p, w in zip(pending, weights)]

    def count_refusal(self, refusal: Refusal) -> None:
        """Count a refusal (app/refusals.py: charged to a client only if its signature verified)."""
        with self._cond:
            if refusal.verified and self._open is not None and refusal.round == self._open.round:
                self._round_refusals += 1
        self.refusals.add(refusal)
        who = refusal.client_id or f"unverified sender at {refusal.address}"
        if refusal.verified:
            log.warning("refused update from %s: %s: %s", who, refusal.reason, refusal.message)
            self.transport.publish("update_refused", {"client_id": refusal.client_id, "round": refusal.round,
                                                      "reason": refusal.reason, "message": refusal.message})
        else:  # a flood must not flood the log or the dashboards: counted, and logged at debug level
            log.debug("refused a request from %s: %s: %s", who, refusal.reason, refusal.message)

    # --- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._evaluate_unevaluated(self.run_id)
            reason = None
            while reason is None and not self._stop.is_set():
                reason = self._play_round(self.round + 1)
            status, reason = ("finished", reason) if reason else ("stopped", self._stop_reason)
        except Exception:  # keep the server up; the run stops and says why
            log.exception("round loop failed")
            status, reason = "stopped", "error: see the server log"
        self.store.set_run_status(self.run_id, status, reason)
        with self._cond:
            self._active, self._open, self.state = False, None, status
        log.info("run %s %s: %s", self.run_id, status, reason)
        self.transport.publish("training_stopped", {"run_id": self.run_id, "reason": reason})
        self.transport.publish("status_update", self.status())

    def _wait_for_clients(self, cfg: RunConfig) -> list[str] | None:
        with self._cond:
            self.state = "waiting"
        self.transport.publish("status_update", self.status())
        while not self._stop.is_set():
            online = [s.client_id for s in self.registry.online()]
            if len(online) >= cfg.min_fit_clients:
                return online
            with self._cond:
                self._cond.wait(timeout=0.5)
        return None

    def _select(self, online: list[str], cfg: RunConfig, round_no: int) -> list[str]:
        k = max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(online)))
        if cfg.max_fit_clients:
            k = min(k, cfg.max_fit_clients)
        rng = random.Random(f"{cfg.seed}/{self.run_id}/{round_no}")
        return sorted(rng.sample(online, min(k, len(online))))

    def _play_round(self, round_no: int) -> str | None:
        """Play one round; returns why the run finished, or None to go on."""
        cfg = self.run_config
        online = self._wait_for_clients(cfg)
        if online is None:
            return None
        started = time.monotonic()
        selected = self._select(online, cfg, round_no)
        request = TrainRequest(run_id=self.run_id, round=round_no, model_version=self.global_version,
                               model_sha256=self._global_sha256,
                               local_epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                               max_batches=cfg.max_batches, deadline_s=cfg.round_timeout,
                               partition=cfg.partition, alpha=cfg.alpha,
                               proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
                               compression=cfg.compression, momentum=cfg.momentum)
        with self._cond:
            self.round, self.state = round_no, "training"
            self._open = OpenRound(self.run_id, round_no, self.global_version, frozenset(selected),
                                   weight_spec(self._global), self.max_update_bytes, cfg.compression)
            self._delivered, self._gone, self._round_refusals = {}, set(), 0
        self.transport.publish("status_update", self.status())
        reached = {cid for cid in selected if self.transport.send_train(cid, request)}
        dispatched = time.monotonic() - started
        deadline = started + cfg.round_timeout
        with self._cond:
            self._gone |= set(selected) - reached
            while not self._stop.is_set():
                pending = set(selected) - set(self._delivered) - self._gone
                enough = cfg.min_updates and len(self._delivered) >= cfg.min_updates
                if not pending or enough or time.monotonic() >= deadline:
                    break
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            delivered, closed_round, self._open = dict(self._delivered), self._open, None
            refusals = self._round_refusals
            self._closed[round_no] = (closed_round, set(delivered))
            for old in [r for r in self._closed if r <= round_no - cfg.max_staleness]:
                del self._closed[old]
        for cid in set(selected) - set(delivered):
            self.transport.send_cancel(cid, self.run_id, round_no)
        if self._stop.is_set():
            return None
        need = max(1, math.ceil(cfg.quorum * len(selected)))
        if len(delivered) < need:
            log.warning("round %d: %d of %d replied, quorum is %d; playing the round again",
                        round_no, len(delivered), len(selected), need)
            with self._cond:
                self.round = round_no - 1
            self._stop.wait(1.0)  # do not spin when clients keep vanishing
            return None
        return self._close_round(round_no, cfg, selected, delivered, refusals, started, dispatched)

    def _close_round(self, round_no: int, cfg: RunConfig, selected: list[str],
                     delivered: dict[str, tuple[dict[str, np.ndarray], int, dict[str, float]]],
                     refusals: int, started: float, dispatched: float) -> str | None:
        with self._cond:
            self.state = "aggregating"
        t_aggregate = time.monotonic()
        ids = sorted(delivered)  # a fixed order: the same updates give the same model, bit for bit
        with self._cond:
            late, self._late_updates, stragglers, self._late = self._late_updates, [], self._late, {}
        offline = self._pending_contributions()
        bound = float(np.median([delivered[cid][2]["norm"] for cid in ids]))
        merges = self._weigh(late + offline, bound)
        merged = {p.contribution_id: (self._staleness(p.base_version), w) for p, (_, w) in zip(late + offline, merges)
                  if p.contribution_id}
        late_rows = {cid: {"round": s["round"], "staleness": self._staleness(s["base_version"]),
                           "merged": s["merged"]} for cid, s in stragglers.items()}
        updates = [(delivered[cid][0], delivered[cid][1]) for cid in ids] + [m for m in merges if m[1] > 0]
        try:
            new_weights, new_state = strategy.aggregate(cfg, self._global, updates, self._strategy_state)
        except ValueError as exc:  # e.g. Krum with too few updates after dropouts
            log.warning("round %d: %s; playing the round again", round_no, exc)
            with self._cond:
                self.round = round_no - 1
                self._late_updates = late + self._late_updates  # stragglers wait for the next try
                self._late = {**stragglers, **self._late}
            return None
        aggregate_seconds = time.monotonic() - t_aggregate
        # Durable first, evaluated second: the round counts once its model is committed, and clients
        # fetch that model (announce_model) while the server evaluates it on the test split. Everything
        # else after the aggregation runs on the checkpoint thread, in order, while this one evaluates:
        # encode, hash, write and fsync the checkpoint, score the updates for anomalies, commit the round
        # to SQLite, announce the model (numpy, hashlib, file I/O and torch all run outside the GIL).
        finished = "max_rounds" if round_no >= cfg.num_rounds else None
        row = {"round": round_no, "accuracy": None, "loss": None, "num_clients": len(delivered),
               "num_selected": len(selected), "num_refused": refusals,
               "seconds": time.monotonic() - started,
               "train_seconds": max((m.get("train_seconds", 0.0) for _, _, m in delivered.values()), default=0.0),
               "eval_seconds": None, "clients": ids, "flagged": {},
               "dropped": sorted(set(selected) - set(delivered)), "stragglers": late_rows,
               "offline_merged": sorted(merged),
               "timings": {  # where the round's time went, and the bytes uploaded (bench/round_overhead.py)
                   "dispatched": dispatched, "aggregate": aggregate_seconds,
                   "last_update_arrived": max(m["arrived"] for _, _, m in delivered.values()) - started,
                   **{f"client_{k}_max": max(m.get(f"{k}_seconds", 0.0) for _, _, m in delivered.values())
                      for k in ("fetch", "eval", "prepare", "total")},
                   "prefetched": sum(int(m.get("prefetched", 0)) for _, _, m in delivered.values()),
                   "upload_bytes": sum(int(m["payload_bytes"]) for _, _, m in delivered.values())}}
        flag = partial(flag_anomalies, ids, [delivered[cid][0] for cid in ids],
                       [delivered[cid][2]["norm"] for cid in ids], self._global, cfg.anomaly_z)
        committed = self._checkpointer.submit(self._commit, round_no, new_weights, new_state, flag,
                                              {**row, "timings": dict(row["timings"])}, finished, merged, started)
        row["timings"]["closed"] = time.monotonic() - started
        t_eval = time.monotonic()
        try:
            row["loss"], row["accuracy"] = self.evaluator_for(cfg)(new_weights)
            row["eval_seconds"] = time.monotonic() - t_eval
        finally:  # the round is committed (or failed to be) before the loop moves on
            version, row["timings"]["committed"], row["flagged"] = committed.result()  # normally long done
        row["model_version"] = version
        row["seconds"] = time.monotonic() - started
        if finished is None and cfg.target_accuracy and row["accuracy"] >= cfg.target_accuracy:
            finished = "target_accuracy"
        self.store.record_evaluation(self.run_id, round_no, version, row, finished)
        log.info("round %d/%d  accuracy %.4f  loss %.4f  clients %d/%d  %.2fs", round_no, cfg.num_rounds,
                 row["accuracy"], row["loss"], len(delivered), len(selected), row["seconds"])
        self.transport.publish("metrics_update", row)
        if merged:
            log.info("round %d merged %d offline contribution(s)", round_no, len(merged))
            self.transport.publish("mesh_update", self.mesh_view())
        return finished

    def _commit(self, round_no: int, weights: dict[str, np.ndarray], state: dict[str, np.ndarray],
                flag: Callable[[dict[str, np.ndarray]], dict[str, Any]], row: dict[str, Any], finished: str | None,
                merged: dict[str, tuple[int, float]], started: float) -> tuple[int, float, dict[str, Any]]:
        """On the checkpoint thread: write the round's checkpoint, flag anomalous updates, record the
        round, adopt its model, announce it. Returns (version, seconds from the round's start until
        committed, the flagged clients)."""
        data = encode_weights(weights)
        checkpoint = self.store.write_checkpoint(data, encode_weights(state) if state else None)
        row["flagged"] = flag(weights)
        version = self.store.commit_round(self.run_id, round_no, checkpoint, self.global_version, row, finished,
                                          merged)
        with self._cond:
            self._set_global(version, data, weights)
            self._strategy_state = state
        committed = time.monotonic() - started
        self.transport.announce_model(version, self._global_sha256)
        return version, committed, row["flagged"]

    # --- views -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"state": self.state, "active": self._active, "run_id": self.run_id, "round": self.round,
                    "num_rounds": self.run_config.num_rounds,
                    "model_version": self.global_version,
                    "clients_online": len(self.registry.online()),
                    "open_round": None if self._open is None else {
                        "round": self._open.round, "selected": sorted(self._open.selected),
                        "delivered": sorted(self._delivered)},
                    "config": asdict(self.run_config)}
