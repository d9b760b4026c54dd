"""Reader and writer for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
``uint32`` dimension sizes, then the array in C order with big-endian items. Files may be
gzip-compressed; compression is detected from the content (the gzip magic bytes), not the name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from curvlab.data.errors import DataFileError, DataNotFoundError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX dtype code -> numpy dtype (big-endian, as stored on disk).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Read ``path``, decompressing it when it starts with the gzip magic bytes."""
    if not path.is_file():
        raise DataNotFoundError(f"IDX file not found: '{path}'")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFileError(
            f"IDX file '{path}' is gzip-compressed but cannot be decompressed "
            f"(corrupt or truncated download?): {err}"
        ) from err


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    Args:
        path: The ``.gz`` or uncompressed IDX file.
        ndim: If given, the number of dimensions the file must have (3 for MNIST images
            ``[N, 28, 28]``, 1 for labels ``[N]``).

    Returns:
        The array with the file's shape and dtype, in native byte order and writable.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        DataFileError: The magic number, dtype code, dimensions or size are invalid; the message
            names the file and what was expected.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFileError(
            f"IDX file '{path}' is too short ({len(data)} bytes) to hold the 4-byte magic number"
        )
    zero0, zero1, code, file_ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataFileError(
            f"IDX file '{path}' has magic number 0x{data[:4].hex()}; expected 0x0000 followed by "
            "a dtype code and the number of dimensions (is this an IDX file?)"
        )
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataFileError(
            f"IDX file '{path}' has unknown dtype code 0x{code:02X}; valid: {valid}"
        )
    if ndim is not None and file_ndim != ndim:
        raise DataFileError(f"IDX file '{path}' has {file_ndim} dimensions; expected {ndim}")
    header_size = 4 + 4 * file_ndim
    if len(data) < header_size:
        raise DataFileError(
            f"IDX file '{path}' is truncated: {len(data)} bytes cannot hold the {file_ndim} "
            f"dimension sizes (header of {header_size} bytes)"
        )
    shape = struct.unpack(f">{file_ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise DataFileError(
            f"IDX file '{path}' is {problem}: shape {tuple(shape)} of {dtype.name} needs "
            f"{expected} bytes (header included), found {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends in ``.gz``.

    Args:
        path: Destination file.
        array: Array of dtype uint8, int8, int16, int32, float32 or float64, with at most 255
            dimensions, each smaller than 2**32.

    Raises:
        ValueError: The dtype or shape cannot be stored in IDX.
    """
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        valid = ", ".join(dtype.name for dtype in IDX_DTYPES.values())
        raise ValueError(f"IDX cannot store dtype {array.dtype}; valid: {valid}")
    if array.ndim > 255 or any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX cannot store an array of shape {array.shape}")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
