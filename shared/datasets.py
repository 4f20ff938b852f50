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
import hashlib
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
# System-wide dataset packages: Debian's dataset-fashion-mnist puts its idx .gz files here. (Debian packages no
# MNIST; a dir of that name is still read if someone fills it.)
SYSTEM_DIRS = {"mnist": "/usr/share/datasets/mnist", "fashion-mnist": "/usr/share/datasets/fashion-mnist"}
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
# torchvision's folder name for each MNIST-family dataset inside a data dir.
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The official binary CIFAR-10 release: fixed-size records read with numpy, so loading it needs no pickle.
CIFAR_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_BATCH_RECORDS = 10_000  # each of data_batch_1..5.bin and test_batch.bin
# Every file of a built-in dataset is checked, so a truncated download or copy never loads silently:
# - its record count: MNIST and Fashion-MNIST hold 60,000 training and 10,000 test images of 28 x 28 with labels
#   0-9; a CIFAR-10 binary batch holds 10,000 records;
# - its checksum, where one is known: the md5 of each .gz file as its publishers give it (torchvision's
#   MNIST.resources and FashionMNIST.resources), or else the sha256 of the uncompressed idx bytes, pinned from
#   Debian's dataset-fashion-mnist (whose .gz files are recompressed, so their md5 differs from upstream's).
#   CIFAR-10's md5 covers only its tar.gz, which torchvision checks when it downloads.
IDX_RECORDS = {"train": 60_000, "t10k": 10_000}
IDX_GZ_MD5 = {
    ("mnist", "train-images-idx3-ubyte"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("mnist", "train-labels-idx1-ubyte"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("mnist", "t10k-images-idx3-ubyte"): "9fb629c4189551a2d022fa330f9573f3",
    ("mnist", "t10k-labels-idx1-ubyte"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("fashion-mnist", "train-images-idx3-ubyte"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("fashion-mnist", "train-labels-idx1-ubyte"): "25c81989df183df01b3e8a0aad5dffbe",
    ("fashion-mnist", "t10k-images-idx3-ubyte"): "bef4ecab320f06d8554ea6380940ec79",
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): "bb300cfdad3c16e7a12a480ee83cd310",
}
IDX_SHA256 = {
    ("fashion-mnist", "train-images-idx3-ubyte"): "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ("fashion-mnist", "train-labels-idx1-ubyte"): "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ("fashion-mnist", "t10k-images-idx3-ubyte"): "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
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
    options = [f"put it under --data-dir (now {root}) in torchvision's layout"]
    if name in SYSTEM_PACKAGES:
        options.append(f"install the system package that fills {SYSTEM_DIRS[name]} (Debian: {SYSTEM_PACKAGES[name]})")
    options.append("or allow torchvision to download it (needs internet)")
    return DatasetNotFound(f"dataset {name!r} not found offline ({why}); " + "; ".join(options))


# --- MNIST family: idx files -------------------------------------------------------------------

def read_idx(path: Path, check: tuple[str, str] | None = None) -> np.ndarray:
    """Read one idx file (plain or .gz): the format of MNIST and Fashion-MNIST. `check` = (dataset, file stem):
    refuse a file whose checksum differs from the known one (IDX_GZ_MD5, IDX_SHA256)."""
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as exc:  # a cut or damaged .gz
        raise DatasetNotFound(f"{path} is not a whole gzip file ({exc}); fetch it again") from None
    if check is not None:
        _check_sum(path, raw, data, check)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFound(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetNotFound(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def _check_sum(path: Path, raw: bytes, data: bytes, key: tuple[str, str]) -> None:
    md5, sha256 = IDX_GZ_MD5.get(key), IDX_SHA256.get(key)
    if path.suffix == ".gz" and md5 and hashlib.md5(raw, usedforsecurity=False).hexdigest() == md5:
        return
    if sha256:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DatasetNotFound(f"{path} is not {key[0]}'s {key[1]}: its uncompressed bytes' sha256 should be "
                                  f"{sha256}{f' (or the .gz md5 {md5})' if md5 else ''}; fetch it again")
    elif path.suffix == ".gz" and md5:
        raise DatasetNotFound(f"{path} is not {key[0]}'s published {key[1]}.gz: its md5 should be {md5}; fetch it "
                              "again")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):  # the .gz first: its published md5 can be checked
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
            images, labels = read_idx(paths[0], (name, stems[0])), read_idx(paths[1], (name, stems[1]))
            n = IDX_RECORDS[prefix]
            if images.shape != (n, 28, 28):
                raise DatasetNotFound(f"{paths[0]} holds images of shape {images.shape}; {name}'s {prefix} split has "
                                      f"{(n, 28, 28)}: the file is cut or another dataset's")
            if labels.shape != (n,) or labels.max() > 9:
                raise DatasetNotFound(f"{paths[1]} holds {labels.shape} labels up to {labels.max()}; {name}'s {prefix} "
                                      f"split has {n} labels 0-9: the file is cut or another dataset's")
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
    """Read one CIFAR-10 binary batch file: CIFAR_BATCH_RECORDS records of <1 x label><3072 x pixel>."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size != CIFAR_BATCH_RECORDS * CIFAR_RECORD:
        raise DatasetNotFound(f"{path} has {data.size} bytes; a CIFAR-10 binary batch has {CIFAR_BATCH_RECORDS} "
                              f"records of {CIFAR_RECORD} bytes ({CIFAR_BATCH_RECORDS * CIFAR_RECORD}): the file is "
                              "cut or not CIFAR-10's")
    records = data.reshape(-1, CIFAR_RECORD)
    if records[:, 0].max() > 9:
        raise DatasetNotFound(f"{path} has labels up to {records[:, 0].max()}; CIFAR-10's are 0-9")
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
