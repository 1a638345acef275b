"""Q-DiT checkpoints: integer codes and group parameters of every quantized layer, float rest.

A Q-DiT checkpoint is a ditq safetensors file (:mod:`ditq.formats.ditq_float`)
whose state dict holds, for every :class:`~ditq.quant.QuantLinear`, its
``qweight`` codes, ``w_scale``/``w_zero`` group parameters and static
``act_quant.lo/hi`` ranges, beside the float tensors of the rest. Its metadata
adds ``quant_kind: "qdit"`` and ``quant_config`` (the full
:class:`~ditq.quant.QDiTConfig`, per-layer map included).

``qweight`` holds the codes of layers of at most 4 bits packed two per byte
(uint8 ``[out, in/2]``, the int4 layout of :mod:`ditq.kernels.packing`,
symmetric codes as ``q + 8``; metadata ``qweight_layout: "int4"``) and those
of wider layers one per byte (uint8/int8 ``[out, in]``); files without
``qweight_layout`` (older ones) hold every layer's codes one per byte.

:func:`load` builds the model on the meta device and adopts the file's
tensors: no float weight of a quantized layer is ever allocated, and the
codes of layers of at most 4 bits stay packed in memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq import quant
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats import build, ditq_float
from ditq.quant.deployed import convert_
from ditq.quant.presets import set_module
from ditq.quant.state import load_quantized_state_dict, packed_state_dict

PathLike = str | os.PathLike

QUANT_KIND = "qdit"
"""``quant_kind`` in the metadata of a Q-DiT checkpoint (files without one but with a ``quant_config``
are Q-DiT files too: the first ones ditq wrote)."""

QWEIGHT_LAYOUTS = ("codes", "int4")
"""``qweight_layout`` values: codes one per byte everywhere (files without the key), or packed int4 codes
for layers of at most 4 bits (what :func:`save` writes)."""

CODES = "qweight"
"""State-dict suffix of a quantized layer's integer weight codes; its other tensors but the bias are
quantization parameters (``w_scale``, ``w_zero``, ``act_quant.lo/hi``)."""


def save(
    model: nn.Module,
    path: PathLike,
    config: quant.QDiTConfig,
    *,
    command: str | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Write a quantized model (codes, group parameters, float rest) with its configs, atomically.

    Codes of layers of at most 4 bits are written int4-packed (see the module doc); the model is
    not changed."""
    if not quant.quantized_layers(model):
        raise InvalidArgumentError("the model has no quantized layers; quantize it before saving it as Q-DiT")
    meta = {
        "quant_kind": QUANT_KIND,
        "quant_config": config.to_dict(),
        "qweight_layout": "int4",
        **(extra_metadata or {}),
    }
    return ditq_float.write(
        model, path, command=command, extra_metadata=meta, state_dict=packed_state_dict(model),
        what="quantized checkpoint",
    )  # fmt: skip


def load(path: PathLike, *, packed: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save`: same layers, codes and outputs, in eval mode, on the CPU.

    With ``packed`` (default) the codes of layers of at most 4 bits stay two per byte. Codes that do
    not fit the metadata (bit width, layout) are a one-line :class:`CheckpointError` naming the layer.
    """
    meta = ckpt.read_metadata(path)
    layout, qconfig = _read_quant_metadata(path, meta)
    model = build.meta_skeleton(build.config_from_metadata(meta, str(path)))
    try:
        load_quantized_state_dict(
            model, ckpt.load_tensors(path), qconfig, layout=layout, packed=packed, assign=True
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    build.check_all_set(model, str(path))
    for q in quant.quantized_layers(model).values():
        if q.bias is not None:  # an inference model: its layers need no gradient to run the kernels
            q.bias.requires_grad_(False)
    model.quant_config = qconfig
    return model.eval()


def skeleton(path: PathLike) -> nn.Module:
    """The model of a Q-DiT checkpoint on the meta device, its quantized layers swapped in (empty:
    nothing is read but the header)."""
    meta = ckpt.read_metadata(path)
    _, qconfig = _read_quant_metadata(path, meta)
    model = build.meta_skeleton(build.config_from_metadata(meta, str(path)))
    info, _ = ckpt.read_safetensors_header(path)
    for key in info:
        name = key[: -len("." + CODES)]
        if key.endswith("." + CODES) and isinstance(_submodule(model, name), nn.Linear):
            q = quant.QuantLinear.empty(model.get_submodule(name), qconfig.for_layer(name), layer=name)
            set_module(model, name, q)
    return convert_(model)


def sizes(path: PathLike) -> dict[str, Any]:
    """What a Q-DiT checkpoint weighs, from its header and the layer shapes of its model (built on meta).

    ``params`` (of the model it stands for, each quantized layer counted by its ``[out, in]``
    shape), ``layers``, ``weights`` (of the quantized layers), ``bits_per_weight`` (as stored) and
    ``bytes``: ``weight_codes``, ``quant_params`` (scales, zero points, activation ranges),
    ``float`` (every other tensor, biases included) and ``header``.
    """
    meta = ckpt.read_metadata(path)
    info, _ = ckpt.read_safetensors_header(path)
    suffix = "." + CODES
    layers = sorted(k[: -len(suffix)] for k in info if k.endswith(suffix))
    if not layers:
        raise CheckpointError(f"{path} has a quant_config but no quantized layer ({CODES} tensors)")
    modules = dict(build.meta_skeleton(build.config_from_metadata(meta, str(path))).named_modules())
    absent = [n for n in layers if not isinstance(getattr(modules.get(n), "weight", None), torch.Tensor)]
    if absent:
        raise CheckpointError(f"{path}: the model of its model_config has no layers {build.few(absent)}")

    def numel(k: str) -> int:
        return math.prod(int(s) for s in info[k]["shape"])

    def nbytes(k: str) -> int:
        return build.header_bytes(info[k])

    weights = sum(modules[n].weight.numel() for n in layers)
    codes = sum(nbytes(f"{n}{suffix}") for n in layers)
    prefixes = tuple(f"{n}." for n in layers)
    qparam_keys = [
        k for k in info if k.startswith(prefixes) and not k.endswith(suffix) and not k.endswith(".bias")
    ]
    float_keys = [k for k in info if not k.endswith(suffix) and k not in set(qparam_keys)]  # biases too
    tensor_bytes = sum(nbytes(k) for k in info)
    return {
        "params": weights + sum(numel(k) for k in float_keys),
        "layers": len(layers),
        "weights": weights,
        "bits_per_weight": 8 * codes / weights,
        "bytes": {
            "weight_codes": codes,
            "quant_params": sum(nbytes(k) for k in qparam_keys),
            "float": sum(nbytes(k) for k in float_keys),
            "header": Path(path).stat().st_size - tensor_bytes,
        },
    }


def _read_quant_metadata(path, meta: dict) -> tuple[str, quant.QDiTConfig]:
    """``(qweight_layout, QDiTConfig)`` of a Q-DiT file's metadata; one-line errors if they do not parse."""
    if meta.get("quant_kind", QUANT_KIND) != QUANT_KIND or "quant_config" not in meta:
        raise CheckpointError(f"{path} is not a Q-DiT checkpoint (quant_kind {meta.get('quant_kind')!r})")
    layout = meta.get("qweight_layout", "codes")
    if layout not in QWEIGHT_LAYOUTS:
        raise CheckpointError(
            f"{path}: qweight_layout {layout!r} is not one this ditq reads ({', '.join(QWEIGHT_LAYOUTS)}); "
            "a newer ditq wrote it"
        )
    try:
        qconfig = quant.QDiTConfig.from_dict(meta["quant_config"])
    except (InvalidArgumentError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: its quant_config does not parse: {e}") from None
    return layout, qconfig


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
