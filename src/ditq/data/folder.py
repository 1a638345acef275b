"""An ImageNet-style folder of images, one subfolder per class, preprocessed as ADM and DiT do.

    root/
      n01440764/  img1.JPEG  img2.JPEG ...
      n01443537/  ...

Class names are the subfolder names, sorted; the label of a class is its
position in that order (so ImageNet's synset folders give the standard
labels). Images are converted to RGB (or to grey with ``channels=1``)
whatever their mode, center-cropped with ADM's :func:`center_crop_arr`, and
mapped to [-1, 1]; a random horizontal flip is optional.

The flip is a pure function of ``(seed, key)``: item ``key`` of the dataset is
image ``key % len(dataset)`` of epoch ``key // len(dataset)``. A sampler that
hands out such keys (:class:`ditq.train.sampler.ResumableSampler` does) gets
a fresh flip per epoch that is the same in every DataLoader worker and after
a resume, with no RNG state to carry.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ditq.errors import DitqError, InvalidArgumentError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (openai/guided-diffusion ``image_datasets.py``, used by DiT): a square uint8 array.

    Halve the image with BOX filtering while its short side is at least twice
    ``image_size`` (cheap, alias-free downsampling), resize with BICUBIC so
    the short side is ``image_size``, then cut the central square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class ImageFolderDataset(Dataset):
    """Class-subfolder images as ``(image (C, S, S) float32 in [-1, 1], label int)``.

    Files are checked when the dataset is built (their header is read, which
    is cheap): unreadable ones are skipped and counted in a one-line warning.
    Set ``check_files=False`` to skip the check on very large folders; an
    unreadable file then raises a :class:`DitqError` naming it when loaded.
    """

    epoch_keys = True  # item ``key`` is image ``key % len`` of epoch ``key // len`` (see the module doc)

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 256,
        *,
        channels: int = 3,
        random_flip: bool = True,
        seed: int = 0,
        check_files: bool = True,
    ):
        if image_size < 1:
            raise InvalidArgumentError(f"image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise InvalidArgumentError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip
        self.seed = seed
        if not self.root.is_dir():
            raise DitqError(
                f"image folder not found: {self.root}; give a folder with one subfolder of images per class"
            )
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise DitqError(
                f"no class subfolders in {self.root}; images must be in root/<class name>/<image file>"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in _image_files(self.root / name)
        ]
        if not samples:
            raise DitqError(
                f"no images found in the class subfolders of {self.root} "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.num_skipped = 0
        if check_files:
            readable, bad = [], []
            for path, label in samples:
                (readable if _readable(path) else bad).append((path, label))
            if bad:
                self.num_skipped = len(bad)
                warnings.warn(
                    f"skipped {len(bad)} unreadable of {len(samples)} image files in {self.root} "
                    f"(first: {bad[0][0]})",
                    stacklevel=2,
                )
            if not readable:
                raise DitqError(f"none of the {len(samples)} image files in {self.root} can be read")
            samples = readable
        self.samples: list[tuple[Path, int]] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        key = int(key)
        if key < 0:
            raise IndexError(f"negative key {key}")
        path, label = self.samples[key % len(self.samples)]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise DitqError(f"cannot read image {path}: {e}; remove or replace the file") from None
        arr = center_crop_arr(im, self.image_size)
        if self.random_flip and flip_bit(self.seed, key):
            arr = arr[:, ::-1]
        x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)  # astype copies: writable, contiguous
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, S, S)
        return x, label


def flip_bit(seed: int, key: int) -> bool:
    """A fair coin from ``(seed, key)`` (splitmix64 finalizer): same answer in every process."""
    z = (seed * 0x9E3779B97F4A7C15 + key + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return bool((z ^ (z >> 31)) & 1)


def _image_files(folder: Path) -> list[Path]:
    # Recursive and sorted, so the order (and thus every index) is the same on every machine.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _readable(path: Path) -> bool:
    # Image.open parses the header only; decoding errors past it surface when the item is loaded.
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018
        return True
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
