"""Aggregation math as pure functions over numpy arrays: no I/O, no logging, no Flask."""
from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]


BLOCK = 1 << 15  # elements per block: n rows of it stay in the CPU cache (measured best of 16K-64K)


def weighted_average(results: list[tuple[Weights, int]]) -> Weights:
    """FedAvg: sum_i n_i * w_i / sum_i n_i, per named array (McMahan et al. 2017).

    `results` holds (arrays, num_examples) pairs with identical names and shapes. Works the same
    for weights and for deltas. Block by block, the n inputs' slices are gathered into a small
    (n, BLOCK) matrix that stays in the CPU cache and reduced with one BLAS matrix-vector product,
    so each input is read from memory once (bench/aggregation_throughput.py compares this with a
    plain copy). Float32 inputs are summed in float32 (BLAS sgemv), others in float64.
    """
    if not results:
        raise ValueError("weighted_average needs at least one result")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError("the results hold no examples")
    out: Weights = {}
    for name, first in results[0][0].items():
        dtype = np.result_type(first.dtype, np.float32)
        coeffs = np.array([n / total for _, n in results], dtype=dtype)
        inputs = [np.ascontiguousarray(arrays[name]).reshape(-1) for arrays, _ in results]
        stack = np.empty((len(inputs), min(BLOCK, first.size)), dtype=dtype)
        flat = np.empty(first.size, dtype=dtype)
        for start in range(0, first.size, BLOCK):
            stop = min(start + BLOCK, first.size)
            block = stack[:, :stop - start]
            for row, x in zip(block, inputs):
                row[...] = x[start:stop]
            np.dot(coeffs, block, out=flat[start:stop])
        out[name] = flat.reshape(first.shape).astype(first.dtype, copy=False)
    return out


def apply_delta(weights: Weights, delta: Weights, scale: float = 1.0) -> Weights:
    """weights + scale * delta, per named array (new arrays, inputs untouched)."""
    return {k: (w + scale * delta[k]).astype(w.dtype, copy=False) for k, w in weights.items()}


def subtract(a: Weights, b: Weights) -> Weights:
    """a - b per named array: the delta a client sends."""
    return {k: (a[k] - b[k]).astype(a[k].dtype, copy=False) for k in a}


# --- late and offline deltas (stragglers, mesh contributions) -------------------------------------

def staleness_weight(num_examples: int, staleness: int) -> float:
    """Weight of a delta trained `staleness` model versions ago: n / sqrt(1 + s) (FedAsync / FedBuff-style)."""
    return num_examples / float(np.sqrt(1 + max(0, staleness)))


def clip_to_norm(delta: Weights, max_norm: float, norm: float | None = None) -> Weights:
    """delta scaled so its L2 norm is at most max_norm (returned as is when it already is)."""
    norm = update_norm(delta) if norm is None else norm
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: (v * scale).astype(v.dtype, copy=False) for k, v in delta.items()}


def cap_total(weights: list[float], cap: float) -> list[float]:
    """weights scaled down together so they sum to at most cap (one client's merges in one round)."""
    total = sum(weights)
    return weights if total <= cap else [w * cap / total for w in weights]


# --- robust aggregation over flattened updates (rows = clients) -----------------------------------

def flatten(weights: Weights) -> np.ndarray:
    """All arrays of one update as one float32 vector, in name order."""
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in weights.values()])


def unflatten(vector: np.ndarray, like: Weights) -> Weights:
    """Inverse of flatten, shaped and typed like `like`."""
    out, start = {}, 0
    for name, a in like.items():
        out[name] = vector[start:start + a.size].reshape(a.shape).astype(a.dtype)
        start += a.size
    return out


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of rows x (n, d) (Yin et al. 2018)."""
    return np.median(x, axis=0)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the floor(beta*n) largest and smallest values (Yin et al. 2018)."""
    n = x.shape[0]
    k = int(np.floor(beta * n))
    if not 0 <= beta < 0.5 or n - 2 * k < 1:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5 and rows left after trimming (n={n}, beta={beta})")
    return np.sort(x, axis=0)[k:n - k].mean(axis=0)


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    """(n, n) squared Euclidean distances between rows, via one Gram matrix (float64)."""
    x64 = x.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", x64, x64)
    d = sq[:, None] + sq[None, :] - 2.0 * (x64 @ x64.T)
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row: sum of squared distances to its n - f - 2 nearest others (Blanchard et al. 2017)."""
    n = x.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 updates; got n={n}, f={f}")
    d = pairwise_sq_distances(x)
    k = n - f - 2
    return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)])


def multikrum(x: np.ndarray, f: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the m rows with the lowest Krum scores (m=1 is Krum); returns (aggregate, chosen rows)."""
    chosen = np.sort(np.argsort(krum_scores(x, f), kind="stable")[:m])
    return x[chosen].mean(axis=0), chosen


def nearest_neighbor_mixing(x: np.ndarray, f: int) -> np.ndarray:
    """NNM (Allouah et al. 2023): replace each row by the mean of its n - f nearest rows, itself included.

    A pre-aggregation step for the robust rules: with heterogeneous (non-IID) honest clients, the
    mixed rows are far less spread out, so a median or trimmed mean over them loses less of what the
    honest clients contributed, while a far-off attacker is mixed away. Needs 0 <= f < n/2.
    """
    n = x.shape[0]
    if not 0 <= f < n / 2:
        raise ValueError(f"nearest-neighbour mixing needs 0 <= f < n/2; got n={n}, f={f}")
    nearest = np.argsort(pairwise_sq_distances(x), axis=1, kind="stable")[:, :n - f]  # (n, n - f)
    mix = np.zeros((n, n), dtype=x.dtype)
    np.put_along_axis(mix, nearest, 1.0 / (n - f), axis=1)
    return mix @ x  # one matrix product: row i = mean of x over nearest[i]


def bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """Bulyan (El Mhamdi et al. 2018): pick n-2f rows by repeated Krum, then per coordinate average
    the n-4f values closest to the median. Needs n >= 4f + 3."""
    n = x.shape[0]
    if n < 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 updates; got n={n}, f={f}")
    remaining = list(range(n))
    selected = []
    for _ in range(n - 2 * f):
        rows = x[remaining]
        if len(remaining) > 2 * f + 2:
            best = int(np.argmin(krum_scores(rows, f)))
        else:  # too few left for Krum's guarantee: take the one nearest to the others
            best = int(np.argmin(pairwise_sq_distances(rows).sum(axis=1)))
        selected.append(remaining.pop(best))
    s = x[selected]                                      # (theta, d), theta = n - 2f
    beta = s.shape[0] - 2 * f                            # values kept per coordinate
    median = np.median(s, axis=0)
    closest = np.argsort(np.abs(s - median), axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, closest, axis=0).mean(axis=0)


# --- server optimisers on the aggregated delta (Reddi et al. 2021; Hsu et al. 2019) ---------------

def fedopt_step(weights: Weights, delta: Weights, state: dict[str, np.ndarray], kind: str, lr: float,
                beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> tuple[Weights, dict[str, np.ndarray]]:
    """One server step on the averaged delta (the pseudo-gradient, pointing downhill).

    kind: 'fedadam' | 'fedyogi' | 'fedadagrad' (adaptive, with m and v) or 'fedavgm' (momentum beta1).
    `state` maps 'm/<name>' and 'v/<name>' to arrays; an empty dict starts from zeros (v from tau^2).
    Returns new weights and new state; inputs are not modified.
    """
    new_w, new_state = {}, {}
    for name, w in weights.items():
        g = delta[name].astype(w.dtype)  # state keeps the weights' dtype (float32): checkpoints stay small
        m = state.get(f"m/{name}", np.zeros_like(g))
        if kind == "fedavgm":
            m = beta1 * m + g
            new_w[name] = (w + lr * m).astype(w.dtype)
            new_state[f"m/{name}"] = m
            continue
        m = beta1 * m + (1 - beta1) * g
        v = state.get(f"v/{name}", np.full_like(g, tau * tau))
        g2 = g * g
        if kind == "fedadagrad":
            v = v + g2
        elif kind == "fedyogi":
            v = v - (1 - beta2) * g2 * np.sign(v - g2)
        elif kind == "fedadam":
            v = beta2 * v + (1 - beta2) * g2
        else:
            raise ValueError(f"unknown server optimiser {kind!r}")
        new_w[name] = (w + lr * m / (np.sqrt(v) + tau)).astype(w.dtype)
        new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
    return new_w, new_state


# --- anomaly scores ----------------------------------------------------------------------------------

def anomaly_scores(x: np.ndarray, aggregate: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row z-score of the update norm and cosine distance to a direction (higher = stranger)."""
    x64, agg64 = x.astype(np.float64), aggregate.astype(np.float64)
    return _scores(np.linalg.norm(x64, axis=1), x64 @ agg64, float(np.linalg.norm(agg64)))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.reshape(-1), b.reshape(-1)))


def update_norm(update: Weights) -> float:
    """L2 norm of an update over all its arrays (one BLAS dot product per array)."""
    return float(np.sqrt(sum(_dot(a, a) for a in update.values())))


def dot(update: Weights, direction: Weights) -> float:
    """<update, direction> over the arrays of `direction` (0.0 when it is empty)."""
    return sum(_dot(update[k], v) for k, v in direction.items())


def flag_anomalies(ids: list[str], norms: list[float], dots: list[float], step_norm: float,
                   z: float) -> dict[str, dict[str, float]]:
    """The ids whose update norm, or cosine distance to the previous round's step, has a z-score above z, with
    their scores. `norms` and `dots` (with that step, whose norm is `step_norm`) are taken as each update
    arrives, so the server needs no copy of any update. In a run's first round there is no step (step_norm
    0): every cosine distance is 1 and only norms can stand out. Fewer than three updates flag nothing."""
    if len(ids) < 3:
        return {}
    scores = _scores(np.asarray(norms, dtype=np.float64), np.asarray(dots, dtype=np.float64), step_norm)
    return {cid: {k: round(float(v[i]), 4) for k, v in scores.items()} for i, cid in enumerate(ids)
            if scores["norm_z"][i] > z or scores["cosine_z"][i] > z}


def _scores(norms: np.ndarray, dots: np.ndarray, agg_norm: float) -> dict[str, np.ndarray]:
    cos_dist = 1.0 - dots / np.maximum(norms * agg_norm, 1e-12)

    def z(v: np.ndarray) -> np.ndarray:
        sd = v.std()
        return (v - v.mean()) / sd if sd > 1e-12 else np.zeros_like(v)

    return {"norm": norms, "norm_z": z(norms), "cosine_distance": cos_dist, "cosine_z": z(cos_dist)}
