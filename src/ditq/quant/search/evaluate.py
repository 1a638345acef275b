"""Measuring one candidate: quantized in place without copying the model, and a proxy fitness.

**No copies.** A candidate is applied by swapping :class:`~ditq.quant.nn.QuantLinear` modules in
(:func:`applied`) and putting the very same float modules back afterwards, even on an exception.
Weight codes are computed once per (layer, weight group) for the whole search (round-to-nearest,
or a ``weights(name, w_group)`` callable such as GPTQ) and cached (:class:`WeightCache`): the cache
holds at most one ``uint8`` copy of a layer's weight per candidate group size.

**Proxy.** :func:`output_error_proxy` makes a cheap fitness (the noise-prediction error vs the
full-precision model on calibration inputs) for pre-screening candidates
(:mod:`ditq.quant.search.evolution`); its reference outputs are computed once, when it is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.api import quantize_, select_layers
from ditq.quant.config import QDiTConfig, as_qdit_config
from ditq.quant.fuse import fuse_
from ditq.quant.nn import QuantLinear
from ditq.quant.presets import set_module


@contextmanager
def applied(
    model: nn.Module, config: QDiTConfig, *, weight_overrides: Mapping[str, object] | None = None
) -> Iterator[nn.Module]:
    """Quantize ``model`` in place under ``config`` for the block, then put the float layers back.

    The selected ``nn.Linear`` modules are kept by reference and restored (the same objects, so the
    same parameters) on exit, also when the block raises. ``weight_overrides`` as in
    :func:`~ditq.quant.api.quantize_`. Nothing is copied but the quantized codes.
    """
    config = as_qdit_config(config)
    originals = {name: model.get_submodule(name) for name in select_layers(model, config)}
    try:
        quantize_(model, config, weight_overrides=weight_overrides)
        yield model
    finally:
        for name, module in originals.items():
            set_module(model, name, module)
        fuse_(model)  # the float layers feed nothing fused: put the plain producers back


class WeightCache:
    """Weight codes per (layer, bits, group, sym, clip), computed once: RTN, or ``weights(name, w_group)``."""

    def __init__(self, modules: Mapping[str, nn.Linear], weights: Callable | None = None):
        self.modules = dict(modules)  # the float layers, by reference
        self.weights = weights
        self._cache: dict[tuple, object] = {}

    def overrides(self, config: QDiTConfig) -> dict[str, object]:
        out = {}
        for name, linear in self.modules.items():
            lq = config.for_layer(name)
            key = (name, lq.w_bits, lq.w_group, lq.w_sym, str(lq.w_clip))
            if key not in self._cache:
                if self.weights is not None:
                    self._cache[key] = self.weights(name, lq.w_group)
                else:
                    q = QuantLinear.from_float(linear, lq, layer=name)
                    self._cache[key] = (q.qweight, q.w_scale, q.w_zero)
            out[name] = self._cache[key]
        return out


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_error_proxy(
    model: nn.Module, inputs: Sequence, *, output: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[nn.Module], float]:
    """A proxy fitness: relative squared error of the model's outputs vs its full-precision outputs.

    ``inputs``: calibration batches (tuples of positional arguments, e.g. ``(x_t, t, y)``, or dicts
    of keyword arguments). The reference outputs are computed **now**, from ``model`` as it is (call
    this before quantizing), once for the whole search. ``output`` selects what to compare, e.g.
    ``lambda out: out[:, :4]`` for the noise prediction of a learned-sigma DiT. The returned callable
    gives ``Σ‖q − f‖² / Σ‖f‖²`` over all batches.
    """
    batches = list(inputs)
    if not batches:
        raise InvalidArgumentError("output_error_proxy needs at least one calibration batch")
    select = output or (lambda out: out)
    with torch.no_grad():
        refs = [select(_call(model, b)).detach() for b in batches]
    denom = sum(float(r.double().pow(2).sum()) for r in refs) or 1.0

    def proxy(quantized: nn.Module) -> float:
        with torch.no_grad():
            err = sum(
                float((select(_call(quantized, b)).double() - r.double()).pow(2).sum())
                for b, r in zip(batches, refs, strict=True)
            )
        return err / denom

    return proxy
