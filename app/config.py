"""Server and run configuration: frozen dataclasses with commented defaults, validated once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.compression import COMPRESSIONS
from shared.datasets import DATASET_NAMES
from shared.errors import ConfigError
from shared.models import MODEL_NAMES
from app.strategy import ROBUST, STRATEGIES, min_updates
from shared.partition import PARTITION_NAMES


@dataclass(frozen=True)
class RunConfig:
    """What one training run does; editable through POST /api/config while no run is active."""

    dataset: str = "fashion-mnist"  # the server evaluates the global model on this test split
    model: str = "cnn"              # 'cnn' (McMahan CNN / CIFAR CNN by input shape) or 'mlp'
    num_rounds: int = 5             # stop after this many completed rounds
    fraction_fit: float = 1.0       # share of connected clients asked to train each round
    min_fit_clients: int = 2        # a round starts only when this many clients are connected
    max_fit_clients: int = 0        # cap on clients asked per round; 0 = no cap
    quorum: float = 0.5             # at the deadline, aggregate if this share of the asked replied
    round_timeout: float = 120.0    # seconds from asking to the deadline (max_duration)
    min_updates: int = 0            # close the round as soon as this many updates arrived; 0 = wait for
                                    # every asked client (asynchronous rounds: set it below the asked count)
    stragglers: str = "drop"        # late updates from asked clients: 'drop' (recorded) or 'merge' (into
                                    # the next aggregation with weight n / sqrt(1 + staleness))
    max_staleness: int = 2          # rounds after which a late update is simply stale
    local_epochs: int = 1           # E: local passes over each client's training split
    lr: float = 0.05                # client SGD learning rate
    momentum: float = 0.0           # client SGD momentum, buffers started afresh each round (0 = plain SGD)
    batch_size: int = 32            # B: client minibatch size
    max_batches: int = 0            # cap on local batches per round; 0 = no cap (E epochs)
    partition: str = ""             # '' = each client keeps its own --partition; else every client
                                    # re-partitions (iid | dirichlet | shards): for simulations
    alpha: float = 0.5              # Dirichlet concentration when partition is 'dirichlet'
    target_accuracy: float = 0.0    # stop once test accuracy reaches this; 0 = off
    strategy: str = "fedavg"        # see app/strategy.py: fedavg fedprox fedadam fedyogi fedadagrad
                                    # fedavgm krum multikrum median trimmed_mean bulyan (+ plug-ins)
    proximal_mu: float = 0.0        # FedProx: clients add mu/2 * ||w - w_global||^2 (fedprox needs > 0)
    server_lr: float = 0.1          # FedOpt / FedAvgM server learning rate (eta)
    beta1: float = 0.9              # FedOpt first-moment decay; FedAvgM momentum
    beta2: float = 0.99             # FedAdam / FedYogi second-moment decay
    tau: float = 1e-3               # FedOpt adaptivity (epsilon); v starts at tau^2
    byzantine_f: int = 0            # Krum / Multi-Krum / Bulyan: attackers tolerated per round
    multikrum_m: int = 0            # Multi-Krum: updates averaged; 0 = n - f
    trim_beta: float = 0.1          # trimmed mean: share cut from each end per coordinate
    mixing: str = "none"            # robust rules: 'nnm' first mixes each update with its n - f nearest
                                    # (Allouah et al. 2023; uses byzantine_f), for non-IID clients
    compression: str = "none"       # how clients encode updates: none | fp16 | int8 (shared/compression.py)
    anomaly_z: float = 2.5          # flag updates whose norm or cosine-distance z-score exceeds this
    seed: int = 0                   # seeds the initial model and client selection

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServerConfig:
    """How the server process runs; fixed for its lifetime (read from argv/env by run_server.py)."""

    state_dir: str = "state"            # SQLite database + model checkpoints live here
    host: str = "127.0.0.1"
    port: int = 5000
    admin_token: str = ""               # required for every request that changes something
    enrollment_token: str = ""          # clients present it when they register
    data_dir: str | None = None         # dataset root; None = $MESHFED_DATA_DIR or ./data
    eval_limit: int = 0                 # evaluate on the first N test samples; 0 = the whole split
    max_update_bytes: int = 32 << 20    # an update body larger than this is refused ('too_large')
    resume: bool = True                 # on start, resume a run that was active when we died
    run: RunConfig = RunConfig()        # the run configuration used when no run is stored
    # Scale-out (README "Several server processes"): one leader runs the round loop and serves the
    # clients; followers serve dashboards only. They share Socket.IO rooms through message_queue.
    role: str = "leader"                # 'leader' or 'follower'
    leader_url: str | None = None       # followers: the leader's address (http://host:port)
    message_queue: str | None = None    # e.g. redis://127.0.0.1:6379/0; None = a single process


# field -> (type, check, what the check means)
_CHECKS: dict[str, tuple[type, Any, str]] = {
    "dataset": (str, lambda v: v in DATASET_NAMES, f"one of {', '.join(DATASET_NAMES)}"),
    "model": (str, lambda v: v in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}"),
    "num_rounds": (int, lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "fraction_fit": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_fit_clients": (int, lambda v: 1 <= v <= 10_000, "an integer from 1 to 10000"),
    "max_fit_clients": (int, lambda v: 0 <= v <= 10_000, "an integer from 0 (no cap) to 10000"),
    "quorum": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "round_timeout": (float, lambda v: 1 <= v <= 86_400, "seconds from 1 to 86400"),
    "min_updates": (int, lambda v: 0 <= v <= 10_000, "an integer >= 0 (0 = wait for all asked clients)"),
    "stragglers": (str, lambda v: v in ("drop", "merge"), "'drop' or 'merge'"),
    "max_staleness": (int, lambda v: 1 <= v <= 100, "an integer from 1 to 100"),
    "local_epochs": (int, lambda v: 1 <= v <= 100, "an integer from 1 to 100"),
    "lr": (float, lambda v: 0 < v <= 10, "a number in (0, 10]"),
    "momentum": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "batch_size": (int, lambda v: 1 <= v <= 65_536, "an integer from 1 to 65536"),
    "max_batches": (int, lambda v: 0 <= v <= 10_000_000, "an integer >= 0 (0 = no cap)"),
    "partition": (str, lambda v: v in ("",) + PARTITION_NAMES,
                  f"'' (clients' own) or one of {', '.join(PARTITION_NAMES)}"),
    "alpha": (float, lambda v: 0.001 <= v <= 1000, "a number from 0.001 to 1000"),
    "target_accuracy": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "strategy": (str, lambda v: v in STRATEGIES, "a registered strategy (see app/strategy.py)"),
    "proximal_mu": (float, lambda v: 0 <= v <= 100, "a number from 0 to 100"),
    "server_lr": (float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "beta1": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta2": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "tau": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "byzantine_f": (int, lambda v: 0 <= v <= 1000, "an integer from 0 to 1000"),
    "multikrum_m": (int, lambda v: 0 <= v <= 10_000, "an integer >= 0 (0 = n - f)"),
    "trim_beta": (float, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "mixing": (str, lambda v: v in ("none", "nnm"), "'none' or 'nnm'"),
    "compression": (str, lambda v: v in COMPRESSIONS, f"one of {', '.join(COMPRESSIONS)}"),
    "anomaly_z": (float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "seed": (int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32-1"),
}


def update_run_config(base: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """base with `changes` applied, or ConfigError listing every bad field and what it must be."""
    if not isinstance(changes, dict):
        raise ConfigError({"_": "expected a JSON object of field: value"})
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in _CHECKS:
            errors[name] = f"unknown field; known fields: {', '.join(_CHECKS)}"
            continue
        kind, check, meaning = _CHECKS[name]
        try:
            if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
                raise ValueError
            coerced = kind(value) if kind is not int else int(float(value))
        except (TypeError, ValueError):
            errors[name] = f"must be {meaning}"
            continue
        if not check(coerced):
            errors[name] = f"must be {meaning}"
        clean[name] = coerced
    if errors:
        raise ConfigError(errors)
    result = dataclasses.replace(base, **clean)
    if result.max_fit_clients and result.max_fit_clients < result.min_fit_clients:
        raise ConfigError({"max_fit_clients": "must be 0 or at least min_fit_clients"})
    if result.strategy == "fedprox" and result.proximal_mu <= 0:
        raise ConfigError({"proximal_mu": "fedprox needs proximal_mu > 0 (e.g. 0.01)"})
    if result.mixing == "nnm":
        if result.strategy not in ROBUST:
            raise ConfigError({"mixing": f"nnm mixes updates before a robust rule ({', '.join(ROBUST)}); "
                                         f"{result.strategy} does not take it"})
        if not 0 < 2 * result.byzantine_f < result.min_fit_clients:
            raise ConfigError({"byzantine_f": "nnm needs byzantine_f (attackers to tolerate) with 1 <= byzantine_f < "
                                              "min_fit_clients / 2"})
    needed = min_updates(result)
    if needed > result.min_fit_clients:
        raise ConfigError({"min_fit_clients": f"{result.strategy} with byzantine_f={result.byzantine_f} needs "
                                              f"at least {needed} clients per round (n > 2f + 2 for Krum, "
                                              f"n >= 4f + 3 for Bulyan)"})
    return result
