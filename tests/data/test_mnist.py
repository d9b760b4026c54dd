"""MNIST-like loaders: file discovery, search order, validation, and the real Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.data import DataFileError, DataNotFoundError, load_mnist_like, write_idx
from curvlab.data import paths as data_paths
from tests.data.fakes import MNIST_NAMES, write_fake_mnist

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $CURVLAB_DATA and no system directories: only what a test sets up is found."""
    monkeypatch.delenv(data_paths.DATA_ENV_VAR, raising=False)
    monkeypatch.setitem(data_paths.SYSTEM_DIRS, "fashion-mnist", (tmp_path / "system-absent",))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_loads_fake_files(tmp_path, no_env, gz, split):
    arrays = write_fake_mnist(tmp_path, gz=gz)
    images, labels = load_mnist_like("mnist", split, root=tmp_path)
    expected_images, expected_labels = arrays[split]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (len(expected_images), 1, 28, 28)
    assert np.array_equal(images[:, 0].numpy(), expected_images)
    assert np.array_equal(labels.numpy(), expected_labels)


def test_accepts_dotted_mirror_names(tmp_path, no_env):
    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 2], np.uint8)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", labels)
    assert load_mnist_like("mnist", "test", root=tmp_path)[1].tolist() == [0, 1, 2]


def test_root_subdirectory_named_after_data_set(tmp_path, no_env):
    write_fake_mnist(tmp_path / "fashion-mnist", n=5)
    assert len(load_mnist_like("fashion-mnist", "train", root=tmp_path)[1]) == 5


@pytest.mark.parametrize("subdir", ["", "mnist"])
def test_env_var_is_searched(tmp_path, no_env, monkeypatch, subdir):
    write_fake_mnist(tmp_path / subdir, n=6)
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path))
    assert len(load_mnist_like("mnist", "train")[1]) == 6


def test_env_var_comes_before_system_dir(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "fashion-mnist", n=4)
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path))
    assert len(load_mnist_like("fashion-mnist", "train")[1]) == 4


def test_system_dir_is_searched_last(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "system", n=7)
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path / "empty"))
    monkeypatch.setitem(data_paths.SYSTEM_DIRS, "fashion-mnist", (tmp_path / "system",))
    assert len(load_mnist_like("fashion-mnist", "train")[1]) == 7


def test_explicit_root_never_falls_back(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "env", n=4)
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "explicit").mkdir()
    with pytest.raises(DataNotFoundError, match="explicit"):
        load_mnist_like("mnist", "train", root=tmp_path / "explicit")


def test_not_found_lists_every_place_and_how_to_get_it(tmp_path, no_env, monkeypatch):
    monkeypatch.setenv(data_paths.DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_mnist_like("fashion-mnist", "test")
    message = str(info.value)
    for place in ["env", "env/fashion-mnist", "system-absent"]:
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_not_found_is_a_file_not_found_error(tmp_path, no_env):
    with pytest.raises(FileNotFoundError):
        load_mnist_like("mnist", "train", root=tmp_path)


def test_half_present_is_reported(tmp_path, no_env):
    write_fake_mnist(tmp_path)
    (tmp_path / (MNIST_NAMES["train"][1] + ".gz")).unlink()
    with pytest.raises(DataNotFoundError, match=r"only train-images-idx3-ubyte\.gz"):
        load_mnist_like("mnist", "train", root=tmp_path)


def test_count_mismatch_names_both_files(tmp_path, no_env):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataFileError, match="3 images .* 2 labels") as info:
        load_mnist_like("mnist", "train", root=tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_wrong_image_size_is_refused(tmp_path, no_env):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 32, 32), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataFileError, match=r"\(28, 28\)"):
        load_mnist_like("mnist", "train", root=tmp_path)


def test_label_out_of_range_is_refused(tmp_path, no_env):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 10], np.uint8))
    with pytest.raises(DataFileError, match="0..9"):
        load_mnist_like("mnist", "train", root=tmp_path)


def test_corrupt_file_error_names_it(tmp_path, no_env):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataFileError, match="truncated") as info:
        load_mnist_like("mnist", "train", root=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("name", "split"), [("kmnist", "train"), ("mnist", "valid")])
def test_unknown_name_or_split(name, split):
    with pytest.raises(ValueError, match="valid"):
        load_mnist_like(name, split)


needs_fashion_mnist = pytest.mark.skipif(
    not SYSTEM_FASHION.is_dir(),
    reason=f"{SYSTEM_FASHION} absent (apt-get install dataset-fashion-mnist)",
)


@needs_fashion_mnist
@pytest.mark.parametrize(("split", "size"), [("train", 60000), ("test", 10000)])
def test_full_fashion_mnist(split, size):
    images, labels = load_mnist_like("fashion-mnist", split, root=SYSTEM_FASHION)
    assert images.shape == (size, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [size // 10] * 10
