"""Linear algebra kernels and (later, C4) randomized estimators and eigensolvers."""

from curvlab.linalg.gram import gram

__all__ = ["gram"]
