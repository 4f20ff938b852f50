"""Evaluates a global model on the server's test split (loaded once, lazily)."""
from __future__ import annotations

import threading

import numpy as np
import torch

from shared.datasets import load_split, to_tensors
from shared.models import build_model, get_weights, set_weights
from shared.training import evaluate


class Evaluator:
    """Callable: weights -> (loss, accuracy) on the first `limit` test samples (all if 0)."""

    def __init__(self, dataset: str, model: str, data_dir: str | None = None, limit: int = 0):
        self.dataset, self.model_name, self.data_dir, self.limit = dataset, model, data_dir, limit
        self._lock = threading.Lock()
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._model: torch.nn.Module | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            split = load_split(self.dataset, train=False, data_dir=self.data_dir)
            indices = np.arange(min(self.limit, len(split.labels))) if self.limit else None
            self._data = to_tensors(split, indices)
        return self._data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._load()[0].shape[1:])

    def initial_weights(self, seed: int) -> dict[str, np.ndarray]:
        return get_weights(build_model(self.model_name, self.input_shape, seed=seed))

    def __call__(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        with self._lock:
            x, y = self._load()
            if self._model is None:
                self._model = build_model(self.model_name, self.input_shape)
            set_weights(self._model, weights)
            return evaluate(self._model, x, y)
