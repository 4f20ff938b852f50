"""A client's differential privacy (shared/privacy.py has the math): DP-SGD through Opacus for dp 'sample', the
Laplace mechanism on its update for dp 'local', and the accountant of what it spent, kept beside its key so a
restarted client goes on counting. A client never trains a round that would take it past the run's budget.

Opacus is imported only when a round asks for DP-SGD (it costs seconds to import).
"""
from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from shared.fileio import write_atomic
from shared.privacy import Accountant, local_laplace
from shared.protocol import TrainRequest
from shared.training import Cancelled, train_summary

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Planned:
    """What a private round will spend: the accountant's event, and the epsilon after it."""

    event: tuple[float, ...]  # (noise multiplier, sampling rate, steps) or (epsilon,)
    epsilon: float


class BudgetExhausted(Exception):
    """This round would spend more than the budget (or the run's delta is too large for this client's data)."""


def dp_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
           max_batches: int, seed: int, momentum: float, noise_multiplier: float,
           max_grad_norm: float, cancel: Callable[[], bool] | None = None) -> tuple[dict[str, float], float, int]:
    """DP-SGD on (x, y) with Opacus (Poisson-sampled batches of expected size batch_size, each example's gradient
    clipped to max_grad_norm, Gaussian noise of std noise_multiplier * max_grad_norm on their sum). The model is
    trained in place and left unwrapped. Returns (loss/accuracy/batches, the sampling rate, the steps taken)."""
    from opacus import PrivacyEngine
    model.train()  # Opacus checks the mode (the held-out evaluation left the model in eval mode)
    torch.manual_seed(seed)  # Opacus samples batches and noise from torch's generator
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():  # Opacus warns that torch's generator is not a CSPRNG (README says so)
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # Ghost clipping (Li et al. 2022): each example's gradient norm without its gradient, then one backward
        # pass of the reweighted loss: 5x faster than per-example gradients on the McMahan CNN here (fc1 alone
        # would be 1.6M floats per example); the clipping and noise are the same (tests/test_privacy.py).
        private, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="ghost",
            criterion=nn.CrossEntropyLoss())
    private.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no gradient here
    try:
        for _ in range(epochs):
            for xb, yb in loader:                        # xb: (~B, C, H, W), a Poisson sample of the data
                if cancel is not None and cancel():      # nothing is released: no privacy is spent
                    raise Cancelled(steps)
                optimizer.zero_grad(set_to_none=True)
                logits = private(xb)
                loss = criterion(logits, yb)
                loss.backward()                           # norms, then the clipped examples' summed gradient
                optimizer.step()                          # add noise, step
                steps += 1
                loss_sum += loss.item() * len(yb)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(yb)
                if max_batches and steps >= max_batches:
                    break
            if max_batches and steps >= max_batches:
                break
    finally:
        private._close()  # the hooks go; the parameters, trained in place, are the model's
    return train_summary(loss_sum, correct, seen, steps), float(loader.sample_rate), steps


class ClientPrivacy:
    """The accountants of one client, one per run, in <key_dir>/<client_id>.privacy.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def accountant(self, request: TrainRequest) -> Accountant:
        state = self._runs.get(request.run_id)
        kind = "pure" if request.dp == "local" else request.accountant
        return Accountant.from_state(state) if state else Accountant(kind)

    def spent(self, request: TrainRequest) -> float:
        return self.accountant(request).epsilon(request.delta)

    def plan(self, request: TrainRequest, num_examples: int, epochs: int, batch_size: int,
             max_batches: int) -> Planned:
        """What this round would spend; BudgetExhausted (naming the setting) if it would pass the budget."""
        if request.dp == "sample":
            if request.delta >= 1 / num_examples:
                raise BudgetExhausted(f"delta {request.delta:g} is not below 1 / this client's {num_examples} "
                                      "examples: lower the run's delta")
            rate = 1 / max(1, -(-num_examples // batch_size))  # Opacus: 1 / batches per epoch
            steps = epochs * max(1, -(-num_examples // batch_size))
            event: tuple[float, ...] = (request.noise_multiplier, rate, min(steps, max_batches or steps))
        else:
            event = (request.local_epsilon,)
        accountant = self.accountant(request)
        epsilon = accountant.epsilon_after(event, request.delta)
        if request.target_epsilon and epsilon > request.target_epsilon:
            raise BudgetExhausted(f"this round would bring epsilon to {epsilon:.3f}, past the run's budget of "
                                  f"{request.target_epsilon:g} (spent so far: {accountant.epsilon(request.delta):.3f})")
        return Planned(event, epsilon)

    def record(self, request: TrainRequest, event: tuple[float, ...]) -> float:
        """Add a round's spending (durably, before the update leaves); returns the epsilon spent in the run."""
        with self._lock:
            accountant = self.accountant(request)
            accountant.step(*event)
            self._runs[request.run_id] = accountant.state_dict()
            write_atomic(self.path, json.dumps(self._runs).encode())
        return accountant.epsilon(request.delta)


def privatize(delta: Weights, request: TrainRequest, rng: np.random.Generator) -> Weights:
    """dp 'local': the update L1-clipped and Laplace-noised (pure local_epsilon for this round)."""
    return local_laplace(delta, request.clip_norm, request.local_epsilon, rng)
