"""How a client's mesh fallback runs (MeshConfig) and where its files live: light enough for every client to
import, with or without --enable-mesh (zeroconf and qrcode load only when the mesh starts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MeshConfig:
    host: str = "127.0.0.1"           # address peers reach this client on (advertised by zeroconf)
    port: int = 0                     # gossip endpoint port; 0 = any free port
    after: float = 5.0                # seconds without the server before switching to mesh mode
    interval: float = 1.0             # seconds between gossip steps
    fanout: int = 2                   # peers contacted per gossip step
    local_batches: int = 10           # local training batches per gossip step
    static_peers: str = ""            # host:port,... for networks without multicast
    interfaces: tuple[str, ...] = ()  # zeroconf interfaces (e.g. 127.0.0.1); () = zeroconf's default
    max_bytes: int = 64 << 20         # largest gossip message accepted


def trust_path(key_dir: str | Path, client_id: str) -> Path:
    """The file of the peers an operator confirmed for this client (mesh/trust.py)."""
    return Path(key_dir) / f"{client_id}.trust.json"
