"""Runs: start one (or resume the stored one), stop it, roll the model back, change the configuration, and
resume after a crash. A run's thread plays its rounds with a RoundLoop (app/rounds.py) until it finishes or
stops. No Flask here: the transport and the thread spawner are handed in.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from app.collection import clients_to_wait_for
from app.config import RunConfig, update_run_config
from app.privacy import check_model, delta_problem
from app.rounds import Phase, RoundLoop
from shared.errors import ConfigError, MeshfedError
from shared.models import weight_spec
from shared.protocol import encode_weights

log = logging.getLogger("meshfed.runs")


class Conflict(MeshfedError):
    """The action does not fit the current state (e.g. Start while a run is active)."""


@dataclass
class Run:
    """The run being played, or the last one. Its fields change under Runs' lock."""

    config: RunConfig
    id: str | None = None
    phase: Phase = Phase.IDLE
    active: bool = False
    completed: int = 0          # rounds completed
    playing: int | None = None  # the round being played, if any
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = "stopped by operator"
    thread: threading.Thread | None = None
    began: dict[str, Any] = field(default_factory=dict)  # how Start began it: resumed, continued or fresh, and why


def _thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True, name="round-loop")
    thread.start()
    return thread


class Runs:
    def __init__(self, rounds: RoundLoop, run_config: RunConfig, spawn: Callable[[Callable[[], None]], Any] = _thread):
        self.rounds, self.store, self.model = rounds, rounds.store, rounds.model
        self._spawn = spawn
        self._lock = threading.Lock()
        self.run = Run(run_config)
        if (stored := self.store.latest_run()) is not None:  # after a restart: the stored run, not active
            self.run = Run(update_run_config(RunConfig(), stored["config"]), stored["id"],
                           Phase.STOPPED if stored["status"] == "running" else Phase(stored["status"]),
                           completed=stored["completed_round"])
        self.model.load_latest()

    run_id = property(lambda self: self.run.id)
    run_config = property(lambda self: self.run.config)
    global_version = property(lambda self: self.model.version)

    def set_config(self, changes: dict[str, Any]) -> RunConfig:
        with self._lock:
            if self.run.active:
                raise Conflict("the run configuration cannot change while a run is active; stop it first")
            self.run.config = update_run_config(self.run.config, changes)
            return self.run.config

    def start(self, new_run: bool = False) -> str:
        """Resume the stored run if it stopped with rounds left (unless new_run); else begin a new run, which
        continues from the current global model when it can (see _continuing) or starts from a fresh one. The
        run's `began` says which, and why."""
        with self._lock:
            if self.run.active:
                raise Conflict("a run is already active; stop it before starting another")
            cfg, stored = self.run.config, self.store.latest_run()
            if problem := delta_problem(cfg, self.store.client_count()):
                raise ConfigError({"delta": problem})
            if cfg.dp == "sample":
                check_model(cfg, self.rounds.evaluator_for(cfg).input_shape)
            if not new_run and stored and stored["status"] in ("running", "stopped") and \
                    stored["completed_round"] < cfg.num_rounds and \
                    (stored["config"]["dataset"], stored["config"]["model"]) == (cfg.dataset, cfg.model):
                run = Run(cfg, stored["id"], completed=stored["completed_round"],
                          began={"how": "resumed", "from_version": self.model.version,
                                 "why": f"run {stored['id']} stopped after round {stored['completed_round']}"})
                self.store.set_run_status(run.id, "running", config=cfg.to_dict())
                log.info("resuming run %s after round %d", run.id, run.completed)
            else:
                run = Run(cfg, uuid.uuid4().hex[:12])
                initial = self.rounds.evaluator_for(cfg).initial_weights(cfg.seed)
                why = "a new run was asked for" if new_run else self._continuing(cfg, stored, initial)
                if why is None:  # the current model, its version and the strategy's state, carry on
                    run.began = {"how": "continued", "from_version": self.model.version,
                                 "why": f"the current model (version {self.model.version}) trains on"}
                    self.store.create_run(run.id, cfg.to_dict(), from_version=self.model.version)
                    log.info("new run %s continues from model version %d", run.id, self.model.version)
                else:
                    self.store.create_run(run.id, cfg.to_dict())
                    data = encode_weights(initial)
                    self.model.adopt(self.store.add_version(data, "init", run_id=run.id), data)
                    run.began = {"how": "fresh", "from_version": self.model.version, "why": why}
                    log.info("new run %s, initial model version %d (%s)", run.id, self.model.version, why)
            run.active, run.phase, self.run = True, Phase.WAITING, run
            self.rounds.merges.reset()
            self.rounds.downlink.reset()
            self.rounds.privacy.start(run.id, cfg)
            self.rounds.evaluations.forget(run.id)  # a run started again: its past worker outcomes are not news
        self.rounds.transport.publish("training_started", {"run_id": run.id, "round": run.completed, **run.began})
        run.thread = self._spawn(lambda: self._play(run))
        return run.id

    def _continuing(self, cfg: RunConfig, stored: dict[str, Any] | None, initial: dict[str, Any]) -> str | None:
        """None if a new run may continue from the current global model; else why it starts from a fresh one."""
        if stored is None or self.model.version is None:
            return "there is no model yet"
        if (stored["config"]["dataset"], stored["config"]["model"]) != (cfg.dataset, cfg.model):
            return f"the dataset or model changed (was {stored['config']['dataset']}, {stored['config']['model']})"
        if weight_spec(self.model.weights) != weight_spec(initial):
            return "the current model does not fit the configured model"
        if cfg.dp != "none":  # the current model's training is not in a new run's accountant
            return "a private run (dp) starts from a fresh model: its accountant counts all of that model's training"
        return None

    def _play(self, run: Run) -> None:
        """The run's thread: play rounds until the run finishes or stops."""
        try:
            self.rounds.evaluate_unevaluated(run.id, run.config)
            finished = None
            while finished is None and not run.stop.is_set():
                finished = self.rounds.play(run, run.completed + 1, self._phase)
            phase, reason = (Phase.FINISHED, finished) if finished else (Phase.STOPPED, run.stop_reason)
        except Exception:  # keep the server up; the run stops and says why
            log.exception("round loop failed")
            phase, reason = Phase.STOPPED, "error: see the server log"
        self.rounds.evaluations.drain()  # evaluation 'background': the run ends once its last round is evaluated
        self.store.set_run_status(run.id, phase.value, reason)
        with self._lock:
            run.active, run.phase, run.playing = False, phase, None
        log.info("run %s %s: %s", run.id, phase, reason)
        self.rounds.transport.publish("training_stopped", {"run_id": run.id, "reason": reason})
        self.rounds.transport.publish("status_update", self.status())

    def _phase(self, run: Run, phase: Phase, playing: int | None = None, completed: int | None = None) -> None:
        """The round loop reports progress: the run's phase, the round being played or just completed."""
        with self._lock:
            run.phase, run.playing = phase, playing
            run.completed = run.completed if completed is None else completed
        if phase in (Phase.WAITING, Phase.TRAINING):
            self.rounds.transport.publish("status_update", self.status())

    def resume_if_interrupted(self) -> bool:
        """Start again if the stored run was active when the server died; else evaluate an unevaluated round."""
        stored = self.store.latest_run()
        if stored is not None and stored["status"] == "running":
            self.start()
            return True
        if stored is not None:  # in the background: start-up does not wait seconds for the test set
            self._spawn(lambda: self.rounds.evaluate_unevaluated(stored["id"], self.run.config))
        return False

    def stop(self, reason: str = "stopped by operator") -> None:
        with self._lock:
            if not self.run.active:
                raise Conflict("no run is active")
            self.run.stop_reason = reason
            self.run.stop.set()
        self.rounds.wake()

    def notify(self) -> None:
        """A client connected: a run waiting for clients looks again, and dashboards see the count."""
        self.rounds.wake()
        if self.run.active and self.run.phase == Phase.WAITING:
            self.rounds.transport.publish("status_update", self.status())

    def rollback(self, version: int) -> int:
        """Make a copy of stored `version` the new global model; returns the new version number."""
        with self._lock:
            if self.run.active:
                raise Conflict("stop the run before rolling back")
            row = self.store.get_version(version)
            if row is None:
                raise KeyError(version)
            data = self.store.read_model(version)
            new = self.store.add_version(data, "rollback", run_id=self.run.id, parent=version,
                                         accuracy=row["accuracy"], loss=row["loss"])
            self.model.adopt(new, data)  # server-optimiser moments belong to the abandoned trajectory
            self.rounds.downlink.reset()  # and so does the download coding's residual
        self.rounds.transport.publish("status_update", self.status())
        return new

    def alive(self) -> bool:
        """False only if a run is active but its thread has died."""
        thread = self.run.thread
        return not self.run.active or thread is None or thread.is_alive()

    def status(self) -> dict[str, Any]:
        with self._lock:
            run = self.run
            return {"state": run.phase.value, "active": run.active, "run_id": run.id,
                    "round": run.playing or run.completed, "completed_round": run.completed,
                    "num_rounds": run.config.num_rounds, "model_version": self.model.version,
                    "clients_online": self.rounds.registry.count(), "open_round": self.rounds.collection.view(),
                    "waiting_for": clients_to_wait_for(run.config) if run.active and run.phase == Phase.WAITING
                    else None,  # connected clients a round needs before it starts
                    "secure_round": self.rounds.secure.view(), "began": run.began,
                    "config": asdict(run.config)}

    def wait_inactive(self, seconds: float) -> bool:
        """For tests and shutdown: wait until no run is active; True if none is."""
        deadline = time.monotonic() + seconds
        while self.run.active and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.run.active
