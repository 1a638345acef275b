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

from ditq.formats.loader import (
    EMBEDDED_MODELS,
    checkpoint_path,
    describe,
    embedded_model_path,
    is_quantized,
    kind,
    load,
    save,
    skeleton,
)

__all__ = [
    "EMBEDDED_MODELS",
    "checkpoint_path",
    "describe",
    "embedded_model_path",
    "is_quantized",
    "kind",
    "load",
    "save",
    "skeleton",
]
