"""Update compression (shared/compression.py) and how the server checks compressed updates (app/verify.py)."""

import numpy as np
import pytest

from app.verify import check_arrays
from shared.compression import SCALE_PREFIX, compress, quantize_int8, wire_spec
from shared.errors import UpdateRefused
from shared.models import weight_spec
from shared.protocol import encode_weights

RNG = np.random.default_rng(0)
DELTA = {"w": RNG.normal(0, 1e-3, (400, 300)).astype(np.float32), "b": RNG.normal(0, 1e-2, 30).astype(np.float32),
         "steps": np.array([7], np.int64)}  # a non-float array travels as it is
SPEC = weight_spec(DELTA)


def received(scheme, delta=DELTA, seed=1):
    """What the server makes of `delta` sent with `scheme`: the checked float deltas."""
    payload = encode_weights(compress(delta, scheme, np.random.default_rng(seed)))
    return check_arrays(payload, SPEC, 1 << 20, scheme), len(payload)


def test_each_scheme_round_trips_within_its_error_and_shrinks_the_payload():
    sizes = {}
    for scheme in ("none", "fp16", "int8"):
        got, sizes[scheme] = received(scheme)
        assert list(got) == list(SPEC) and all(got[k].dtype == DELTA[k].dtype for k in SPEC)
        assert got["steps"][0] == 7
        for name in ("w", "b"):
            err = np.abs(got[name] - DELTA[name]).max()
            peak = np.abs(DELTA[name]).max()
            bound = {"none": 0.0, "fp16": peak * 2.0 ** -11, "int8": peak / 127}[scheme]
            assert err <= bound, (scheme, name, err, bound)
            if scheme == "fp16":  # per value: 2^-11 relative, 2^-25 absolute where half precision is subnormal
                per_value = np.abs(got[name] - DELTA[name])
                assert (per_value <= np.maximum(np.abs(DELTA[name]) * 2.0 ** -11, 2.0 ** -25)).all()
    assert sizes["fp16"] < 0.55 * sizes["none"] and sizes["int8"] < 0.3 * sizes["none"]


def test_int8_stochastic_rounding_is_unbiased():
    x = np.linspace(-1, 1, 1001, dtype=np.float32) * 0.3  # values between levels, and the peak itself
    rng = np.random.default_rng(0)
    draws = [q.astype(np.float64) * s[0] for q, s in (quantize_int8(x, rng) for _ in range(2000))]
    level = 0.3 / 127
    mean = np.mean(draws, axis=0)
    # one draw errs by up to a level; the mean of 2000 by ~level/sqrt(2000) (plus 1/512 level of bias)
    assert np.abs(mean - x).max() < 0.1 * level
    assert np.abs(draws[0] - x).max() < level
    rounded = np.rint(x / level) * level  # round-to-nearest would be biased towards the grid
    assert np.abs(mean - x).mean() < 0.2 * np.abs(rounded - x).mean()


def test_all_zero_delta_quantizes_to_zero():
    q, scale = quantize_int8(np.zeros(5, np.float32), np.random.default_rng(0))
    assert not q.any() and np.isfinite(scale)


def reason(scheme, arrays):
    with pytest.raises(UpdateRefused) as info:
        check_arrays(encode_weights(arrays), SPEC, 1 << 20, scheme)
    return info.value.reason, str(info.value)


def test_non_finite_updates_are_refused_under_every_scheme():
    for bad in (np.nan, np.inf):
        delta = {**DELTA, "b": np.full(30, bad, np.float32)}
        for scheme in ("none", "fp16", "int8"):
            assert reason(scheme, compress(delta, scheme, np.random.default_rng(0)))[0] == "non_finite"
    # a value beyond float16's range becomes infinity on the way
    big = {**DELTA, "w": np.full((400, 300), 1e6, np.float32)}
    assert reason("fp16", compress(big, "fp16", np.random.default_rng(0)))[0] == "non_finite"
    # a forged int8 payload with a NaN scale
    forged = compress(DELTA, "int8", np.random.default_rng(0))
    assert reason("int8", {**forged, SCALE_PREFIX + "w": np.array([np.nan], np.float32)})[0] == "non_finite"


def test_an_update_in_another_encoding_than_the_rounds_is_refused_with_a_reason():
    code, message = reason("int8", DELTA)  # full precision where int8 was asked: the scales are missing
    assert code == "shape_mismatch" and "int8" in message
    code, message = reason("fp16", DELTA)
    assert code == "dtype_mismatch" and "fp16" in message
    code, _ = reason("none", compress(DELTA, "fp16", np.random.default_rng(0)))
    assert code == "dtype_mismatch"
    wrong_scale = {**compress(DELTA, "int8", np.random.default_rng(0)), SCALE_PREFIX + "b": np.ones(2, np.float32)}
    assert reason("int8", wrong_scale)[0] == "shape_mismatch"


def test_wire_spec_lists_a_scale_per_float_array_only():
    spec = wire_spec(SPEC, "int8")
    assert set(spec) == {"w", "b", "steps", SCALE_PREFIX + "w", SCALE_PREFIX + "b"}
    assert spec["w"] == ((400, 300), "|i1") and spec[SCALE_PREFIX + "w"] == ((1,), "<f4") and spec["steps"] == SPEC["steps"]
    with pytest.raises(ValueError, match="unknown compression"):
        wire_spec(SPEC, "zip")
