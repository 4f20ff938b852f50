"""The one frame codec (shared/frames.py) and bounded JSON (shared/jsonio.py): every hostile header the attack
harness used is refused with a reason, advisory fields are cleaned, and Hypothesis finds no bytes that make the
decoders of MFU1, MFS1 or MFG1 raise anything but a refusal."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.wire import MeshRefused, ReplayGuard, open_message, seal
from shared import crypto, jsonio
from shared.errors import UpdateRefused
from shared.protocol import (SyncHeader, UpdateHeader, decode_weights, encode_weights, pack_sync, pack_update,
                             unpack_sync, unpack_update)

HEADER = dict(run_id="r1", round=3, model_version=7, client_id="c1", num_examples=42, payload_sha256="a" * 64)


def raw_frame(magic: bytes, header: dict | str, payload: bytes = b"p") -> bytes:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    return magic + struct.pack(">I", len(head)) + head + payload


def refused(fn, *args) -> str:
    with pytest.raises(UpdateRefused) as info:
        fn(*args)
    return info.value.reason


def test_headers_nested_60000_deep_are_malformed_not_a_crash():
    nested = "[" * 60_000 + "]" * 60_000
    for magic, unpack in ((b"MFU1", unpack_update), (b"MFS1", unpack_sync)):
        body = raw_frame(magic, '{"run_id": ' + nested + "}")
        assert refused(unpack, body) == "malformed"


@pytest.mark.parametrize("field,value", [("round", "1e999"), ("round", "-1"), ("round", "true"), ("round", "3.5"),
                                         ("num_examples", "1e19"), ("num_examples", "10000000000000000000"),
                                         ("model_version", '"7"'), ("client_id", '"bad id!"'),
                                         ("payload_sha256", '"not-hex"'), ("run_id", "null")])
def test_out_of_range_or_mistyped_fields_are_malformed_and_named(field, value):
    text = json.dumps({**HEADER, field: "SENTINEL"}).replace('"SENTINEL"', value)
    with pytest.raises(UpdateRefused) as info:
        unpack_update(raw_frame(b"MFU1", text))
    assert info.value.reason == "malformed" and repr(field) in str(info.value)


def test_a_sync_claiming_ten_to_the_nineteen_examples_is_malformed():
    text = json.dumps({**HEADER, "contribution_id": "k1", "base_version": 1, "local_steps": 3,
                       "num_examples": "X"}).replace('"X"', "10000000000000000000")
    assert refused(unpack_sync, raw_frame(b"MFS1", text)) == "malformed"


def test_advisory_metrics_are_cleaned_with_notes_and_never_fail_the_update():
    text = json.dumps({**HEADER, "metrics": {"train_seconds": "X", "prefetched": "Y", "batches": 12,
                                             "cpu_percent": -5, "surprise": 1, "loss": "text"}})
    text = text.replace('"X"', "Infinity").replace('"Y"', "NaN")
    header, payload = unpack_update(raw_frame(b"MFU1", text))
    assert header.metrics == {"batches": 12.0} and payload == b"p"
    assert len(header.notes) == 5 and any("train_seconds" in n for n in header.notes)
    assert all(math.isfinite(v) for v in header.metrics.values())


def test_metrics_are_outside_the_signature_and_every_other_field_inside():
    h = UpdateHeader(**HEADER)
    assert UpdateHeader(**HEADER, metrics={"batches": 3.0}).canonical_bytes() == h.canonical_bytes()
    for field in ("run_id", "round", "model_version", "client_id", "num_examples", "payload_sha256"):
        other = {**HEADER, field: HEADER[field] + (1 if isinstance(HEADER[field], int) else "x")}
        assert UpdateHeader(**other).canonical_bytes() != h.canonical_bytes(), field
    # The three frames sign in separate domains: the same values never verify as another kind of message.
    s = SyncHeader(contribution_id="r1", client_id="c1", base_version=3, local_steps=7, num_examples=42,
                   payload_sha256="a" * 64)
    assert s.canonical_bytes().startswith(b"MFS1\n") and h.canonical_bytes().startswith(b"MFU1\n")


def test_frames_round_trip():
    h = UpdateHeader(**HEADER, signature="c2ln", metrics={"batches": 3.0})
    assert unpack_update(pack_update(h, b"xyz")) == (h, b"xyz")
    s = SyncHeader(contribution_id="k1", client_id="c1", base_version=3, local_steps=7, num_examples=42,
                   payload_sha256="a" * 64, peers=["c2", "c3"], signature="c2ln")
    assert unpack_sync(pack_sync(s, b"xyz")) == (s, b"xyz")


def test_bounded_json():
    assert jsonio.loads(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for bad in (b"[" * 5000 + b"]" * 5000, b'{"a": NaN}', b"1e999", b"-Infinity", b"1" * 30, b"\xff\xfe"):
        with pytest.raises(ValueError):
            jsonio.loads(bad)
    with pytest.raises(ValueError):
        jsonio.loads(b"[[[1]]]", max_depth=2)
    with pytest.raises(ValueError):
        jsonio.loads(b"[1, 2]", max_bytes=3)
    assert jsonio.dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'


def test_safetensors_with_deeply_nested_order_metadata_is_malformed():
    from safetensors.numpy import save
    data = save({"w": np.zeros(2, np.float32)}, metadata={"order": "[" * 50_000 + "]" * 50_000})
    assert refused(decode_weights, data) == "malformed"


def test_huge_or_odd_rsa_keys_and_other_algorithms_are_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    def pem(key) -> str:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for key, why in ((rsa.generate_private_key(65537, 4608), "4608 bits"),
                     (rsa.generate_private_key(3, 2048), "exponent"),
                     (ed25519.Ed25519PrivateKey.generate(), "not RSA")):
        with pytest.raises(ValueError):
            crypto.load_public_key(pem(key))
    with pytest.raises(ValueError):
        crypto.load_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# --- Hypothesis: any bytes, and any mutation of a valid frame, end in a refusal with a reason ---------------

KEY = crypto.generate_key()
GOOD_UPDATE = pack_update(UpdateHeader(**HEADER), encode_weights({"w": np.zeros(3, np.float32)}))
GOOD_SYNC = pack_sync(SyncHeader(contribution_id="k1", client_id="c1", base_version=1, local_steps=2, num_examples=5,
                                 payload_sha256="a" * 64), b"")
GOOD_GOSSIP = seal(KEY, "c1", {"w": np.zeros(3, np.float32)}, 1, 2, 5)
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class TrustAll:
    def check(self, sender: str, fingerprint: str) -> None:
        pass


def decoders(body: bytes) -> None:
    """Every decoder a frame from the network meets; each may only refuse."""
    for fn in (unpack_update, unpack_sync):
        try:
            header, payload = fn(body)
            decode_weights(payload, max_bytes=1 << 20)
        except UpdateRefused as exc:
            assert exc.reason and str(exc)
    try:
        open_message(body, TrustAll(), ReplayGuard(), 1 << 20)
    except MeshRefused as exc:
        assert exc.reason and str(exc)


def mutate(frame: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "cut", "splice", "header"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        return frame[:i] + bytes([frame[i] ^ data.draw(st.integers(1, 255))]) + frame[i + 1:]
    if kind == "cut":
        return frame[:data.draw(st.integers(0, len(frame)))]
    if kind == "splice":
        i = data.draw(st.integers(0, len(frame)))
        return frame[:i] + data.draw(st.binary(max_size=64)) + frame[i:]
    json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)
    header = data.draw(st.dictionaries(st.sampled_from(sorted({*HEADER, "metrics", "peers", "signature", "nonce",
                                                               "sent_at", "public_key"})), json_value, max_size=10))
    return raw_frame(frame[:4], json.dumps(header), frame[-40:])


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_are_refused_with_a_reason(body):
    decoders(body)


@FUZZ
@given(st.sampled_from([GOOD_UPDATE, GOOD_SYNC, GOOD_GOSSIP]), st.data())
def test_any_mutation_of_a_valid_frame_is_refused_with_a_reason_or_still_valid(frame, data):
    decoders(mutate(frame, data))
