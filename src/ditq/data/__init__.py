"""Datasets that need no download (synthetic), readers of standard formats (idx), image folders.

- :func:`load_synthetic_dataset`: ten procedurally drawn shape classes, any size, from a seed.
- :func:`load_idx_dataset`: MNIST / Fashion-MNIST idx files.
- :class:`ImageFolderDataset`: an ImageNet-style folder, center-cropped as ADM and DiT do.
- :func:`extract_latents` / :class:`LatentDataset`: VAE latents encoded once into
  safetensors shards (``ditq extract-latents``), and read back for training.
"""

from ditq.data.folder import ImageFolderDataset, center_crop_arr
from ditq.data.idx import FASHION_MNIST_CLASSES, load_idx_dataset, read_idx
from ditq.data.latents import LatentDataset, extract_latents, read_manifest
from ditq.data.synthetic import SYNTHETIC_CLASSES, load_synthetic_dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SYNTHETIC_CLASSES",
    "ImageFolderDataset",
    "LatentDataset",
    "center_crop_arr",
    "extract_latents",
    "load_idx_dataset",
    "load_synthetic_dataset",
    "read_idx",
    "read_manifest",
]
