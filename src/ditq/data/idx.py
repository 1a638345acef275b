"""MNIST / Fashion-MNIST from their standard idx files (``.gz`` or raw).

On Debian, ``apt-get install dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditq.errors import DitqError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# idx type codes -> numpy dtypes (big-endian on disk)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzip-compressed or raw) into an array of its stored shape."""
    path = Path(path)
    if not path.exists():
        raise DitqError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DitqError(f"cannot read idx file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DitqError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DitqError(f"{path} is truncated: expected {expected} data bytes, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DitqError(f"no {stem}[.gz] in {root}; for Fashion-MNIST run: apt-get install dataset-fashion-mnist")


def load_idx_dataset(
    root: str | Path = FASHION_MNIST_DIR, split: str = "train", image_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, S, S) float32 in [-1, 1] and labels (N,) int64 of an (Fashion-)MNIST split.

    28×28 images are zero-padded (black border) to 32×32; other sizes are resized bilinearly.
    """
    if split not in ("train", "test"):
        raise DitqError(f"split must be 'train' or 'test', got '{split}'")
    root = Path(root)
    if not root.is_dir():
        raise DitqError(
            f"dataset folder not found: {root}; for Fashion-MNIST run: apt-get install dataset-fashion-mnist"
        )
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DitqError(f"inconsistent idx files in {root}: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    h = x.shape[-1]
    if image_size != h:
        if image_size > h and (image_size - h) % 2 == 0:
            pad = (image_size - h) // 2
            x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        else:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(labels.astype(np.int64))
