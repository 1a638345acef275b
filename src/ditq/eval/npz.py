"""ADM ``.npz`` files for evaluation: sample batches in, reference batches in and out.

A **sample batch** is what ``ditq sample`` (and ADM/DiT's ``sample_ddp.py``)
writes: ``arr_0`` uint8 (N, H, W, 3) images, optionally ``arr_1`` labels;
write one with :func:`ditq.images.save_npz`.

A **reference batch** is what the ADM evaluator compares against (e.g.
``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images (used for Precision
and Recall), and the Inception statistics ``mu``, ``sigma`` (pool, 2048-d)
and ``mu_s``, ``sigma_s`` (spatial, 2023-d). Statistics found in the file
are used as they are, never recomputed, exactly as ADM does.

Images are read in batches straight from the zip member, so a 50,000-image
batch (10 GB at 256 px) never needs to fit in memory (ADM streams it too).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditq.checkpoint import atomic_write
from ditq.errors import InvalidArgumentError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InvalidArgumentError(f"no such file: {path}")
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a folder, not an .npz file")
    if not zipfile.is_zipfile(path):
        raise InvalidArgumentError(
            f"{path} is not an .npz file (not a zip archive, or cut off); check the path or write it again"
        )


@contextmanager
def _open_member(path: Path, key: str):
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise InvalidArgumentError(
                    f"{path} has no '{key}' array (it has: {', '.join(names) or 'none'})"
                )
            with zf.open(f"{key}.npy") as f:
                yield f
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidArgumentError(f"{path} is not a readable .npz file ({e})") from None


def _read_header(f, path: Path, key: str):
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        return read(f)
    except ValueError as e:
        raise InvalidArgumentError(f"{path}: '{key}' is not a valid .npy array ({e})") from None


def _check_images_header(path: Path, shape, dtype, key: str = "arr_0") -> None:
    shape = tuple(shape)
    if len(shape) != 4:
        raise InvalidArgumentError(f"{path}: '{key}' must be images (N, H, W, 3), got shape {shape}")
    if shape[-1] != 3:
        if shape[-1] == 1:
            raise InvalidArgumentError(
                f"{path}: '{key}' holds grayscale images {shape}; write RGB (ditq.images.save_npz repeats "
                "the channel) so that they compare with RGB references"
            )
        raise InvalidArgumentError(f"{path}: '{key}' must be NHWC images with 3 channels, got shape {shape}")
    if np.dtype(dtype) != np.uint8:
        raise InvalidArgumentError(
            f"{path}: '{key}' must be uint8 images 0-255, got {np.dtype(dtype)}; "
            "convert with ditq.images.to_uint8"
        )
    if shape[0] == 0:
        raise InvalidArgumentError(f"{path}: '{key}' holds no images")


@dataclass
class ImageArray:
    """The ``arr_0`` images of an ``.npz``: shape known from the header, pixels read in batches."""

    path: Path
    shape: tuple[int, int, int, int]
    key: str = "arr_0"

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches in file order, the last one possibly shorter."""
        if batch_size < 1:
            raise InvalidArgumentError(f"batch size must be positive, got {batch_size}")
        with _open_member(self.path, self.key) as f:
            shape, fortran, dtype = _read_header(f, self.path, self.key)
            if fortran or dtype.hasobject:  # not a plain C array: read it whole
                images = np.load(self.path)[self.key]
                for i in range(0, len(images), batch_size):
                    yield np.ascontiguousarray(images[i : i + batch_size])
                return
            for i in range(0, shape[0], batch_size):
                # readinto a fresh array: no extra copy, and the batch is writable
                batch = np.empty((min(batch_size, shape[0] - i), *shape[1:]), dtype=dtype)
                view, got = memoryview(batch).cast("B"), 0
                while got < len(view) and (n := f.readinto(view[got:])):
                    got += n
                if got != len(view):
                    raise InvalidArgumentError(
                        f"{self.path}: '{self.key}' is truncated (at image {i + got // batch[0].nbytes} of "
                        f"{shape[0]}); the file was cut off while being written or copied"
                    )
                yield batch

    def read(self) -> np.ndarray:
        """All images at once (mind the memory: N x H x W x 3 bytes)."""
        return np.concatenate(list(self.batches(max(1, min(len(self), 1024)))), axis=0)


def open_images(path: str | os.PathLike, key: str = "arr_0") -> ImageArray:
    """The checked ``key`` images of an ``.npz`` (uint8 NHWC RGB), headers read, pixels not yet."""
    path = Path(path)
    _check_file(path)
    with _open_member(path, key) as f:
        shape, _, dtype = _read_header(f, path, key)
    _check_images_header(path, shape, dtype, key)
    return ImageArray(path, tuple(int(s) for s in shape), key)


def read_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """An ADM sample batch: ``(images, labels)``, images uint8 (N, H, W, 3), labels int64 (N,) or None."""
    images = open_images(path).read()
    labels = None
    with np.load(path) as data:
        if "arr_1" in data.files:
            labels = np.asarray(data["arr_1"])
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise InvalidArgumentError(
                    f"{path}: 'arr_1' must hold one integer label per image, "
                    f"got {labels.dtype} {labels.shape}"
                )
            labels = labels.astype(np.int64, copy=False)
    return images, labels


@dataclass
class Reference:
    """An ADM reference batch: its images (if any) and Inception statistics (those present)."""

    path: Path
    images: ImageArray | None
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_pool_stats(self) -> bool:
        return "mu" in self.stats and "sigma" in self.stats

    @property
    def has_spatial_stats(self) -> bool:
        return "mu_s" in self.stats and "sigma_s" in self.stats


def _check_stats(path, mu: np.ndarray, sigma: np.ndarray, names: tuple[str, str]) -> None:
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InvalidArgumentError(
            f"{path}: '{names[0]}' {mu.shape} and '{names[1]}' {sigma.shape} are not a (D,) mean and "
            "a (D, D) covariance"
        )
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise InvalidArgumentError(f"{path}: '{names[0]}' and '{names[1]}' must be floating point")


def read_reference(path: str | os.PathLike) -> Reference:
    """Read an ADM reference batch: its statistics now, its ``arr_0`` images lazily (see :class:`ImageArray`).

    A mean without its covariance (or the reverse) is an error; a file with
    neither statistics nor images cannot serve as a reference.
    """
    path = Path(path)
    _check_file(path)
    try:
        with np.load(path) as data:
            files = set(data.files)
            stats = {k: np.asarray(data[k]) for k in STAT_KEYS if k in files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InvalidArgumentError(f"{path} is not a readable .npz file ({e})") from None
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in stats) != (sigma in stats):
            have, lack = (mu, sigma) if mu in stats else (sigma, mu)
            raise InvalidArgumentError(f"{path} has '{have}' but no '{lack}'; a reference needs both")
        if mu in stats:
            _check_stats(path, stats[mu], stats[sigma], (mu, sigma))
    images = open_images(path) if "arr_0" in files else None
    if images is None and not stats:
        raise InvalidArgumentError(
            f"{path} has neither images ('arr_0') nor statistics ('mu', 'sigma', 'mu_s', 'sigma_s'); "
            "it is not an ADM reference batch"
        )
    return Reference(path, images, stats)


def write_reference(
    path: str | os.PathLike,
    *,
    images: np.ndarray | None = None,
    mu: np.ndarray | None = None,
    sigma: np.ndarray | None = None,
    mu_s: np.ndarray | None = None,
    sigma_s: np.ndarray | None = None,
) -> Path:
    """Write an ADM reference batch (atomically): ``arr_0`` images and/or the statistics given.

    Images must be uint8 (N, H, W, 3); each mean comes with its covariance.
    The statistics are stored as float64. The ADM evaluator reads the result.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    if images is not None:
        images = np.asarray(images)
        _check_images_header(path, images.shape, images.dtype, "images")
        arrays["arr_0"] = np.ascontiguousarray(images)
    given = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (given[m] is None) != (given[s] is None):
            raise InvalidArgumentError(f"give '{m}' and '{s}' together (a mean and its covariance)")
        if given[m] is not None:
            arrays[m] = np.asarray(given[m], dtype=np.float64)
            arrays[s] = np.asarray(given[s], dtype=np.float64)
            _check_stats(path, arrays[m], arrays[s], (m, s))
    if not arrays:
        raise InvalidArgumentError("a reference needs images or statistics; got neither")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object, so numpy does not append another ".npz"
    return path
