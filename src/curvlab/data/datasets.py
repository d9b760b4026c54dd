"""One entry point for every data set: :func:`load_dataset`, and :func:`class_names`."""

from __future__ import annotations

import os

import torch

from curvlab.data.bundled import load_bundled
from curvlab.data.cifar import load_cifar10
from curvlab.data.mnist import load_mnist_like

__all__ = ["DATASETS", "SPLITS", "class_names", "load_dataset"]

#: Class names of each data set, in label order.
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(digit) for digit in range(10)),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
_CLASS_NAMES["bundled"] = _CLASS_NAMES["fashion-mnist"]

#: Names accepted by :func:`load_dataset` and :func:`class_names`.
DATASETS: tuple[str, ...] = ("bundled", "fashion-mnist", "mnist", "cifar10")

#: Splits of every data set.
SPLITS: tuple[str, ...] = ("train", "test")


def _check_name(name: str) -> None:
    """Raise ValueError for an unknown data-set name, listing the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


def class_names(name: str) -> tuple[str, ...]:
    """Names of the classes of data set ``name``, indexed by label.

    Args:
        name: One of :data:`DATASETS`.

    Returns:
        A tuple of C names; ``class_names(name)[label]`` names ``label``.

    Raises:
        ValueError: Unknown ``name``.
    """
    _check_name(name)
    return _CLASS_NAMES[name]


def load_dataset(
    name: str, split: str = "train", path: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a data set as uint8 images and int64 labels.

    ``"bundled"`` is the Fashion-MNIST subset inside the package (2,048 train / 1,024 test);
    ``"fashion-mnist"`` and ``"mnist"`` read the original IDX files; ``"cifar10"`` reads the
    python-pickle batches. Where files are looked for when ``path`` is None is described in
    :mod:`curvlab.data.paths`. Use :func:`curvlab.data.to_float` for float inputs in ``[0, 1]``.

    Args:
        name: One of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        path: Directory holding the data set's files (not accepted for ``"bundled"``).

    Returns:
        ``(images, labels)``: uint8 ``[N, C, H, W]`` (``[N, 1, 28, 28]`` for the MNIST family,
        ``[N, 3, 32, 32]`` for CIFAR-10) and int64 ``[N]``.

    Raises:
        ValueError: Unknown ``name`` or ``split``, or a ``path`` for ``"bundled"``.
        DataNotFoundError: The files are nowhere to be found (the message lists where it looked).
        DataFileError: A file is corrupt or unsafe.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if name == "bundled":
        if path is not None:
            raise ValueError("the bundled data set ships inside the package; it takes no path")
        return load_bundled(split)
    if name == "cifar10":
        return load_cifar10(path, split)
    return load_mnist_like(name, split, root=path)
