"""IDX reader and writer: round trips and errors that name the file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from curvlab.data import DataFileError, DataNotFoundError, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 1, 3, 2)])
def test_round_trip(tmp_path, gz, dtype, shape):
    array = (np.arange(np.prod(shape)) * 37 % 251 - 100).reshape(shape).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_is_big_endian_on_disk(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([1, 258], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + b"\x00\x01\x01\x02"


def test_gzip_detected_from_content_not_name(tmp_path):
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 5, 6])))
    assert read_idx(path).tolist() == [5, 6]


def test_result_is_writable_native(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.ones((2, 2), dtype=np.float32))
    back = read_idx(path)
    back[0, 0] = 3
    assert back.dtype.isnative and back[0, 0] == 3


def _valid_bytes() -> bytes:
    return bytes([0, 0, 8, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "dtype code 0x07"),
        (bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02", "truncated"),
        (_valid_bytes()[:-1], "truncated"),
        (_valid_bytes() + b"\x00", "longer than its header"),
    ],
    ids=["empty", "short", "magic", "dtype", "header", "data", "trailing"],
)
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_corrupt_file_error_names_file(tmp_path, payload, expected, gz):
    path = tmp_path / "broken-idx-file"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DataFileError, match=expected) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_error_names_file(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(_valid_bytes() * 100)[:-20])
    with pytest.raises(DataFileError, match="cannot be decompressed") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_wrong_ndim_error(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(_valid_bytes())
    with pytest.raises(DataFileError, match="has 2 dimensions; expected 3"):
        read_idx(path, ndim=3)


def test_missing_file_error(tmp_path):
    path = tmp_path / "absent-idx3-ubyte.gz"
    with pytest.raises(DataNotFoundError, match="absent-idx3-ubyte.gz"):
        read_idx(path)


def test_missing_file_error_is_file_not_found_and_value_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "absent")


def test_write_refuses_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
