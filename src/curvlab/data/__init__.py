"""Data sets for curvlab: loaders for the original files and a subset bundled in the package.

* :func:`load_dataset` -- one entry point: ``"bundled"``, ``"fashion-mnist"``, ``"mnist"``,
  ``"cifar10"``; returns uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``.
* :func:`load_bundled` -- 2,048 + 1,024 Fashion-MNIST images shipped with curvlab (MIT licence).
* :func:`load_mnist_like` -- MNIST / Fashion-MNIST from IDX files (:func:`read_idx`).
* :func:`load_cifar10` -- CIFAR-10 pickle batches through a restricted unpickler.
* :func:`to_float` -- uint8 images to floats in ``[0, 1]``; :func:`class_names` -- label names.

Files are searched in the explicit path, then ``$CURVLAB_DATA`` (and ``$CURVLAB_DATA/<name>``),
then system directories (see :mod:`curvlab.data.paths`). Errors subclass :class:`DataFileError`
(a :class:`ValueError`) and name the file or every place searched.
"""

from curvlab.data.bundled import bundled_metadata, load_bundled
from curvlab.data.cifar import RestrictedUnpickler, load_cifar10
from curvlab.data.datasets import DATASETS, class_names, load_dataset
from curvlab.data.errors import DataFileError, DataNotFoundError, UnsafePickleError
from curvlab.data.idx import read_idx, write_idx
from curvlab.data.mnist import load_mnist_like
from curvlab.data.splits import balanced_indices
from curvlab.data.tensors import to_float

__all__ = [
    "DATASETS",
    "DataFileError",
    "DataNotFoundError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "balanced_indices",
    "bundled_metadata",
    "class_names",
    "load_bundled",
    "load_cifar10",
    "load_dataset",
    "load_mnist_like",
    "read_idx",
    "to_float",
    "write_idx",
]
