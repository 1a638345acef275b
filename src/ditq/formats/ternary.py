"""Ternary checkpoints (TerDiT QAT): the file ``ditq export`` writes, how it is read back, what it weighs.

A ternary checkpoint is a ditq safetensors checkpoint (:mod:`ditq.checkpoint`)
of a model whose ternary layers are packed :class:`~ditq.quant.TernaryLinear`:

**Tensors** (state-dict names of the model, unchanged):

=====================  ===========================  =============================================
``<layer>.weight``     uint8 ``[out, in/4]``        2-bit codes ``W̃ + 1`` (0, 1, 2; 3 never
                                                    occurs) in the ``"k4"`` layout of
                                                    :mod:`ditq.kernels.packing`: byte ``j`` of
                                                    row ``o`` holds inputs ``4j .. 4j+3`` of
                                                    output ``o`` in bits 1-0, 3-2, 5-4, 7-6
``<layer>.alphas``     float ``(1,)``               the layer's scale ``s`` (TerDiT's α; γ =
                                                    mean|W| for BitNet-style layers, frozen at
                                                    convert): ``W = s · W̃``
``<layer>.bias``       float ``[out]``              when the layer has one
everything else        float, its own shape          embedders, ``pos_embed``, norms (TerDiT's
                                                    adaLN RMSNorm gains), the final layer, ...
=====================  ===========================  =============================================

Floats are float32 as trained, or float16/bfloat16 with ``float_dtype``
(smaller; then outputs differ from the QAT model by that rounding).

**Metadata** (the ``"ditq"`` JSON): ``format_version``, ``model_config``,
``ditq_version`` and ``command`` as every ditq checkpoint; ``quant_kind:
"ternary"``; ``quant_config``: the :class:`~ditq.quant.TernaryQATConfig`
(``step: "convert"``; its ``act_bits`` is what the layers do to their inputs);
``ternary``: ``{"layout": "k4", "bits": 2, "code": "w+1", "float_dtype": ...,
"layers": [names of the ternary layers]}``.

**Loading** (:func:`load_ternary_into`) takes a model skeleton built on the
meta device, swaps the listed layers for empty ``TernaryLinear`` (still on
meta), checks every name, shape and dtype against the file's header, and
adopts the file's tensors with ``load_state_dict(assign=True)``: nothing but
what the file holds is ever allocated, so no full-precision ``[out, in]``
weight of a ternary layer exists at any point.

:func:`checkpoint_sizes` counts the bytes exactly (from the header alone for a
file) against the same model in float32 and bfloat16, and lists what stays in
floating point.

"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq import checkpoint as ckpt
from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.formats import build, ditq_float
from ditq.quant.fuse import fuse_
from ditq.quant.ternary import LAYOUT, TernaryLinear, TernaryQATConfig, TernaryQATLinear, empty_ternary_

QUANT_KIND = "ternary"
"""``quant_kind`` in the metadata of a ternary checkpoint."""

BITS = 2
"""Bits per packed ternary weight."""

CODE = "w+1"
"""How a ternary value is stored: code = W̃ + 1."""

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""What ``float_dtype`` may name: the dtype of every floating-point tensor in the file."""

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def ternary_metadata(
    model: nn.Module, config: TernaryQATConfig | None = None, float_dtype: str | None = None
) -> dict:
    """The ``quant_kind`` / ``quant_config`` / ``ternary`` metadata of a converted model.

    ``config`` defaults to a TernaryQATConfig with the layers' ``act_bits``.
    One-line errors for a model that still has QAT layers, has no ternary
    layer, or whose layers disagree with ``config.act_bits``.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (TernaryLinear, TernaryQATLinear))}
    qat = [n for n, m in layers.items() if isinstance(m, TernaryQATLinear)]
    if qat:
        raise InvalidArgumentError(
            f"the model still has {len(qat)} ternary QAT layers (e.g. {qat[0]}); convert it first: "
            "quantize_(model, TernaryQATConfig(step='convert'))"
        )
    if not layers:
        raise InvalidArgumentError(
            "the model has no ternary layers; prepare, train and convert it with TernaryQATConfig first"
        )
    act = {m.act_bits for m in layers.values()}
    if config is None:
        if len(act) > 1:
            raise InvalidArgumentError(
                f"the ternary layers mix act_bits {sorted(act, key=str)}; pass a config"
            )
        config = TernaryQATConfig(act_bits=next(iter(act)))
    elif act != {config.act_bits}:
        raise InvalidArgumentError(
            f"the ternary layers have act_bits {sorted(act, key=str)} but the config says {config.act_bits}"
        )
    return {
        "quant_kind": QUANT_KIND,
        "quant_config": replace(config, step="convert").to_dict(),
        "ternary": {
            "layout": LAYOUT,
            "bits": BITS,
            "code": CODE,
            "float_dtype": float_dtype or _float_dtypes_of(model.state_dict()),
            "layers": list(layers),
        },
    }


def save_ternary(
    model: nn.Module,
    path: PathLike,
    config: TernaryQATConfig | None = None,
    *,
    command: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    float_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a converted model (packed :class:`TernaryLinear` layers) as a ternary checkpoint, atomically.

    ``model.config.to_dict()`` is stored as ``model_config``; ``float_dtype``
    (``"float32"``, ``"float16"``, ``"bfloat16"``; default: as they are) casts every
    floating-point tensor. See the module doc for the layout.
    """
    config_obj = getattr(model, "config", None)
    if config_obj is None or not hasattr(config_obj, "to_dict"):
        raise InvalidArgumentError(
            f"{type(model).__name__} has no .config with to_dict(); build it with ditq.models"
        )
    cast = _float_dtype(float_dtype)
    meta = ternary_metadata(model, config, None if cast is None else _dtype_name(cast))
    clash = [k for k in (extra_metadata or {}) if k in meta]
    if clash:
        raise InvalidArgumentError(f"extra_metadata cannot set '{clash[0]}'; save_ternary writes it")
    state = model.state_dict()
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    return ditq_float.write(
        model, path, command=command, extra_metadata={**(extra_metadata or {}), **meta}, state_dict=state,
        what="ternary checkpoint",
    )  # fmt: skip


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def is_ternary_checkpoint(path: PathLike) -> bool:
    """True for a ditq safetensors file whose metadata says ``quant_kind: "ternary"``."""
    p = Path(path)
    if not p.is_file() or not ckpt.is_safetensors(p):
        return False
    try:
        return ckpt.read_metadata(p).get("quant_kind") == QUANT_KIND
    except CheckpointError:
        return False


def read_ternary_metadata(path: PathLike) -> tuple[dict, TernaryQATConfig, list[str]]:
    """``(metadata, quant config, ternary layer names)`` of a ternary checkpoint, validated (header only).

    One-line :class:`CheckpointError` for anything this ditq cannot load: another
    ``quant_kind``, a layout other than ``"k4"``, a bit width other than 2, a
    missing ``model_config`` or layer list, a ``quant_config`` that does not parse.
    """
    meta = ckpt.read_metadata(path)
    kind = meta.get("quant_kind")
    if kind != QUANT_KIND:
        what = f"a '{kind}' model" if kind else "no quant_kind"
        raise CheckpointError(f"{path} holds {what}, not a ternary one (quant_kind 'ternary')")
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{path} has no model_config in its metadata; re-export it with ditq export")
    info = meta.get("ternary")
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} has no 'ternary' entry (layout, bits, layers) in its metadata")
    if info.get("layout") != LAYOUT:
        raise CheckpointError(
            f"{path}: packed layout {info.get('layout')!r} is not supported; this ditq reads {LAYOUT!r} "
            "(see ditq.kernels.packing); re-export it with ditq export"
        )
    if info.get("bits") != BITS or info.get("code", CODE) != CODE:
        raise CheckpointError(
            f"{path}: ternary weights of {info.get('bits')!r} bits (code {info.get('code')!r}) are not "
            f"supported; this ditq reads {BITS}-bit codes {CODE}"
        )
    layers = info.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise CheckpointError(f"{path}: its metadata lists no ternary layers")
    try:
        config = TernaryQATConfig.from_dict(meta.get("quant_config") or {})
    except InvalidArgumentError as e:
        raise CheckpointError(f"{path}: its quant_config does not parse: {e}") from None
    return meta, config, layers


def load_ternary_into(
    skeleton: nn.Module, path: PathLike, *, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Fill a meta-device ``skeleton`` (the float model of the file's ``model_config``) from a ternary
    checkpoint: its ternary layers become :class:`TernaryLinear`, and every tensor is the file's.

    Floating-point tensors come back as ``dtype``. Names, shapes and dtypes are
    checked against the file's header before anything is read, and the tensors
    are adopted as they are (``assign=True``). Returns the skeleton, on the CPU, fused
    (:func:`~ditq.quant.fuse.fuse_`).
    """
    _, config, layers = read_ternary_metadata(path)
    if not all(t.is_meta for t in chain(skeleton.parameters(), skeleton.buffers())):
        raise InvalidArgumentError("build the skeleton on the meta device (with torch.device('meta'): ...)")
    modules = dict(skeleton.named_modules())
    absent = [n for n in layers if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        raise CheckpointError(
            f"{path} lists ternary layers that the model of its model_config has no linear for: "
            f"{build.few(absent)}"
        )
    try:
        empty_ternary_(skeleton, replace(config, step="convert"), include=layers, exclude=[])
    except InvalidArgumentError as e:
        raise CheckpointError(f"{path}: {e}") from None
    info, _ = ckpt.read_safetensors_header(path)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    _check_header(path, expected, info)
    tensors = ckpt.load_tensors(path)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in chain(skeleton.named_parameters(), skeleton.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the model has tensors no checkpoint holds ({build.few(left)})")
    return fuse_(skeleton)


def load(path: PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a ternary checkpoint, in eval mode on the CPU, its ternary layers packed.

    The model is built on the meta device and adopts the file's tensors
    (:func:`load_ternary_into`): the float weights of its ternary layers never
    exist. Floating-point tensors come back as ``dtype``.
    """
    meta, qconfig, _ = read_ternary_metadata(path)
    model = build.meta_skeleton(build.config_from_metadata(meta, str(path)))
    load_ternary_into(model, path, dtype=dtype)
    model.quant_config = qconfig
    return model.eval()


def skeleton(path: PathLike) -> nn.Module:
    """The model of a ternary checkpoint on the meta device, its ternary layers swapped in (header only)."""
    meta, tconfig, layers = read_ternary_metadata(path)
    model = build.meta_skeleton(build.config_from_metadata(meta, str(path)))
    empty_ternary_(model, replace(tconfig, step="convert"), include=layers, exclude=[])
    return model


def _check_header(path, expected: dict[str, tuple], info: dict[str, dict]) -> None:
    missing = [k for k in expected if k not in info]
    unexpected = [k for k in info if k not in expected]
    bad = []
    for k, (shape, dtype) in expected.items():
        if k not in info:
            continue
        found, found_dtype = tuple(info[k]["shape"]), build.HEADER_DTYPES.get(info[k]["dtype"], (None, 0))[0]
        if found != shape:
            what = " (packed 2-bit codes, 4 per byte)" if dtype == torch.uint8 else ""
            bad.append(f"{k}: expected {shape}{what}, found {found}")
        elif dtype.is_floating_point and not (found_dtype is not None and found_dtype.is_floating_point):
            bad.append(f"{k}: expected floating point, found {info[k]['dtype']}")
        elif not dtype.is_floating_point and found_dtype != dtype:
            want = "uint8 (packed 2-bit codes)" if dtype == torch.uint8 else str(dtype).removeprefix("torch.")
            bad.append(f"{k}: expected {want}, found {info[k]['dtype']}")
    problems = []
    if missing:
        problems.append(f"missing {build.few(missing)}")
    if unexpected:
        problems.append(f"unexpected {build.few(unexpected)}")
    if bad:
        problems.append(f"mismatched {build.few(bad)}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model of its own metadata: {'; '.join(problems)}")


# ----------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------


def checkpoint_sizes(source: PathLike | nn.Module) -> dict:
    """Exact bytes of a ternary checkpoint (a file, or a converted model as it would be saved).

    Returns ``tensor_bytes`` (all tensor data), ``file_bytes`` (files only:
    data + header), ``ternary`` (layers, weights, ``packed_bytes`` at 2 bits
    each, ``scale_bytes``, ``bias_bytes``, ``bits_per_weight``),
    ``full_precision`` (``params``, ``bytes`` and, per state-dict name with
    block indices as ``*``, what stays in floating point), and the same model
    in floating point: ``float_params`` (every weight of the float model),
    ``fp32_bytes``, ``bf16_bytes``, ``vs_fp32`` and ``vs_bf16`` (how many times
    smaller). Files are measured from the header alone.
    """
    if isinstance(source, nn.Module):
        entries = {
            k: (tuple(v.shape), v.dtype, v.numel() * v.element_size()) for k, v in source.state_dict().items()
        }
        layers = [n for n, m in source.named_modules() if isinstance(m, TernaryLinear)]
        if any(isinstance(m, TernaryQATLinear) for m in source.modules()):
            raise InvalidArgumentError("the model still has ternary QAT layers; convert it first")
        file_bytes = None
    else:
        _, _, layers = read_ternary_metadata(source)
        info, _ = ckpt.read_safetensors_header(source)
        entries = {}
        for k, v in info.items():
            dtype, size = build.HEADER_DTYPES.get(v["dtype"], (None, 0))
            if dtype is None:
                raise CheckpointError(
                    f"{source}: tensor {k} has dtype {v['dtype']}, which ditq does not read"
                )
            shape = tuple(v["shape"])
            entries[k] = (shape, dtype, build.numel(shape) * size)
        file_bytes = Path(source).stat().st_size
    if not layers:
        raise InvalidArgumentError("no ternary layers to count; convert the model first")
    ternary_keys = set()
    weights = packed = scales = biases = bias_params = 0
    for name in layers:
        shape, dtype, nbytes = entries[f"{name}.weight"]
        if dtype != torch.uint8 or len(shape) != 2:
            raise CheckpointError(f"{name}.weight is not a packed uint8 [out, in/4] tensor")
        weights += shape[0] * shape[1] * 4
        packed += nbytes
        ternary_keys.add(f"{name}.weight")
        scales += entries[f"{name}.alphas"][2]
        ternary_keys.add(f"{name}.alphas")
        if f"{name}.bias" in entries:
            biases += entries[f"{name}.bias"][2]
            bias_params += build.numel(entries[f"{name}.bias"][0])
            ternary_keys.add(f"{name}.bias")
    groups: dict[str, dict] = {}
    for k, (shape, dtype, nbytes) in entries.items():
        if k in ternary_keys:
            continue
        g = groups.setdefault(
            re.sub(r"^(\w+)\.\d+\.", r"\1.*.", k), {"tensors": 0, "params": 0, "bytes": 0, "dtypes": []}
        )
        g["tensors"] += 1
        g["params"] += build.numel(shape)
        g["bytes"] += nbytes
        name = str(dtype).removeprefix("torch.")
        if name not in g["dtypes"]:
            g["dtypes"].append(name)
    fp_params = sum(g["params"] for g in groups.values())
    fp_bytes = sum(g["bytes"] for g in groups.values())
    float_params = weights + bias_params + fp_params
    tensor_bytes = sum(e[2] for e in entries.values())
    total = file_bytes if file_bytes is not None else tensor_bytes
    return {
        "tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "ternary": {
            "layers": len(layers),
            "weights": weights,
            "packed_bytes": packed,
            "bits_per_weight": 8 * packed / weights,
            "scale_bytes": scales,
            "bias_bytes": biases,
        },
        "full_precision": {"params": fp_params, "bytes": fp_bytes, "tensors": groups},
        "float_params": float_params,
        "fp32_bytes": 4 * float_params,
        "bf16_bytes": 2 * float_params,
        "vs_fp32": 4 * float_params / total,
        "vs_bf16": 2 * float_params / total,
    }


def sizes_line(sizes: dict) -> str:
    """One line summarizing :func:`checkpoint_sizes`."""
    t, fp = sizes["ternary"], sizes["full_precision"]
    total = sizes["file_bytes"] if sizes["file_bytes"] is not None else sizes["tensor_bytes"]
    extra = t["scale_bytes"] + t["bias_bytes"]
    return (
        f"{total / 1e6:.3f} MB: {t['weights'] / 1e6:.3f}M ternary weights in {t['layers']} layers at "
        f"{t['bits_per_weight']:g} bits ({t['packed_bytes'] / 1e6:.3f} MB), their scales and biases "
        f"({extra / 1e6:.3f} MB), {fp['params'] / 1e6:.3f}M other values in floating point "
        f"({fp['bytes'] / 1e6:.3f} MB); "
        f"float32 {sizes['fp32_bytes'] / 1e6:.3f} MB ({sizes['vs_fp32']:.1f}x smaller), bfloat16 "
        f"{sizes['bf16_bytes'] / 1e6:.3f} MB ({sizes['vs_bf16']:.1f}x)"
    )


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _float_dtype(value) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    if isinstance(value, str) and value in FLOAT_DTYPES:
        return FLOAT_DTYPES[value]
    raise InvalidArgumentError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {value!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_dtypes_of(state: Mapping[str, torch.Tensor]) -> str:
    names = sorted({_dtype_name(v.dtype) for v in state.values() if v.is_floating_point()})
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


__all__ = [
    "BITS",
    "CODE",
    "FLOAT_DTYPES",
    "QUANT_KIND",
    "checkpoint_sizes",
    "is_ternary_checkpoint",
    "load",
    "load_ternary_into",
    "read_ternary_metadata",
    "save_ternary",
    "skeleton",
    "sizes_line",
    "ternary_metadata",
]
