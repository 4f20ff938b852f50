"""Update compression (shared/compression.py) and how the server checks compressed updates (app/verify.py)."""

import numpy as np
import pytest

from app.verify import check_arrays
from client.feedback import ErrorFeedback
from shared.compression import (INDEX_PREFIX, MIN_SENT, SCALE_PREFIX, compress, decode_indices, decompress,
                                encode_indices, quantize_int8, topk_count, wire_spec)
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
    assert spec["w"] == ((400, 300), "|i1") and spec[SCALE_PREFIX + "w"] == ((1,), "<f4")
    assert spec["steps"] == SPEC["steps"]
    with pytest.raises(ValueError, match="unknown compression"):
        wire_spec(SPEC, "zip")


# --- top-k with error feedback (issue 24) ------------------------------------------------------------------

def test_topk_sends_the_largest_values_exactly_and_indices_decode_exactly():
    for scheme, ratio in (("topk", 0.01), ("topk+int8", 0.01), ("topk", 1.0), ("topk+int8", 0.001)):
        payload = encode_weights(compress(DELTA, scheme, np.random.default_rng(0), ratio))
        got = check_arrays(payload, SPEC, 1 << 20, scheme, ratio)
        assert got["steps"][0] == 7 and got["w"].shape == DELTA["w"].shape
        for name in ("w", "b"):
            x, k = DELTA[name].ravel(), topk_count(DELTA[name].size, ratio)
            chosen = np.flatnonzero(got[name].ravel()) if scheme == "topk" else None
            largest = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
            if scheme == "topk":  # the k largest magnitudes, their values exact
                assert (chosen == largest).all() and (got[name].ravel()[largest] == x[largest]).all()
            else:  # int8 values: within a level of the largest magnitude kept
                assert np.abs(got[name].ravel()[largest] - x[largest]).max() <= np.abs(x).max() / 127 + 1e-9
    dense = len(encode_weights(DELTA))
    sparse = len(encode_weights(compress(DELTA, "topk+int8", np.random.default_rng(0), 0.01)))
    assert sparse < dense / 50  # about 2 bytes a kept value (plus the safetensors header) against 400 per 100


def test_index_streams_round_trip_at_every_gap_size():
    index = np.array([0, 1, 127, 128, 16_511, 16_512, 2**21 + 5, 2**28 + 9, 2**32 - 1], np.int64)
    assert (decode_indices(encode_indices(index), index.size, 2**32) == index).all()
    rng = np.random.default_rng(3)
    for size, k in ((10, 10), (10_000, 1), (1_000_000, 1000)):
        index = np.sort(rng.choice(size, k, replace=False))
        assert (decode_indices(encode_indices(index), k, size) == index).all()


def sparse_reason(arrays, scheme="topk", ratio=0.01):
    with pytest.raises(UpdateRefused) as info:
        check_arrays(encode_weights(arrays), SPEC, 1 << 20, scheme, ratio)
    return info.value.reason, str(info.value)


def varints(gaps):
    """A varint stream of these gaps as they are (encode_indices takes the indices the gaps add up to)."""
    return encode_indices(np.cumsum(np.asarray(gaps, np.int64)))


def test_malformed_sparse_updates_are_refused_with_reasons():
    good = compress(DELTA, "topk", np.random.default_rng(0), 0.01)
    k, size = good["w"].size, DELTA["w"].size
    gaps = np.diff(decode_indices(good[INDEX_PREFIX + "w"], k, size), prepend=0)
    # Sent as gaps, indices cannot go down: an "unsorted" stream shows as a repeat (a 0 gap) or as a gap that
    # runs past the tensor (what a 32-bit decoder would wrap around); both are refused, as is a wrong count
    bad = {"repeated": varints([gaps[0], 0, *gaps[2:]]),
           "out of range": varints([*gaps[:-1], size]),
           "wrapping": varints([gaps[0], 2**32 - 1, *gaps[2:]]),
           "too few": varints(gaps[:-1]),
           "too many": varints([*gaps, 1]),
           "a cut varint": np.concatenate([good[INDEX_PREFIX + "w"], [0x80]]).astype(np.uint8),
           "a 6-byte varint": np.concatenate([[0x81] * 5 + [0x01], varints(gaps[1:])]).astype(np.uint8),
           "too long a stream": np.zeros(6 * k, np.uint8)}
    for why, stream in bad.items():
        code, message = sparse_reason({**good, INDEX_PREFIX + "w": stream})
        assert code == "bad_indices" and "w" in message, (why, code, message)
    assert sparse_reason({**good, "w": good["w"][:-1]})[0] == "shape_mismatch"  # fewer values than k
    assert sparse_reason({**good, INDEX_PREFIX + "w": good[INDEX_PREFIX + "w"].astype(np.int16)})[0] == \
        "dtype_mismatch"
    assert sparse_reason({**good, "b": np.full_like(good["b"], np.nan)})[0] == "non_finite"
    forged = compress(DELTA, "topk+int8", np.random.default_rng(0), 0.01)
    assert sparse_reason({**forged, SCALE_PREFIX + "w": np.array([np.inf], np.float32)}, "topk+int8")[0] == \
        "non_finite"
    assert sparse_reason(good, "topk", 0.05)[0] == "shape_mismatch"  # k follows the run's ratio (6,000, not 4,096)


def test_error_feedback_conserves_mass_and_survives_a_restart(tmp_path):
    rng = np.random.default_rng(5)
    deltas = [{"w": rng.normal(0, 1, (50, 40)).astype(np.float32), "n": np.array([1], np.int64)} for _ in range(6)]
    spec = weight_spec(deltas[0])
    path = tmp_path / "c0.residual.safetensors"
    feedback, sent = ErrorFeedback(path), np.zeros((50, 40), np.float64)
    for i, delta in enumerate(deltas):
        if i == 3:  # a restart: the residual comes back from disk
            feedback = ErrorFeedback(path)
        arrays = feedback.compress("run-a", delta, "topk+int8", 0.05, rng)
        feedback.commit()
        sent += decompress(arrays, "topk+int8", spec)["w"]
    total = sum(d["w"].astype(np.float64) for d in deltas)
    assert np.allclose(sent + feedback.residual["w"], total, atol=1e-4)  # nothing lost, only delayed
    assert np.abs(feedback.residual["w"]).sum() > 0
    before = feedback.residual["w"].copy()  # a lost update leaves the residual as it was
    feedback.compress("run-a", deltas[0], "topk", 0.05, rng)
    feedback.discard()
    assert (ErrorFeedback(path).residual["w"] == before).all() and (feedback.residual["w"] == before).all()
    arrays = feedback.compress("run-b", deltas[0], "topk", 0.05, rng)  # a new run starts from zero
    assert np.allclose(decompress(arrays, "topk", spec)["w"] + feedback._pending[1]["w"], deltas[0]["w"])
    path.write_bytes(b"not safetensors")
    assert ErrorFeedback(path).residual == {}  # unreadable: from zero, with a warning


def test_a_coded_steps_inflation_is_bounded_and_whole():
    import zlib
    from shared.compression import inflate
    data = encode_weights(DELTA)
    assert inflate(zlib.compress(data, 1), len(data)) == data
    bad = {"a bomb, past the limit": zlib.compress(bytes(10_000_000), 1), "cut short": zlib.compress(data, 1)[:-10],
           "trailing bytes": zlib.compress(data, 1) + b"x", "not zlib": b"not zlib at all"}
    for why, body in bad.items():
        with pytest.raises(ValueError):
            inflate(body, len(data))


def test_a_tensor_sends_at_least_min_sent_values_and_travels_whole_once_that_is_half_of_it():
    assert MIN_SENT == 4096
    assert [topk_count(n, 0.01) for n in (10, 800, 5120, 8192, 8193, 51200, 1_605_632)] == \
        [10, 800, 5120, 8192, 4096, 4096, 16057]  # the McMahan CNN: biases, conv1, fc2 whole; conv2 8%; fc1 1%
    rng = np.random.default_rng(3)
    delta = {"fc2": rng.normal(0, 1e-2, (10, 512)).astype(np.float32),
             "conv2": rng.normal(0, 1e-2, (64, 32, 5, 5)).astype(np.float32)}
    spec = weight_spec(delta)
    for scheme in ("topk", "topk+int8"):
        arrays = compress(delta, scheme, rng, 0.01)
        assert INDEX_PREFIX + "fc2" not in arrays and arrays["fc2"].size == 5120  # whole: no index stream
        assert arrays["conv2"].size == 4096 and INDEX_PREFIX + "conv2" in arrays
        assert set(wire_spec(spec, scheme, 0.01)) == set(arrays)
        got = check_arrays(encode_weights(arrays), spec, 1 << 20, scheme, 0.01)
        if scheme == "topk":
            assert np.array_equal(got["fc2"], delta["fc2"])  # whole and exact, in order
        else:
            assert np.abs(got["fc2"] - delta["fc2"]).max() <= np.abs(delta["fc2"]).max() / 127 + 1e-9
    forged = {**arrays, INDEX_PREFIX + "fc2": np.zeros(5120, np.uint8)}  # indices where none are due
    with pytest.raises(UpdateRefused) as info:
        check_arrays(encode_weights(forged), spec, 1 << 20, "topk+int8", 0.01)
    assert info.value.reason == "shape_mismatch"
