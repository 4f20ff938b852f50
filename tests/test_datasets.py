"""Dataset loaders on small files written here in the real formats, and the real Fashion-MNIST."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from shared.datasets import SYSTEM_DIRS, _not_found, load_split, read_idx, to_tensors
from shared.errors import DatasetNotFound


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(data)


def write_mnist(root, folder="MNIST", train=True, n=None, seed=0):
    """A split in MNIST's idx format and torchvision's layout, with the real split's record count unless `n`."""
    prefix = "train" if train else "t10k"
    n = n or (60000 if train else 10000)
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
    raw = root / folder / "raw"
    write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return images, labels


def test_mnist_loads_from_torchvision_layout(tmp_path):
    images, labels = write_mnist(tmp_path, train=False)
    split = load_split("mnist", train=False, data_dir=str(tmp_path), download=False)
    assert split.images.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(split.images[:, 0], images)
    np.testing.assert_array_equal(split.labels, labels)
    x, y = to_tensors(split, np.arange(50))  # standardised with MNIST's public mean and std, not this sample's
    np.testing.assert_allclose(x[:, 0].numpy(), (images[:50] / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
    assert y.dtype.is_floating_point is False


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(DatasetNotFound, match="truncated"):
        read_idx(path)


def test_a_split_with_the_wrong_record_count_is_refused_naming_the_file(tmp_path):
    write_mnist(tmp_path, train=False, n=9999)  # a consistent header, one image short of the real split
    with pytest.raises(DatasetNotFound, match=r"t10k-images-idx3-ubyte holds images of shape \(9999, 28, 28\); "
                                              r"mnist's t10k split has \(10000, 28, 28\)"):
        load_split("mnist", train=False, data_dir=str(tmp_path), download=False)
    raw = tmp_path / "MNIST" / "raw"  # a cut .gz: the gzip stream ends early
    whole = gzip.compress((raw / "t10k-labels-idx1-ubyte").read_bytes())
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetNotFound, match="t10k-labels-idx1-ubyte.gz is not a whole gzip file"):
        load_split("mnist", train=False, data_dir=str(tmp_path), download=False)


def test_a_gz_that_is_not_the_published_file_is_refused_with_its_expected_md5(tmp_path):
    write_mnist(tmp_path, train=False)
    raw = tmp_path / "MNIST" / "raw"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # torchvision keeps both; the .gz is read
        write_gz = gzip.compress((raw / name).read_bytes())
        (raw / f"{name}.gz").write_bytes(write_gz)
    with pytest.raises(DatasetNotFound, match="its md5 should be 9fb629c4189551a2d022fa330f9573f3"):
        load_split("mnist", train=False, data_dir=str(tmp_path), download=False)


def test_a_changed_fashion_mnist_copy_is_refused_by_its_pinned_sha256(fmnist, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        data = bytearray(gzip.decompress((Path(SYSTEM_DIRS["fashion-mnist"]) / f"{name}.gz").read_bytes()))
        (raw / name).write_bytes(bytes(data))
    assert load_split("fashion-mnist", train=False, data_dir=str(tmp_path), download=False).images.shape[0] == 10000
    data[-1] ^= 1  # one label changed: the count and the header still agree
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(data))
    with pytest.raises(DatasetNotFound, match="uncompressed bytes' sha256 should be 0402a96d"):
        load_split("fashion-mnist", train=False, data_dir=str(tmp_path), download=False)


def write_cifar(folder, rng, records=10000):
    folder.mkdir(exist_ok=True)
    labels = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels[name] = rng.integers(0, 10, records)
        pixels = rng.integers(0, 256, (records, 3072), dtype=np.uint8)
        np.concatenate([labels[name][:, None].astype(np.uint8), pixels], axis=1).tofile(folder / name)
    return labels


def test_cifar10_loads_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    labels = write_cifar(folder, np.random.default_rng(1))
    train = load_split("cifar10", train=True, data_dir=str(tmp_path), download=False)
    test = load_split("cifar10", train=False, data_dir=str(tmp_path), download=False)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels.tolist() == np.concatenate([labels[f"data_batch_{i}.bin"] for i in range(1, 6)]).tolist()
    # channel planes: the first 1024 pixel bytes of a record are the red plane
    first = np.fromfile(folder / "data_batch_1.bin", dtype=np.uint8)[:3073]
    np.testing.assert_array_equal(train.images[0, 0].ravel(), first[1:1025])
    # each colour plane standardised with its own channel's mean and std
    x, _ = to_tensors(test, np.arange(100))
    for c, (mean, std) in enumerate([(0.4914, 0.2470), (0.4822, 0.2435), (0.4465, 0.2616)]):
        np.testing.assert_allclose(x[:, c].numpy(), (test.images[:100, c] / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_a_truncated_cifar10_batch_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar(folder, np.random.default_rng(2), records=3)  # whole records, but 3 of a batch's 10,000
    with pytest.raises(DatasetNotFound, match=r"test_batch.bin has 9219 bytes; a CIFAR-10 binary batch has 10000"):
        load_split("cifar10", train=False, data_dir=str(tmp_path), download=False)


def test_missing_dataset_error_names_the_three_options(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        load_split("mnist", train=True, data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert "--data-dir" in message and "download" in message
    assert "dataset-mnist" not in message  # Debian has no such package
    assert "(Debian: dataset-fashion-mnist)" in str(_not_found("fashion-mnist", tmp_path, "download disabled"))


def test_fashion_mnist_from_the_system_package(fmnist, tmp_path):
    train = load_split("fashion-mnist", train=True, data_dir=str(tmp_path), download=False)
    test = load_split("fashion-mnist", train=False, data_dir=str(tmp_path), download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10


def test_unknown_dataset_is_refused():
    with pytest.raises(DatasetNotFound, match="unknown dataset"):
        load_split("imagenet", train=True)
