"""A federated round, as McMahan et al.'s Algorithm 1 reads (play()): wait for clients, ask a fraction of them
to train from the global model, collect their updates until all answered or the deadline, aggregate, commit,
evaluate, publish. Each stage has its object: Collection (app/collection.py) collects the round and late
updates, the strategy's accumulator sums updates as they arrive, PendingMerges (app/merges.py) holds late and
offline deltas, Committer (app/committer.py) makes the round durable, GlobalModel (app/model.py) holds the model.
Runs (app/runs.py) start and stop runs and play their rounds. No Flask here: the transport is handed in.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from app import strategy
from app.collection import Collection, clients_to_wait_for, select_clients
from app.committer import Committer, RoundRow, timings
from app.config import RunConfig
from app.downlink import Downlink
from app.evaluation import EvaluationWorker, progress_log
from app.evaluator import Evaluator
from app.merges import PendingMerges
from app.model import GlobalModel
from app.privacy import RunPrivacy
from app.refusals import Refusal, RefusalLedger
from app.registry import Registry
from app.store import Store
from app.tier import LeaderTier
from app.secagg import Abandoned, SecureAggregation, secure_row
from app.verify import SECURE, OpenRound, Verified
from shared.accumulator import RingSum, WeightedSum
from shared.aggregate import update_norm
from shared.models import weight_spec
from shared.protocol import TrainRequest, decode_weights

if TYPE_CHECKING:
    from app.runs import Run

log = logging.getLogger("meshfed.rounds")
PRIVATE = ("dp", "noise_multiplier", "max_grad_norm", "clip_norm", "local_epsilon", "delta", "target_epsilon",
           "accountant")  # what a client privatising its own training is told (dp 'sample' or 'local')


class Transport(Protocol):
    """The one seam between the rounds and the network (Socket.IO in app/fl.py; a fake in unit tests)."""

    def send_train(self, client_id: str, request: TrainRequest) -> bool: ...
    def send_cancel(self, client_id: str, run_id: str, round_no: int) -> None: ...
    def publish(self, event: str, data: dict[str, Any]) -> None: ...
    def announce_model(self, version: int, sha256: str) -> None: ...
    def send_secagg(self, client_id: str, data: dict[str, Any]) -> bool: ...


NOT_SHARDED = ("not_sharded: this run's rule needs every update at the leader (robust rules, secure aggregation, "
               "client-level DP), and too few clients are connected to it rather than to an edge; route clients to "
               "the leader, or use fedavg, fedprox or a fedopt rule")


def shards(cfg: RunConfig) -> bool:
    """Whether edges may pre-aggregate this run's updates (app/tier.py): only a rule that needs just the running
    weighted mean, without secure aggregation or client-level DP."""
    return strategy.STRATEGIES[cfg.strategy].streams and cfg.secure_aggregation == "none" and cfg.dp != "client"


class Phase(StrEnum):
    IDLE, WAITING, TRAINING, AGGREGATING = "idle", "waiting", "training", "aggregating"
    STOPPED, FINISHED = "stopped", "finished"


def dropped_words(why_dropped: dict[str, str]) -> str:
    """': c2 missed the 300 s deadline, c3 disconnected' for a partial round's log line ('' when none dropped)."""
    return ": " + ", ".join(f"{cid} {why}" for cid, why in why_dropped.items()) if why_dropped else ""


class RoundLoop:
    def __init__(self, store: Store, registry: Registry, transport: Transport,
                 evaluator_for: Callable[[RunConfig], Evaluator], max_update_bytes: int,
                 tier: LeaderTier | None = None):
        self.store, self.registry, self.transport, self.evaluator_for = store, registry, transport, evaluator_for
        self.model, self.merges = GlobalModel(store), PendingMerges(store, max_update_bytes)
        self.collection = Collection(self.merges, tier)  # with edges, their partial sums too (app/tier.py)
        self.downlink = Downlink()  # delta-coded downloads (download_compression 'int8')
        self.committer = Committer(store, self.model, transport, self.downlink)
        self.refusals = RefusalLedger(store)
        self.privacy = RunPrivacy(store)
        self.evaluations = EvaluationWorker()  # evaluation 'background' (app/evaluation.py)
        self.secure = SecureAggregation(lambda cid: (store.client(cid) or {}).get("public_key"),
                                        lambda cid, data: transport.send_secagg(cid, data))
        self._cond = threading.Condition()  # wakes the wait for clients

    def play(self, run: "Run", round_no: int, report: Callable[..., None]) -> str | None:
        """Round `round_no` of `run`: why the run finished, or None to go on (a failed round is played again).
        `report(run, phase, playing, completed)` tells the run where the round is."""
        cfg = run.config
        if run.id in self.evaluations.failed:  # evaluation 'background': as an inline failure, the run stops
            raise RuntimeError("evaluating a committed round failed (see above)")
        if finished := self.evaluations.reached.pop(run.id, None):  # the last round reached target_accuracy
            return finished
        report(run, Phase.WAITING)
        online = self._wait_for_clients(cfg, run.stop)
        if online is None:
            return None
        started, eligible = time.monotonic(), self.privacy.eligible(online, cfg)        # budget left
        if self.collection.tier is not None and not shards(cfg):  # the rule needs every update here
            eligible = [cid for cid in eligible if (s := self.registry.get(cid)) is not None and s.edge is None]
            if len(eligible) < cfg.min_fit_clients:
                return NOT_SHARDED
        selected = select_clients(eligible, cfg, run.id, round_no)                      # S_t
        if finished := self.privacy.refuses(cfg, len(selected), len(online), len(eligible)):
            return finished
        secure = self.secure.open(run.id, round_no, self._weights(selected), cfg, started) \
            if cfg.secure_aggregation != "none" else None
        deadline_at = time.time() + cfg.round_timeout  # wall clock, for the dashboards' countdown
        now = self._ask(run.id, round_no, selected, cfg, deadline_at)                   # w_t to each k in S_t
        dispatched = time.monotonic() - started
        report(run, Phase.TRAINING, round_no)  # with the open round and its deadline
        if secure is not None:                                                          # keys, shares: app/secagg.py
            try:  # those who shared keys may send input from here on (Collection.admit)
                secure = self.secure.setup(secure, run.stop, self.collection.admit)
            except Abandoned as exc:
                return self._lost(run, report, round_no, selected, str(exc), cfg)
            self.collection.gone(set(selected) - set(secure.u2), "did not share its secure-aggregation keys in time")
        self.collection.wait(started + cfg.round_timeout, cfg.min_updates, run.stop)    # their deltas d_k
        arrivals, accumulator, refusals = self.collection.close(cfg.max_staleness)
        why_dropped = self._why_dropped(selected, arrivals, started, cfg, run.stop)
        for cid in why_dropped:
            self.transport.send_cancel(cid, run.id, round_no)
        if run.stop.is_set() or len(arrivals) < math.ceil(cfg.quorum * len(selected)):
            self.secure.close()
            return self._again(run, report, round_no, f"{len(arrivals)} of {len(selected)} replied"
                               + "".join(f"; {cid} {why}" for cid, why in why_dropped.items()))
        report(run, Phase.AGGREGATING, round_no)
        t_aggregate = time.monotonic()
        if secure is not None:                                                          # reveal, unmask
            try:
                mean, total = self.secure.unmask(secure, accumulator, run.stop)
            except Abandoned as exc:  # the survivors wait for a reveal that will not come: tell them
                for cid in secure.survivors:
                    self.transport.send_cancel(cid, run.id, round_no)
                return self._again(run, report, round_no, str(exc))
            accumulator, median_norm = WeightedSum(), update_norm(mean)  # no update's norm is known: the mean's
            accumulator.add(mean, total, "secure sum")
        else:
            median_norm = float(np.median([a.norm for a in arrivals]))
        taken = self.merges.take(now.version, weight_spec(now.weights), median_norm, offline=cfg.dp == "none")
        for delta, weight, key in taken.merges:                                         # + late and offline deltas
            accumulator.add(delta, weight, key)
        try:                                                                            # w_t+1 = w_t + sum n_k/n d_k
            weights, state = strategy.aggregate(cfg, now.weights, accumulator.result(), now.state)
        except ValueError as exc:  # e.g. Krum with too few updates after dropouts
            self.merges.give_back(taken)
            return self._again(run, report, round_no, str(exc))
        coded = None
        if cfg.download_compression == "int8":  # the model committed is the last one plus an int8-coded step
            weights, step = self.downlink.code(now.weights, weights)
            coded = (now.version, step)
        row = RoundRow(round_no, [a.client_id for a in arrivals], len(selected), refusals, time.monotonic() - started,
                       max(a.metrics.get("train_seconds", 0.0) for a in arrivals), sorted(why_dropped),
                       taken.stragglers, sorted(taken.contributions),
                       timings(arrivals, started, dispatched, t_aggregate),
                       privacy=self.privacy.account(cfg, accumulator, len(selected), len(eligible), arrivals),
                       secure=secure_row(secure) if secure else {}, why_dropped=why_dropped)
        row.timings["model_bytes"] = len(now.data)  # float32: what each transfer's bytes are compared with
        finished = "max_rounds" if round_no >= cfg.num_rounds else None
        committed = self.committer.submit(run.id, row, weights, state, [] if secure else arrivals,
                                          update_norm(now.step),
                                          cfg.anomaly_z, finished, taken.contributions, started, coded)
        row.timings["closed"] = time.monotonic() - started
        due = finished is not None or round_no % cfg.eval_every == 0  # evaluate every K rounds and the last
        if cfg.evaluation != "inline":  # the next round starts once the model is committed
            self._committed(row, committed.result(), started)
            self.evaluations.submit(lambda: self._evaluate_later(run.id, row, weights if due else None, cfg))
        else:
            finished = self._evaluate(run.id, row, weights if due else None, committed, finished, started, cfg)
        report(run, Phase.AGGREGATING, None, round_no)
        return finished

    def _why_dropped(self, selected: list[str], arrivals: list[Any], started: float, cfg: RunConfig,
                     stop: threading.Event) -> dict[str, str]:
        """Each asked client that did not deliver, and why: what the collection knows (disconnected, refused...),
        else the deadline it missed, the run stopping, or min_updates arriving first."""
        known, missing = self.collection.why(), sorted(set(selected) - {a.client_id for a in arrivals})
        if stop.is_set():
            default = "the run stopped"
        elif time.monotonic() >= started + cfg.round_timeout:
            default = f"missed the {cfg.round_timeout:g} s deadline"
        else:
            default = f"not waited for: min_updates ({cfg.min_updates}) arrived first"
        return {cid: known.get(cid, default) for cid in missing}

    def _wait_for_clients(self, cfg: RunConfig, stop: threading.Event) -> list[Any] | None:
        """The connected clients once clients_to_wait_for(cfg) are; after wait_timeout, once min_fit_clients
        are (None if the run stops first)."""
        needed, started, said, said_at = clients_to_wait_for(cfg), time.monotonic(), -1, 0.0
        while not stop.is_set():
            online = self.registry.online()
            waited = time.monotonic() - started
            late = bool(cfg.wait_timeout) and waited >= cfg.wait_timeout
            if len(online) >= needed:
                return online
            if late and len(online) >= cfg.min_fit_clients:
                log.warning("waited %.0f s for %d clients; the round goes ahead with the %d connected",
                            waited, needed, len(online))
                return online
            if len(online) != said and time.monotonic() - said_at >= 1.0:  # progress, at most a line a second
                said, said_at = len(online), time.monotonic()
                log.info("waiting for clients: %d/%d connected%s", said, needed,
                         f" (past wait_timeout, a round needs min_clients {cfg.min_fit_clients})" if late else "")
            with self._cond:
                self._cond.wait(timeout=0.5)
        return None

    def _ask(self, run_id: str, round_no: int, selected: list[str], cfg: RunConfig, deadline_at: float) -> Any:
        """Open the round and ask each selected client to train (the model itself travels over HTTP); returns the
        global model the round starts from."""
        now = self.model.now()
        secure = cfg.secure_aggregation != "none"  # nobody may send input before sharing keys (Collection.admit)
        self.collection.open(OpenRound(run_id, round_no, now.version, frozenset() if secure else frozenset(selected),
                                       weight_spec(now.weights), self.merges.max_bytes,
                                       SECURE if secure else cfg.compression, cfg.topk_ratio),
                             RingSum() if secure else self.privacy.accumulator(cfg, len(selected)), now.step,
                             deadline_at)
        request = TrainRequest(run_id=run_id, round=round_no, model_version=now.version, model_sha256=now.sha256,
                               local_epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                               max_batches=cfg.max_batches, deadline_s=cfg.round_timeout, partition=cfg.partition,
                               alpha=cfg.alpha, proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
                               compression=cfg.compression, topk_ratio=cfg.topk_ratio,
                               error_feedback=cfg.error_feedback == "on",
                               download_compression=cfg.download_compression, momentum=cfg.momentum,
                               secure_aggregation=cfg.secure_aggregation,
                               **({k: getattr(cfg, k) for k in PRIVATE} if cfg.dp in ("sample", "local") else {}))
        self.collection.gone({cid for cid in selected if not self.transport.send_train(cid, request)},
                             "not reached (it had just disconnected)")
        return now

    def _weights(self, selected: list[str]) -> dict[str, int]:
        """Each asked client's registered examples (what the server bounds its updates by): a secure round's
        weights, announced in its roster."""
        return {cid: int((self.store.client(cid) or {}).get("num_examples") or 1) for cid in selected}

    def _lost(self, run: "Run", report: Callable[..., None], round_no: int, selected: list[str], why: str,
              cfg: RunConfig) -> None:
        """A secure round abandoned before its inputs: close it, tell the asked clients, play it again."""
        self.collection.close(cfg.max_staleness)
        for cid in selected:
            self.transport.send_cancel(cid, run.id, round_no)
        return self._again(run, report, round_no, why)

    def _again(self, run: "Run", report: Callable[..., None], round_no: int, why: str) -> None:
        """The round failed: its run plays it again after a pause (unless the run is stopping)."""
        if not run.stop.is_set():
            log.warning("round %d: %s; playing the round again", round_no, why)
            run.stop.wait(1.0)  # do not spin when clients keep vanishing
        report(run, Phase.WAITING)

    def _evaluate(self, run_id: str, row: RoundRow, weights: dict | None, committed: Any, finished: str | None,
                  started: float, cfg: RunConfig) -> str | None:
        """Evaluate the new model (None: not this round) on the test split while it is committed; record and
        publish the round."""
        try:
            if weights is not None:
                self._score(row, weights, cfg)
        finally:  # the round is committed (or failed to be) before the loop moves on
            done = committed.result()  # normally long done
        self._committed(row, done, started)
        if finished is None and cfg.target_accuracy and row.accuracy is not None \
                and row.accuracy >= cfg.target_accuracy:
            finished = "target_accuracy"
        self._record(run_id, row, cfg, finished)
        return finished

    def _evaluate_later(self, run_id: str, row: RoundRow, weights: dict | None, cfg: RunConfig) -> None:
        """evaluation 'background': the worker evaluates a committed round while the next one trains."""
        if weights is not None:
            try:
                self._score(row, weights, cfg)
            except Exception:  # the round stays committed, unevaluated; the loop stops the run at its next round
                self.evaluations.failed.add(run_id)
                raise
            if cfg.target_accuracy and row.accuracy >= cfg.target_accuracy:
                self.evaluations.reached[run_id] = "target_accuracy"
        self._record(run_id, row, cfg)

    def _score(self, row: RoundRow, weights: dict, cfg: RunConfig) -> None:
        """The model's test loss and accuracy into the round's row, with the seconds they took."""
        started = time.monotonic()
        row.loss, row.accuracy = self.evaluator_for(cfg)(weights, progress_log(f"round {row.round}: evaluating"))
        row.eval_seconds = time.monotonic() - started

    def _committed(self, row: RoundRow, done: Any, started: float) -> None:
        row.model_version, row.flagged, row.timings["committed"] = done.version, done.flagged, done.seconds
        row.seconds = time.monotonic() - started  # to evaluated (inline) or committed (background)

    def _record(self, run_id: str, row: RoundRow, cfg: RunConfig, finished: str | None = None) -> None:
        """Store the round's evaluation (or that it had none), log its line, publish it."""
        self.store.record_evaluation(run_id, row.round, row.model_version, row.to_dict(), finished)
        quality = f"accuracy {row.accuracy:.4f}  loss {row.loss:.4f}" if row.accuracy is not None \
            else f"not evaluated (every {cfg.eval_every})"
        log.info("round %d/%d  %s  clients %d/%d%s  %.2fs", row.round, cfg.num_rounds, quality, len(row.clients),
                 row.num_selected, dropped_words(row.why_dropped), row.seconds)
        self.transport.publish("metrics_update", {**row.to_dict(), "run_id": run_id})
        if row.offline_merged:
            self.transport.publish("mesh_update", self.merges.view())

    def evaluate_unevaluated(self, run_id: str, cfg: RunConfig) -> None:
        """The server died between committing rounds and evaluating them: evaluate their models now, from the
        stored checkpoints, in round order."""
        now = self.model.now()
        for row in self.store.rounds(run_id, evaluated_only=False):
            if row["evaluated"] is not None:
                continue
            weights = now.weights if row["model_version"] == now.version \
                else decode_weights(self.store.read_model(row["model_version"]))
            started = time.monotonic()
            row["loss"], row["accuracy"] = self.evaluator_for(cfg)(weights, progress_log(
                f"round {row['round']}: evaluating after the restart"))
            row["eval_seconds"] = time.monotonic() - started
            self.store.record_evaluation(run_id, row["round"], row["model_version"], row)
            log.info("round %d evaluated after the restart: accuracy %.4f", row["round"], row["accuracy"])

    # --- what handlers call --------------------------------------------------------------------------------

    def offer_contribution(self, contribution: Verified) -> dict[str, Any]:
        """Keep a verified offline contribution for the next aggregation (app/merges.py has the policy)."""
        reply = self.merges.offer_contribution(contribution, weight_spec(self.model.weights))
        if not reply["duplicate"]:
            self.transport.publish("mesh_update", self.merges.view())
        return reply

    def count_refusal(self, refusal: Refusal) -> None:
        """Count a refusal (app/refusals.py: charged to a client only if its signature verified)."""
        if refusal.verified:
            self.collection.refused(refusal.round, refusal.client_id, refusal.reason)
            log.warning("refused update from %s: %s: %s", refusal.client_id, refusal.reason, refusal.message)
            self.transport.publish("update_refused", {"client_id": refusal.client_id, "round": refusal.round,
                                                      "reason": refusal.reason, "message": refusal.message})
        else:  # a flood must not flood the log or the dashboards: counted, and logged at debug level
            log.debug("refused a request from %s: %s: %s", refusal.address, refusal.reason, refusal.message)
        self.refusals.add(refusal)

    def wake(self) -> None:
        """A client connected, or the run is stopping: stop waiting now."""
        with self._cond:
            self._cond.notify_all()
        self.collection.wake()
