"""CIFAR-10 pickle batches: fake files in the original format, validation, refused pickles."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from curvlab.data import DataFileError, DataNotFoundError, UnsafePickleError, load_cifar10
from curvlab.data import paths as data_paths
from curvlab.data.cifar import read_cifar_batch
from tests.data.fakes import (
    cifar_pickle_bytes,
    fake_cifar_batch,
    write_fake_cifar,
    write_fake_cifar_archive,
)

PROTOCOLS = [2, 4]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(data_paths.DATA_ENV_VAR, raising=False)


def _expected(batches, names):
    images = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    return images, labels


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("split", "names"),
    [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])],
)
def test_loads_fake_batches(tmp_path, protocol, split, names):
    batches = write_fake_cifar(tmp_path, n=4, protocol=protocol)
    images, labels = load_cifar10(tmp_path, split)
    expected_images, expected_labels = _expected(batches, names)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (4 * len(names), 3, 32, 32)
    assert np.array_equal(images.numpy(), expected_images)
    assert np.array_equal(labels.numpy(), expected_labels)


def test_channel_layout_is_rgb_planes(tmp_path):
    batch = fake_cifar_batch(1, 0)
    batch[b"data"][0] = np.repeat(np.array([10, 20, 30], np.uint8), 1024)
    (tmp_path / "test_batch").write_bytes(cifar_pickle_bytes(batch, 2))
    images, _ = load_cifar10(tmp_path, "test")
    assert images[0, :, 5, 7].tolist() == [10, 20, 30]


def test_protocol2_fake_has_python2_structure():
    data = cifar_pickle_bytes(fake_cifar_batch(2, 0), 2)
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data


@pytest.mark.parametrize("folder", ["cifar-10-batches-py", "cifar10"])
def test_finds_standard_folder_under_root(tmp_path, folder):
    write_fake_cifar(tmp_path / folder, n=3)
    assert len(load_cifar10(tmp_path, "test")[1]) == 3


def test_env_var_is_searched(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", n=3)
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path))
    assert len(load_cifar10(None, "train")[1]) == 15


def test_not_found_lists_places(tmp_path):
    write_fake_cifar(tmp_path, n=2)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="missing data_batch_3") as info:
        load_cifar10(tmp_path, "train")
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


@pytest.mark.parametrize("point_at", ["archive", "folder"])
def test_reads_downloaded_archive_without_unpacking(tmp_path, point_at):
    batches = write_fake_cifar_archive(tmp_path / "dl", n=3)
    root = tmp_path / "dl" / "cifar-10-python.tar.gz" if point_at == "archive" else tmp_path / "dl"
    (tmp_path / "dl" / "unpacked").rename(tmp_path / "elsewhere")
    images, labels = load_cifar10(root, "train")
    expected_images, expected_labels = _expected(batches, [f"data_batch_{i}" for i in range(1, 6)])
    assert np.array_equal(images.numpy(), expected_images)
    assert np.array_equal(labels.numpy(), expected_labels)


def test_archive_missing_member_is_named(tmp_path):
    write_fake_cifar_archive(tmp_path, n=2, skip=("test_batch",))
    with pytest.raises(DataFileError, match="lacks test_batch") as info:
        load_cifar10(tmp_path / "cifar-10-python.tar.gz", "test")
    assert "cifar-10-python.tar.gz" in str(info.value)


def test_corrupt_archive_is_named(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"not an archive")
    with pytest.raises(DataFileError, match="cannot read CIFAR-10 archive") as info:
        load_cifar10(path, "test")
    assert str(path) in str(info.value)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_unexecuted(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    batch = fake_cifar_batch(2, 0)
    batch[b"labels"] = _RunsShell(marker)
    path.write_bytes(cifar_pickle_bytes(batch, protocol))
    with pytest.raises(UnsafePickleError, match=r"\.system") as info:
        load_cifar10(tmp_path, "test")
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=2),
        pickle.dumps(np.zeros(3), protocol=5),  # numpy's protocol-5 path: numeric._frombuffer
        pickle.dumps({b"data": b"x"}, protocol=2),  # Python 3 bytes at protocol 2: _codecs
    ],
    ids=["builtins.eval", "protocol5-frombuffer", "codecs"],
)
def test_globals_outside_the_allow_list_are_refused(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="not allowed"):
        read_cifar_batch(path)


def _write_batch(tmp_path, batch, protocol=4):
    path = tmp_path / "test_batch"
    path.write_bytes(cifar_pickle_bytes(batch, protocol))
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b.pop(b"data"), "no 'data' entry"),
        (lambda b: b.pop(b"labels"), "no 'labels' entry"),
        (lambda b: b.update({b"data": b[b"data"][:, :100]}), r"expected a uint8 array \[N, 3072\]"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "float32"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "labels of shape"),
        (lambda b: b.update({b"labels": [11] * len(b[b"labels"])}), "0..9"),
        (lambda b: b.update({b"labels": [0.5] * len(b[b"labels"])}), "expected integers"),
    ],
    ids=["no-data", "no-labels", "shape", "dtype", "count", "range", "float-labels"],
)
def test_invalid_batch_error_names_file(tmp_path, mutate, expected):
    batch = fake_cifar_batch(3, 0)
    mutate(batch)
    path = _write_batch(tmp_path, batch)
    with pytest.raises(DataFileError, match=expected) as info:
        load_cifar10(tmp_path, "test")
    assert str(path) in str(info.value)


def test_not_a_dict_is_refused(tmp_path):
    path = _write_batch(tmp_path, [1, 2, 3])
    with pytest.raises(DataFileError, match="expected a dict"):
        read_cifar_batch(path)


def test_str_keys_are_accepted(tmp_path):
    batch = {key.decode(): value for key, value in fake_cifar_batch(2, 0).items()}
    path = _write_batch(tmp_path, batch)
    assert read_cifar_batch(path)[0].shape == (2, 3, 32, 32)


def test_truncated_pickle_error_names_file(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(cifar_pickle_bytes(fake_cifar_batch(3, 0), 2)[:-40])
    with pytest.raises(DataFileError, match="corrupt or truncated") as info:
        load_cifar10(tmp_path, "test")
    assert str(path) in str(info.value)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        load_cifar10(tmp_path, "validation")
