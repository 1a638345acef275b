"""Reading PyTorch pickles safely: ``torch.load(weights_only=True)``, one-line errors, nothing executed.

Official DiT and TerDiT checkpoints, original training checkpoints and ditq's
training states are pickles. They are read with ``weights_only=True`` only;
the one class let in beyond what that accepts is ``argparse.Namespace`` (the
``args`` of training checkpoints and TerDiT's ``model_args.pth``), which only
holds attribute values, so unpickling it runs no code of the file.

A file is untrusted input: whatever it holds (random bytes, text, a truncated
zip, a pickled class) becomes a :class:`~ditq.errors.CheckpointError` that
says what was found and what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditq.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
"""How a PyTorch file saved by ``torch.save`` (zip container, the default since 1.6) starts."""

PICKLE_PROTOCOL_OPCODE = 0x80
"""First byte of a pickle of protocol 2 or later (``torch.save``'s legacy format starts with one)."""


def looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` writes: a zip container, or a protocol-2+ pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or (len(head) >= 2 and head[0] == PICKLE_PROTOCOL_OPCODE)


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, letting ``argparse.Namespace`` in and nothing else.

    Every failure is one :class:`CheckpointError` line: not found, not a
    PyTorch file, truncated or corrupt, or a pickled class ditq does not load
    (named, with what to save instead).
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file; give the file's path")
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if not looks_like_torch_file(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a PyTorch file (torch.save) nor a safetensors file"
            f"{_empty_note(path)}; give a checkpoint's path"
        )
    try:
        return _load(path, allow_namespace=False)
    except pickle.UnpicklingError as e:
        blocked = blocked_global(e)
        if blocked != "argparse.Namespace":
            raise unpickle_error(path, blocked) from None
    # Original DiT training checkpoints keep their argparse Namespace in "args".
    try:
        return _load(path, allow_namespace=True)
    except pickle.UnpicklingError as e:
        raise unpickle_error(path, blocked_global(e)) from None


def _load(path: Path, *, allow_namespace: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # Legacy (non-zip) files make torch warn on stderr; the result or the error says it all.
            warnings.simplefilter("ignore")
            if allow_namespace:
                with torch.serialization.safe_globals([argparse.Namespace]):
                    return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except MemoryError:
        raise CheckpointError(
            f"checkpoint {path} claims more memory than this machine has; it is corrupt or not a checkpoint"
        ) from None
    except Exception as e:  # noqa: BLE001 -- an untrusted file can make the unpickler raise anything
        raise unreadable(path, e) from None


def blocked_global(e: Exception) -> str | None:
    """The ``module.Class`` that ``weights_only`` refused, from its error message; None if none."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else None


def unpickle_error(path: Path, blocked: str | None) -> CheckpointError:
    """The error for a pickle that does not load: damaged, or holding the class ``blocked``."""
    if blocked is None:  # not a pickle at all, or a damaged one
        return CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file (it does not unpickle); "
            "re-create or re-download it"
        )
    return CheckpointError(
        f"{path} contains a pickled {blocked}, which ditq does not load (it could run code); "
        "save only the tensors, e.g. torch.save(ckpt['ema'], path), and load that"
    )


def unreadable(path: Path, e: BaseException) -> CheckpointError:
    """The error for a PyTorch file that fails to read (truncated zip, bad records, ...)."""
    first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    first = first.split(". This is an internal")[0]  # drop torch's multi-sentence advice
    if isinstance(e, KeyError):  # the legacy unpickler indexes by opcode: a text file lands here
        first = "not a pickle"
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({first[:200]}); re-create or re-download it"
    )


def is_state_dict(obj: Any) -> bool:
    """A non-empty flat mapping of string names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def is_plain(v: Any) -> bool:
    """A JSON-like value (strings, numbers, bools, None, and lists/dicts of them): safe to show."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(is_plain(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and is_plain(x) for k, x in v.items())
    return False


def _empty_note(path: Path) -> str:
    try:
        return " (it is empty)" if path.stat().st_size == 0 else ""
    except OSError:
        return ""
