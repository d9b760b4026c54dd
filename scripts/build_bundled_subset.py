"""Build the Fashion-MNIST subset bundled with curvlab, reproducibly, from the original IDX files.

Usage::

    python scripts/build_bundled_subset.py            # (re)write the bundled .npz
    python scripts/build_bundled_subset.py --check    # rebuild in memory; exit 1 if it differs

What it does (see docs/data.md):

* reads the four original IDX files (found as ``load_mnist_like("fashion-mnist", ...)`` finds
  them: ``--source``, else ``$CURVLAB_DATA``, else ``/usr/share/datasets/fashion-mnist``) and
  records their sha256 (of the files and of the uncompressed IDX bytes);
* draws 2,048 training and 1,024 test indices with ``curvlab.data.balanced_indices`` (class
  balanced, class-interleaved order), seeds ``[SEED, 0]`` for train and ``[SEED, 1]`` for test;
* stores the uint8 images ``[N, 28, 28]``, uint8 labels, int64 indices and a JSON ``metadata``
  string in a deflate-compressed ``.npz`` whose zip entries carry a fixed timestamp, so the same
  inputs give a byte-identical file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from curvlab.data.idx import read_idx
from curvlab.data.mnist import find_mnist_files
from curvlab.data.splits import balanced_indices, class_counts

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "curvlab" / "data" / "bundled" / "fashion_mnist_subset.npz"
SEED = 0
SIZES = {"train": 2048, "test": 1024}
NUM_CLASSES = 10
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def idx_sha256(path: Path) -> str:
    """sha256 of the uncompressed IDX bytes: the same for any (re)compression of the file."""
    raw = path.read_bytes()
    return hashlib.sha256(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).hexdigest()


def build(source: Path | None, seed: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    sources = {}
    for split_id, (split, size) in enumerate(sizes.items()):
        images_path, labels_path = find_mnist_files("fashion-mnist", split, source)
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        indices = balanced_indices(labels, size, seed=[seed, split_id])
        arrays[f"{split}_images"] = images[indices]
        arrays[f"{split}_labels"] = labels[indices].astype(np.uint8)
        arrays[f"{split}_indices"] = indices
        for path in (images_path, labels_path):
            sources[path.name] = {
                "sha256": sha256(path),
                "bytes": path.stat().st_size,
                "uncompressed_sha256": idx_sha256(path),
            }
        counts = class_counts(labels[indices], NUM_CLASSES).tolist()
        sources[f"{split}_class_counts"] = counts
    metadata = {
        "dataset": "Fashion-MNIST",
        "license": "MIT, Copyright (c) 2017 Zalando SE, https://tech.zalando.com",
        "source": "https://github.com/zalandoresearch/fashion-mnist",
        "builder": "scripts/build_bundled_subset.py",
        "selection": (
            "curvlab.data.balanced_indices(labels, size, seed=[seed, split_id]) with split_id 0 "
            "for train and 1 for test: class-balanced (counts differ by at most one), "
            "class-interleaved order"
        ),
        "seed": seed,
        "sizes": sizes,
        "class_counts": {split: sources.pop(f"{split}_class_counts") for split in sizes},
        "source_files": sources,
    }
    arrays["metadata"] = np.array(json.dumps(metadata, indent=1, sort_keys=True))
    return arrays


def save_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed``, but with fixed zip timestamps (byte-identical rebuilds)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


def same_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    with np.load(path, allow_pickle=False) as npz:
        if sorted(npz.files) != sorted(arrays):
            return False
        return all(
            npz[name].dtype == array.dtype and np.array_equal(npz[name], array)
            for name, array in arrays.items()
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="directory of the IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    arrays = build(args.source, args.seed, SIZES)
    if args.check:
        ok = args.out.is_file() and same_arrays(args.out, arrays)
        print(f"{args.out}: {'up to date' if ok else 'DIFFERS from a fresh build'}")
        return 0 if ok else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz_reproducibly(args.out, arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    print(json.dumps(json.loads(str(arrays["metadata"])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
