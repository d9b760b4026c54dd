"""Builders of small fake data files in the original on-disk formats, for the data tests."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from curvlab.data.idx import write_idx

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fake_mnist_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_fake_mnist(directory: Path, n: int = 12, gz: bool = True, seed: int = 0) -> dict:
    """Write both splits of a fake MNIST-like data set; return the arrays by split."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for offset, (split, (images_name, labels_name)) in enumerate(MNIST_NAMES.items()):
        images, labels = fake_mnist_arrays(n + offset, seed + offset)
        ext = ".gz" if gz else ""
        write_idx(directory / (images_name + ext), images)
        write_idx(directory / (labels_name + ext), labels)
        arrays[split] = (images, labels)
    return arrays


class Py2StylePickler(pickle._Pickler):
    """Pickles ``str`` and ``bytes`` as Python 2 strings, as the original CIFAR batches do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(data)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def cifar_pickle_bytes(batch: dict, protocol: int) -> bytes:
    """Pickle ``batch``; protocol 2 reproduces the Python 2 files byte for byte in structure."""
    if protocol != 2:
        return pickle.dumps(batch, protocol=protocol)
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(batch)
    # Python 2 numpy named the module numpy.core.multiarray.
    return buffer.getvalue().replace(
        b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
    )


def fake_cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        b"labels": [int(label) for label in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_fake_cifar(directory: Path, n: int = 4, protocol: int = 2) -> dict:
    """Write data_batch_1..5 and test_batch with ``n`` images each; return the batches by name."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for seed, name in enumerate(names):
        batches[name] = fake_cifar_batch(n, seed)
        (directory / name).write_bytes(cifar_pickle_bytes(batches[name], protocol))
    return batches


def write_fake_cifar_archive(directory: Path, n: int = 3, skip: tuple[str, ...] = ()) -> dict:
    """Write ``cifar-10-python.tar.gz`` as downloaded: batches inside ``cifar-10-batches-py/``."""
    batches = write_fake_cifar(directory / "unpacked" / "cifar-10-batches-py", n=n)
    with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in batches:
            if name not in skip:
                path = directory / "unpacked" / "cifar-10-batches-py" / name
                tar.add(path, arcname=f"cifar-10-batches-py/{name}")
    return batches
