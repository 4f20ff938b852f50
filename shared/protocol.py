"""The meshfed wire protocol, version 1: event names, messages, and weights <-> bytes.

Control travels as Socket.IO events on the /fl namespace; weights travel over HTTP as bytes:
  GET  /api/model/<version>   -> encode_weights(global weights)
  POST /api/update            -> pack_update(header, encode_weights(delta))
An update carries the *delta* (local weights - the global weights it started from).
Nothing here uses pickle: weights are an uncompressed .npz read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.errors import UpdateRefused

PROTOCOL_VERSION = "meshfed/1"
NAMESPACE = "/fl"

# Socket.IO events on /fl.
EV_WELCOME = "welcome"              # server -> client after connect: {client_id, run_id, fingerprint}
EV_TRAIN = "train"                  # server -> client: TrainRequest.to_dict()
EV_CANCEL = "cancel"                # server -> client: {run_id, round}: the round ended without you
EV_UPDATE_RESULT = "update_result"  # server -> client: {round, accepted, reason, message}
EV_CLIENT_STATUS = "client_status"  # client -> server: {state, cpu_percent, memory_mb}

UPDATE_MAGIC = b"MFU1"  # first bytes of every packed update


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks of one client for one round."""

    run_id: str
    round: int
    model_version: int
    local_epochs: int
    lr: float
    batch_size: int
    max_batches: int = 0      # 0 = no cap; >0 stops local training after that many batches
    deadline_s: float = 0.0   # seconds the client has before the round closes without it
    partition: str = ""       # '' = keep the client's own partition; else re-partition this way
    alpha: float = 0.5        # Dirichlet concentration for partition 'dirichlet'
    proximal_mu: float = 0.0  # FedProx: > 0 adds mu/2 * ||w - w_global||^2 to the local loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainRequest":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class UpdateHeader:
    """The signed facts about one update; `signature` covers canonical_bytes(), not the JSON."""

    run_id: str
    round: int
    model_version: int
    client_id: str
    num_examples: int
    payload_sha256: str
    signature: str = ""            # base64 RSA-PSS signature over canonical_bytes()
    protocol: str = PROTOCOL_VERSION
    metrics: dict[str, float] = field(default_factory=dict)  # advisory, shown on the dashboard

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: one field per line, fixed order."""
        fields = (self.protocol, self.run_id, str(self.round), str(self.model_version),
                  self.client_id, str(self.num_examples), self.payload_sha256)
        return "\n".join(fields).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_weights(weights: dict[str, np.ndarray]) -> bytes:
    """Weights as an uncompressed .npz (keys keep the state_dict order)."""
    buf = io.BytesIO()
    np.savez(buf, **weights)
    return buf.getvalue()


def decode_weights(data: bytes, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of encode_weights; refuses pickled objects and archives that expand past max_bytes."""
    try:
        # Never set allow_pickle=True here: these bytes come from the network or from disk.
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            expanded = sum(info.file_size for info in npz.zip.infolist())  # declared sizes, before reading
            if max_bytes is not None and expanded > max_bytes:
                raise UpdateRefused("too_large", f"weights expand to {expanded} bytes, limit is {max_bytes}")
            return {name: npz[name] for name in npz.files}
    except UpdateRefused:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object), EOFError, ...
        raise UpdateRefused("malformed", f"weights are not a valid .npz: {exc}") from exc


def pack_update(header: UpdateHeader, payload: bytes) -> bytes:
    """MFU1 | uint32 header length | header JSON | payload (the encoded delta)."""
    head = json.dumps(asdict(header), sort_keys=True).encode("utf-8")
    return UPDATE_MAGIC + struct.pack(">I", len(head)) + head + payload


def unpack_update(body: bytes, max_header: int = 64 * 1024) -> tuple[UpdateHeader, bytes]:
    """Split a packed update; raises UpdateRefused('malformed') on anything off."""
    if len(body) < 8 or body[:4] != UPDATE_MAGIC:
        raise UpdateRefused("malformed", "body does not start with the MFU1 update frame")
    (n,) = struct.unpack(">I", body[4:8])
    if n > max_header or 8 + n > len(body):
        raise UpdateRefused("malformed", f"header length {n} is out of range")
    try:
        raw = json.loads(body[8:8 + n])
        header = UpdateHeader(
            run_id=str(raw["run_id"]), round=int(raw["round"]), model_version=int(raw["model_version"]),
            client_id=str(raw["client_id"]), num_examples=int(raw["num_examples"]),
            payload_sha256=str(raw["payload_sha256"]), signature=str(raw.get("signature", "")),
            protocol=str(raw.get("protocol", "")),
            metrics={str(k): float(v) for k, v in dict(raw.get("metrics", {})).items()})
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateRefused("malformed", f"update header is not valid: {exc}") from exc
    return header, body[8 + n:]
