"""The README's three plug-in examples in one module: a strategy, a model and a dataset (tests/test_plugins.py
runs a real server and clients with them)."""
import numpy as np
from torch import nn

from app.strategy import register
from shared.aggregate import apply_delta, flatten, unflatten
from shared.datasets import Split, register_dataset
from shared.models import register_model


@register("geomed_lite")
def geomed_lite(global_weights, updates, state, cfg):
    """Coordinate-wise mean of the updates whose norm is below the median norm."""
    x = np.stack([flatten(d) for d, _ in updates])
    norms = np.linalg.norm(x, axis=1)
    keep = x[norms <= np.median(norms)]
    return apply_delta(global_weights, unflatten(keep.mean(axis=0), global_weights)), state


@register_model("logreg")
def logreg(input_shape, num_classes):
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))


@register_dataset("stripes")
def stripes(train: bool, data_dir: str | None, download: bool) -> Split:
    """8x8 images whose bright row is the label: learnable in a round or two."""
    rng = np.random.default_rng(0 if train else 1)
    labels = rng.integers(0, 8, 1600 if train else 400)
    images = (rng.random((len(labels), 1, 8, 8)) * 60).astype(np.uint8)
    images[np.arange(len(labels)), 0, labels, :] = 255
    return Split(images, labels.astype(np.int64))
