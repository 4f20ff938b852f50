"""The meshfed wire protocol, version 2: event names, messages, and weights <-> bytes.

Control travels as Socket.IO events on the /fl namespace; weights travel over HTTP as bytes:
  GET  /api/model/<version>   -> encode_weights(global weights)
  POST /api/update            -> pack_update(header, encode_weights(compress(delta, request.compression)))
  POST /api/sync              -> pack_sync(header, encode_weights(delta)): what a client learned in
                                 the mesh while the server was away (mesh/), sent once it is back
An update carries the *delta* (local weights - the global weights it started from).
Nothing here uses pickle: weights are safetensors (a JSON header of names, dtypes, shapes and
offsets, then the raw little-endian arrays). Version 1 sent .npz archives, which cost 5-10x more
CPU to write and read (zip CRCs and copies) on both ends of every transfer.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import crypto
from shared.errors import UpdateRefused

PROTOCOL_VERSION = "meshfed/2"
NAMESPACE = "/fl"

# Socket.IO events on /fl.
EV_WELCOME = "welcome"              # server -> client after connect: {client_id, run_id, fingerprint}
EV_TRAIN = "train"                  # server -> client: TrainRequest.to_dict()
EV_CANCEL = "cancel"                # server -> client: {run_id, round}: the round ended without you
EV_UPDATE_RESULT = "update_result"  # server -> client: {round, accepted, reason, message}
EV_CLIENT_STATUS = "client_status"  # client -> server: {state, cpu_percent, memory_mb}
EV_NEW_MODEL = "new_model"          # server -> all clients: {version} once a round's model is committed

UPDATE_MAGIC = b"MFU1"  # first bytes of every packed update
SYNC_MAGIC = b"MFS1"    # first bytes of every packed offline contribution


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks of one client for one round."""

    run_id: str
    round: int
    model_version: int
    local_epochs: int
    lr: float
    batch_size: int
    model_sha256: str = ""    # sha256 of model_version's bytes: a version number alone is not unique
                              # across servers (a server reset onto a fresh state dir counts from 0 again)
    max_batches: int = 0      # 0 = no cap; >0 stops local training after that many batches
    deadline_s: float = 0.0   # seconds the client has before the round closes without it
    partition: str = ""       # '' = keep the client's own partition; else re-partition this way
    alpha: float = 0.5        # Dirichlet concentration for partition 'dirichlet'
    proximal_mu: float = 0.0  # FedProx: > 0 adds mu/2 * ||w - w_global||^2 to the local loss
    compression: str = "none" # how to encode the update: none | fp16 | int8 (shared/compression.py)
    momentum: float = 0.0     # local SGD momentum (0 = plain SGD), buffers started afresh each round

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
    """Weights as safetensors bytes; the names' order (the state_dict's) is kept in the metadata."""
    return st_save({k: np.ascontiguousarray(v) for k, v in weights.items()},
                   metadata={"order": json.dumps(list(weights))})


def decode_weights(data: bytes, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of encode_weights (writable arrays, in the encoder's order); UpdateRefused on bad bytes."""
    if max_bytes is not None and len(data) > max_bytes:
        raise UpdateRefused("too_large", f"weights are {len(data)} bytes, limit is {max_bytes}")
    try:
        arrays = st_load(data)  # validates the header and that every offset lies inside the buffer
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        order = json.loads(meta["order"]) if "order" in meta else sorted(arrays)
    except (SafetensorError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UpdateRefused("malformed", f"weights are not valid safetensors: {exc}") from exc
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order) and sorted(order) == sorted(arrays)):
        raise UpdateRefused("malformed", "the weights' name order does not list exactly their arrays")
    return {name: arrays[name] for name in order}


def frame(magic: bytes, header: Any, payload: bytes) -> bytes:
    """magic | uint32 header length | header JSON (a dataclass) | payload: every signed body we send."""
    head = json.dumps(asdict(header), sort_keys=True).encode("utf-8")
    return magic + struct.pack(">I", len(head)) + head + payload


def unframe(magic: bytes, body: bytes, max_header: int = 64 * 1024) -> tuple[dict[str, Any], bytes]:
    """Inverse of frame: (header dict, payload), or UpdateRefused('malformed')."""
    if len(body) < 8 or body[:4] != magic:
        raise UpdateRefused("malformed", f"body does not start with the {magic.decode()} frame")
    (n,) = struct.unpack(">I", body[4:8])
    if n > max_header or 8 + n > len(body):
        raise UpdateRefused("malformed", f"header length {n} is out of range")
    try:
        raw = json.loads(body[8:8 + n])
    except ValueError as exc:
        raise UpdateRefused("malformed", f"header is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UpdateRefused("malformed", "header is not a JSON object")
    return raw, body[8 + n:]


def pack_update(header: UpdateHeader, payload: bytes) -> bytes:
    """MFU1 | uint32 header length | header JSON | payload (the encoded delta)."""
    return frame(UPDATE_MAGIC, header, payload)


def unpack_update(body: bytes, max_header: int = 64 * 1024) -> tuple[UpdateHeader, bytes]:
    """Split a packed update; raises UpdateRefused('malformed') on anything off."""
    raw, payload = unframe(UPDATE_MAGIC, body, max_header)
    try:
        header = UpdateHeader(
            run_id=str(raw["run_id"]), round=int(raw["round"]), model_version=int(raw["model_version"]),
            client_id=str(raw["client_id"]), num_examples=int(raw["num_examples"]),
            payload_sha256=str(raw["payload_sha256"]), signature=str(raw.get("signature", "")),
            protocol=str(raw.get("protocol", "")),
            metrics={str(k): float(v) for k, v in dict(raw.get("metrics", {})).items()})
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateRefused("malformed", f"update header is not valid: {exc}") from exc
    return header, payload


@dataclass(frozen=True)
class SyncHeader:
    """The signed facts about one offline contribution: the delta a client's mesh model made from
    the global version it started at. `contribution_id` makes the upload idempotent."""

    contribution_id: str
    client_id: str
    base_version: int
    local_steps: int
    num_examples: int
    payload_sha256: str
    peers: list[str] = field(default_factory=list)  # whom it mixed with (the dashboard's topology)
    signature: str = ""
    protocol: str = PROTOCOL_VERSION

    def canonical_bytes(self) -> bytes:
        fields = ("sync", self.protocol, self.contribution_id, self.client_id, str(self.base_version),
                  str(self.local_steps), str(self.num_examples), self.payload_sha256, ",".join(self.peers))
        return "\n".join(fields).encode("utf-8")


def pack_sync(header: SyncHeader, payload: bytes) -> bytes:
    """MFS1 | uint32 header length | header JSON | payload (the encoded delta)."""
    return frame(SYNC_MAGIC, header, payload)


def unpack_sync(body: bytes, max_header: int = 64 * 1024) -> tuple[SyncHeader, bytes]:
    raw, payload = unframe(SYNC_MAGIC, body, max_header)
    try:
        header = SyncHeader(
            contribution_id=str(raw["contribution_id"]), client_id=str(raw["client_id"]),
            base_version=int(raw["base_version"]), local_steps=int(raw["local_steps"]),
            num_examples=int(raw["num_examples"]), payload_sha256=str(raw["payload_sha256"]),
            peers=[str(p) for p in raw.get("peers", [])], signature=str(raw.get("signature", "")),
            protocol=str(raw.get("protocol", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateRefused("malformed", f"sync header is not valid: {exc}") from exc
    if not (0 < len(header.contribution_id) <= 64) or header.num_examples <= 0:
        raise UpdateRefused("malformed", "contribution_id must be 1-64 characters and num_examples positive")
    return header, payload


def roster_bytes(clients: dict[str, str], issued_at: float) -> bytes:
    """What the server signs in a roster: client id -> key fingerprint, and when it was issued."""
    return json.dumps({"clients": clients, "issued_at": issued_at}, sort_keys=True, separators=(",", ":")).encode()


def signed_roster(server_key: Any, clients: dict[str, str]) -> dict[str, Any]:
    issued_at = time.time()
    pem = crypto.public_pem(server_key)
    return {"clients": clients, "issued_at": issued_at, "server_key": pem,
            "server_fingerprint": crypto.fingerprint(pem),
            "signature": crypto.sign(server_key, roster_bytes(clients, issued_at))}
