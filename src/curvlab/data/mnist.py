"""Loaders for MNIST and Fashion-MNIST from their original IDX files.

The four files of each data set keep their original names, gzip-compressed or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (``.gz`` optional; the ``train-images.idx3-ubyte`` spelling of some
mirrors is accepted too). Where they are looked for is described in :mod:`curvlab.data.paths`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from curvlab.data.errors import DataFileError, DataNotFoundError
from curvlab.data.idx import read_idx
from curvlab.data.paths import DATA_ENV_VAR, candidate_dirs
from curvlab.data.tensors import as_tensors

__all__ = ["MNIST_LIKE", "find_mnist_files", "load_mnist_like"]

#: Data sets in the MNIST format and their number of classes.
MNIST_LIKE: dict[str, int] = {"fashion-mnist": 10, "mnist": 10}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SIZE = (28, 28)


def _file_names(split: str, kind: str) -> list[str]:
    """File names that may hold ``kind`` ("images" or "labels") of ``split``, preferred first."""
    prefix = _SPLIT_PREFIX[split]
    idx = "idx3" if kind == "images" else "idx1"
    stems = [f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"]
    return [stem + ext for stem in stems for ext in (".gz", "")]


def _find_in(directory: Path, split: str, kind: str) -> Path | None:
    """First file of ``kind`` for ``split`` in ``directory``, or None."""
    for file_name in _file_names(split, kind):
        candidate = directory / file_name
        if candidate.is_file():
            return candidate
    return None


def _check_args(name: str, split: str) -> None:
    """Raise ValueError for an unknown data-set name or split."""
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown MNIST-like data set {name!r}; valid: {sorted(MNIST_LIKE)}")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(_SPLIT_PREFIX)}")


def find_mnist_files(
    name: str, split: str, root: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """Locate the images and labels IDX files of ``name``/``split``.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        root: Explicit directory; if None, ``$CURVLAB_DATA`` and the system directories are
            searched (see :mod:`curvlab.data.paths`).

    Returns:
        ``(images_path, labels_path)``, both from the first directory that holds both.

    Raises:
        ValueError: Unknown ``name`` or ``split``.
        DataNotFoundError: No directory holds both files; the message lists every place searched
            and how to get the data.
    """
    _check_args(name, split)
    searched = []
    for directory in candidate_dirs(name, root):
        images = _find_in(directory, split, "images")
        labels = _find_in(directory, split, "labels")
        if images is not None and labels is not None:
            return images, labels
        if images is None and labels is None:
            state = "no files" if directory.is_dir() else "does not exist"
        else:
            state = f"only {(images or labels).name}"  # type: ignore[union-attr]
        searched.append(f"  {directory} ({state})")
    wanted = " and ".join(_file_names(split, kind)[1] for kind in ("images", "labels"))
    how = "pass root=<directory with the files>"
    if root is None:
        how = f"set ${DATA_ENV_VAR}=<directory>, or {how}"
    if name == "fashion-mnist":
        how = f"install it with `apt-get install dataset-fashion-mnist`, {how}"
    else:
        how = f"download the four IDX files and {how}"
    raise DataNotFoundError(
        f"{name} ({split}) not found: looked for {wanted} (raw or .gz) in\n"
        + "\n".join(searched)
        + f"\nTo get the data, {how}."
    )


def load_mnist_like(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST from the original IDX files.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: Directory holding the files (or a ``<name>`` sub-directory); if None,
            ``$CURVLAB_DATA``, ``$CURVLAB_DATA/<name>`` and the system directories are searched.

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and int64 ``[N]`` with values in 0..9.

    Raises:
        ValueError: Unknown ``name`` or ``split``.
        DataNotFoundError: The files are nowhere to be found (the message lists where it looked).
        DataFileError: A file is corrupt, or images and labels disagree.
    """
    images_path, labels_path = find_mnist_files(name, split, root)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != _IMAGE_SIZE:
        raise DataFileError(
            f"'{images_path}' holds {images.dtype} images of shape {images.shape[1:]}; "
            f"expected uint8 images of shape {_IMAGE_SIZE}"
        )
    if len(images) != len(labels):
        raise DataFileError(
            f"'{images_path}' holds {len(images)} images but '{labels_path}' holds "
            f"{len(labels)} labels; expected equal counts"
        )
    num_classes = MNIST_LIKE[name]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFileError(
            f"'{labels_path}' holds labels in [{labels.min()}, {labels.max()}]; "
            f"expected 0..{num_classes - 1}"
        )
    return as_tensors(images[:, None], labels)
