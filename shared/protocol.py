"""The meshfed wire protocol, version 3: event names, messages, and weights <-> bytes.

Control travels as Socket.IO events on the /fl namespace; weights travel over HTTP as bytes:
  GET  /api/model/<version>   -> encode_weights(global weights)
  POST /api/update            -> pack_update(header, encode_weights(compress(delta, request.compression)))
  POST /api/sync              -> pack_sync(header, encode_weights(delta)): what a client learned in
                                 the mesh while the server was away (mesh/), sent once it is back
An update carries the *delta* (local weights - the global weights it started from).
Nothing here uses pickle: weights are safetensors (a JSON header of names, dtypes, shapes and
offsets, then the raw little-endian arrays). Version 1 sent .npz archives, which cost 5-10x more
CPU to write and read (zip CRCs and copies) on both ends of every transfer. Signed headers are
dataclasses read and signed by one codec (shared/frames.py), with each field's bounds beside it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import crypto, jsonio
from shared.errors import UpdateRefused
from shared.frames import (BASE64, CLIENT_ID, PEM, SHA256, TOKEN_ID, VERSION, advisory, canonical_bytes, frame,
                           integer, local, number, strings, text, unframe, wire_dict)

PROTOCOL_VERSION = "meshfed/5"  # 3: one codec; every header field signed but the advisory metrics; signed
                                # registration over a challenge. 4: top-k updates; an offline contribution
                                # says (signed) how its delta is compressed. 5: top-k sends a tensor under
                                # 10,000 values whole, without an index stream
NAMESPACE = "/fl"

# Socket.IO events on /fl.
EV_WELCOME = "welcome"              # server -> client after connect: {client_id, run_id, fingerprint}
EV_TRAIN = "train"                  # server -> client: TrainRequest.to_dict()
EV_CANCEL = "cancel"                # server -> client: {run_id, round}: the round ended without you
EV_UPDATE_RESULT = "update_result"  # server -> client: {round, accepted, reason, message}
EV_CLIENT_STATUS = "client_status"  # client -> server: {state, cpu_percent, memory_mb}
EV_NEW_MODEL = "new_model"          # server -> all clients: {version} once a round's model is committed
EV_SECAGG = "secagg"                # both ways: secure aggregation's stages (app/secagg.py, client/secagg.py)

UPDATE_MAGIC = b"MFU1"        # first bytes of every packed update
SYNC_MAGIC = b"MFS1"          # first bytes of every packed offline contribution
REGISTRATION_MAGIC = b"MFR1"  # domain tag of a registration's signed bytes (it travels as Socket.IO auth)
MAX_EXAMPLES = 10_000_000     # no client may claim more training examples than this


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
    compression: str = "none" # how to encode the update: none | fp16 | int8 | topk | topk+int8 (shared/compression.py)
    topk_ratio: float = 0.01  # topk: the share of each tensor's values sent
    error_feedback: bool = True  # topk: keep what was not sent and add it to the next delta (client/feedback.py)
    download_compression: str = "none"  # int8: a client holding the last model may download the coded step
    momentum: float = 0.0     # local SGD momentum (0 = plain SGD), buffers started afresh each round
    # privacy (shared/privacy.py): 'sample' trains with DP-SGD, 'local' noises the update; the client keeps its
    # own accountant and refuses a round that would take it past target_epsilon (0 = no budget)
    dp: str = "none"
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    clip_norm: float = 0.0    # local: the update's L1 clip
    local_epsilon: float = 0.0
    delta: float = 0.0
    target_epsilon: float = 0.0
    accountant: str = "rdp"
    secure_aggregation: str = "none"  # 'secagg+': the update is masked (app/secagg.py); its stages follow

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainRequest":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# The advisory values a client reports with an update (unsigned, shown on the dashboard, never used to
# weigh or accept anything): name -> (lo, hi). Others, and values out of bounds, are dropped with a note.
DAY = 86_400.0
METRICS: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, 1e9), "train_accuracy": (0.0, 1.0), "examples": (0.0, 1e12), "batches": (0.0, 1e12),
    "train_seconds": (0.0, DAY), "eval_loss": (0.0, 1e9), "eval_accuracy": (0.0, 1.0), "eval_seconds": (0.0, DAY),
    "cpu_percent": (0.0, 1e5), "memory_mb": (0.0, 1e8), "fetch_seconds": (0.0, DAY), "prefetched": (0.0, 1.0),
    "prepare_seconds": (0.0, DAY), "total_seconds": (0.0, DAY), "download_bytes": (0.0, 1e11),
    "delta_download": (0.0, 1.0), "compress_seconds": (0.0, DAY)}


@dataclass(frozen=True)
class UpdateHeader:
    """The facts about one update. `signature` covers canonical_bytes(): every field but metrics (advisory)."""

    run_id: str = field(metadata=text(TOKEN_ID))
    round: int = field(metadata=integer(0))
    model_version: int = field(metadata=integer(0))
    client_id: str = field(metadata=text(CLIENT_ID))
    num_examples: int = field(metadata=integer(0))  # its bounds are the server's check (app/verify.py)
    payload_sha256: str = field(metadata=text(SHA256))
    epsilon: float = field(default=0.0, metadata=number(0, 1e6))  # privacy the client spent in this run so far
                                                                   # (dp 'sample' or 'local'); the server relies on it
    protocol: str = field(default=PROTOCOL_VERSION, metadata=text(VERSION))
    signature: str = field(default="", metadata=text(BASE64, signed=False))  # base64 RSA-PSS
    metrics: dict[str, float] = field(default_factory=dict, metadata=advisory(METRICS))
    notes: tuple[str, ...] = field(default=(), metadata=local())  # advisory values the decoder dropped

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(UPDATE_MAGIC, self)


@dataclass(frozen=True)
class Registration:
    """What a client sends to connect on /fl (the Socket.IO auth): it proves it holds the private key of
    `public_key` by signing a fresh server challenge (GET /api/challenge) together with what it claims."""

    client_id: str = field(metadata=text(CLIENT_ID))
    public_key: str = field(metadata=text(PEM))
    num_examples: int = field(metadata=integer(0))
    challenge: str = field(metadata=text(r"[A-Za-z0-9_.-]{1,256}"))
    enrollment_token: str = field(default="", metadata=text(r"[ -~]{0,256}", signed=False))
    protocol: str = field(default=PROTOCOL_VERSION, metadata=text(VERSION))
    signature: str = field(default="", metadata=text(BASE64, signed=False))

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(REGISTRATION_MAGIC, self)

    def to_dict(self) -> dict[str, Any]:
        return wire_dict(self)


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
        meta = jsonio.loads(data[8:8 + header_len], max_bytes=header_len).get("__metadata__") or {}
        order = jsonio.loads(meta["order"], max_depth=1) if "order" in meta else sorted(arrays)
    except (SafetensorError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UpdateRefused("malformed", f"weights are not valid safetensors: {str(exc)[:200]}") from None
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order) and sorted(order) == sorted(arrays)):
        raise UpdateRefused("malformed", "the weights' name order does not list exactly their arrays")
    return {name: arrays[name] for name in order}


def pack_update(header: UpdateHeader, payload: bytes) -> bytes:
    """MFU1 | uint32 header length | header JSON | payload (the encoded delta)."""
    return frame(UPDATE_MAGIC, header, payload)


def unpack_update(body: bytes) -> tuple[UpdateHeader, bytes]:
    """Split a packed update; raises UpdateRefused('malformed') naming what is off."""
    return unframe(UPDATE_MAGIC, UpdateHeader, body)


@dataclass(frozen=True)
class SyncHeader:
    """The signed facts about one offline contribution: the delta a client's mesh model made from
    the global version it started at. `contribution_id` makes the upload idempotent."""

    contribution_id: str = field(metadata=text(TOKEN_ID))
    client_id: str = field(metadata=text(CLIENT_ID))
    base_version: int = field(metadata=integer(0))
    local_steps: int = field(metadata=integer(0))
    num_examples: int = field(metadata=integer(0))  # its bounds are the server's check (app/verify.py)
    payload_sha256: str = field(metadata=text(SHA256))
    peers: list[str] = field(default_factory=list, metadata=strings(CLIENT_ID, 256))  # whom it mixed with
    compression: str = field(default="none", metadata=text(r"none|fp16|int8"))  # of the delta (shared/compression.py)
    protocol: str = field(default=PROTOCOL_VERSION, metadata=text(VERSION))
    signature: str = field(default="", metadata=text(BASE64, signed=False))

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(SYNC_MAGIC, self)


def pack_sync(header: SyncHeader, payload: bytes) -> bytes:
    """MFS1 | uint32 header length | header JSON | payload (the encoded delta)."""
    return frame(SYNC_MAGIC, header, payload)


def unpack_sync(body: bytes) -> tuple[SyncHeader, bytes]:
    return unframe(SYNC_MAGIC, SyncHeader, body)


def signed_registration(key: Any, client_id: str, num_examples: int, challenge: str,
                        enrollment_token: str) -> Registration:
    """A client's registration for /fl, signed with its key over the server's `challenge`."""
    r = Registration(client_id=client_id, public_key=crypto.public_pem(key), num_examples=num_examples,
                     challenge=challenge, enrollment_token=enrollment_token)
    return replace(r, signature=crypto.sign(key, r.canonical_bytes()))


def roster_bytes(clients: dict[str, str], issued_at: float) -> bytes:
    """What the server signs in a roster: client id -> key fingerprint, and when it was issued."""
    return json.dumps({"clients": clients, "issued_at": issued_at}, sort_keys=True, separators=(",", ":")).encode()


def signed_roster(server_key: Any, clients: dict[str, str]) -> dict[str, Any]:
    issued_at = time.time()
    pem = crypto.public_pem(server_key)
    return {"clients": clients, "issued_at": issued_at, "server_key": pem,
            "server_fingerprint": crypto.fingerprint(pem),
            "signature": crypto.sign(server_key, roster_bytes(clients, issued_at))}
