"""Strategies: how the server turns the round's deltas into the next global model.

A strategy is one function, registered by name:

    @register("my_strategy")
    def my_strategy(global_weights, updates, state, cfg):
        # updates: [(delta, weight), ...]: every update of the round (clients in id order, then the late and
        # offline ones); state: dict of arrays (saved with every checkpoint, so a resumed run continues
        # exactly); cfg: the RunConfig
        return new_global_weights, new_state

Put it in a file, start the server with --strategy-module that.module, and choose it with
--strategy my_strategy (or in the dashboard). A strategy that needs only the example-weighted mean of the
deltas registers with `streams=True`: it then gets that mean as its one update, which the server keeps as a
running sum as updates arrive (O(d) memory for any number of clients, shared/accumulator.py), as FedAvg,
FedProx, FedAvgM and FedOpt do. The math lives in shared/aggregate.py; this module only adapts it. FedProx
changes nothing here: the server sends proximal_mu and clients add the term.

Importing this module loads numpy only (no Flask, no torch): plug-ins can import `register` cheaply.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from shared import aggregate as agg
from shared.accumulator import Accumulator, Buffer, WeightedSum

if TYPE_CHECKING:
    from app.config import RunConfig

Weights = dict[str, np.ndarray]
State = dict[str, np.ndarray]
Updates = list[tuple[Weights, float]]  # (delta, weight) pairs
Rule = Callable[[Weights, Updates, State, "RunConfig"], tuple[Weights, State]]


@dataclass(frozen=True)
class Strategy:
    rule: Rule
    streams: bool  # True: needs only the weighted mean (a running sum suffices); False: every update


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, streams: bool = False) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        STRATEGIES[name] = Strategy(fn, streams)
        return fn
    return add


def load_modules(names: list[str]) -> None:
    """Import user modules that register strategies (from --strategy-module)."""
    for name in names:
        importlib.import_module(name)


def updates_needed(cfg: "RunConfig") -> int:
    """How many updates the strategy needs to be defined (Krum: n > 2f + 2; Bulyan: n >= 4f + 3)."""
    f = cfg.byzantine_f
    return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.strategy, 1)


def accumulator_for(cfg: "RunConfig") -> Accumulator:
    """A running sum for strategies that stream, a buffer of every update for the others."""
    return WeightedSum() if STRATEGIES[cfg.strategy].streams else Buffer()


def aggregate(cfg: "RunConfig", global_weights: Weights, updates: Updates, state: State) -> tuple[Weights, State]:
    """Apply strategy cfg.strategy to `updates` (an accumulator's result: the mean alone for a streaming
    strategy, every update for the others); ValueError when its preconditions fail."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; known: {', '.join(sorted(STRATEGIES))}")
    if len(updates) < updates_needed(cfg):
        raise ValueError(f"{cfg.strategy} with f={cfg.byzantine_f} needs at least {updates_needed(cfg)} updates, "
                         f"got {len(updates)}")
    return STRATEGIES[cfg.strategy].rule(global_weights, updates, state, cfg)


ROBUST = ("krum", "multikrum", "median", "trimmed_mean", "bulyan")  # rules that take --mixing


def _robust(global_weights: Weights, updates: Updates,
            combine: Callable[[np.ndarray], np.ndarray], cfg: Any) -> Weights:
    x = np.stack([agg.flatten(d) for d, _ in updates])  # (n, d)
    if cfg.mixing == "nnm":
        x = agg.nearest_neighbor_mixing(x, cfg.byzantine_f)
    return agg.apply_delta(global_weights, agg.unflatten(combine(x), global_weights))


@register("fedavg", streams=True)
@register("fedprox", streams=True)
def fedavg(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    return agg.apply_delta(global_weights, agg.weighted_average(updates)), state


def _fedopt(kind: str) -> Rule:
    def step(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
        return agg.fedopt_step(global_weights, agg.weighted_average(updates), state, kind, cfg.server_lr,
                               cfg.beta1, cfg.beta2, cfg.tau)
    return step


for _kind in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
    register(_kind, streams=True)(_fedopt(_kind))


@register("median")
def median(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    return _robust(global_weights, updates, agg.coordinate_median, cfg), state


@register("trimmed_mean")
def trimmed_mean(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    return _robust(global_weights, updates, lambda x: agg.trimmed_mean(x, cfg.trim_beta), cfg), state


@register("krum")
def krum(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    return _robust(global_weights, updates, lambda x: agg.multikrum(x, cfg.byzantine_f, 1)[0], cfg), state


@register("multikrum")
def multikrum(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    def combine(x: np.ndarray) -> np.ndarray:
        m = cfg.multikrum_m or x.shape[0] - cfg.byzantine_f
        return agg.multikrum(x, cfg.byzantine_f, m)[0]
    return _robust(global_weights, updates, combine, cfg), state


@register("bulyan")
def bulyan(global_weights: Weights, updates: Updates, state: State, cfg: Any) -> tuple[Weights, State]:
    return _robust(global_weights, updates, lambda x: agg.bulyan(x, cfg.byzantine_f), cfg), state
