"""ditq float checkpoints: safetensors with the model config in the ``"ditq"`` metadata.

The container (atomic writes, header-only reads, ``format_version``) is
:mod:`ditq.checkpoint`. This module adds what every ditq model file carries
-- ``model_config``, ``ditq_version`` and the ``command`` that made it -- and
reads full-precision ones back. Quantized files add ``quant_kind`` and their
own tensors (:mod:`ditq.formats.qdit`, :mod:`ditq.formats.ternary`) and are
written through :func:`write` too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq.errors import InvalidArgumentError
from ditq.formats import build

PathLike = str | os.PathLike

FORMAT = "ditq-safetensors"
"""``describe()["format"]`` of every ditq checkpoint (float or quantized; ``quant_kind`` tells them apart)."""

RESERVED = ("format_version", "model_config", "ditq_version")
"""Metadata keys ditq writes itself; ``extra_metadata`` cannot set them."""


def write(
    model: nn.Module,
    path: PathLike,
    *,
    command: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    what: str = "checkpoint",
) -> Path:
    """Write ``model`` (its ``config`` and state dict) as a ditq checkpoint, atomically.

    ``command`` records what made the file (the CLI passes its command line);
    ``extra_metadata`` adds JSON-serializable entries (``quant_config``, ...);
    ``state_dict`` replaces ``model.state_dict()`` (e.g. with packed codes);
    ``what`` names the file in the one-line error of a failed write.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise InvalidArgumentError(
            f"{type(model).__name__} has no .config with to_dict(); build it with ditq.models"
        )
    from ditq import __version__

    metadata: dict[str, Any] = {"model_config": config.to_dict(), "ditq_version": __version__}
    if command is not None:
        metadata["command"] = command
    for k, v in (extra_metadata or {}).items():
        if k in RESERVED:
            raise InvalidArgumentError(f"extra_metadata cannot set '{k}'; ditq writes it")
        metadata[k] = v
    ckpt.save_checkpoint(path, model.state_dict() if state_dict is None else state_dict, metadata, what=what)
    return Path(path)


def load(path: Path, meta: Mapping[str, Any]) -> nn.Module:
    """The full-precision model of a ditq checkpoint whose metadata is ``meta``, on the CPU."""
    config = build.config_from_metadata(meta, str(path))
    return build.build_model(config, ckpt.load_tensors(path), str(path))
