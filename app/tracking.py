"""Experiment tracking with MLflow (run_server.py --mlflow or --mlflow-uri): each meshfed run is an MLflow run.

It logs the run's configuration as parameters, each round's metrics with the round as the step (test accuracy
and loss, the round's seconds, clients asked, delivered, refused and dropped, upload bytes, and epsilon when DP is
on), and, when the run ends, the final global model (safetensors) as an artifact and the MLflow status: FINISHED,
KILLED (stopped) or FAILED. A resumed meshfed run goes on in the same MLflow run (found by its tag meshfed.run_id).

The tracker observes the events the round loop publishes (app/fl.py SocketTransport.observers) and does its work
on one thread of its own, in order: a slow or unreachable tracking server never holds a round up. A failure is
logged once per kind and the run goes on. MLflow is imported only here, and only when tracking is asked for.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.store import Store

log = logging.getLogger("meshfed.tracking")
EXPERIMENT = "meshfed"
RUN_TAG = "meshfed.run_id"
DEFAULT_DIR = "mlruns"  # --mlflow: a SQLite store and artifacts here, no server needed


def local_uri(directory: str = DEFAULT_DIR) -> str:
    """The tracking URI of --mlflow: a SQLite database in `directory` (MLflow 3 keeps its plain-file store in
    maintenance mode and refuses it by default; SQLite is its local store now)."""
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


class MlflowTracker:
    def __init__(self, uri: str, store: "Store", artifact_dir: str | None = None):
        from mlflow.tracking import MlflowClient  # here: MLflow loads only when tracking is asked for

        self.uri, self.store, self.artifact_dir = uri, store, artifact_dir
        # A SQLite store creates its tables here, on the thread that starts the server (on the tracker's own
        # thread, MLflow 3.17's Alembic migration of a new database failed in our test); a tracking server is reached
        # only from the tracker's thread, so start-up never waits for it.
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment = ""
        self._runs: dict[str, str] = {}  # meshfed run id -> MLflow run id
        self._failed: set[str] = set()
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        location = Path(self.artifact_dir).resolve().as_uri() if self.artifact_dir else None
        self._experiment = found.experiment_id if found is not None \
            else self.client.create_experiment(EXPERIMENT, artifact_location=location)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        """An event the round loop published: queued, never waited on."""
        if event in ("training_started", "metrics_update", "training_stopped"):
            self._queue.put((event, data))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            event, data = item
            try:
                if not self._experiment:
                    self._connect()
                {"training_started": self._started, "metrics_update": self._round,
                 "training_stopped": self._stopped}[event](data)
            except Exception as exc:  # the tracking server is down, a disk is full: the FL run goes on
                if event not in self._failed:
                    self._failed.add(event)
                    log.warning("MLflow (%s) failed to log %s: %s; the run goes on untracked there", self.uri,
                                event, exc)

    def _mlflow_run(self, run_id: str) -> tuple[str, bool]:
        """The MLflow run of meshfed run `run_id`: the one tagged with it (a resumed run), else a new one (True)."""
        if run_id in self._runs:
            return self._runs[run_id], False
        found = self.client.search_runs([self._experiment], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
                                        max_results=1)
        if found:
            self._runs[run_id] = found[0].info.run_id
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return self._runs[run_id], False
        self._runs[run_id] = self.client.create_run(self._experiment, run_name=run_id,
                                                    tags={RUN_TAG: run_id}).info.run_id
        return self._runs[run_id], True

    def _started(self, data: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = data["run_id"]
        mlflow_run, fresh = self._mlflow_run(run_id)
        stored = self.store.run(run_id) or {}
        if fresh:  # parameters are written once: MLflow refuses to change a logged one
            params = [Param(k, str(v)[:6000]) for k, v in sorted((stored.get("config") or {}).items())]
            self.client.log_batch(mlflow_run, params=params)
            self.client.set_tag(mlflow_run, "meshfed.began", str(data.get("how", "")))
            if data.get("from_version") is not None:
                self.client.set_tag(mlflow_run, "meshfed.from_version", str(data["from_version"]))

    def _round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        mlflow_run, step, now = self._mlflow_run(row["run_id"])[0], int(row["round"]), int(time.time() * 1000)
        timings = row.get("timings") or {}
        values = {"accuracy": row.get("accuracy"), "loss": row.get("loss"), "round_seconds": row.get("seconds"),
                  "train_seconds": row.get("train_seconds"), "eval_seconds": row.get("eval_seconds"),
                  "clients_asked": row.get("num_selected"), "clients_delivered": len(row.get("clients") or []),
                  "updates_refused": row.get("num_refused"), "clients_dropped": len(row.get("why_dropped") or {}),
                  "upload_bytes": timings.get("upload_bytes"), "download_bytes": timings.get("download_bytes")}
        privacy = row.get("privacy") or {}
        if privacy.get("epsilon") is not None:  # dp 'client': the run's epsilon
            values["epsilon"] = privacy["epsilon"]
        if privacy.get("clients"):  # dp 'sample' / 'local': each client's; the largest spent
            values["epsilon_max_client"] = max(privacy["clients"].values())
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(mlflow_run, metrics=metrics)

    def _stopped(self, data: dict[str, Any]) -> None:
        run_id = data["run_id"]
        mlflow_run, stored = self._mlflow_run(run_id)[0], self.store.run(run_id) or {}
        latest = self.store.latest_version()
        if latest is not None:  # the global model as the run left it
            self.client.log_artifact(mlflow_run, str(self.store.models_dir / latest["path"]), "model")
            self.client.set_tag(mlflow_run, "meshfed.model_version", str(latest["version"]))
        reason = str(data.get("reason") or "")
        self.client.set_tag(mlflow_run, "meshfed.stop_reason", reason)
        status = "FINISHED" if stored.get("status") == "finished" else \
            "FAILED" if reason.startswith("error") else "KILLED"
        self.client.set_terminated(mlflow_run, status)
