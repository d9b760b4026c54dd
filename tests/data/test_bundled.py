"""The bundled Fashion-MNIST subset: shapes, balance, provenance, and rows of the original."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.data import bundled_metadata, load_bundled, load_mnist_like
from curvlab.data.bundled import load_bundled_arrays

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZES = {"train": 2048, "test": 1024}


@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_and_dtypes(split):
    images, labels = load_bundled(split)
    assert images.shape == (SIZES[split], 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (SIZES[split],) and labels.dtype == torch.int64


@pytest.mark.parametrize("split", ["train", "test"])
def test_class_balanced(split):
    counts = torch.bincount(load_bundled(split)[1], minlength=10)
    assert counts.sum() == SIZES[split] and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_prefix_of_ten_is_one_per_class(split):
    labels = load_bundled(split)[1]
    rounds = labels[: len(labels) // 10 * 10].reshape(-1, 10)
    assert torch.equal(rounds.sort(dim=1).values, torch.arange(10).expand_as(rounds))


def test_images_are_not_blank():
    images = load_bundled("train")[0].float()
    assert 50 < images.mean() < 100 and images.std(dim=(1, 2, 3)).min() > 0


def test_metadata_records_provenance():
    metadata = bundled_metadata()
    assert metadata["seed"] == 0 and metadata["sizes"] == SIZES
    assert "MIT" in metadata["license"] and "Zalando" in metadata["license"]
    assert len(metadata["source_files"]) == 4


def test_indices_unique_and_labels_match_counts():
    arrays = load_bundled_arrays()
    for split, size in SIZES.items():
        assert np.unique(arrays[f"{split}_indices"]).size == size
        counts = np.bincount(arrays[f"{split}_labels"], minlength=10).tolist()
        assert counts == bundled_metadata()["class_counts"][split]


def test_license_file_ships_beside_the_data():
    from importlib import resources

    text = resources.files("curvlab.data").joinpath("bundled", "LICENSE").read_text("utf-8")
    assert "MIT License" in text and "Zalando SE" in text


def test_loads_are_independent_copies():
    images, _ = load_bundled("test")
    images.zero_()
    assert load_bundled("test")[0].float().mean() > 0


def test_unknown_split():
    with pytest.raises(ValueError, match="valid"):
        load_bundled("val")


needs_fashion_mnist = pytest.mark.skipif(
    not SYSTEM_FASHION.is_dir(),
    reason=f"{SYSTEM_FASHION} absent (apt-get install dataset-fashion-mnist)",
)


@needs_fashion_mnist
def test_source_files_match_recorded_sha256():
    recorded = bundled_metadata()["source_files"]
    for name, info in recorded.items():
        path = SYSTEM_FASHION / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], name


@needs_fashion_mnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_subset_rows_are_original_rows_at_recorded_indices(split):
    full_images, full_labels = load_mnist_like("fashion-mnist", split, root=SYSTEM_FASHION)
    indices = torch.from_numpy(load_bundled_arrays()[f"{split}_indices"])
    images, labels = load_bundled(split)
    assert torch.equal(images, full_images[indices]) and torch.equal(labels, full_labels[indices])


@needs_fashion_mnist
def test_rebuild_is_identical():
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "build_bundled_subset.py"
    spec = importlib.util.spec_from_file_location("build_bundled_subset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arrays = module.build(SYSTEM_FASHION, module.SEED, module.SIZES)
    bundled = load_bundled_arrays()
    assert sorted(arrays) == sorted(bundled)
    assert all(np.array_equal(arrays[k], bundled[k]) for k in arrays if k != "metadata")
