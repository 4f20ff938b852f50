"""Protocol round trips and refusals; RSA-PSS keys and signatures."""
import io
import json
import os
import stat

import numpy as np
import pytest

from shared import crypto
from shared.errors import UpdateRefused
from shared.protocol import (UpdateHeader, decode_weights, encode_weights, pack_update, sha256_hex,
                             unpack_update)


def test_weights_round_trip_keeps_names_order_shapes_dtypes():
    w = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(4, np.float32)}
    out = decode_weights(encode_weights(w))
    assert list(out) == list(w)
    for k in w:
        np.testing.assert_array_equal(out[k], w[k])
        assert out[k].dtype == w[k].dtype


def test_pickled_arrays_are_refused():
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"a": 1}], dtype=object))  # an object array needs pickle to load
    with pytest.raises(UpdateRefused) as info:
        decode_weights(buf.getvalue())
    assert info.value.reason == "malformed"


def _safetensors(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


def test_header_that_claims_more_bytes_than_sent_is_malformed():
    lying = _safetensors({"x": {"dtype": "F32", "shape": [5_000_000], "data_offsets": [0, 20_000_000]}}, b"\0" * 16)
    with pytest.raises(UpdateRefused) as info:
        decode_weights(lying)
    assert info.value.reason == "malformed"


def test_oversized_weights_are_refused_before_parsing():
    data = encode_weights({"x": np.zeros(300_000, np.float32)})
    with pytest.raises(UpdateRefused) as info:
        decode_weights(data, max_bytes=1_000_000)
    assert info.value.reason == "too_large"


def test_name_order_must_list_exactly_the_arrays():
    x = np.ones(2, np.float32).tobytes()
    for order in (["x", "ghost"], ["x", "x"], {"x": 1}, [1, "x"], [["x"]]):
        body = _safetensors({"__metadata__": {"order": json.dumps(order)},
                             "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, x)
        with pytest.raises(UpdateRefused) as info:
            decode_weights(body)
        assert info.value.reason == "malformed"


def test_garbage_is_malformed():
    for body in (b"", b"XXXX" + b"\0" * 10, b"MFU1\xff\xff\xff\xff{}"):
        with pytest.raises(UpdateRefused) as info:
            unpack_update(body)
        assert info.value.reason == "malformed"
    with pytest.raises(UpdateRefused):
        decode_weights(b"not safetensors")


def test_update_pack_round_trip():
    h = UpdateHeader(run_id="r", round=3, model_version=7, client_id="c1", num_examples=42,
                     payload_sha256=sha256_hex(b"abc"), signature="sig", metrics={"eval_accuracy": 0.5})
    h2, payload = unpack_update(pack_update(h, b"abc"))
    assert h2 == h and payload == b"abc"


def test_sign_verify_and_tamper(tmp_path):
    key = crypto.load_or_create_key(tmp_path, "c1")
    other = crypto.generate_key()
    pub = crypto.load_public_key(crypto.public_pem(key))
    sig = crypto.sign(key, b"canonical")
    assert crypto.verify(pub, b"canonical", sig)
    assert not crypto.verify(pub, b"canonicaL", sig)
    assert not crypto.verify(pub, b"canonical", crypto.sign(other, b"canonical"))
    assert not crypto.verify(pub, b"canonical", "not base64!")


def test_key_file_is_private_and_reloaded(tmp_path):
    key = crypto.load_or_create_key(tmp_path, "c1")
    mode = stat.S_IMODE(os.stat(tmp_path / "c1.pem").st_mode)
    assert mode == 0o600
    again = crypto.load_or_create_key(tmp_path, "c1")
    assert crypto.public_pem(again) == crypto.public_pem(key)
    assert key.key_size >= 2048


def test_small_keys_are_refused_and_fingerprints_are_stable(tmp_path):
    small = crypto.generate_key(1024)
    with pytest.raises(ValueError, match="2048"):
        crypto.load_public_key(crypto.public_pem(small))
    key = crypto.load_or_create_key(tmp_path, "c1")
    fp = crypto.fingerprint(crypto.public_pem(key))
    assert fp.startswith("SHA256:") and len(fp.split(":")) == 17
    assert fp == crypto.fingerprint(crypto.public_pem(key))
