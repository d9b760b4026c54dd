"""The Fashion-MNIST subset shipped inside the package.

``bundled/fashion_mnist_subset.npz`` holds 2,048 training and 1,024 test images of Fashion-MNIST
(MIT licence, Zalando SE; see ``bundled/LICENSE``), drawn class-balanced with a fixed seed by
``scripts/build_bundled_subset.py`` from the original IDX files. Its arrays:

* ``train_images`` uint8 ``[2048, 28, 28]``, ``train_labels`` uint8 ``[2048]``,
  ``train_indices`` int64 ``[2048]`` (rows of the original training set);
* ``test_images``, ``test_labels``, ``test_indices`` likewise ``[1024, ...]`` (rows of the
  original test set);
* ``metadata``: a JSON string with the seed, the algorithm, and the sha256 of each source file.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import numpy as np
import torch

from curvlab.data.errors import DataFileError
from curvlab.data.tensors import as_tensors

__all__ = ["BUNDLED_FILE", "bundled_metadata", "load_bundled", "load_bundled_arrays"]

#: File name of the subset inside ``curvlab/data/bundled``.
BUNDLED_FILE = "fashion_mnist_subset.npz"

_SPLITS = ("train", "test")


@functools.cache
def _read_npz() -> dict[str, np.ndarray]:
    """Read the bundled ``.npz`` once per process; the arrays are made read-only."""
    resource = resources.files("curvlab.data").joinpath("bundled", BUNDLED_FILE)
    try:
        with resource.open("rb") as file, np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise DataFileError(
            f"cannot read the bundled subset '{resource}' (is the package installed with its "
            f"data files?): {err}"
        ) from err
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def load_bundled_arrays() -> dict[str, np.ndarray]:
    """Every array of the bundled ``.npz`` (works from an installed package or a zip).

    Returns:
        Fresh copies of the arrays by name, as described in the module docstring.

    Raises:
        DataFileError: The file is missing from the installation or unreadable.
    """
    return {name: array.copy() for name, array in _read_npz().items()}


def bundled_metadata() -> dict[str, Any]:
    """How the bundled subset was built: seed, algorithm, sizes and source sha256s.

    Returns:
        The metadata dict written by ``scripts/build_bundled_subset.py``.
    """
    return json.loads(str(_read_npz()["metadata"]))


def load_bundled(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load the bundled Fashion-MNIST subset (no download, no files outside the package).

    Args:
        split: ``"train"`` (2,048 images) or ``"test"`` (1,024 images).

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and int64 ``[N]``. The images are in a
        class-interleaved order: every prefix of ``10 * k`` images holds ``k`` of each class.

    Raises:
        ValueError: Unknown ``split``.
        DataFileError: The bundled file is missing or unreadable.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(_SPLITS)}")
    arrays = _read_npz()
    return as_tensors(arrays[f"{split}_images"][:, None].copy(), arrays[f"{split}_labels"])
