"""Simulated client behaviour for tests and demos: Byzantine attacks, delays, dropouts, slow devices.

Attacks act on what a client sends, never on the server: sign_flip and scale multiply the honest
delta by -scale and scale; gaussian replaces it with N(0, scale^2) noise; label_flip trains on
labels 9 - y (data poisoning, set through DataConfig.flip_labels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ATTACKS = ("", "sign_flip", "scale", "gaussian", "label_flip")


@dataclass(frozen=True)
class Behaviour:
    attack: str = ""           # '' = honest; else one of ATTACKS
    attack_scale: float = 10.0  # multiplier (sign_flip, scale) or noise std (gaussian)
    delay: float = 0.0         # seconds to wait after training, before posting
    dropout_prob: float = 0.0  # chance of silently skipping a round
    slowdown: float = 1.0      # > 1: a slow device that completes only 1/slowdown of the local work
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(a for a in ATTACKS if a)}")
        if not 0 <= self.dropout_prob <= 1 or self.slowdown < 1 or self.delay < 0:
            raise ValueError("need 0 <= dropout_prob <= 1, slowdown >= 1, delay >= 0")


def poison(delta: dict[str, np.ndarray], attack: str, scale: float,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The delta a Byzantine client sends instead of its honest one."""
    if attack == "sign_flip":
        return {k: (-scale * v).astype(v.dtype) for k, v in delta.items()}
    if attack == "scale":
        return {k: (scale * v).astype(v.dtype) for k, v in delta.items()}
    if attack == "gaussian":
        return {k: rng.normal(0.0, scale, v.shape).astype(v.dtype) for k, v in delta.items()}
    return delta  # '' and label_flip send what they trained


def partial_batches(num_examples: int, batch_size: int, epochs: int, slowdown: float, cap: int = 0) -> int:
    """The batch budget of a device `slowdown` times slower than asked (0 = no cap)."""
    if slowdown <= 1:
        return cap
    budget = max(1, math.floor(math.ceil(num_examples / batch_size) * epochs / slowdown))
    return min(budget, cap) if cap else budget
