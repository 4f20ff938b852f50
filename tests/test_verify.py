"""Every refusal reason of app/verify.py, one by one (pure functions, real keys)."""

import numpy as np
import pytest

from app.verify import OpenRound, check_arrays, check_examples, check_round, check_signature
from shared import crypto
from shared.errors import UpdateRefused
from shared.models import weight_spec
from shared.protocol import MAX_EXAMPLES, UpdateHeader, encode_weights, sha256_hex

MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = weight_spec(MODEL)


@pytest.fixture(scope="module")
def key():
    return crypto.generate_key()


def signed(key, payload, **over):
    fields = dict(run_id="run", round=2, model_version=5, client_id="c1", num_examples=10,
                  payload_sha256=sha256_hex(payload))
    fields.update(over)
    h = UpdateHeader(**fields)
    return UpdateHeader(**{**h.__dict__, "signature": crypto.sign(key, h.canonical_bytes())})


def open_round(**over):
    fields = dict(run_id="run", round=2, model_version=5, selected=frozenset({"c1"}), spec=weight_spec(MODEL),
                  max_bytes=1 << 20)
    fields.update(over)
    return OpenRound(**fields)


def reason(fn, *args):
    with pytest.raises(UpdateRefused) as info:
        fn(*args)
    return info.value.reason


def test_valid_update_passes(key):
    payload = encode_weights(MODEL)
    h = signed(key, payload)
    check_signature(h, payload, crypto.public_pem(key))
    check_round(h, open_round(), set())
    assert set(check_arrays(payload, SPEC, 1 << 20)) == {"w", "b"}


def test_signature_refusals(key):
    payload = encode_weights(MODEL)
    pem = crypto.public_pem(key)
    h = signed(key, payload)
    assert reason(check_signature, h, payload, None) == "unknown_client"
    assert reason(check_signature, signed(crypto.generate_key(), payload), payload, pem) == "bad_signature"
    assert reason(check_signature, UpdateHeader(**{**h.__dict__, "round": 3}), payload, pem) == "bad_signature"
    assert reason(check_signature, h, payload + b"x", pem) == "payload_mismatch"
    assert reason(check_signature, UpdateHeader(**{**h.__dict__, "protocol": "meshfed/0"}), payload, pem) \
        == "protocol_version"


def test_round_refusals(key):
    h = signed(key, b"p")
    assert reason(check_round, h, None, set()) == "no_open_round"
    assert reason(check_round, h, open_round(run_id="other"), set()) == "wrong_run"
    assert reason(check_round, h, open_round(round=3), set()) == "stale_round"
    assert reason(check_round, h, open_round(model_version=6), set()) == "wrong_version"
    assert reason(check_round, h, open_round(selected=frozenset({"c2"})), set()) == "not_selected"
    assert reason(check_round, h, open_round(), {"c1"}) == "replay"


def test_examples_are_bounded_by_what_the_client_registered():
    check_examples(100, registered=100)
    assert reason(check_examples, 0, 100) == "bad_examples"
    assert reason(check_examples, 101, 100) == "bad_examples"
    assert reason(check_examples, MAX_EXAMPLES + 1, 10 ** 15) == "bad_examples"  # a registration cannot lift it


def test_array_refusals():
    r = (SPEC, 1 << 20)
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    assert reason(check_arrays, encode_weights(nan), *r) == "non_finite"
    inf = {"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)}
    assert reason(check_arrays, encode_weights(inf), *r) == "non_finite"
    shape = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    assert reason(check_arrays, encode_weights(shape), *r) == "shape_mismatch"
    names = {"w": np.zeros((2, 3), np.float32)}
    assert reason(check_arrays, encode_weights(names), *r) == "shape_mismatch"
    dtype = {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}
    assert reason(check_arrays, encode_weights(dtype), *r) == "dtype_mismatch"
    assert reason(check_arrays, encode_weights(MODEL), SPEC, 10) == "too_large"
    assert reason(check_arrays, b"garbage", *r) == "malformed"
