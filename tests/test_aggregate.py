import numpy as np
import pytest

from shared.aggregate import apply_delta, subtract, weighted_average


def test_fedavg_weights_by_examples_hand_computed():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "b": np.array([3.0], dtype=np.float32)}
    out = weighted_average([(a, 1), (b, 2)])
    # (1*[1,2] + 2*[4,8]) / 3 = [3, 6]; (1*0 + 2*3) / 3 = 2
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    np.testing.assert_allclose(out["b"], [2.0])
    assert out["w"].dtype == np.float32


def test_fedavg_is_order_independent_and_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    results = [({"x": rng.normal(size=(3, 4)).astype(np.float32)}, int(n)) for n in rng.integers(1, 100, 5)]
    oracle = np.average(np.stack([r["x"] for r, _ in results]), axis=0, weights=[n for _, n in results])
    np.testing.assert_allclose(weighted_average(results)["x"], oracle, rtol=1e-6)
    np.testing.assert_allclose(weighted_average(results[::-1])["x"], oracle, rtol=1e-6)


def test_fedavg_refuses_empty_and_zero_examples():
    with pytest.raises(ValueError):
        weighted_average([])
    with pytest.raises(ValueError):
        weighted_average([({"x": np.zeros(1)}, 0)])


def test_delta_round_trip():
    w = {"x": np.array([1.0, 2.0], dtype=np.float32)}
    local = {"x": np.array([1.5, 1.0], dtype=np.float32)}
    d = subtract(local, w)
    np.testing.assert_allclose(d["x"], [0.5, -1.0])
    np.testing.assert_allclose(apply_delta(w, d)["x"], local["x"])
