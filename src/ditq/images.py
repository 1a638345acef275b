"""Images out of a sampler: uint8 conversion, ADM ``.npz`` batches and labelled PNG grids.

Sample batches follow the ADM evaluator's format (openai/guided-diffusion):
``arr_0`` uint8 NHWC RGB images, ``arr_1`` the class labels. Every write is
atomic (a temporary file in the same folder, then a rename), so a killed run
never leaves half a file behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ditq.checkpoint import atomic_write
from ditq.errors import InvalidArgumentError

# Output suffixes the sample command understands, and what each one writes.
OUTPUT_FORMATS = {".npz": "npz", ".png": "grid", ".jpg": "grid", ".jpeg": "grid"}


def output_format(path: str | os.PathLike) -> str:
    """``"npz"`` or ``"grid"`` from the suffix of ``path``; any other suffix is an error."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InvalidArgumentError(
            f"cannot tell what to write from '{path}': use a suffix among {', '.join(OUTPUT_FORMATS)}"
        )
    return OUTPUT_FORMATS[suffix]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C) with DiT's rule ``clamp(127.5 x + 128, 0, 255)``.

    The cast truncates, exactly as DiT's ``sample_ddp.py`` does, so our
    sample batches agree with theirs bit for bit.
    """
    if images.ndim != 4:
        raise InvalidArgumentError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W) grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InvalidArgumentError(
            f"images must be (N, H, W, C) with 1 or 3 channels, got shape {tuple(images.shape)}"
        )
    if images.dtype != np.uint8:
        raise InvalidArgumentError(f"images must be uint8 (use ditq.images.to_uint8), got {images.dtype}")
    return images


def save_npz(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    what: str = "sample batch",
) -> Path:
    """Write an ADM sample batch: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels (when given).

    Grayscale images are written as RGB (the channel repeated), because the
    ADM evaluator and its reference batches are RGB. Returns the path.
    ``what`` names the file in the one-line error of a full disk or a
    read-only folder (see :func:`ditq.checkpoint.atomic_write`).
    """
    images = _as_nhwc(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise InvalidArgumentError(
                f"need one label per image: {len(images)} images, labels {labels.shape}"
            )
        arrays["arr_1"] = labels
    path = Path(path)
    with (
        atomic_write(path, what, size_hint=images.nbytes + 8 * len(images) + 1024) as tmp,
        open(tmp, "wb") as f,
    ):
        np.savez(f, **arrays)  # a file object, so numpy does not append another ".npz"
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    # Shorten a caption until it fits under its tile, marking the cut with a dot.
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + ".", font=font) > width:
        text = text[:-1]
    return text + "."


def make_grid(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    nrow: int | None = None,
    padding: int = 2,
    scale: int | None = None,
):
    """A PIL image tiling ``images`` (uint8 NHWC), ``nrow`` per row, with optional captions.

    With ``labels``, each tile gets a caption: ``class_names[label]`` when
    names are given, else the label number. ``scale`` enlarges tiles by an
    integer factor (nearest neighbour); by default, captioned tiles are scaled
    to at least 64 pixels wide so that the captions fit.
    """
    from PIL import Image, ImageDraw

    images = _as_nhwc(images)
    n, h, w, c = images.shape
    if n == 0:
        raise InvalidArgumentError("no images to put in a grid")
    if labels is not None and len(labels) != n:
        raise InvalidArgumentError(f"need one label per image: {n} images, {len(labels)} labels")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise InvalidArgumentError(f"nrow must be positive, got {nrow}")
    nrows = math.ceil(n / nrow)
    if scale is None:
        scale = max(1, math.ceil(64 / w)) if labels is not None else 1
    if scale < 1:
        raise InvalidArgumentError(f"scale must be positive, got {scale}")
    th, tw = h * scale, w * scale

    font = _font(max(8, min(12, tw // 6))) if labels is not None else None
    caption_h = 0
    if font is not None:
        top, bottom = font.getbbox("Ag")[1::2]
        caption_h = bottom - top + 4
    mode = "L" if c == 1 else "RGB"
    white = 255 if c == 1 else (255, 255, 255)
    black = 0 if c == 1 else (0, 0, 0)
    cols = min(nrow, n)
    grid = Image.new(
        mode,
        (padding + cols * (tw + padding), padding + nrows * (th + caption_h + padding)),
        white,
    )
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, col = divmod(i, nrow)
        x0, y0 = padding + col * (tw + padding), padding + r * (th + caption_h + padding)
        tile = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
        if scale > 1:
            tile = tile.resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x0, y0))
        if font is not None:
            label = int(labels[i])
            text = (
                class_names[label]
                if class_names is not None and 0 <= label < len(class_names)
                else str(label)
            )
            text = _fit(draw, text, font, tw)
            tx = x0 + (tw - draw.textlength(text, font=font)) / 2
            draw.text((tx, y0 + th + 1), text, fill=black, font=font)
    return grid


def save_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    nrow: int | None = None,
    padding: int = 2,
    scale: int | None = None,
) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` (PNG, or JPEG by suffix); returns the path."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(f"a grid is written as .png or .jpg, not '{path.name}'")
    grid = make_grid(images, labels, class_names, nrow=nrow, padding=padding, scale=scale)
    with atomic_write(path) as tmp:
        grid.save(tmp, format=fmt)
    return path


def describe_npz(path: str | os.PathLike) -> dict:
    """Name, shape and dtype of every array in an ``.npz`` (headers only, however large the file)."""
    import zipfile

    path = Path(path)
    if not path.exists():
        raise InvalidArgumentError(f"no such file: {path}")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)
                arrays[name[: -len(".npy")]] = {"shape": list(shape), "dtype": str(dtype)}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InvalidArgumentError(f"{path} is not a readable .npz file ({e})") from None
    kind = "ADM sample batch" if "arr_0" in arrays else "npz arrays"
    return {"path": str(path), "format": kind, "file_size": path.stat().st_size, "arrays": arrays}
