"""Secure aggregation's pure parts (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020): Shamir sharing, key
agreement, encrypted shares, PRG masks, ring quantisation and the neighbour graph. No I/O, no Flask: the
round's stages (app/secagg.py on the server, client/secagg.py on a client) are built from these.

What a client sends as its input is y_u = q_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) PRG(s_uv)  (mod 2^32):
q_u its quantised, weighted update, b_u a self-mask seed, s_uv the X25519 agreement of u's and v's mask keys
(sign +1 if u < v, else -1, so a pair's masks cancel in the sum). The server removes the self-masks of the
clients that sent input and, for a client that dropped after sharing keys, the pairwise masks its surviving
neighbours added, from secrets reconstructed out of t Shamir shares held by the survivors.

The ring is Z_{2^32}: an input is as many bytes as a float32 update. Quantisation scales so that the weighted
sum of any subset of the round's clients stays inside [-2^31, 2^31): it cannot wrap (ring_scale).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from typing import Any, Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PRIME = 2**521 - 1       # Shamir's field: a Mersenne prime above every 32-byte secret
RING_BITS = 32           # inputs live in Z_{2^32}, as uint32: the bytes of a float32 update
SECRET_BYTES = 32
Weights = dict[str, np.ndarray]


class SecAggError(ValueError):
    """A secure-aggregation message or secret that does not check out; the message says which and why."""


# --- Shamir's secret sharing over GF(PRIME) --------------------------------------------------------------

def split(secret: bytes, holders: list[int], threshold: int, rng: random.SystemRandom | None = None
          ) -> dict[int, int]:
    """Shares of `secret` (at most 65 bytes) for the holders' x coordinates (distinct, 1..PRIME-1): any
    `threshold` of them give the secret back, fewer give nothing about it."""
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"threshold {threshold} must be from 1 to the {len(holders)} holders")
    if len(set(holders)) != len(holders) or not all(0 < x < PRIME for x in holders):
        raise SecAggError("share coordinates must be distinct and non-zero")
    rng = rng or random.SystemRandom()
    coefficients = [int.from_bytes(secret, "big")] + [rng.randrange(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: dict[int, int], threshold: int, size: int = SECRET_BYTES) -> bytes:
    """The secret from at least `threshold` shares {x: y} (Lagrange interpolation at 0); SecAggError below it."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * -xj % PRIME, den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise SecAggError("the shares do not interpolate to a secret of this size (a share is wrong)")
    return secret.to_bytes(size, "big")


def default_threshold(holders: int, fraction: float = 0.5) -> int:
    """Shares needed out of `holders`: a strict majority at least, so no two disjoint sets of holders can each
    reconstruct (a server cannot get a client's self-mask from some and its mask key from others)."""
    return max(holders // 2 + 1, math.ceil(fraction * holders))


# --- keys, agreement, encrypted shares -------------------------------------------------------------------

def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 bytes."""
    key = X25519PrivateKey.generate()
    return (key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: str, context: str) -> bytes:
    """32 bytes both ends derive: HKDF-SHA256 of the X25519 shared secret, bound to its purpose and round."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"bad X25519 key: {exc}") from None
    return HKDF(hashes.SHA256(), 32, salt=None, info=f"meshfed secagg {purpose} {context}".encode()).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: nonce (12 bytes) | ciphertext and tag."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext, or SecAggError if the ciphertext, its tag or its associated data were changed."""
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError):
        raise SecAggError("share does not decrypt: tampered with, or not for this recipient and round") from None


def commitment(secret: bytes) -> str:
    """What a client signs about its self-mask seed, so a reconstructed one can be checked."""
    return hashlib.sha256(b"meshfed secagg self-mask\n" + secret).hexdigest()


def share_plaintext(sender: str, recipient: str, mask_key_share: int, self_mask_share: int) -> bytes:
    return json.dumps([sender, recipient, format(mask_key_share, "x"), format(self_mask_share, "x")]).encode()


def read_share_plaintext(data: bytes, sender: str, recipient: str) -> tuple[int, int]:
    try:
        s, r, mask_key_share, self_mask_share = json.loads(data)
        if (s, r) != (sender, recipient):
            raise SecAggError(f"share names {s!r} -> {r!r}, expected {sender!r} -> {recipient!r}")
        return int(mask_key_share, 16), int(self_mask_share, 16)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"share is not well formed: {exc}") from None


# --- masks ------------------------------------------------------------------------------------------------

def prg(seed: bytes, size: int) -> np.ndarray:
    """`size` uint32 words of ChaCha20 keystream under the 32-byte seed (a fresh seed per round and pair)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * size)), dtype="<u4")


def pair_sign(me: str, other: str) -> int:
    return 1 if me < other else -1


def add_mask(total: np.ndarray, mask: np.ndarray, sign: int = 1) -> None:
    """total += sign * mask (mod 2^32), in place."""
    if sign > 0:
        np.add(total, mask, out=total)
    else:
        np.subtract(total, mask, out=total)


# --- quantisation in the ring -----------------------------------------------------------------------------

def ring_scale(clip: float, clients: int) -> float:
    """Integers per unit of weighted update: each client's input is round(S * n_u / W * clip(x_u, c)), so the
    sum over any subset of the `clients` is at most S * c + clients (stochastic rounding adds under 1 each),
    which S keeps below 2^31: the signed sum never wraps."""
    return (2 ** (RING_BITS - 1) - 1 - clients) / clip


def quantise(delta: Weights, share: float, clip: float, scale: float, rng: np.random.Generator
             ) -> tuple[Weights, int]:
    """The client's ring input: each coordinate clipped to [-clip, clip], times its weight share n_u / W and
    the scale, stochastically rounded (unbiased), in two's complement as uint32; and how many were clipped."""
    out, clipped = {}, 0
    for name, array in delta.items():
        x = np.asarray(array, dtype=np.float64)
        if not np.isfinite(x).all():  # the server cannot see it: the client must not send it
            raise SecAggError(f"{name} holds NaN or infinity; not sending this update")
        clipped += int(np.count_nonzero(np.abs(x) > clip))
        y = np.clip(x, -clip, clip) * (share * scale)
        q = np.floor(y + rng.random(y.shape)).astype(np.int64)
        out[name] = q.astype(np.uint32)  # mod 2^32 (two's complement)
    return out, clipped


def dequantise(total: Weights, scale: float, share: float) -> Weights:
    """The weighted mean from the unmasked ring sum: signed sum / scale is sum_u n_u x_u / W; dividing by the
    survivors' share sum_u n_u / W gives their example-weighted mean."""
    return {name: (s.view(np.int32).astype(np.float64) / (scale * share)).astype(np.float32)
            for name, s in total.items()}


def split_flat(flat: np.ndarray, spec: dict[str, tuple[tuple[int, ...], str]]) -> Weights:
    """A flat uint32 vector as named arrays of the model's shapes (in the spec's order)."""
    out, start = {}, 0
    for name, (shape, _) in spec.items():
        n = math.prod(shape)
        out[name] = flat[start:start + n].reshape(shape)
        start += n
    return out


def flatten(arrays: Weights, spec: dict[str, tuple[tuple[int, ...], str]]) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(arrays[name], dtype=np.uint32).reshape(-1) for name in spec])


AUDIT_ENV = "MESHFED_SECAGG_AUDIT_DIR"  # set: clients and server write what they hold (tests, bench/secagg.py)


def audit(name: str, array: Callable[[], np.ndarray]) -> None:
    """With $MESHFED_SECAGG_AUDIT_DIR set, save array() there as <name>.npy (numpy, no pickle): the plaintext
    input a client quantised, what the server held of each (masked) and their unmasked sum, for an audit.
    Unset (always, outside tests and benchmarks), nothing is computed."""
    folder = os.environ.get(AUDIT_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, f"{name}.npy"), array(), allow_pickle=False)


# --- the neighbour graph ----------------------------------------------------------------------------------

def auto_neighbours(n: int) -> int:
    """SecAgg+'s k for n clients: 6 log2 n (rounded up, even), at most n - 1 (then it is plain SecAgg). With a
    majority threshold, a round is lost when more than half of some neighbourhood drops; at 30% dropouts that
    takes a tail event whose chance falls exponentially in k: 6 log2 n keeps it around 1% at 50-100 clients
    (bench/secagg.py measures it), where 2 log2 n lost about half the rounds."""
    return min(n - 1, 6 * math.ceil(math.log2(max(n, 2))))


def survives(graph: dict[str, list[str]], dropped: set[str], threshold: Callable[[str], int]) -> bool:
    """Whether every neighbourhood keeps its threshold of survivors when `dropped` leave after sharing keys."""
    return all(sum(1 for v in [c, *near] if v not in dropped) >= threshold(c) for c, near in graph.items())


def neighbours(clients: list[str], k: int, seed: str) -> dict[str, list[str]]:
    """A k-regular graph (k >= n - 1: complete): the clients in a seeded random order on a circle, each joined
    to the k/2 nearest on either side (a Harary graph; k is rounded up to even)."""
    n = len(clients)
    if k >= n - 1:
        return {c: [v for v in clients if v != c] for c in clients}
    order = sorted(clients)
    random.Random(seed).shuffle(order)
    half = (k + 1) // 2
    graph = {c: set() for c in clients}
    for i, c in enumerate(order):
        for j in range(1, half + 1):
            graph[c].add(order[(i + j) % n])
            graph[c].add(order[(i - j) % n])
    return {c: sorted(v) for c, v in graph.items()}


# --- the stages' messages -----------------------------------------------------------------------------

# Client -> server, each signed with the client's pinned RSA key over signed_bytes(): a stage name and its
# fields. Every field is checked here (type, size, pattern) before anything else reads it.
HEX32 = re.compile(r"[0-9a-f]{64}")
SHARE_Y = re.compile(r"[0-9a-f]{1,131}")  # a share: an element of GF(2^521 - 1) in hex
SEALED = re.compile(r"[A-Za-z0-9+/]{1,800}={0,2}")  # ~430 characters: two shares, two ids
CLIENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PEERS = 10_000
STAGES = {"keys": ("mask_key", "share_key", "commitment"), "shares": ("shares",),
          "reveal": ("self_mask", "mask_key_shares")}


def signed_bytes(message: dict[str, Any]) -> bytes:
    """What a stage message's signature covers: a domain tag, then its checked fields (signature left out)."""
    fields = {k: v for k, v in message.items() if k != "signature"}
    return b"MFA1\n" + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_message(raw: Any) -> dict[str, Any]:
    """A client's stage message with every field checked, rebuilt from the checked values; SecAggError naming
    the first bad field otherwise."""
    if not isinstance(raw, dict):
        raise SecAggError("message is not a JSON object")
    stage = raw.get("stage")
    if not isinstance(stage, str) or stage not in STAGES:
        raise SecAggError(f"'stage' must be one of {', '.join(STAGES)}")
    out: dict[str, Any] = {"stage": stage}
    for name in ("run_id", "client_id"):
        if not isinstance(raw.get(name), str) or not CLIENT.fullmatch(raw[name]):
            raise SecAggError(f"{name!r} must be an id")
        out[name] = raw[name]
    if not isinstance(raw.get("round"), int) or isinstance(raw["round"], bool) or not 0 <= raw["round"] < 2**53:
        raise SecAggError("'round' must be a non-negative integer")
    out["round"] = raw["round"]
    if not isinstance(raw.get("signature"), str) or len(raw["signature"]) > 1400:
        raise SecAggError("'signature' must be a base64 RSA-PSS signature")
    out["signature"] = raw["signature"]
    for name in STAGES[stage]:
        value = raw.get(name)
        if name in ("mask_key", "share_key", "commitment"):
            if not isinstance(value, str) or not HEX32.fullmatch(value):
                raise SecAggError(f"{name!r} must be 64 hex digits")
        else:
            pattern = SEALED if name == "shares" else SHARE_Y
            if not isinstance(value, dict) or len(value) > MAX_PEERS or not all(
                    isinstance(k, str) and CLIENT.fullmatch(k) and isinstance(v, str) and pattern.fullmatch(v)
                    for k, v in value.items()):
                what = "sealed shares" if name == "shares" else "shares in hex"
                raise SecAggError(f"{name!r} must map client ids to {what}")
            value = dict(value)
        out[name] = value
    return out
