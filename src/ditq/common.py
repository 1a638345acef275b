"""Small shared plumbing: downloads with a progress bar, and device selection.

Used by ``models`` (official DiT weights), ``eval`` (Inception weights) and the
pipelines; it imports nothing from ditq but the errors.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import torch

from ditq.errors import InvalidArgumentError


def show_progress(progress: bool | None) -> bool:
    """``progress`` if given, else: on rank 0 only, and only when stderr is a terminal."""
    if progress is not None:
        return progress
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() != 0:
            return False
    return sys.stderr.isatty()


def fetch_url(url: str, dst: Path, *, progress: bool | None = None) -> None:
    """Write the content at ``url`` to ``dst`` (with a progress bar). Raises OSError on failure.

    Module-level so tests (and offline setups) can replace it.
    """
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "ditq"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dst, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            disable=not show_progress(progress),
        ) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and f.tell() != total:
            raise OSError(f"connection closed after {f.tell()} of {total} bytes")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"bad device '{device}': {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device '{device}' asked for, but CUDA is not available; use --device cpu"
        )
    return device
