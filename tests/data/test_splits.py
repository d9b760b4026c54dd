"""Seeded class-balanced subsets."""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.data import balanced_indices
from curvlab.data.splits import class_counts

LABELS = np.repeat(np.arange(4), [10, 7, 9, 8])


@pytest.mark.parametrize("size", [0, 1, 4, 10, 27, 28])
def test_counts_differ_by_at_most_one(size):
    counts = class_counts(LABELS[balanced_indices(LABELS, size, seed=0)], 4)
    assert counts.sum() == size and counts.max() - counts.min() <= 1


def test_no_repeats_and_in_range():
    indices = balanced_indices(LABELS, 28, seed=1)
    assert np.unique(indices).size == 28 and indices.min() >= 0 and indices.max() < LABELS.size


def test_every_round_holds_each_class_once():
    labels = LABELS[balanced_indices(LABELS, 24, seed=2)].reshape(6, 4)
    assert (np.sort(labels, axis=1) == np.arange(4)).all()


def test_same_seed_same_draw_other_seed_other_draw():
    first = balanced_indices(LABELS, 12, seed=[3, 0])
    assert np.array_equal(first, balanced_indices(LABELS, 12, seed=[3, 0]))
    assert not np.array_equal(first, balanced_indices(LABELS, 12, seed=[3, 1]))


def test_too_large_is_refused():
    with pytest.raises(ValueError, match="smallest class, 1, has 7"):
        balanced_indices(LABELS, 29, seed=0)
