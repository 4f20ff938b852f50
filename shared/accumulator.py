"""Streaming aggregation: add(delta, weight) as each update arrives, result() when the round closes.

This is the seam every way of combining updates goes through (app/strategy.py picks one per run):

- WeightedSum keeps a running sum of weight * delta per array, in the arrays' own precision (float32 for
  meshfed's models): FedAvg's example-weighted mean in O(d) memory, whatever the number of clients. 0.4 ms per
  update for the McMahan CNN's 1.66M floats here, where a float64 sum took 1.6 ms and, added while the last
  updates arrive, cost the round 16 ms (bench/round_overhead.py). The product and the sum are rounded
  separately (no fused multiply-add), so two updates give the same sum in either order; with more, the last
  bits depend on the order they arrived in, as any float32 sum's (relative error ~1e-7 per add).
- Buffer keeps every update, for rules that need them all (median, trimmed mean, Krum, Bulyan, plug-ins).
- RingSum adds secure aggregation's masked inputs modulo 2^32 (shared/secagg.py); the round unmasks the sum.

Both are thread-safe: the server adds updates from its request threads. Pure numpy: no I/O, no Flask.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np

Weights = dict[str, np.ndarray]
BLOCK = 1 << 17  # elements per block: weight * delta stays in the CPU cache between its two passes


class Accumulator(Protocol):
    def add(self, delta: Weights, weight: float, key: str) -> None: ...
    def result(self) -> list[tuple[Weights, float]]: ...
    def __len__(self) -> int: ...


class WeightedSum:
    """Running sum_i w_i * delta_i and sum_i w_i; result() is [(the weighted mean, the total weight)]."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.total = 0.0
        self._count = 0
        self._scratch: np.ndarray | None = None

    def add(self, delta: Weights, weight: float, key: str = "") -> None:
        if weight <= 0:
            raise ValueError("a weight must be positive")
        with self._lock:
            for name, array in delta.items():
                if name not in self._sum:
                    self._sum[name] = np.zeros(array.size, np.result_type(array.dtype, np.float32))
                    self._dtypes[name], self._shapes[name] = array.dtype, array.shape
                total = self._sum[name]
                flat = np.ascontiguousarray(array).reshape(-1)
                if self._scratch is None or self._scratch.dtype != total.dtype:
                    self._scratch = np.empty(BLOCK, total.dtype)
                for start in range(0, flat.size, BLOCK):  # total += weight * delta, block by block
                    stop = min(start + BLOCK, flat.size)
                    scratch = self._scratch[:stop - start]
                    np.multiply(flat[start:stop], weight, out=scratch, dtype=total.dtype)
                    np.add(total[start:stop], scratch, out=total[start:stop])
            self.total += weight
            self._count += 1

    def result(self) -> list[tuple[Weights, float]]:
        with self._lock:
            return [(self.mean(), self.total)] if self._count else []

    def mean(self, denominator: float | None = None,
             noise: Callable[[np.ndarray], np.ndarray] | None = None) -> Weights:
        """(the sum [+ noise(sum)]) / denominator (default: the total weight), in each array's dtype."""
        return {name: ((s if noise is None else s + noise(s)) / (denominator or self.total))
                .astype(self._dtypes[name]).reshape(self._shapes[name]) for name, s in self._sum.items()}

    def __len__(self) -> int:
        return self._count


class Buffer:
    """Every (delta, weight), returned in the order of their keys (a fixed order: the same updates give the
    same result whatever order they arrived in)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, Weights, float]] = []

    def add(self, delta: Weights, weight: float, key: str = "") -> None:
        with self._lock:
            self._items.append((key, delta, weight))

    def result(self) -> list[tuple[Weights, float]]:
        with self._lock:
            return [(delta, weight) for _, delta, weight in sorted(self._items, key=lambda item: item[0])]

    def __len__(self) -> int:
        return len(self._items)


class ClippedNoisySum:
    """DP-FedAvg's aggregate (McMahan et al. 2018): each update clipped to L2 norm `clip` and counted once
    (example counts are ignored: they would let one client weigh more), the sum noised with N(0, (sigma * clip)^2)
    per coordinate, divided by `denominator` (the clients asked: a fixed denominator, so that no count leaks).
    It also counts the updates that needed no clipping, for adaptive clipping (shared/privacy.py)."""

    def __init__(self, clip: float, noise_multiplier: float, denominator: int, rng: np.random.Generator,
                 count_noise: float = 0.0):
        self.clip, self.noise_multiplier, self.denominator = clip, noise_multiplier, denominator
        self.count_noise, self._rng = count_noise, rng
        self._sum = WeightedSum()
        self._unclipped = 0
        self._lock = threading.Lock()

    def add(self, delta: Weights, weight: float, key: str = "") -> None:
        from shared.privacy import clip_l2
        clipped, within = clip_l2(delta, self.clip)
        self._sum.add(clipped, 1.0, key)
        with self._lock:
            self._unclipped += int(within)

    def result(self) -> list[tuple[Weights, float]]:
        if not len(self._sum):
            return []
        std = self.noise_multiplier * self.clip
        return [(self._sum.mean(self.denominator, lambda s: self._rng.normal(0.0, std, s.shape)),
                 float(self.denominator))]

    def unclipped_fraction(self) -> float:
        """The share of updates within the clip, noised with N(0, count_noise^2) on the count (adaptive clipping)."""
        with self._lock:
            count = self._unclipped + self._rng.normal(0.0, self.count_noise) if self.count_noise else self._unclipped
        return float(count) / self.denominator

    def __len__(self) -> int:
        return len(self._sum)


class RingSum:
    """Secure aggregation's running sum of masked uint32 inputs, modulo 2^32 (numpy's uint32 adds wrap), and who
    added them with what weight. It never holds an input alone: each is masked, and only the sum is kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sum: Weights = {}
        self.weights: dict[str, float] = {}

    def add(self, delta: Weights, weight: float, key: str = "") -> None:
        with self._lock:
            for name, array in delta.items():
                if name not in self.sum:
                    self.sum[name] = np.zeros(array.shape, np.uint32)
                np.add(self.sum[name], array, out=self.sum[name])
            self.weights[key] = weight

    def result(self) -> list[tuple[Weights, float]]:
        raise TypeError("a ring sum is masked: the round unmasks it (app/secagg.py)")

    def __len__(self) -> int:
        return len(self.weights)
