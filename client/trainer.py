"""Local training on one client's own partition: global weights in, signed-ready delta out."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch

from shared.aggregate import subtract
from shared.datasets import Split, load_split, to_tensors
from shared.models import build_model, set_weights
from client.config import DataConfig
from shared.partition import partition, train_holdout
from shared.training import evaluate, train

Weights = dict[str, np.ndarray]


# A launcher that forks several clients (run_client.py --local-clients) decodes their training split once,
# before forking, instead of each client decoding all of it: each takes its own rows and drops the rest.
_preloaded: dict[tuple[str, str | None], Split] = {}


def preload_split(dataset: str, data_dir: str | None) -> None:
    """Decode `dataset`'s training split for the LocalTrainer that this process (or a fork of it) makes
    next; that one takes it (the preloaded split is used once)."""
    _preloaded[(dataset, data_dir)] = load_split(dataset, train=True, data_dir=data_dir)


def drop_preloaded() -> None:
    _preloaded.clear()


class LocalTrainer:
    """Holds this client's train/held-out tensors and a model; only our partition is kept."""

    def __init__(self, data: DataConfig, model_name: str = "cnn"):
        if not 0 <= data.client_index < data.num_clients:
            raise ValueError(f"client index {data.client_index} is outside 0..{data.num_clients - 1}")
        self.data = data
        self._load(data)
        self.model_name = model_name
        self.model = build_model(model_name, tuple(self.x.shape[1:]))
        self._loaded: Weights | None = None  # the weights dict the model holds unchanged, if known
        self._apart: torch.nn.Module | None = None  # evaluate_apart's own model

    def _load_weights(self, weights: Weights) -> None:
        """Put `weights` into the model, unless it holds them already (evaluate() of a model, then a round that
        trains from it). Weight dicts are never changed in place here (a new model is a new dict), so holding
        the same dict means the same values."""
        if weights is not self._loaded:
            set_weights(self.model, weights)
            self._loaded = weights

    def repartition(self, scheme: str, alpha: float) -> bool:
        """Switch to another partitioning of the same dataset (the server's run config asked); True if changed."""
        if (scheme, alpha) == (self.data.partition, self.data.alpha):
            return False
        self.data = dataclasses.replace(self.data, partition=scheme, alpha=alpha)
        self._load(self.data)
        return True

    def _load(self, data: DataConfig) -> None:
        split = _preloaded.pop((data.dataset, data.data_dir), None)
        if split is None:
            split = load_split(data.dataset, train=True, data_dir=data.data_dir)
        mine = partition(split.labels, data.partition, data.num_clients, data.alpha, data.seed)[data.client_index]
        if data.max_samples:
            mine = np.random.default_rng(data.seed).permutation(mine)[:data.max_samples]
        train_idx, holdout_idx = train_holdout(mine, seed=data.seed + data.client_index, fraction=data.holdout)
        self.x, self.y = to_tensors(split, train_idx)                 # (N, C, H, W), (N,)
        if data.flip_labels:
            self.y = int(split.labels.max()) - self.y
        self.x_hold, self.y_hold = to_tensors(split, holdout_idx)
        self.labels = np.bincount(split.labels[mine], minlength=10)  # class histogram of our partition
        del split                                                     # drop everyone else's samples

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def fit(self, global_weights: Weights, epochs: int, lr: float, batch_size: int, max_batches: int = 0,
            seed: int = 0, proximal_mu: float = 0.0, momentum: float = 0.0,
            dp_sgd: tuple[float, float] | None = None,
            cancel: Callable[[], bool] | None = None) -> tuple[Weights, dict[str, float]]:
        """Train from global_weights; returns (delta = local - global, training metrics). With dp_sgd =
        (noise multiplier, per-example clip) it trains with DP-SGD (client/privacy.py), and the metrics carry
        the sampling rate and steps its accountant needs. cancel() is asked before each batch (shared/training.py:
        Cancelled ends training within one batch)."""
        self._load_weights(global_weights)
        self._loaded = None  # training changes the model's weights
        started = time.perf_counter()
        if dp_sgd is None:
            stats = train(self.model, self.x, self.y, epochs, lr, batch_size, max_batches, seed, proximal_mu,
                          momentum, cancel)
        else:
            from client.privacy import dp_sgd as private_sgd
            stats, rate, steps = private_sgd(self.model, self.x, self.y, epochs, lr, batch_size, max_batches, seed,
                                             momentum, *dp_sgd, cancel)
            stats = {**stats, "sample_rate": rate, "steps": float(steps)}
        train_seconds = time.perf_counter() - started
        local = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}  # views, no copy
        delta = subtract(local, global_weights)
        return delta, {"train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                       "examples": stats["examples"], "batches": stats["batches"], "train_seconds": train_seconds,
                       **{k: stats[k] for k in ("sample_rate", "steps") if k in stats}}

    def evaluate_apart(self, weights: Weights) -> tuple[float, float]:
        """(loss, accuracy) of `weights` on our held-out share, on a model of its own: it may run while a round
        trains self.model (the held-out evaluation of a newly announced global model)."""
        x, y = self.x_hold, self.y_hold
        if len(y) == 0:
            return 0.0, 0.0
        if self._apart is None:
            self._apart = build_model(self.model_name, tuple(x.shape[1:]))
        set_weights(self._apart, weights)
        with torch.no_grad():
            return evaluate(self._apart, x, y)

    def evaluate(self, weights: Weights | None = None) -> tuple[float, float]:
        """(loss, accuracy) on our held-out 20%, of `weights` or of the current local model."""
        if weights is not None:
            self._load_weights(weights)
        if len(self.y_hold) == 0:
            return 0.0, 0.0
        with torch.no_grad():
            return evaluate(self.model, self.x_hold, self.y_hold)
