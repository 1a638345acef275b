"""MNIST-style idx files (ditq.data.idx): raw or gzip-compressed, any stored dtype in native byte order,
the Fashion-MNIST layout padded to 32 px; bad files and folders as one-line errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ditq.data import load_idx_dataset, read_idx
from ditq.errors import DitqError


def _write_split(folder, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One split as Fashion-MNIST lays it out; the images raw, the labels gzip-compressed."""
    header = struct.pack(">4B3I", 0, 0, 8, 3, *images.shape)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4BI", 0, 0, 8, 1, len(labels)) + labels.tobytes())


def test_read_and_load_idx_files(tmp_path):
    floats = np.array([[1.5, -2.0], [3.0, 4.0]], ">f4")  # idx stores big-endian
    (tmp_path / "floats.idx").write_bytes(struct.pack(">4B2I", 0, 0, 0x0D, 2, 2, 2) + floats.tobytes())
    values = read_idx(tmp_path / "floats.idx")
    assert values.dtype == np.dtype("float32") and values.tolist() == [[1.5, -2.0], [3.0, 4.0]]
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_split(tmp_path, "train", images, np.array([0, 1, 9], np.uint8))
    x, y = load_idx_dataset(tmp_path, "train")
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0, 1, 9]
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images / 127.5 - 1).float())
    assert (x[..., :2, :] == -1).all() and (x[..., 30:, :] == -1).all() and (x[..., :, 30:] == -1).all()
    assert load_idx_dataset(tmp_path, "train", image_size=16)[0].shape == (3, 1, 16, 16)  # resized


def test_bad_idx_files_are_one_line_errors(tmp_path):
    _write_split(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03")
    (tmp_path / "short").write_bytes(struct.pack(">4B3I", 0, 0, 8, 3, 3, 28, 28) + bytes(10))
    odd = tmp_path / "odd"
    odd.mkdir()
    _write_split(odd, "train", np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8))
    for call, match in [
        (lambda: read_idx(tmp_path / "magic"), "is not an idx file"),
        (lambda: read_idx(tmp_path / "short"), "is truncated: expected 2352 data bytes, found 10"),
        (lambda: read_idx(tmp_path / "nope"), "idx file not found"),
        (lambda: load_idx_dataset(tmp_path, "val"), "split must be 'train' or 'test'"),
        (lambda: load_idx_dataset(tmp_path, "test"), "no t10k-images-idx3-ubyte\\[.gz\\] in"),
        (lambda: load_idx_dataset(tmp_path / "nope"), "dataset folder not found"),
        (lambda: load_idx_dataset(odd), "inconsistent idx files"),
    ]:
        with pytest.raises(DitqError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
