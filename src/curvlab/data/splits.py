"""Seeded, class-balanced subsets of a labelled data set.

:func:`balanced_indices` is what built the bundled Fashion-MNIST subset
(``scripts/build_bundled_subset.py``); it is public so that experiments can draw their own
balanced subsets the same documented way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["balanced_indices", "class_counts"]


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of examples of each class.

    Args:
        labels: Integer labels ``[N]`` in ``0..num_classes-1``.
        num_classes: Number of classes C.

    Returns:
        int64 counts ``[C]``.
    """
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def balanced_indices(labels: np.ndarray, size: int, seed: int | Sequence[int]) -> np.ndarray:
    """Draw a class-balanced subset of ``size`` indices, in a class-interleaved order.

    The algorithm, with ``rng = numpy.random.default_rng(seed)`` and ``C`` the classes present in
    ``labels`` (sorted):

    1. Quotas: every class gets ``size // C`` examples; ``size % C`` classes, drawn with
       ``rng.choice(C, size % C, replace=False)``, get one more (counts differ by at most one).
    2. Members: for each class in increasing order, ``rng.permutation`` of its indices, truncated
       to its quota.
    3. Order: in round ``r = 0, 1, ...`` the classes whose quota exceeds ``r`` each contribute
       their ``r``-th member, in the class order ``rng.permutation`` of those classes. Hence every
       prefix of length ``k * C`` holds exactly ``k`` examples of each class.

    Args:
        labels: Integer labels ``[N]``.
        size: Number of indices to draw, at most ``C`` times the size of the smallest class.
        seed: Seed of ``numpy.random.default_rng`` (an int or a sequence of ints).

    Returns:
        int64 indices into ``labels`` ``[size]``, without repeats.

    Raises:
        ValueError: ``size`` is negative or larger than a balanced draw allows.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if size < 0 or (size > 0 and classes.size == 0):
        raise ValueError(f"cannot draw {size} balanced indices from {labels.size} labels")
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.array([np.count_nonzero(labels == cls) for cls in classes])
    if size > classes.size * counts.min():
        smallest = int(np.argmin(counts))
        raise ValueError(
            f"cannot draw {size} balanced indices: the smallest class, {classes[smallest]}, has "
            f"{counts[smallest]} examples, so at most {classes.size * counts.min()} can be drawn"
        )
    rng = np.random.default_rng(seed)
    quotas = np.full(classes.size, size // classes.size, dtype=np.int64)
    quotas[rng.choice(classes.size, size % classes.size, replace=False)] += 1
    members = []
    for cls, quota in zip(classes, quotas, strict=True):
        members.append(rng.permutation(np.flatnonzero(labels == cls))[:quota])
    order = []
    for round_ in range(int(quotas.max())):
        present = np.flatnonzero(quotas > round_)
        order.extend(members[c][round_] for c in rng.permutation(present))
    return np.asarray(order, dtype=np.int64)
