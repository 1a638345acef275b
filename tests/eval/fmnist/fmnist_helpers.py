"""Shared by the tests of ditq.eval.fmnist: separable texture images, a tiny classifier and evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.eval import metrics as M
from ditq.eval.fmnist import (
    FEATURE_KEY,
    FMNISTClassifier,
    FMNISTClassifierConfig,
    FMNISTEvaluator,
    FMNISTTrainConfig,
)

TINY = FMNISTClassifierConfig(widths=(8, 16))
FAST = FMNISTTrainConfig(epochs=3, batch_size=32, lr=1e-2, max_shift=0)


def textures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images of 10 separable classes (a periodic 4x4 texture each, shifted, noisy)."""
    tiles = np.random.default_rng(1234).integers(0, 2, (10, 4, 4)) * 200
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = np.tile(tiles[labels], (1, 7, 7))
    shifts = rng.integers(0, 4, (n, 2))
    images = np.stack([np.roll(im, tuple(s), axis=(0, 1)) for im, s in zip(images, shifts, strict=True)])
    return np.clip(images + rng.integers(0, 50, images.shape), 0, 255).astype(np.uint8), labels


def tiny_evaluator(images: np.ndarray, seed: int = 0) -> FMNISTEvaluator:
    """An untrained tiny classifier whose reference statistics are those of ``images``."""
    torch.manual_seed(seed)
    model = FMNISTClassifier(TINY).eval()
    ev = FMNISTEvaluator(model, np.zeros(16), np.eye(16))
    ev.mu, ev.sigma = M.feature_statistics(ev.extract(images)[FEATURE_KEY])
    return ev


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message
