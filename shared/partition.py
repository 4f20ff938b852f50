"""Seeded, deterministic partitioners: which sample indices each client owns."""
from __future__ import annotations

import numpy as np

PARTITION_NAMES = ("iid", "dirichlet", "shards")
HOLDOUT_FRACTION = 0.2  # each client keeps 20% of its partition for local evaluation


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and cut into num_clients near-equal parts."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
              min_size: int = 10) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha) (Hsu et al. 2019).

    Redraws (up to 100 times) until every client has at least `min_size` samples.
    """
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give every client {min_size} samples with alpha={alpha}; raise alpha")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan's pathological non-IID: sort by label, cut into shards, deal each client a few."""
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = np.random.default_rng(seed).permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[i] for i in row])) for row in deal]


def partition(labels: np.ndarray, scheme: str, num_clients: int, alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
    """Partition by name: 'iid', 'dirichlet' (uses alpha) or 'shards'."""
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return shards(labels, num_clients, seed=seed)
    raise ValueError(f"unknown partition {scheme!r}; choose one of {', '.join(PARTITION_NAMES)}")


def train_holdout(indices: np.ndarray, seed: int = 0,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into (train, held-out `fraction`), seeded."""
    if not 0 <= fraction < 1:
        raise ValueError("the held-out fraction must be in [0, 1)")
    shuffled = np.random.default_rng(seed).permutation(indices)
    n_hold = int(round(len(shuffled) * fraction))
    return np.sort(shuffled[n_hold:]), np.sort(shuffled[:n_hold])
