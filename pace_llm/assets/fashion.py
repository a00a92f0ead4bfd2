"""Fashion-MNIST, read from the IDX files of the Debian package `dataset-fashion-mnist`."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from pace_llm.assets.cache import AssetMissing

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's "train" (60,000) or
    "test" (10,000) split, read from the IDX files of the Debian package
    `dataset-fashion-mnist` (root: /usr/share/datasets/fashion-mnist, or
    $PACE_FASHION_MNIST; .gz or uncompressed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("PACE_FASHION_MNIST") or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise AssetMissing(
                f"Fashion-MNIST not found ({candidates[0]}): install the Debian package "
                f"dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) "
                f"or point $PACE_FASHION_MNIST at a folder with the IDX files"
            )
        files.append(found)
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)
