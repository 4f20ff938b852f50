"""Dataset loaders on small files written here in the real formats, and the real Fashion-MNIST."""
import gzip
import struct

import numpy as np
import pytest

from shared.datasets import load_split, read_idx, to_tensors
from shared.errors import DatasetNotFound


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_loads_from_torchvision_layout(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    raw = tmp_path / "MNIST" / "raw"
    suffix = ".gz" if compress else ""
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    split = load_split("mnist", train=True, data_dir=str(tmp_path), download=False)
    assert split.images.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(split.images[:, 0], images)
    np.testing.assert_array_equal(split.labels, labels)
    x, y = to_tensors(split)  # standardised with MNIST's public mean and std, not this sample's
    np.testing.assert_allclose(x[:, 0].numpy(), (images / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
    assert y.dtype.is_floating_point is False


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(DatasetNotFound, match="truncated"):
        read_idx(path)


def test_cifar10_loads_binary_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected_labels = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 3)
        pixels = rng.integers(0, 256, (3, 3072))
        records = np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8)
        records.tofile(folder / name)
        if name != "test_batch.bin":
            expected_labels.extend(labels.tolist())
    train = load_split("cifar10", train=True, data_dir=str(tmp_path), download=False)
    test = load_split("cifar10", train=False, data_dir=str(tmp_path), download=False)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.labels.tolist() == expected_labels
    # channel planes: the first 1024 pixel bytes of a record are the red plane
    first = np.fromfile(folder / "data_batch_1.bin", dtype=np.uint8)[:3073]
    np.testing.assert_array_equal(train.images[0, 0].ravel(), first[1:1025])
    # each colour plane standardised with its own channel's mean and std
    x, _ = to_tensors(test)
    for c, (mean, std) in enumerate([(0.4914, 0.2470), (0.4822, 0.2435), (0.4465, 0.2616)]):
        np.testing.assert_allclose(x[:, c].numpy(), (test.images[:, c] / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_missing_dataset_error_names_the_three_options(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        load_split("mnist", train=True, data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert "--data-dir" in message and "dataset-mnist" in message and "download" in message


def test_fashion_mnist_from_the_system_package(fmnist, tmp_path):
    train = load_split("fashion-mnist", train=True, data_dir=str(tmp_path), download=False)
    test = load_split("fashion-mnist", train=False, data_dir=str(tmp_path), download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10


def test_unknown_dataset_is_refused():
    with pytest.raises(DatasetNotFound, match="unknown dataset"):
        load_split("imagenet", train=True)
