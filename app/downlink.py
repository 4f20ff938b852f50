"""Delta-coded downloads (run option download_compression 'int8'): the server makes each new global model the
previous one plus an int8-coded step, and keeps those steps for the last few versions. A client that holds the
previous model downloads the step (int8 safetensors, deflated with zlib at level 1: about 6x fewer bytes than
the model, zlib taking another third off the int8 values' mostly small levels), applies it (shared/compression.py
apply_step, the same function the server used) and checks the result against the new model's sha256; anything
else gets the full model.

    s = (w' - w) + r        the round's step, plus what earlier roundings left out (the server's residual)
    w' := w + int8(s)       the committed model: exactly what a client rebuilds from w and the coded step
    r  := s - int8(s)       error feedback on the downlink, so the rounding error is delayed, never dropped

The residual lives in memory: after a restart it starts from zero again (one round's rounding is lost).
"""
from __future__ import annotations

import collections
import threading
import zlib

import numpy as np

from shared.aggregate import subtract
from shared.compression import DOWNLINK, add_step, compress, decompress
from shared.models import weight_spec
from shared.protocol import encode_weights

Weights = dict[str, np.ndarray]
KEEP = 4  # coded steps kept, one hop each (v-1 -> v): a client holding the version just before the one it asks
          # for gets the step, even a few versions late; one further behind downloads the whole model


class Downlink:
    def __init__(self, seed: int = 0):
        self._lock = threading.Lock()
        self._steps: collections.OrderedDict[int, tuple[int, bytes]] = collections.OrderedDict()  # to -> (from, it)
        self._residual: Weights = {}
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """A new run: its first model owes nothing to the last run's roundings."""
        with self._lock:
            self._residual = {}

    def code(self, base: Weights, weights: Weights) -> tuple[Weights, bytes]:
        """(the model to commit instead of `weights`, its coded step from `base`)."""
        with self._lock:
            step = subtract(weights, base)
            fits = all(k in step and step[k].shape == r.shape for k, r in self._residual.items())
            residual = self._residual if fits else {}
            step = {k: v + residual[k] if k in residual else v for k, v in step.items()}
            arrays = compress(step, DOWNLINK, self._rng)
            sent = decompress(arrays, DOWNLINK, weight_spec(step))
            self._residual = {k: step[k] - sent[k] for k in step if step[k].dtype.kind == "f"}
        return add_step(base, sent), zlib.compress(encode_weights(arrays), 1)  # what apply_step gives a client

    def keep(self, version: int, base_version: int, coded: bytes) -> None:
        with self._lock:
            self._steps[version] = (base_version, coded)
            while len(self._steps) > KEEP:
                self._steps.popitem(last=False)

    def step(self, version: int, base_version: int) -> bytes | None:
        """The coded step from `base_version` to `version`, if kept."""
        with self._lock:
            kept = self._steps.get(version)
        return kept[1] if kept and kept[0] == base_version else None
