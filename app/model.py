"""The global model the server holds: its version, encoded bytes, sha256, weights and the strategy's state.

One object, thread-safe: the loop reads it to open a round, the checkpoint thread adopts each committed
round's model, request threads serve it to clients (GET /api/model/latest is served from here, not disk).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from app.store import Store
from shared.protocol import decode_weights

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Snapshot:
    version: int | None = None
    data: bytes | None = None      # the safetensors bytes clients download
    sha256: str | None = None
    weights: Weights = field(default_factory=dict)
    state: Weights = field(default_factory=dict)  # the strategy's (FedOpt moments), saved with each checkpoint
    step: Weights = field(default_factory=dict)   # the last round's step (weights - the previous weights):
                                                  # updates are scored against it (app/collection.py)


class GlobalModel:
    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._now = Snapshot()

    def load_latest(self) -> None:
        """Adopt the newest stored version and its strategy state (after a restart)."""
        latest = self.store.latest_version()
        if latest is not None:
            state = self.store.read_state(latest["version"])
            self.adopt(latest["version"], self.store.read_model(latest["version"]),
                       state=decode_weights(state) if state else {})

    def adopt(self, version: int, data: bytes, weights: Weights | None = None, state: Weights | None = None,
              step: Weights | None = None) -> None:
        """Make stored `version` the global model (its bytes; its weights, if already decoded; its strategy
        state and the step that led to it, empty unless given: a new run or a rollback starts afresh)."""
        sha256 = self.store.get_version(version)["sha256"]  # hashed once, when it was stored
        snapshot = Snapshot(version, data, sha256, weights if weights is not None else decode_weights(data),
                            state or {}, step or {})
        with self._lock:
            self._now = snapshot

    def now(self) -> Snapshot:
        with self._lock:
            return self._now

    @property
    def version(self) -> int | None:
        return self.now().version

    @property
    def weights(self) -> Weights:
        return self.now().weights
