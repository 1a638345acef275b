"""Ternary module swaps: ``prepare`` (float -> QAT layers), ``convert`` (QAT -> packed), and empty packed
layers to load a checkpoint into. :func:`ditq.quant.quantize_` runs them for a :class:`TernaryQATConfig`."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant import select
from ditq.quant.config import patterns
from ditq.quant.presets import match_any, set_module
from ditq.quant.ternary.config import TernaryQATConfig
from ditq.quant.ternary.layers import TernaryLinear, TernaryQATLinear

TERNARY_LAYERS = (TernaryQATLinear, TernaryLinear)
"""The module types a ternary model's quantized layers have."""


def select_ternary_layers(
    model: nn.Module, config: TernaryQATConfig | None = None, *, include=None, exclude=None
) -> list[str]:
    """Names of the float ``nn.Linear`` layers ``prepare`` would swap."""
    return select.select_layers(model, config or TernaryQATConfig(), include=include, exclude=exclude)


def ternary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: TernaryQATLinear | TernaryLinear}`` in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TERNARY_LAYERS)}


def _selected_or_error(model: nn.Module, config: TernaryQATConfig, include, exclude) -> list[str]:
    return select.selected_or_error(
        model, config, include, exclude, already=len(ternary_layers(model)), done="ternary"
    )


def quantize_ternary_(
    model: nn.Module, config: TernaryQATConfig | None = None, *, include=None, exclude=None
) -> nn.Module:
    """Apply ``config.step`` in place and return ``model`` (what ``quantize_`` does for a TernaryQATConfig).

    ``prepare``: the selected ``nn.Linear`` layers become :class:`TernaryQATLinear`
    sharing their weight and bias Parameters (build the optimizer afterwards).
    ``convert``: every :class:`TernaryQATLinear` (matching ``include`` if given,
    minus ``exclude``) becomes a packed :class:`TernaryLinear`; the result
    computes exactly what the QAT model computes in eval mode. All layers are
    built before any is swapped, so an error leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"quantize_ takes an nn.Module, got {type(model).__name__}")
    config = config if config is not None else TernaryQATConfig()
    if isinstance(config, Mapping):
        config = TernaryQATConfig.from_dict(config)
    new: dict[str, nn.Module] = {}
    if config.step == "prepare":
        for name in _selected_or_error(model, config, include, exclude):
            linear = model.get_submodule(name)
            new[name] = TernaryQATLinear.from_float(
                linear, scale=config.scale, alpha_init=config.alpha_init, act_bits=config.act_bits, layer=name
            )
    else:
        inc = patterns(include, "include", "TernaryQATConfig") if include is not None else config.include
        exc = patterns(exclude, "exclude", "TernaryQATConfig") if exclude is not None else config.exclude
        qat = {
            n: m for n, m in model.named_modules()
            if isinstance(m, TernaryQATLinear) and (inc is None or match_any(n, inc))
            and not match_any(n, exc)
        }  # fmt: skip
        if not qat:
            done = sum(isinstance(m, TernaryLinear) for m in model.modules())
            hint = f"; {done} layers are already converted" if done else ""
            raise InvalidArgumentError(
                f"step='convert' found no TernaryQATLinear layer to convert{hint}; run "
                f"quantize_(model, TernaryQATConfig(step='prepare')) and train first"
            )
        new = {n: TernaryLinear.from_qat(m, layer=n) for n, m in qat.items()}
    for name, module in new.items():
        set_module(model, name, module)
    return model


def empty_ternary_(
    model: nn.Module, config: TernaryQATConfig | None = None, *, include=None, exclude=None
) -> nn.Module:
    """Swap the layers ``prepare`` would select for empty :class:`TernaryLinear`, to load packed weights into.

    Works on the meta device (no memory); ``config.act_bits`` sets the layers' activation mode.
    """
    config = config or TernaryQATConfig()
    new = {}
    for name in _selected_or_error(model, config, include, exclude):
        linear = model.get_submodule(name)
        new[name] = TernaryLinear(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            act_bits=config.act_bits,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            layer=name,
        ).train(linear.training)  # the mode of the layer it replaces (a new Module starts training)
    for name, module in new.items():
        set_module(model, name, module)
    return model
