"""A client's configuration: its data partition and its connection. Importable without torch, so that
run_client.py --help and a mistyped flag answer at once."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.config import MeshConfig
from shared.partition import HOLDOUT_FRACTION


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    partition: str = "dirichlet"   # iid | dirichlet | shards
    alpha: float = 0.5             # Dirichlet concentration (smaller = more label skew)
    num_clients: int = 1           # how many partitions the dataset is cut into
    client_index: int = 0          # which partition is ours
    seed: int = 0                  # the same seed on every client gives disjoint partitions
    max_samples: int = 0           # keep at most this many of our samples (0 = all); for quick runs
    holdout: float = HOLDOUT_FRACTION  # share of our samples kept out of training for local evaluation
    flip_labels: bool = False      # train on labels 9 - y (the label_flip attack, client/behaviour.py)


@dataclass(frozen=True)
class NodeConfig:
    client_id: str
    server_address: str            # http://host:port of the server (or of nginx in front of it)
    enrollment_token: str
    key_dir: str = "keys"          # where <client_id>.pem lives (created 0600 on first run)
    local_epochs: int | None = None  # None = use the server's value; set to override for this client
    lr: float | None = None
    batch_size: int | None = None
    http_timeout: float = 60.0     # seconds for one model download or update upload
    ca_cert: str | None = None     # CA bundle to verify the server's TLS certificate (https://, wss://)
    mesh: MeshConfig | None = None  # --enable-mesh: fall back to a P2P mesh when the server is away
