"""Making a round durable: the checkpoint thread, the anomaly flags, the round's telemetry row.

After each aggregation the loop hands the new weights to the Committer and evaluates them meanwhile. On its one
thread, in order, the Committer encodes the model, writes and fsyncs the checkpoint, flags anomalous updates,
commits the round to SQLite (model version and round in one transaction: a SIGKILL leaves all or nothing),
adopts the model as the global one and announces it to the clients, which fetch it while the server evaluates
it. numpy, hashlib, file I/O and torch all run outside the GIL, so the two overlap.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from app.collection import Arrival
from app.downlink import Downlink
from app.model import GlobalModel
from app.store import Store
from shared.aggregate import flag_anomalies, subtract
from shared.protocol import encode_weights

Weights = dict[str, np.ndarray]


class Announcer(Protocol):
    def announce_model(self, version: int, sha256: str) -> None: ...


@dataclass
class RoundRow:
    """One round's telemetry, as stored (the rounds table) and published (metrics_update)."""

    round: int
    clients: list[str]                    # who delivered, in id order
    num_selected: int
    num_refused: int                      # verified refusals during the round
    seconds: float                        # from asking to evaluated (updated as the round goes)
    train_seconds: float                  # the slowest client's local training (advisory)
    dropped: list[str]                    # asked, did not deliver
    stragglers: dict[str, Any]            # late updates since the last aggregation
    offline_merged: list[str]             # offline contribution ids merged
    timings: dict[str, float]             # where the round's time went (bench/round_overhead.py)
    flagged: dict[str, Any] = field(default_factory=dict)  # anomalous updates, with their z-scores
    privacy: dict[str, Any] = field(default_factory=dict)  # epsilon per client; the run's step (app/privacy.py)
    secure: dict[str, Any] = field(default_factory=dict)   # a secure round's stages (app/secagg.secure_row)
    why_dropped: dict[str, str] = field(default_factory=dict)  # each dropped client: why it did not deliver
    accuracy: float | None = None
    loss: float | None = None
    eval_seconds: float | None = None
    model_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_clients": len(self.clients)}


def timings(arrivals: list[Arrival], started: float, dispatched: float, t_aggregate: float) -> dict[str, float]:
    """Where a round's time went, and the bytes uploaded (bench/round_overhead.py reads them)."""
    return {"dispatched": dispatched, "aggregate": time.monotonic() - t_aggregate,
            "last_update_arrived": max(a.metrics["arrived"] for a in arrivals) - started,
            **{f"client_{k}_max": max(a.metrics.get(f"{k}_seconds", 0.0) for a in arrivals)
               for k in ("fetch", "eval", "prepare", "total")},
            "prefetched": sum(int(a.metrics.get("prefetched", 0)) for a in arrivals),
            "upload_bytes": sum(int(a.metrics["payload_bytes"]) for a in arrivals), "uploads": len(arrivals),
            "download_bytes": sum(int(a.metrics.get("download_bytes", 0)) for a in arrivals),  # as clients say
            "downloads": sum(1 for a in arrivals if "download_bytes" in a.metrics),
            "delta_downloads": sum(int(a.metrics.get("delta_download", 0)) for a in arrivals),
            "update_cpu_seconds": sum(a.metrics["server_cpu_seconds"] for a in arrivals) / len(arrivals),
            "client_compress_max": max(a.metrics.get("compress_seconds", 0.0) for a in arrivals)}


@dataclass(frozen=True)
class Committed:
    version: int
    seconds: float                        # from the round's start until committed
    flagged: dict[str, Any]


class Committer:
    def __init__(self, store: Store, model: GlobalModel, announcer: Announcer, downlink: Downlink | None = None):
        self.store, self.model, self.announcer, self.downlink = store, model, announcer, downlink
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")

    def submit(self, run_id: str, row: RoundRow, weights: Weights, state: Weights, arrivals: list[Arrival],
               step_norm: float, anomaly_z: float, finished: str | None, merged: dict[str, tuple[int, float]],
               started: float, coded: tuple[int, bytes] | None = None) -> "Future[Committed]":
        """Commit on the checkpoint thread; `arrivals` in id order, scored against the step of norm `step_norm`;
        `coded`: (base version, the coded step to `weights`) of a delta-coded download (app/downlink.py)."""
        return self._thread.submit(self._commit, run_id, RoundRow(**{**asdict(row), "timings": dict(row.timings)}),
                                   weights, state, arrivals, step_norm, anomaly_z, finished, merged, started, coded)

    def _commit(self, run_id: str, row: RoundRow, weights: Weights, state: Weights, arrivals: list[Arrival],
                step_norm: float, anomaly_z: float, finished: str | None, merged: dict[str, tuple[int, float]],
                started: float, coded: tuple[int, bytes] | None) -> Committed:
        previous = self.model.now()
        data = encode_weights(weights)
        checkpoint = self.store.write_checkpoint(data, encode_weights(state) if state else None)
        row.flagged = flag_anomalies([a.client_id for a in arrivals], [a.norm for a in arrivals],
                                     [a.dot for a in arrivals], step_norm, anomaly_z)
        version = self.store.commit_round(run_id, row.round, checkpoint, previous.version, row.to_dict(), finished,
                                          merged)
        self.model.adopt(version, data, weights, state, step=subtract(weights, previous.weights))
        if coded is not None and self.downlink is not None:  # kept before clients hear of the version
            self.downlink.keep(version, *coded)
        committed = time.monotonic() - started
        self.announcer.announce_model(version, checkpoint.sha256)
        return Committed(version, committed, row.flagged)
