"""Datasets, resolved offline first: --data-dir, then system packages, then torchvision download.

Every dataset comes back as uint8 images (N, C, H, W) and int64 labels (N,), the raw form a
partitioner slices; `to_tensors` turns a slice into standardised float tensors for training.

A dataset is a loader registered by name; plug-ins add theirs the same way (--dataset-module, on the server
and the clients alike):

    @register_dataset("noise")
    def noise(train: bool, data_dir: str | None, download: bool) -> Split:
        rng = np.random.default_rng(0 if train else 1)
        n = 2000 if train else 500
        return Split((rng.random((n, 1, 8, 8)) * 255).astype(np.uint8), rng.integers(0, 10, n))
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from shared.errors import DatasetNotFound

if TYPE_CHECKING:  # torch loads for to_tensors, not when the registry is imported (--help, config checks)
    import torch

Loader = Callable[[bool, "str | None", bool], "Split"]  # (train, data_dir, download) -> split
DATASETS: dict[str, Loader] = {}  # name -> loader; plug-ins add theirs with register_dataset
DATA_DIR_ENV = "MESHFED_DATA_DIR"  # overrides the default data dir when --data-dir is not given
DEFAULT_DATA_DIR = "data"
# System-wide dataset packages (Debian's dataset-fashion-mnist puts its idx .gz files here).
SYSTEM_DIRS = {"mnist": "/usr/share/datasets/mnist", "fashion-mnist": "/usr/share/datasets/fashion-mnist"}
# torchvision's folder name for each MNIST-family dataset inside a data dir.
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The official binary CIFAR-10 release: fixed-size records read with numpy, so loading it needs no pickle.
CIFAR_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_FOLDER = "cifar-10-batches-bin"
# Per-channel mean and std of each training split's pixels in [0, 1] (fashion-mnist measured on
# Debian's copy: 0.28604, 0.35302). Every client standardises with these public constants, never
# with statistics of its own partition, so all clients feed the model the same way. Inputs with
# mean 0 and std 1 instead of [-1, 1] (mean -0.43, std 0.71) reach about 1 point more accuracy per
# round in the first FedAvg rounds on Fashion-MNIST (bench/RESULTS.md).
NORMALIZATION = {"mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,)),
                 "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


@dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images (N, C, H, W), int64 labels (N,), and the per-channel
    mean and std (of pixels in [0, 1]) that to_tensors standardises with."""

    images: np.ndarray
    labels: np.ndarray
    mean: tuple[float, ...] = (0.5,)  # the defaults map [0, 255] to [-1, 1]
    std: tuple[float, ...] = (0.5,)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def resolve_data_dir(data_dir: str | None) -> Path:
    """--data-dir if given, else $MESHFED_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        DATASETS[name] = loader
        return loader
    return add


def load_split(name: str, train: bool, data_dir: str | None = None, download: bool = True) -> Split:
    """Load the train or test split of registered dataset `name`."""
    if name not in DATASETS:
        raise DatasetNotFound(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))} (or add one "
                              "with --dataset-module)")
    return DATASETS[name](train, data_dir, download)


def to_tensors(split: Split, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised float images ((x / 255 - mean) / std per channel) and long labels, for the given
    indices (all if None)."""
    import torch
    images = split.images if indices is None else split.images[indices]
    labels = split.labels if indices is None else split.labels[indices]
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    x = torch.from_numpy(images).float().div_(255).sub_(mean).div_(std)
    return x, torch.from_numpy(labels.astype(np.int64))


def _not_found(name: str, root: Path, why: str) -> DatasetNotFound:
    system = SYSTEM_DIRS.get(name)
    options = [f"put it under --data-dir (now {root}) in torchvision's layout"]
    if system:
        options.append(f"install the system package that fills {system} (Debian: dataset-{name})")
    options.append("or allow torchvision to download it (needs internet)")
    return DatasetNotFound(f"dataset {name!r} not found offline ({why}); " + "; ".join(options))


# --- MNIST family: idx files -------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (plain or .gz): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFound(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetNotFound(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist_family(name: str, train: bool, root: Path, download: bool) -> Split:
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    raw = root / TORCHVISION_FOLDER[name] / "raw"
    folders = [raw] + ([Path(SYSTEM_DIRS[name])] if name in SYSTEM_DIRS else [])
    for folder in folders:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            images, labels = read_idx(paths[0]), read_idx(paths[1])
            return Split(images[:, None, :, :].copy(), labels.astype(np.int64))
    if not download:
        raise _not_found(name, root, "download disabled")
    import torchvision  # imported here: only a download needs it

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    try:
        cls(str(root), train=train, download=True)
    except Exception as exc:  # no internet, proxy refused, mirror down: all end the same way
        raise _not_found(name, root, f"download failed: {exc}") from exc
    return _load_mnist_family(name, train, root, download=False)


# --- CIFAR-10: binary version -----------------------------------------------------------------

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 3072 pixel bytes (R, G, B planes)


def read_cifar_bin(path: Path) -> Split:
    """Read one CIFAR-10 binary batch file: records of <1 x label><3072 x pixel>."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR_RECORD:
        raise DatasetNotFound(f"{path} is not a CIFAR-10 binary batch ({data.size} bytes)")
    records = data.reshape(-1, CIFAR_RECORD)
    return Split(records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].astype(np.int64))


def _load_cifar10(train: bool, root: Path, download: bool) -> Split:
    folder = root / CIFAR_FOLDER
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    if all((folder / n).is_file() for n in names):
        parts = [read_cifar_bin(folder / n) for n in names]
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    if not download:
        raise _not_found("cifar10", root, f"no {CIFAR_FOLDER}/ with {', '.join(names)}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR_BIN_URL, str(root), md5=CIFAR_BIN_MD5)
    except Exception as exc:
        raise _not_found("cifar10", root, f"download failed: {exc}") from exc
    return _load_cifar10(train, root, download=False)


# --- synthetic: learnable, instant, for smoke tests ----------------------------------------------

def synthetic_split(train: bool, num_classes: int = 10, seed: int = 0) -> Split:
    """10 classes of 1x28x28 images: a fixed random template per class plus noise."""
    templates = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, 1, 28, 28))
    rng = np.random.default_rng(seed + (1 if train else 2))
    n = 6000 if train else 1000
    labels = rng.integers(0, num_classes, size=n)
    images = templates[labels] + rng.normal(0, 60, size=(n, 1, 28, 28))
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64))


# --- the built-in datasets ------------------------------------------------------------------------

def _idx_loader(name: str) -> Loader:
    def load(train: bool, data_dir: str | None, download: bool) -> Split:
        split = _load_mnist_family(name, train, resolve_data_dir(data_dir), download)
        return dataclasses.replace(split, mean=NORMALIZATION[name][0], std=NORMALIZATION[name][1])
    return load


for _name in TORCHVISION_FOLDER:
    register_dataset(_name)(_idx_loader(_name))


@register_dataset("cifar10")
def _cifar10(train: bool, data_dir: str | None, download: bool) -> Split:
    split = _load_cifar10(train, resolve_data_dir(data_dir), download)
    return dataclasses.replace(split, mean=NORMALIZATION["cifar10"][0], std=NORMALIZATION["cifar10"][1])


@register_dataset("synthetic")
def _synthetic(train: bool, data_dir: str | None, download: bool) -> Split:
    return synthetic_split(train)
