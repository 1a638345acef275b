"""What a quantized model weighs when deployed: codes at their bit width, scales in fp16, the rest as is."""

from __future__ import annotations

import math

import torch
from torch import nn

from ditq.quant import select
from ditq.quant.act_quant import ActQuantizer
from ditq.quant.config import LayerQuant, QDiTConfig, as_qdit_config
from ditq.quant.granularity import num_groups, weight_granularity
from ditq.quant.nn import QuantLinear

SCALE_BYTES = 2
"""Bytes per stored scale / zero point / static range end in :func:`model_size_bytes` (fp16)."""


def quant_bytes(in_f: int, out_f: int, cfg: LayerQuant, bias: torch.Tensor | None, static_groups: int) -> int:
    """Deployed bytes of one quantized linear: codes, scales (and zeros), bias, static range ends."""
    n = num_groups(weight_granularity(cfg.w_group), in_f)
    codes = math.ceil(out_f * in_f * cfg.w_bits / 8)
    params = out_f * n * SCALE_BYTES * (1 if cfg.w_sym else 2)  # symmetric: no zero points
    b = bias.numel() * bias.element_size() if bias is not None else 0
    return codes + params + b + 2 * static_groups * SCALE_BYTES


def model_size_bytes(
    model: nn.Module, config: QDiTConfig | None = None, *, include=None, exclude=None
) -> int:
    """Deployed bytes: weight codes at their bit width, scales (and asymmetric zeros) in fp16, the rest as is.

    Each :class:`QuantLinear` counts ``ceil(out·in·bits/8)`` bytes of codes,
    2 bytes per scale and per zero point (none when symmetric), its bias at
    its dtype, and 2 × 2 bytes per static activation range. Every other
    parameter and persistent buffer counts at its dtype (shared tensors once).
    With ``config``, the float linears :func:`quantize_` would select count
    as quantized under it: the size of a plan, before quantizing.
    """
    planned: dict[str, LayerQuant] = {}
    if config is not None:
        config = as_qdit_config(config)
        planned = {
            n: config.for_layer(n)
            for n in select.select_layers(model, config, include=include, exclude=exclude)
        }
    total, seen, inside = 0, set(), []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # tensors of a QuantLinear's children are counted with it
        if isinstance(mod, QuantLinear):
            inside.append(name)
            cfg = LayerQuant(w_bits=mod.w_bits, w_group=mod.w_group, w_sym=mod.w_sym)
            aq = mod.act_quant
            static = aq.n_static_groups if hasattr(aq, "lo") else 0
            total += quant_bytes(mod.in_features, mod.out_features, cfg, mod.bias, static)
            continue
        if name in planned:
            cfg = planned[name]
            static = 0
            if cfg.a_bits is not None and not cfg.dynamic:
                static = ActQuantizer(cfg.a_bits, cfg.a_group, False, False, mod.in_features).n_static_groups
            total += quant_bytes(mod.in_features, mod.out_features, cfg, mod.bias, static)
            seen.update(id(t) for t in (mod.weight, mod.bias) if t is not None)
            continue
        tensors = list(mod.named_parameters(recurse=False)) + [
            (n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set
        ]
        for _, t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
