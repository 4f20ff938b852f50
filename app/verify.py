"""Checks an update must pass before it may touch a round. Each refusal has a stable reason code:

  protocol_version  header speaks another protocol version
  unknown_client    no key is pinned for this client id (register first)
  bad_signature     RSA-PSS signature does not verify against the pinned key
  payload_mismatch  sha256 of the payload differs from the signed one
  wrong_run         update is for another run
  no_open_round     no round is collecting updates now
  stale_round       update is for a round that already closed (or for a future one)
  wrong_version     update was trained from a model version other than this round's
  not_selected      client was not asked to train in this round
  replay            client already delivered an update for this round
  bad_examples      num_examples is not in 1..what the client registered (at most MAX_EXAMPLES)
  contribution_limit  the client made its offline contributions from that base version already
  too_large         body or decoded weights exceed the configured limit
  malformed         framing, header or weights cannot be parsed
  shape_mismatch    array names or shapes differ from the model's
  dtype_mismatch    array dtypes differ from what the run's compression sends (the model's for 'none')
  non_finite        NaN or infinity in the update
  bad_indices       a top-k update's indices are out of range, unsorted, repeated or not as many as its values
  not_sharded       (an edge) this run's rule needs every update at the leader (app/tier.py)
  leader_unreachable, queue_unreachable  (an edge, or a tier's Redis) not the sender's fault: send it again (503)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared import crypto
from shared.compression import DEFAULT_RATIO, INDEX_PREFIX, VARINT_MAX, decompress, wire_spec
from shared.errors import UpdateRefused
from shared.protocol import MAX_EXAMPLES, PROTOCOL_VERSION, SyncHeader, UpdateHeader, decode_weights, sha256_hex


SECURE = "secagg"  # OpenRound.compression of a secure round: inputs are masked uint32 arrays


@dataclass(frozen=True)
class OpenRound:
    """What the currently open round accepts."""

    run_id: str
    round: int
    model_version: int
    selected: frozenset[str]
    spec: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype str) of the model
    max_bytes: int
    compression: str = "none"  # how updates are encoded (shared/compression.py), as the TrainRequest said
    topk_ratio: float = DEFAULT_RATIO  # the share of values a top-k update carries (its k per tensor)


@dataclass(frozen=True)
class Verified:
    """An update or offline contribution whose signature checked out against its sender's pinned key (only
    RoundLoop.authenticate makes one); from there on, refusals are charged to the sender."""

    header: UpdateHeader | SyncHeader
    payload: bytes
    registered_examples: int  # what the sender registered with (signed): the bound of its examples


def authenticate(store: Any, header: UpdateHeader | SyncHeader, payload: bytes) -> Verified:
    """Check the signature against the sender's key pinned in `store`; UpdateRefused (nobody charged) if it fails."""
    client = store.client(header.client_id)
    check_signature(header, payload, client["public_key"] if client else None)
    return Verified(header, payload, int(client["num_examples"] or 0))


def check_signature(header: UpdateHeader | SyncHeader, payload: bytes, public_key_pem: str | None) -> None:
    """Refuse unless protocol, pinned key, signature and payload hash all check out."""
    if header.protocol != PROTOCOL_VERSION:
        raise UpdateRefused("protocol_version", f"expected {PROTOCOL_VERSION}, got {header.protocol!r}")
    if public_key_pem is None:
        raise UpdateRefused("unknown_client", f"no key is pinned for {header.client_id!r}; register first")
    if not crypto.verify(crypto.load_public_key(public_key_pem), header.canonical_bytes(), header.signature):
        raise UpdateRefused("bad_signature", "signature does not verify against the client's pinned key")
    if sha256_hex(payload) != header.payload_sha256:
        raise UpdateRefused("payload_mismatch", "payload sha256 differs from the signed one")


def check_round(header: UpdateHeader, open_round: OpenRound | None, delivered: set[str]) -> None:
    """Refuse unless the update belongs to the open round, from a selected client, for the first time."""
    if open_round is None:
        raise UpdateRefused("no_open_round", "no round is collecting updates now; wait for the next request")
    if header.run_id != open_round.run_id:
        raise UpdateRefused("wrong_run", f"update is for run {header.run_id!r}, current is {open_round.run_id!r}")
    if header.round != open_round.round:
        raise UpdateRefused("stale_round", f"update is for round {header.round}, open round is {open_round.round}")
    if header.model_version != open_round.model_version:
        raise UpdateRefused("wrong_version", f"trained from version {header.model_version}, "
                                             f"round {open_round.round} uses {open_round.model_version}")
    if header.client_id not in open_round.selected:
        raise UpdateRefused("not_selected", f"{header.client_id!r} was not asked to train in this round")
    if header.client_id in delivered:
        raise UpdateRefused("replay", f"{header.client_id!r} already delivered round {header.round}")


def check_examples(num_examples: int, registered: int) -> None:
    """Refuse a claim of more examples than the client registered with (or than MAX_EXAMPLES)."""
    bound = min(registered, MAX_EXAMPLES)
    if not 0 < num_examples <= bound:
        raise UpdateRefused("bad_examples", f"num_examples must be in 1..{bound} (what the client registered), "
                                            f"got {num_examples}")


def check_arrays(payload: bytes, spec: dict[str, tuple[tuple[int, ...], str]], max_bytes: int,
                 scheme: str = "none", ratio: float = DEFAULT_RATIO) -> dict[str, np.ndarray]:
    """Decode the delta and refuse unless names, shapes and dtypes match the model's `spec` as compression
    `scheme` sends it and every value is finite; returns float deltas in the model's order and dtypes (a secure
    round's masked inputs: uint32 arrays of the model's shapes, as they are)."""
    arrays = decode_weights(payload, max_bytes=max_bytes)
    expected = {name: (shape, "<u4") for name, (shape, _) in spec.items()} if scheme == SECURE \
        else wire_spec(spec, scheme, ratio)
    if set(arrays) != set(expected):
        raise UpdateRefused("shape_mismatch", f"arrays {sorted(arrays)[:4]}... do not match the model's names "
                                              f"(compression {scheme!r})")
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if name.startswith(INDEX_PREFIX):  # a varint stream: one to VARINT_MAX bytes per index
            if array.ndim != 1 or not shape[0] <= array.size <= VARINT_MAX * shape[0]:
                raise UpdateRefused("bad_indices", f"{name} has {array.size} bytes for {shape[0]} indices")
        elif tuple(array.shape) != shape:
            raise UpdateRefused("shape_mismatch", f"{name} has shape {tuple(array.shape)}, expected {shape}")
        if array.dtype.str != dtype:
            raise UpdateRefused("dtype_mismatch", f"{name} has dtype {array.dtype.str}, expected {dtype} "
                                                  f"(compression {scheme!r})")
    if scheme == SECURE:  # masked ring integers (app/secagg.py): any value is one
        return {name: arrays[name] for name in expected}
    try:
        delta = decompress({name: arrays[name] for name in expected}, scheme, spec)
    except ValueError as exc:  # a top-k index stream that is not what its values need
        raise UpdateRefused("bad_indices", str(exc)) from None
    for name, array in delta.items():
        if not np.isfinite(array).all():
            raise UpdateRefused("non_finite", f"{name} contains NaN or infinity")
    return delta
