"""Signed gossip messages between mesh peers.

Frame: MFG1 | uint32 header length | header JSON | payload (weights as safetensors, shared.protocol; their floats
as float32, or as fp16 when the header's signed `encoding` says so: 2x fewer bytes, in a run that compresses).
The header carries the sender's public key, and an RSA-PSS/SHA-256 signature over the canonical
bytes of every other header field, the payload's sha256 among them. open_message() checks, in
order: frame, version, key matches fingerprint, sender trusted (mesh/trust.py), signature, payload
hash, freshness, replay, payload decodes, values finite; each failure is a MeshRefused with a reason.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm

from shared import crypto
from shared.errors import UpdateRefused
from shared.frames import (BASE64, CLIENT_ID, PEM, SHA256, VERSION, canonical_bytes, frame, integer, number, text,
                           unframe)
from shared.protocol import decode_weights, encode_weights, sha256_hex

MESH_VERSION = "meshfed-mesh/3"  # 2: headers read and signed by shared/frames.py. 3: the payload's encoding
MAGIC = b"MFG1"
FINGERPRINT = r"SHA256:[0-9a-f]{4}(:[0-9a-f]{4}){15}"
MAX_SKEW_SECONDS = 300.0  # a message older (or further in the future) than this is refused as stale


class MeshRefused(UpdateRefused):
    """A mesh message was refused; `reason` is a stable code, counted per peer by the caller."""


@dataclass(frozen=True)
class GossipHeader:
    sender: str = field(metadata=text(CLIENT_ID))          # client id
    fingerprint: str = field(metadata=text(FINGERPRINT))   # of public_key (shared.crypto.fingerprint)
    public_key: str = field(metadata=text(PEM))            # trusted only through the roster or an operator
    nonce: str = field(metadata=text(r"[0-9a-f]{32}"))     # random, once per message: replay protection
    sent_at: float = field(metadata=number(0, 1e11))       # unix time at the sender
    base_version: int = field(metadata=integer(0))         # the global version the sender's model descends from
    local_steps: int = field(metadata=integer(0))          # local training steps since base_version
    num_examples: int = field(metadata=integer(0))         # the sender's training examples: its weight in the mix
    payload_sha256: str = field(metadata=text(SHA256))
    encoding: str = field(default="float32", metadata=text(r"float32|fp16"))  # of the payload's float arrays
    version: str = field(default=MESH_VERSION, metadata=text(VERSION))
    signature: str = field(default="", metadata=text(BASE64, signed=False))

    def canonical_bytes(self) -> bytes:
        return canonical_bytes(MAGIC, self)


def seal(key: Any, sender: str, weights: dict[str, np.ndarray], base_version: int, local_steps: int,
         num_examples: int, encoding: str = "float32") -> bytes:
    """A signed, framed message carrying `weights` (their floats in `encoding`: float32 or fp16); the signature
    covers the bytes as sent."""
    if encoding == "fp16":
        weights = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()}
    payload = encode_weights(weights)
    pem = crypto.public_pem(key)
    header = GossipHeader(sender=sender, fingerprint=crypto.fingerprint(pem), public_key=pem,
                          nonce=secrets.token_hex(16), sent_at=time.time(), base_version=base_version,
                          local_steps=local_steps, num_examples=num_examples, payload_sha256=sha256_hex(payload),
                          encoding=encoding)
    return frame(MAGIC, replace(header, signature=crypto.sign(key, header.canonical_bytes())), payload)


class ReplayGuard:
    """Nonces seen within the freshness window; older ones are refused as stale anyway."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_add(self, nonce: str, now: float) -> bool:
        """True if the nonce is new (and remembers it)."""
        with self._lock:
            for old in [n for n, t in self._seen.items() if now - t > 2 * MAX_SKEW_SECONDS]:
                del self._seen[old]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


def unpack(body: bytes) -> tuple[GossipHeader, bytes]:
    try:
        return unframe(MAGIC, GossipHeader, body)
    except UpdateRefused as exc:
        raise MeshRefused(exc.reason, str(exc).removeprefix(f"{exc.reason}: ")) from None


def open_message(body: bytes, trust: Any, replay: ReplayGuard, max_bytes: int,
                 now: float | None = None) -> tuple[GossipHeader, dict[str, np.ndarray]]:
    """Verify a framed message; returns its header and weights or raises MeshRefused."""
    if len(body) > max_bytes:
        raise MeshRefused("too_large", f"message is {len(body)} bytes, the limit is {max_bytes}")
    header, payload = unpack(body)
    if header.version != MESH_VERSION:
        raise MeshRefused("bad_version", f"expected {MESH_VERSION}, got {header.version!r}")
    try:
        public_key = crypto.load_public_key(header.public_key)
        key_ok = crypto.fingerprint(header.public_key) == header.fingerprint
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MeshRefused("malformed", f"public key is not a PEM RSA key: {exc}") from exc
    if not key_ok:
        raise MeshRefused("key_mismatch", "the public key does not match the fingerprint it claims")
    trust.check(header.sender, header.fingerprint)  # raises MeshRefused('unknown_peer' / 'key_mismatch')
    if not crypto.verify(public_key, header.canonical_bytes(), header.signature):
        raise MeshRefused("bad_signature", f"signature does not verify for {header.sender}")
    if sha256_hex(payload) != header.payload_sha256:
        raise MeshRefused("bad_signature", "payload does not match the signed sha256")
    now = time.time() if now is None else now
    if abs(now - header.sent_at) > MAX_SKEW_SECONDS:
        raise MeshRefused("stale", f"sent {now - header.sent_at:.0f}s ago; the window is {MAX_SKEW_SECONDS:.0f}s")
    if not replay.check_and_add(header.nonce, now):
        raise MeshRefused("replay", f"nonce {header.nonce[:8]}... was seen before")
    if header.num_examples <= 0:
        raise MeshRefused("malformed", "num_examples must be positive")
    try:
        weights = decode_weights(payload, max_bytes=max_bytes)
    except UpdateRefused as exc:
        raise MeshRefused(exc.reason, str(exc)) from exc
    if header.encoding == "fp16":  # back to float32: peers mix in full precision
        weights = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in weights.items()}
    if any(a.dtype == np.float16 for a in weights.values()):
        raise MeshRefused("malformed", "fp16 arrays in a message that says its encoding is float32")
    if not all(np.isfinite(a).all() for a in weights.values() if a.dtype.kind == "f"):
        raise MeshRefused("non_finite", "weights contain NaN or infinity")
    return header, weights
