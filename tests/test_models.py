import math

import numpy as np
import pytest
import torch

from shared.models import build_model, get_weights


def test_the_models_have_the_papers_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("cnn", (1, 28, 28))) == 1_663_370   # McMahan et al. 2017's CNN
    assert count(build_model("mlp", (1, 28, 28))) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert build_model("cnn", (3, 32, 32))(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_layers_start_glorot_uniform_with_zero_biases_and_the_seed_decides():
    weights = get_weights(build_model("cnn", (1, 28, 28), seed=0))
    for name, fan_in, fan_out in (("conv1", 25, 32 * 25), ("conv2", 32 * 25, 64 * 25), ("fc1", 3136, 512),
                                  ("fc2", 512, 10)):
        w, bound = weights[f"{name}.weight"], math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, name
        assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound, name   # uniform(-b, b) has std b/sqrt(3)
        assert not weights[f"{name}.bias"].any(), name
    again, other = (get_weights(build_model("cnn", (1, 28, 28), seed=s)) for s in (0, 1))
    assert all(np.array_equal(weights[k], again[k]) for k in weights)
    assert not np.array_equal(weights["fc1.weight"], other["fc1.weight"])


def test_unknown_models_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (1, 28, 28))
    with pytest.raises(ValueError, match="no CNN for input shape"):
        build_model("cnn", (1, 64, 64))
