"""Batched feature extraction (ditq.eval.features): each key's rows stacked in image order as float32,
an extractor's missing or misshapen features as one-line errors, TF32 off inside and restored after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.eval.features import extract_features, no_tf32

BATCHES = [np.arange(8, dtype=np.uint8).reshape(2, 2, 2), np.arange(8, 12, dtype=np.uint8).reshape(1, 2, 2)]


def _extractor(batch: np.ndarray) -> dict:
    """Each image's first two pixels (a tensor) and its first pixel (an array)."""
    flat = batch.reshape(len(batch), -1)
    return {"pair": torch.from_numpy(flat[:, :2].astype(np.float32)), "first": flat[:, :1]}


def test_features_are_stacked_in_image_order():
    out = extract_features(iter(BATCHES), _extractor, ["pair", "first"], total=3, progress=False)
    assert out["pair"].dtype == out["first"].dtype == np.float32
    assert out["pair"].tolist() == [[0, 1], [4, 5], [8, 9]] and out["first"].ravel().tolist() == [0, 4, 8]


def test_bad_extractors_and_empty_input_are_one_line_errors():
    one_too_many = lambda b: {"pair": np.zeros((len(b) + 1, 2))}  # noqa: E731
    for batches, extractor, keys, match in [
        (BATCHES, _extractor, ["logits"], "gives no 'logits' features \\(it gives \\['first', 'pair'\\]\\)"),
        (BATCHES, one_too_many, ["pair"], "'pair' has shape \\(3, 2\\) for a batch of 2"),
        ([], _extractor, ["pair"], "no images to extract features from"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match) as e:
            extract_features(iter(batches), extractor, keys, progress=False)
        assert "\n" not in str(e.value)


def test_no_tf32_turns_tf32_off_inside_and_restores_it():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        with no_tf32():
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
