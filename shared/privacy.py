"""Differential privacy math: clipping, noise, adaptive clipping, and privacy accounting. No I/O, no Flask.

Three modes (RunConfig.dp):
- 'sample': DP-SGD on each client (Abadi et al. 2016), through Opacus (client/privacy.py): a guarantee for each
  client's individual examples, accounted by each client for its own data.
- 'client': DP-FedAvg on the server (McMahan et al. 2018): each update clipped to L2 norm C, Gaussian noise of
  std sigma * C added to their sum; C fixed or adapted to a quantile of the update norms (Andrew et al. 2021).
  A guarantee for each client's whole contribution, accounted by the server as a sampled Gaussian mechanism
  with sampling rate q = clients asked / online clients drawn from, one step per round.
- 'local': each client clips its update's L1 norm to C and adds Laplace noise of scale 2C / epsilon_round
  before it leaves: pure epsilon_round per round, composed by adding (for a server nobody trusts).

Accountant wraps Opacus' RDP and PRV accountants (the sampled Gaussian mechanism; imported only when used) and
adds the pure-DP sum for 'local'; its state is its history, a list a JSON file or a database row keeps.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]
DP_MODES = ("none", "sample", "client", "local")
ACCOUNTANTS = ("rdp", "prv")


# --- clipping and noise ------------------------------------------------------------------------------------

def l2_norm(delta: Weights) -> float:
    return float(np.sqrt(sum(float(np.dot(a.reshape(-1), a.reshape(-1))) for a in delta.values())))


def l1_norm(delta: Weights) -> float:
    return float(sum(np.abs(a).sum(dtype=np.float64) for a in delta.values()))


def scaled(delta: Weights, factor: float) -> Weights:
    return {k: (v * factor).astype(v.dtype, copy=False) for k, v in delta.items()}


def clip_l2(delta: Weights, bound: float) -> tuple[Weights, bool]:
    """delta scaled to L2 norm at most `bound`, and whether it was within already (the 'unclipped' bit)."""
    norm = l2_norm(delta)
    return (delta, True) if norm <= bound else (scaled(delta, bound / norm), False)


def clip_l1(delta: Weights, bound: float) -> Weights:
    norm = l1_norm(delta)
    return delta if norm <= bound else scaled(delta, bound / norm)


def add_gaussian(delta: Weights, std: float, rng: np.random.Generator) -> Weights:
    """delta + N(0, std^2) per coordinate (float64 noise, cast to each array's dtype)."""
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in delta.items()}


def add_laplace(delta: Weights, scale: float, rng: np.random.Generator) -> Weights:
    return {k: (v + rng.laplace(0.0, scale, v.shape)).astype(v.dtype) for k, v in delta.items()}


def local_laplace(delta: Weights, clip: float, epsilon: float, rng: np.random.Generator) -> Weights:
    """The 'local' mechanism: L1-clip to `clip`, add Laplace(2 clip / epsilon): any two clipped updates differ
    by at most 2 clip in L1, so this is epsilon-DP for the whole update (one round)."""
    return add_laplace(clip_l1(delta, clip), 2 * clip / epsilon, rng)


# --- adaptive clipping (Andrew et al. 2021) ------------------------------------------------------------------

def split_noise(noise_multiplier: float, count_noise: float) -> float:
    """The noise multiplier left for the update sum when the unclipped count also gets noise of std
    `count_noise` (its sensitivity is 1/2 after centring): sigma_sum = (sigma^-2 - (2 count_noise)^-2)^(-1/2),
    so that both releases together cost what sigma alone would (Andrew et al. 2021, Theorem 1)."""
    rest = noise_multiplier ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"count noise {count_noise} leaves nothing for the updates at noise multiplier "
                         f"{noise_multiplier}: it must exceed {1 / (2 * noise_multiplier):g}")
    return rest ** -0.5


def next_clip(clip: float, unclipped_fraction: float, target_quantile: float, learning_rate: float) -> float:
    """Geometric update of the clipping norm towards the target quantile of the update norms:
    C <- C * exp(-eta * (b - gamma)), b the (noised) fraction of updates that needed no clipping."""
    return clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


# --- accounting ---------------------------------------------------------------------------------------------

class Accountant:
    """Privacy spent by a sequence of steps. 'rdp' and 'prv' account sampled Gaussian steps (noise multiplier,
    sampling rate) with Opacus' accountants; 'pure' adds pure-DP epsilons (the local Laplace mechanism)."""

    def __init__(self, kind: str = "rdp", history: list[Any] | None = None):
        if kind not in ACCOUNTANTS + ("pure",):
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} or pure, not {kind!r}")
        self.kind = kind
        self.history: list[list[float]] = [list(h) for h in history or []]  # [sigma, q, steps] or [epsilon]

    def step(self, *event: float) -> None:
        """(noise multiplier, sampling rate, steps) for rdp and prv; (epsilon,) for pure."""
        self.history.append([float(x) for x in event])

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        if self.kind == "pure":
            return float(sum(e for (e,) in self.history))
        from opacus.accountants import PRVAccountant, RDPAccountant  # only when DP is on
        accountant = RDPAccountant() if self.kind == "rdp" else PRVAccountant()
        accountant.history = [(sigma, q, int(steps)) for sigma, q, steps in self.history]
        return float(accountant.get_epsilon(delta))

    def epsilon_after(self, event: tuple[float, ...], delta: float) -> float:
        """The epsilon spent if `event` were added: what a budget check needs before a round."""
        return Accountant(self.kind, self.history + [list(event)]).epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": self.history}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Accountant":
        return cls(state.get("kind", "rdp"), state.get("history", []))
