"""Errors raised by the data loaders.

Every error names the file (or the places searched) and says what was expected, so a user can fix
the problem without reading the loader's source.
"""

from __future__ import annotations

__all__ = ["DataFileError", "DataNotFoundError", "UnsafePickleError"]


class DataFileError(ValueError):
    """A data file is corrupt, truncated, of the wrong format or holds unexpected contents."""


class DataNotFoundError(DataFileError, FileNotFoundError):
    """A data file or data set could not be found.

    Subclasses both :class:`DataFileError` (hence :class:`ValueError`) and
    :class:`FileNotFoundError`, so either can be caught.
    """


class UnsafePickleError(DataFileError):
    """A pickle refers to a global outside the loader's allow-list and was refused unread."""
