"""Images and labels in (ditq.eval.fmnist.images): padding like the training data, gray layouts,
one-line errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from fmnist_helpers import one_line, textures, tiny_evaluator

from ditq.errors import InvalidArgumentError
from ditq.eval.fmnist import check_images, to_model_input


def test_check_images_pads_28_like_the_training_data_and_takes_gray_layouts():
    images, _ = textures(4, 0)
    padded = check_images(images)
    assert padded.shape == (4, 32, 32, 1) and padded.dtype == np.uint8
    assert (padded[:, 2:30, 2:30, 0] == images).all()
    assert (padded[:, :2] == 0).all() and (padded[:, :, 30:] == 0).all()
    assert (check_images(images[..., None]) == padded).all()
    rgb = np.repeat(padded, 3, axis=-1)  # how .npz sample batches store grayscale
    assert (check_images(rgb) == padded).all()
    assert (check_images(torch.from_numpy(padded)) == padded).all()
    x = to_model_input(padded)
    assert x.shape == (4, 1, 32, 32) and x.min() == -1.0 and x.max() <= 1.0


def test_preprocessing_equals_load_idx_dataset(tmp_path):
    from ditq.data import load_idx_dataset

    images, labels = textures(6, 3)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 6, 28, 28) + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 6) + labels.astype(np.uint8).tobytes())
    x, _ = load_idx_dataset(tmp_path, "test")
    torch.testing.assert_close(to_model_input(check_images(images)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 32, 32, 1), np.float32), "uint8"),
        (np.zeros((2, 32, 32, 2), np.uint8), "grayscale"),
        (np.zeros((2, 16, 16, 1), np.uint8), "16x16"),
        (np.zeros((2, 32, 28, 1), np.uint8), "grayscale"),
        (np.zeros((32, 32), np.uint8), "grayscale"),
        (np.zeros((0, 32, 32, 1), np.uint8), "no images"),
        (np.stack([np.zeros((2, 32, 32)), np.ones((2, 32, 32)), np.zeros((2, 32, 32))], -1).astype(np.uint8),
         "colour"),
    ],
)  # fmt: skip
def test_bad_images_are_one_line_errors(images, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        check_images(images)
    one_line(e)


def test_bad_labels_are_one_line_errors():
    images, _ = textures(4, 0)
    ev = tiny_evaluator(images)
    for labels, match in (
        (np.zeros(3, np.int64), "one integer per image"),
        (np.zeros(4, np.float32), "one integer per image"),
        (np.array([0, 1, 2, 10]), "out of range"),
        (np.array([0, -1, 2, 3]), "out of range"),
    ):
        with pytest.raises(InvalidArgumentError, match=match) as e:
            ev.evaluate(images, labels)
        one_line(e)
    with pytest.raises(InvalidArgumentError, match="at least 2") as e:
        ev.evaluate(images[:1])
