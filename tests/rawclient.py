"""A client at the protocol level, for tests that play a client by hand (an attacker, a flood): it registers
the way run_client.py does, over a fresh challenge, and signs what it sends with its own key."""
from __future__ import annotations

import dataclasses
import struct
from typing import Any, Callable

import requests

from shared import crypto
from shared.protocol import UpdateHeader, encode_weights, pack_update, sha256_hex, signed_registration


def auth_for(url: str, key: Any, client_id: str, enrollment_token: str, num_examples: int = 10,
             session: requests.Session | None = None) -> Callable[[], dict[str, Any]]:
    """The Socket.IO auth callable of a client: a registration signed over a challenge fetched each time."""
    http = session or requests

    def auth() -> dict[str, Any]:
        challenge = http.get(url + "/api/challenge", timeout=10).json()["challenge"]
        return signed_registration(key, client_id, num_examples, challenge, enrollment_token).to_dict()
    return auth


def signed_update(key: Any, request: dict[str, Any], weights: dict, client_id: str, num_examples: int = 10,
                  **header: Any) -> bytes:
    """An MFU1 body for train request `request`, signed by `key` (which may not be the client's own)."""
    payload = encode_weights(weights)
    h = UpdateHeader(run_id=request["run_id"], round=request["round"], model_version=request["model_version"],
                     client_id=client_id, num_examples=num_examples, payload_sha256=sha256_hex(payload), **header)
    return pack_update(dataclasses.replace(h, signature=crypto.sign(key, h.canonical_bytes())), payload)


def with_raw_metrics(body: bytes, metrics_json: bytes) -> bytes:
    """`body` (an MFU1 frame with no metrics) carrying `metrics_json` verbatim, e.g. b'{"x": NaN}', which no
    JSON library writes. Metrics are not signed, so the signature still holds."""
    n = struct.unpack(">I", body[4:8])[0]
    head = body[8:8 + n].replace(b'"metrics": {}', b'"metrics": ' + metrics_json)
    return body[:4] + struct.pack(">I", len(head)) + head + body[8 + n:]
