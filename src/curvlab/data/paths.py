"""Where the loaders look for data sets on disk.

Search order for a data set ``name`` (the first place that holds the files wins):

1. the ``root`` the caller passed, then ``root/<name>`` -- and nothing else, so an explicit path
   never silently falls back to another copy;
2. otherwise every directory in ``$CURVLAB_DATA`` (one path, or several joined by ``os.pathsep``),
   each followed by ``<dir>/<name>``;
3. then the system directories of the data set (for Fashion-MNIST the Debian package
   ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "SYSTEM_DIRS", "candidate_dirs"]

#: Environment variable naming the user's data directory (or several, joined by ``os.pathsep``).
DATA_ENV_VAR = "CURVLAB_DATA"

#: Directories where system packages install a data set, by data-set name.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (),
    "cifar10": (),
}


def candidate_dirs(
    name: str, root: str | os.PathLike[str] | None = None, subdirs: tuple[str, ...] = ()
) -> list[Path]:
    """List the directories to search for data set ``name``, in order, without duplicates.

    Args:
        name: Data-set name, also the sub-directory looked for under each base directory.
        root: Explicit directory from the caller; if given, only ``root`` and its sub-directories
            are searched.
        subdirs: Extra sub-directory names to try under each base (e.g.
            ``"cifar-10-batches-py"``), besides ``name``.

    Returns:
        Directories to look in, whether or not they exist (so that errors can list them all).
    """
    if root is not None:
        bases = [Path(root)]
    else:
        env = os.environ.get(DATA_ENV_VAR, "")
        bases = [Path(part) for part in env.split(os.pathsep) if part]
    dirs: list[Path] = []
    for base in bases:
        dirs.append(base)
        for sub in (name, *subdirs):
            dirs.append(base / sub)
            dirs.extend(base / sub / nested for nested in subdirs if nested != sub)
    if root is None:
        dirs.extend(SYSTEM_DIRS.get(name, ()))
    unique: list[Path] = []
    for directory in dirs:
        if directory not in unique:
            unique.append(directory)
    return unique
