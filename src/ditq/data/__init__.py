"""Datasets that need no download (synthetic) and readers of standard formats (idx)."""

from ditq.data.idx import FASHION_MNIST_CLASSES, load_idx_dataset, read_idx

__all__ = ["FASHION_MNIST_CLASSES", "load_idx_dataset", "read_idx"]
