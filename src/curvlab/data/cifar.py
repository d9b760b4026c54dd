"""CIFAR-10 from the standard python-pickle batches, read through a restricted unpickler.

The "python version" of CIFAR-10 (``cifar-10-python.tar.gz``, unpacked to a
``cifar-10-batches-py`` folder) holds ``data_batch_1`` ... ``data_batch_5`` (training, 50,000
images) and ``test_batch`` (10,000 images). Each is a pickled dict with ``b"data"``, a uint8 array
``[10000, 3072]`` (the red, green and blue 32x32 planes of each image in row-major order), and
``b"labels"``, a list of ints in 0..9.

Unpickling can run arbitrary code, so the batches are read by :class:`RestrictedUnpickler`, which
resolves only the globals a numpy array needs (``_reconstruct``, ``ndarray``, ``dtype``) and refuses
anything else -- e.g. ``os.system`` -- before it can be called. The downloaded archive
``cifar-10-python.tar.gz`` can also be read as it is, without unpacking it.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from curvlab.data.errors import DataFileError, DataNotFoundError, UnsafePickleError
from curvlab.data.paths import DATA_ENV_VAR, candidate_dirs
from curvlab.data.tensors import as_tensors

__all__ = [
    "ALLOWED_GLOBALS",
    "CIFAR10_ARCHIVE",
    "CIFAR10_FILES",
    "RestrictedUnpickler",
    "find_cifar10",
    "load_cifar10",
    "load_pickle_restricted",
    "parse_cifar_batch",
    "read_cifar_batch",
    "unpickle_restricted",
]

#: Batch files of each split.
CIFAR10_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

#: Name of the downloaded archive, readable without unpacking.
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"

_FOLDER = "cifar-10-batches-py"
_IMAGE_SHAPE = (3, 32, 32)
_NUM_CLASSES = 10

_numpy_core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core
_reconstruct = _numpy_core.multiarray._reconstruct

#: The only globals a pickle may refer to: what numpy arrays need, under numpy 1 and 2 names.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (numpy arrays), nothing else.

    Args:
        file: Binary file object to read the pickle from.
        source: Name of the file, used in error messages.
        encoding: How to decode Python 2 strings; ``"bytes"`` (the default) keeps them as bytes,
            as the original CIFAR batches expect (their keys become ``b"data"``, ``b"labels"``).
    """

    def __init__(self, file: IO[bytes], source: str, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, or raise :class:`UnsafePickleError` naming the refused one."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"refused to unpickle '{self.source}': it refers to the global {module}.{name}, "
                f"which is not allowed (allowed: {allowed}); the file is not a genuine CIFAR "
                "batch and may be malicious"
            ) from None


def unpickle_restricted(file: IO[bytes], source: str) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler`, wrapping failures in DataFileError.

    Args:
        file: Binary file object positioned at the pickle.
        source: Name of the file for error messages.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: The pickle refers to a global outside the allow-list.
        DataFileError: The data is not a readable pickle (corrupt or truncated).
    """
    try:
        return RestrictedUnpickler(file, source=source).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # pickle raises many types on corrupt input
        raise DataFileError(
            f"cannot unpickle '{source}' (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from err


def load_pickle_restricted(path: str | os.PathLike[str]) -> Any:
    """Unpickle the file ``path`` with :class:`RestrictedUnpickler`.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        UnsafePickleError: The pickle refers to a global outside the allow-list.
        DataFileError: The file is not a readable pickle (corrupt or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"pickle file not found: '{path}'")
    with path.open("rb") as file:
        return unpickle_restricted(file, str(path))


def _get(batch: dict, key: str, source: str) -> Any:
    """``batch[key]`` under a bytes or str key, or a DataFileError naming the file."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataFileError(
        f"CIFAR batch '{source}' has no {key!r} entry; found keys {sorted(map(repr, batch))}, "
        "expected b'data' and b'labels'"
    )


def parse_cifar_batch(batch: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate an unpickled CIFAR-10 batch and return its images and labels.

    Args:
        batch: The unpickled object; must be a dict with ``data`` and ``labels`` entries
            (bytes or str keys).
        source: Name of the file for error messages.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DataFileError: Not a dict, missing keys, wrong dtype or shape, or labels out of range.
    """
    if not isinstance(batch, dict):
        raise DataFileError(
            f"CIFAR batch '{source}' holds a {type(batch).__name__}; expected a dict"
        )
    data = _get(batch, "data", source)
    labels = _get(batch, "labels", source)
    row = int(np.prod(_IMAGE_SHAPE))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != row)
    ):
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DataFileError(
            f"CIFAR batch '{source}' has data {found}; expected a uint8 array [N, {row}]"
        )
    label_array = np.asarray(labels)
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise DataFileError(
            f"CIFAR batch '{source}' has labels of dtype {label_array.dtype}; expected integers"
        )
    label_array = label_array.astype(np.int64)
    if label_array.shape != (len(data),):
        raise DataFileError(
            f"CIFAR batch '{source}' has {len(data)} images but labels of shape "
            f"{label_array.shape}; expected [{len(data)}]"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= _NUM_CLASSES):
        raise DataFileError(
            f"CIFAR batch '{source}' has labels in [{label_array.min()}, {label_array.max()}]; "
            f"expected 0..{_NUM_CLASSES - 1}"
        )
    return data.reshape(-1, *_IMAGE_SHAPE), label_array


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CIFAR-10 batch file.

    Args:
        path: A ``data_batch_<i>`` or ``test_batch`` file.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        UnsafePickleError: The pickle refers to a global outside the allow-list.
        DataFileError: Corrupt file, missing keys, wrong dtype or shape, or labels out of range.
    """
    return parse_cifar_batch(load_pickle_restricted(path), str(path))


def _read_archive_batches(
    archive: Path, names: tuple[str, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read the batches ``names`` from ``cifar-10-python.tar.gz`` without unpacking it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [name for name in names if name not in members]
            if missing:
                raise DataFileError(
                    f"CIFAR-10 archive '{archive}' lacks {', '.join(missing)}; expected the "
                    f"python version ({CIFAR10_ARCHIVE}) with a {_FOLDER} folder"
                )
            batches = []
            for name in names:
                source = f"{archive}:{members[name].name}"
                file = tar.extractfile(members[name])
                batches.append(parse_cifar_batch(unpickle_restricted(file, source), source))
            return batches
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataFileError(
            f"cannot read CIFAR-10 archive '{archive}' (corrupt or truncated?): {err}"
        ) from err


def find_cifar10(split: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Locate the batch files of ``split``: a directory holding them, or the downloaded archive.

    Args:
        split: ``"train"`` or ``"test"``.
        root: The archive ``cifar-10-python.tar.gz`` itself, or a directory holding the batches,
            a ``cifar-10-batches-py`` or ``cifar10`` folder, or the archive; if None,
            ``$CURVLAB_DATA`` is searched the same way.

    Returns:
        The first directory that holds every batch file of ``split`` or, failing that, holds
        the archive, in which case the archive's path.

    Raises:
        ValueError: Unknown ``split``.
        DataNotFoundError: Found nowhere; the message lists every place searched.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(CIFAR10_FILES)}")
    if root is not None and Path(root).is_file():
        return Path(root)
    names = CIFAR10_FILES[split]
    searched = []
    for directory in candidate_dirs("cifar10", root, subdirs=(_FOLDER,)):
        missing = [name for name in names if not (directory / name).is_file()]
        if not missing:
            return directory
        if (directory / CIFAR10_ARCHIVE).is_file():
            return directory / CIFAR10_ARCHIVE
        state = "does not exist" if not directory.is_dir() else f"missing {', '.join(missing)}"
        searched.append(f"  {directory} ({state})")
    if root is None and not searched:
        searched.append(f"  (nowhere: no root given and ${DATA_ENV_VAR} is not set)")
    raise DataNotFoundError(
        f"CIFAR-10 ({split}) not found: looked for {', '.join(names)} or {CIFAR10_ARCHIVE} in\n"
        + "\n".join(searched)
        + f"\nTo get the data, download the python version ({CIFAR10_ARCHIVE}) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and pass it (or the folder it unpacks to) "
        f"as root, or set ${DATA_ENV_VAR}."
    )


def load_cifar10(
    root: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from the python-pickle batches.

    Args:
        root: Directory holding the batches (or a ``cifar-10-batches-py`` / ``cifar10`` folder
            inside it), or the downloaded ``cifar-10-python.tar.gz``; if None,
            ``$CURVLAB_DATA`` is searched.
        split: ``"train"`` (``data_batch_1..5``) or ``"test"`` (``test_batch``).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]`` with values in 0..9.

    Raises:
        ValueError: Unknown ``split``.
        DataNotFoundError: The batch files are nowhere to be found.
        UnsafePickleError: A batch refers to a global other than numpy's array constructors.
        DataFileError: A batch is corrupt or has the wrong keys, dtype or shape.
    """
    location = find_cifar10(split, root)
    names = CIFAR10_FILES[split]
    if location.is_file():
        batches = _read_archive_batches(location, names)
    else:
        batches = [read_cifar_batch(location / name) for name in names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return as_tensors(images, labels)
