"""Error feedback for top-k updates (DGC's local accumulation, Lin et al. 2018): what a client did not send
this round is added to its next delta, so nothing it learned is dropped for good, only delayed.

    v = delta + residual          (the residual is the run's: a new run starts from zero)
    send topk(v), quantised       (shared/compression.py)
    residual = v - what was sent  (its dequantised values at their indices: the sum of everything sent plus
                                   the residual is the sum of every delta, up to float rounding)

The residual is kept in memory and in <key-dir>/<client-id>.residual.safetensors (the run id in its metadata), so a
restarted client goes on with it; it changes only once the server took the update (a lost or refused one leaves
the previous residual). There is no momentum to correct across rounds here: a client's SGD momentum buffers start
afresh each round (TrainRequest.momentum), so DGC's momentum correction has nothing to act on.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from shared.compression import compress, decompress
from shared.fileio import write_atomic
from shared.models import weight_spec

log = logging.getLogger("meshfed.client")
Weights = dict[str, np.ndarray]


class ErrorFeedback:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self.run_id, self.residual = self._load()
        self._pending: tuple[str, Weights] | None = None  # (run, residual) to keep once the server took the update

    def compress(self, run_id: str, delta: Weights, scheme: str, ratio: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The arrays to send for `delta` plus the run's residual; the new residual waits for commit()."""
        with self._lock:
            residual = self.residual if self.run_id == run_id and self._fits(delta) else {}
        v = {k: (x + residual[k]).astype(x.dtype, copy=False) if k in residual else x for k, x in delta.items()}
        arrays = compress(v, scheme, rng, ratio)
        sent = decompress(arrays, scheme, weight_spec(v))
        floats = {k for k, x in v.items() if x.dtype.kind == "f"}
        with self._lock:
            self._pending = (run_id, {k: v[k] - sent[k] for k in floats})
        return arrays

    def commit(self) -> None:
        """The server took the update: what it did not get is the residual from now on (also on disk)."""
        with self._lock:
            if self._pending is None:
                return
            self.run_id, self.residual = self._pending
            self._pending = None
            data = save(self.residual, metadata={"run_id": self.run_id})
        write_atomic(self.path, data)

    def discard(self) -> None:
        """The update was lost or refused: the residual stays what it was."""
        with self._lock:
            self._pending = None

    def norm(self) -> float:
        with self._lock:
            return float(np.sqrt(sum(float(np.vdot(r, r)) for r in self.residual.values())))

    def _fits(self, delta: Weights) -> bool:
        return all(k in delta and delta[k].shape == r.shape for k, r in self.residual.items())

    def _load(self) -> tuple[str | None, Weights]:
        if not self.path.exists():
            return None, {}
        try:
            with safe_open(str(self.path), framework="np") as f:
                run_id = (f.metadata() or {}).get("run_id")
            return run_id, load_file(str(self.path))
        except (OSError, SafetensorError, ValueError) as exc:  # unreadable: start from zero, say so
            log.warning("error-feedback residual %s unreadable (%s); starting from zero", self.path, exc)
            return None, {}
