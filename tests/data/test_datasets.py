"""The single entry point load_dataset, class_names and to_float."""

from __future__ import annotations

import pytest
import torch

from curvlab.data import DATASETS, class_names, load_bundled, load_dataset, to_float
from curvlab.data import paths as data_paths
from tests.data.fakes import write_fake_cifar, write_fake_mnist


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(data_paths.DATA_ENV_VAR, raising=False)


def test_bundled_matches_load_bundled():
    images, labels = load_dataset("bundled", "test")
    expected_images, expected_labels = load_bundled("test")
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_mnist_with_path(tmp_path):
    write_fake_mnist(tmp_path, n=5)
    images, labels = load_dataset("mnist", "train", path=tmp_path)
    assert images.shape == (5, 1, 28, 28) and labels.dtype == torch.int64


def test_fashion_mnist_with_path(tmp_path):
    write_fake_mnist(tmp_path, n=5)
    assert load_dataset("fashion-mnist", "test", path=tmp_path)[0].shape == (6, 1, 28, 28)


def test_cifar10_with_path(tmp_path):
    write_fake_cifar(tmp_path, n=2)
    images, labels = load_dataset("cifar10", "train", path=tmp_path)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="bundled, fashion-mnist, mnist, cifar10"):
        load_dataset("imagenet", "train")


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("bundled", "val")


def test_bundled_refuses_a_path(tmp_path):
    with pytest.raises(ValueError, match="no path"):
        load_dataset("bundled", "train", path=tmp_path)


@pytest.mark.parametrize("name", DATASETS)
def test_class_names_are_ten_distinct(name):
    names = class_names(name)
    assert len(set(names)) == 10


def test_class_names_known_values():
    assert (
        class_names("fashion-mnist")[9] == "Ankle boot" and class_names("cifar10")[0] == "airplane"
    )


def test_class_names_unknown():
    with pytest.raises(ValueError, match="valid"):
        class_names("svhn")


def test_to_float_scales_to_unit_interval():
    images = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    out = to_float(images)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([[0.0, 0.2, 1.0]]))


def test_to_float_dtype():
    assert to_float(torch.zeros(2, dtype=torch.uint8), torch.float64).dtype == torch.float64


def test_to_float_refuses_float_input():
    with pytest.raises(TypeError, match="uint8"):
        to_float(torch.zeros(2))
