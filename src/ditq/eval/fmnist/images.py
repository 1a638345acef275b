"""Images and labels in: what FID-FMNIST accepts, and the one scaling it feeds the classifier.

Images are uint8 (N, 32, 32, 1) (also (N, 32, 32), and 28x28, which is
zero-padded to 32x32 exactly as :func:`ditq.data.load_idx_dataset` pads;
RGB with three equal channels, as ``.npz`` sample batches store grayscale, is
taken too). Pixels go to ``u / 127.5 - 1``, the scaling of the training data.
Anything else is a one-line :class:`~ditq.errors.InvalidArgumentError`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ditq.errors import InvalidArgumentError
from ditq.eval.fmnist.classifier import NUM_CLASSES

IMAGE_SIZE = 32


def check_images(images, name: str = "images") -> np.ndarray:
    """uint8 grayscale images as (N, 32, 32, 1); 28x28 is zero-padded, equal-channel RGB made gray.

    Accepts numpy arrays or tensors shaped (N, H, W), (N, H, W, 1) or
    (N, H, W, 3) with three equal channels, H = W = 28 or 32, dtype uint8.
    Anything else is a one-line :class:`InvalidArgumentError`.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InvalidArgumentError(
            f"{name} must be uint8 pixels 0-255, got {images.dtype}; convert with ditq.images.to_uint8"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise InvalidArgumentError(
            f"{name} must be grayscale NHWC (N, 32, 32, 1) or (N, 28, 28, 1), got shape {images.shape}"
        )
    if images.shape[1] not in (28, IMAGE_SIZE):
        raise InvalidArgumentError(
            f"{name} are {images.shape[1]}x{images.shape[2]}; FID-FMNIST takes 32x32 or 28x28 images"
        )
    if len(images) == 0:
        raise InvalidArgumentError(f"{name} holds no images")
    if images.shape[-1] == 3:
        # Sample batches store grayscale as RGB (the channel repeated); anything else is colour.
        if not ((images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()):
            raise InvalidArgumentError(
                f"{name} are colour images (their RGB channels differ); FID-FMNIST takes grayscale images"
            )
        images = images[..., :1]
    if images.shape[1] == 28:  # as load_idx_dataset: a 2-pixel black border
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return np.ascontiguousarray(images)


def check_labels(labels, num_images: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Integer labels (N,) in ``[0, num_classes)``, one per image, as int64."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not (
        np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_
    ):
        raise InvalidArgumentError(
            f"labels must be one integer per image ({num_images},), got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InvalidArgumentError(f"label {int(bad[0])} is out of range 0..{num_classes - 1}")
    return labels


def to_model_input(batch: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 32, 32, 1) -> float32 (B, 1, 32, 32) ``u / 127.5 - 1``: exactly the training data's scale."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # B, 1, 32, 32


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``images``, ``batch_size`` long (the last one shorter)."""
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]
