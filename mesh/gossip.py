"""Gossip mixing: a client averages its model with the models its peers sent, weighted by examples.

The same FedAvg math as the server (shared.aggregate.weighted_average), so a mesh that gossips until
it agrees computes what the server would have.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from shared.aggregate import Weights, weighted_average

T = TypeVar("T")


def mix(own: Weights, own_examples: int, received: Sequence[tuple[Weights, int]]) -> Weights:
    """sum_i n_i w_i / sum_i n_i over this client and the peers it heard from this step."""
    for weights, _ in received:
        if weights.keys() != own.keys() or any(weights[k].shape != own[k].shape for k in own):
            raise ValueError("a peer's model does not have this client's names and shapes")
    return weighted_average([(own, own_examples), *received])


def choose_peers(peers: Sequence[T], fanout: int, rng: random.Random) -> list[T]:
    """Up to `fanout` distinct peers, uniformly at random (random gossip, Boyd et al. 2006)."""
    return rng.sample(list(peers), min(fanout, len(peers)))
