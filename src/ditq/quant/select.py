"""Which layers a quantization config swaps: one rule for every method.

The ``include`` argument, else ``config.include``, else the preset's patterns
(:mod:`ditq.quant.presets`; ``config.preset="auto"`` recognizes the family
from the model's layer names, quantized ones included, so a second step on a
partly quantized model sees the same family), else every ``nn.Linear``; minus
``exclude`` (argument, else ``config.exclude``). Patterns are fnmatch (``*``
crosses dots) or ``re:`` + a regex, matched against full names from
``named_modules``. Only float ``nn.Linear`` layers are ever selected.

A config is anything with ``include``, ``exclude``, ``preset`` and
``quantize_adaln`` (:class:`~ditq.quant.QDiTConfig`,
:class:`~ditq.quant.TernaryQATConfig`).
"""

from __future__ import annotations

from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.config import patterns
from ditq.quant.presets import few_names, get_preset, linear_names, match_any, nothing_selected, preset_for
from ditq.quant.ternary.layers import TernaryLinear, TernaryQATLinear


def family_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers, float or quantized: what presets recognize a family by."""
    ternary = [n for n, m in model.named_modules() if isinstance(m, (TernaryQATLinear, TernaryLinear))]
    return linear_names(model) + ternary


def rules(model: nn.Module, config, include=None, exclude=None) -> tuple[list[str], list[str]]:
    """The (include, exclude) patterns in force: arguments win over the config, the config over the preset."""
    owner = type(config).__name__
    if include is not None:
        inc = patterns(include, "include", owner)
    elif config.include is not None:
        inc = config.include
    else:
        if config.preset == "auto":
            preset = preset_for(family_names(model))
        elif config.preset is None:
            preset = None
        else:
            preset = get_preset(config.preset)
        inc = preset.patterns(config.quantize_adaln) if preset is not None else ["*"]
    exc = patterns(exclude, "exclude", owner) if exclude is not None else config.exclude
    return inc, exc or []


def select_layers(model: nn.Module, config, *, include=None, exclude=None) -> list[str]:
    """Names of the float ``nn.Linear`` layers the config selects (no checks, no errors)."""
    inc, exc = rules(model, config, include, exclude)
    return [
        n for n, m in model.named_modules()
        if n and isinstance(m, nn.Linear) and match_any(n, inc) and not match_any(n, exc)
    ]  # fmt: skip


def selected_or_error(
    model: nn.Module, config, include=None, exclude=None, *, already: int = 0, done: str = "quantized"
) -> list[str]:
    """:func:`select_layers`, or a one-line error naming the model's linears when nothing is selected
    (``already`` layers are already ``done``, which the message mentions)."""
    selected = select_layers(model, config, include=include, exclude=exclude)
    if not selected:
        raise nothing_selected(model, *rules(model, config, include, exclude), already, done=done)
    return selected


def check_named(kind: str, names, selected: list[str], model: nn.Module) -> None:
    """One-line errors for per-layer entries (``kind``) naming layers that are missing or left unquantized."""
    existing = set(linear_names(model))
    missing = [n for n in names if n not in existing]
    if missing:
        raise InvalidArgumentError(
            f"{kind} names layer(s) the model lacks: {few_names(missing, 3)}; quantizable layers are e.g. "
            f"{few_names(selected or sorted(existing))}"
        )
    chosen = set(selected)
    left = [n for n in names if n not in chosen]
    if left:
        raise InvalidArgumentError(
            f"{kind} names layer(s) that include/exclude leave unquantized (or already quantized): "
            f"{few_names(left, 3)}; include them or drop their entries"
        )
