"""Aggregation math as pure functions over numpy arrays: no I/O, no logging, no Flask."""
from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]


def weighted_average(results: list[tuple[Weights, int]]) -> Weights:
    """FedAvg: sum_i n_i * w_i / sum_i n_i, per named array (McMahan et al. 2017).

    `results` holds (arrays, num_examples) pairs with identical names and shapes. Works the same
    for weights and for deltas. Accumulates in float64 so the order of clients does not matter.
    """
    if not results:
        raise ValueError("weighted_average needs at least one result")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError("the results hold no examples")
    out: Weights = {}
    for name, first in results[0][0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for arrays, n in results:
            acc += arrays[name].astype(np.float64, copy=False) * (n / total)
        out[name] = acc.astype(first.dtype)
    return out


def apply_delta(weights: Weights, delta: Weights, scale: float = 1.0) -> Weights:
    """weights + scale * delta, per named array (new arrays, inputs untouched)."""
    return {k: (w + scale * delta[k]).astype(w.dtype) for k, w in weights.items()}


def subtract(a: Weights, b: Weights) -> Weights:
    """a - b per named array: the delta a client sends."""
    return {k: (a[k] - b[k]).astype(a[k].dtype) for k in a}
