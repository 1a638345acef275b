"""Datasets that need no download (synthetic), readers of standard formats (idx), image folders.

- :func:`load_synthetic_dataset`: ten procedurally drawn shape classes, any size, from a seed.
- :func:`load_idx_dataset`: MNIST / Fashion-MNIST idx files.
- :class:`ImageFolderDataset`: an ImageNet-style folder, center-cropped as ADM and DiT do.
"""

from ditq.data.folder import ImageFolderDataset, center_crop_arr
from ditq.data.idx import FASHION_MNIST_CLASSES, load_idx_dataset, read_idx
from ditq.data.synthetic import SYNTHETIC_CLASSES, load_synthetic_dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SYNTHETIC_CLASSES",
    "ImageFolderDataset",
    "center_crop_arr",
    "load_idx_dataset",
    "load_synthetic_dataset",
    "read_idx",
]
