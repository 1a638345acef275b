"""Checkpoint formats: one module per format, and the loader and saver that dispatch among them.

    loader          load / save / describe / kind / skeleton: the doors (``ditq.load``,
                    ``ditq.save``, ``ditq info``), dispatching on what a file is
    build           building the model a file describes on the meta device; misfit errors
    pickles         safe ``torch.load(weights_only=True)`` with one-line errors
    official_dit    official DiT weights by name (cached download), state dicts, training checkpoints
    official_terdit official TerDiT folders (packed ternary weights, label order)
    ditq_float      ditq safetensors: model_config metadata, full-precision models
    qdit            Q-DiT checkpoints (integer codes, group parameters)
    ternary         ternary checkpoints (packed 2-bit "k4" codes, per-layer scales)

``formats`` wires ``models`` and ``quant`` together; neither imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOADER_NAMES = (
    "EMBEDDED_MODELS",
    "checkpoint_path",
    "describe",
    "embedded_model_path",
    "is_quantized",
    "kind",
    "load",
    "save",
    "skeleton",
)

__all__ = list(_LOADER_NAMES)


def __getattr__(name: str) -> Any:
    # The loader imports models and quant; reaching it on first use lets ditq.formats.pickles
    # (the training loop reads its states through it) be imported without them.
    if name in _LOADER_NAMES:
        value = getattr(importlib.import_module("ditq.formats.loader"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditq.formats' has no attribute {name!r}")
