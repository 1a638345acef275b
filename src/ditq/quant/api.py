"""Quantizing a model is swapping its layers: ``quantize_(model, config)``, dispatched on the config's type.

::

    from ditq import quant
    quant.quantize_(model, quant.QDiTConfig(w_bits=4, a_bits=8))      # round to nearest; the preset picks
    quant.quantize_(model, cfg, include=["blocks.*.mlp.*"], exclude=["blocks.0.*"])
    quant.quantize_(model, quant.QDiTConfig(a_bits=8, dynamic=False), calibration=data)  # static ranges
    quant.quantize_(model, quant.GPTQConfig(quant.QDiTConfig(w_bits=4), calibration=data))
    quant.quantize_(model, quant.TernaryQATConfig(step="prepare"))     # ... train, then step="convert"
    quant.quantized_layers(model)                                      # {name: QuantLinear}
    quant.kernel_plan(model)                                           # {name: op it runs}

Each config type has one handler (:func:`register_quantize_handler`, the
pattern of torchao's ``quantize_``), so a new method is a new config and a
handler, not a new door. Which layers a config takes is
:mod:`ditq.quant.select`, one rule for every method. Models whose integer
layers read a fused producer get it swapped in afterwards
(:mod:`ditq.quant.fuse`), so a quantized model runs as a loaded one does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.kernels import ops
from ditq.quant import select
from ditq.quant.act_quant import ActQuantizer
from ditq.quant.calibration import run_calibration
from ditq.quant.config import QDiTConfig, as_qdit_config
from ditq.quant.deployed import DeployedQuantLinear, convert_
from ditq.quant.fuse import fuse_
from ditq.quant.gptq import GPTQConfig, gptq_model
from ditq.quant.nn import QuantLinear
from ditq.quant.presets import set_module
from ditq.quant.state import quantized_layers
from ditq.quant.ternary import TernaryLinear, TernaryQATConfig, quantize_ternary_

Handler = Callable[..., nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register_quantize_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Make the decorated ``handler(model, config, *, include, exclude, **options) -> model`` what
    :func:`quantize_` runs for configs of ``config_type`` (and its subclasses)."""

    def register(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return register


def quantize_(model: nn.Module, config=None, *, include=None, exclude=None, **options) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says; returns it.

    ``config``: a :class:`QDiTConfig` (default; round-to-nearest weights, dynamic or static
    activations), a :class:`GPTQConfig`, a :class:`TernaryQATConfig` (``prepare`` or ``convert``),
    the dict form of one, or any type with a registered handler. ``include``/``exclude`` override
    the config's layer patterns. ``options`` go to the handler (see each one). Every layer is built
    before any is swapped, so an error leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"quantize_ takes an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QDiTConfig()
    elif isinstance(config, Mapping):
        config = (TernaryQATConfig if config.get("method") == "ternary" else QDiTConfig).from_dict(
            dict(config)
        )
    handler = next((_HANDLERS[t] for t in type(config).__mro__ if t in _HANDLERS), None)
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise InvalidArgumentError(
            f"quantize_ has no handler for a {type(config).__name__}; configs it takes: {known}"
        )
    accepted = [p for p in inspect.signature(handler).parameters if p not in ("model", "config")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = ", ".join(p for p in accepted if p not in ("include", "exclude")) or "none"
        raise InvalidArgumentError(
            f"{', '.join(unknown)} do not apply to a {type(config).__name__} (its options: {takes})"
        )
    handler(model, config, include=include, exclude=exclude, **options)
    return fuse_(model)


@register_quantize_handler(QDiTConfig)
def _quantize_qdit(
    model: nn.Module,
    config: QDiTConfig,
    *,
    include=None,
    exclude=None,
    weight_overrides: Mapping[str, object] | None = None,
    calibration=None,
    batch_size: int = 64,
) -> nn.Module:
    """Q-DiT round-to-nearest: the selected ``nn.Linear`` layers become :class:`QuantLinear`, and
    those whose settings fit an integer op are deployed (:func:`~ditq.quant.deployed.convert_`).

    Weights are quantized under each layer's settings (``config.for_layer(name)``), unless
    ``weight_overrides[name]`` gives codes and group parameters (a ``GPTQResult`` or ``(codes, scale,
    zero)``). Static activation ranges are observed on ``calibration`` (CalibrationData) when given,
    ``batch_size`` inputs at a time; else :func:`calibrate` sets them later. One-line errors when
    nothing is selected, when ``config.layers`` or ``weight_overrides`` name layers that are missing
    or not selected, or when a group size does not divide a layer's input channels.
    """
    config = as_qdit_config(config)
    weight_overrides = dict(weight_overrides or {})
    selected = select.selected_or_error(model, config, include, exclude, already=len(quantized_layers(model)))
    select.check_named("QDiTConfig.layers", list(config.layers), selected, model)
    select.check_named("weight_overrides", list(weight_overrides), selected, model)
    new = {}
    for name in selected:
        linear = model.get_submodule(name)
        new[name] = QuantLinear.from_float(
            linear, config.for_layer(name), weight_overrides.get(name), layer=name
        )
    for name, q in new.items():
        set_module(model, name, q)
    if calibration is not None and not config.dynamic and not config.weight_only:
        with calibrate(model):
            run_calibration(model, calibration, batch_size)
    return convert_(model)


@register_quantize_handler(GPTQConfig)
def _quantize_gptq(model: nn.Module, config: GPTQConfig, *, include=None, exclude=None) -> nn.Module:
    """GPTQ block by block on the config's calibration inputs (:func:`ditq.quant.gptq.gptq_model`)."""
    gptq_model(
        model,
        config.qdit,
        config.calibration_for(model),
        include=include,
        exclude=exclude,
        batch_size=config.batch_size,
        block_size=config.block_size,
        percdamp=config.percdamp,
        act_order=config.act_order,
        log=config.log,
    )
    return convert_(model)


@register_quantize_handler(TernaryQATConfig)
def _quantize_ternary(model: nn.Module, config: TernaryQATConfig, *, include=None, exclude=None) -> nn.Module:
    """TerDiT ternary QAT: ``prepare`` or ``convert`` (:func:`~ditq.quant.ternary.quantize_ternary_`)."""
    return quantize_ternary_(model, config, include=include, exclude=exclude)


def select_layers(
    model: nn.Module, config: QDiTConfig | None = None, *, include=None, exclude=None
) -> list[str]:
    """Names of the float ``nn.Linear`` layers :func:`quantize_` would swap for ``config`` (no errors)."""
    return select.select_layers(model, as_qdit_config(config), include=include, exclude=exclude)


def _static_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer) and hasattr(m, "lo")]


@contextmanager
def calibrate(model: nn.Module, *, reset: bool = True) -> Iterator[nn.Module]:
    """Record static activation ranges while the block runs, then freeze them.

    Inside, static quantizers pass inputs through unchanged and widen their
    running min/max; on exit they quantize with the recorded ranges. ``reset``
    forgets earlier ranges first. The block runs under ``torch.no_grad()``.
    Dynamic quantizers are unaffected (a no-op for a dynamic-only model). A
    static layer that saw no data raises a one-line error naming it when used.
    """
    quantizers = _static_quantizers(model)
    for q in quantizers:
        if reset:
            q.reset()
        q.calibrating = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for q in quantizers:
            q.calibrating = False


_KERNEL_LAYERS = (DeployedQuantLinear, TernaryLinear)


def set_kernels(model: nn.Module, enabled: bool) -> int:
    """Let every deployed :class:`QuantLinear` and :class:`TernaryLinear` run integer kernels in eval mode
    (``enabled``, the default) or keep them on their fake-quant / float path; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, _KERNEL_LAYERS)]
    for m in layers:
        m.use_kernels = bool(enabled)
    return len(layers)


def kernel_plan(
    model: nn.Module, device: torch.device | str | None = None, *, build: bool = True
) -> dict[str, str]:
    """``{layer name: what its eval-mode forward runs}`` on ``device`` (default: where the model is)
    under the kernel backend in force: the op and the implementation it runs, such as
    ``"w4a8_linear [cpp-avx2]"`` (see :func:`ditq.kernels.ops.implementation`), or
    ``"float: <why>"`` for the fake-quant / float path. Checks settings, backend and device only
    (a forward also takes the float path when its output needs gradients). ``build=False`` builds
    no CPU kernels to find out (see :func:`ditq.kernels.has_fast_impl`)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    backend = ops.get_backend()
    plan = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and not isinstance(m, DeployedQuantLinear):
            op = m.kernel_op
            why = "the layer's settings fit no integer op" if op is None else f"not converted to run {op}"
            plan[name] = f"float: {why}"
            continue
        if not isinstance(m, _KERNEL_LAYERS):
            continue
        op = m.op if isinstance(m, DeployedQuantLinear) else m.kernel_op
        if op is None or not m.use_kernels:
            why = "the layer's settings fit no integer op" if op is None else "use_kernels is off"
            plan[name] = f"float: {why}"
            continue
        impl = m.kernel_implementation(device, build=build)
        if backend == "auto" and impl == "reference":
            plan[name] = f"float: no fast {op} on {device.type} (backend auto)"
        else:
            plan[name] = f"{op} [{impl}]"
    return plan
