"""Producers fused with their consumers' int8 quantization, by a module swap: ``fuse_(model)``.

An integer linear that quantizes its input per token to int8 (a W8A8 or
symmetric W4A8 :class:`~ditq.quant.nn.QuantLinear`, a W1.58A8
:class:`~ditq.quant.ternary.TernaryLinear`) reads a float activation that was
written only to be turned into codes. Where that activation comes out of a
norm-modulate, a GELU or a SwiGLU product, a fused op of :mod:`ditq.kernels.ops`
makes the codes in one pass, and the producer hands them to its consumers as
:class:`~ditq.kernels.ops.Int8Tokens`: the float activation is never written
(nor read back, once per consumer). Models stay
the math (``ditq.models`` imports neither ``quant`` nor ``kernels``): :func:`fuse_`
swaps the producer modules of the blocks it knows (:data:`FUSIONS`) for the
modules below, wherever their consumers are ditq integer layers (they have
``takes_int8_tokens``). A fused module holds the parameters of the module it
replaces under the same names, so state dicts do not change.

    block                 producer          fused module                 consumers
    DiTBlock              norm1, norm2      LayerNormModulateQuantize    attn.qkv; mlp.fc1
    Mlp                   act (GELU tanh)   GELUQuantize                 fc2
    Large-DiT block       attention_norm,   RMSNormModulateQuantize      attention.wq, wk, wv;
                          ffn_norm                                       feed_forward.w1, w3
    Large-DiT FeedForward act (SwiGLU)      SwiGLUQuantize               w2

At every call a fused module runs its fused op only where
:func:`ditq.kernels.ops.should_fuse` says so for every consumer (it would
quantize this input by the same rule and run an integer kernel, the op has a
fast implementation or the backend is ``"reference"``, and
:func:`ditq.kernels.ops.set_fusion` has not turned fusion off) and the op fits
the call (equal dtypes; no gradient the op would drop); elsewhere it runs the
module it replaced. Consumers are looked up in the block at each call, so a
layer swapped after ``fuse_`` is the one asked.

:func:`~ditq.quant.api.quantize_`, :func:`~ditq.quant.gptq.gptq_model` (after
each block), :func:`~ditq.quant.api.load_quantized_state_dict` and
:func:`~ditq.quant.export.load_ternary_into` call ``fuse_``; call it yourself
after building integer layers another way (e.g. :func:`~ditq.quant.ternary.empty_ternary_`
and loading a state dict).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditq.kernels import ops


class FusedProducer(nn.Module):
    """A producer (``plain``) run fused with its consumers' int8 quantization where they take the codes.

    ``plain`` is the module replaced: not a child, but its parameters and buffers
    are this module's own (the very same dicts), so the state dict keeps its
    keys, and whatever replaces a tensor later (``load_state_dict(assign=True)``,
    a move off the meta device) replaces it for both. ``block`` is the module
    holding the producer; ``consumers`` are paths in it, looked up at each call.
    """

    op: str  # the fused op of ditq.kernels.ops

    def __init__(self, plain: nn.Module, block: nn.Module, consumers: tuple[str, ...]):
        super().__init__()
        self._parameters = plain._parameters
        self._buffers = plain._buffers
        self._non_persistent_buffers_set = plain._non_persistent_buffers_set
        # Plain attributes, not submodules: plain's tensors are already ours, and the block holds us.
        object.__setattr__(self, "plain", plain)
        object.__setattr__(self, "block", block)
        self.consumers = tuple(consumers)

    @classmethod
    def fits(cls, plain: nn.Module) -> bool:
        """Whether the fused op computes what ``plain`` (of the class :data:`FUSIONS` names) computes."""
        return True

    def consumers_take_codes(self, x: torch.Tensor) -> bool:
        """Whether every consumer of ``x`` takes the int8 codes that the fused op makes."""
        return bool(self.consumers) and all(
            ops.should_fuse(self.op, self.block.get_submodule(path), x) for path in self.consumers
        )

    def extra_repr(self) -> str:
        return f"{self.plain!r} -> {', '.join(self.consumers)}"


class LayerNormModulateQuantize(FusedProducer):
    """DiT's ``modulate(layer_norm(x), shift, scale)`` (no affine), fused with int8 quantization per token."""

    op = "layernorm_modulate_quantize_int8"

    @classmethod
    def fits(cls, plain: nn.Module) -> bool:
        return plain.weight is None and plain.bias is None  # the op has no affine parameters

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        if shift.dtype == scale.dtype == x.dtype and self.consumers_take_codes(x):
            codes = ops.layernorm_modulate_quantize_int8(x, shift, scale, self.plain.eps)
            return ops.Int8Tokens(*codes, x.dtype)
        return self.plain(x, shift, scale)


class RMSNormModulateQuantize(FusedProducer):
    """Large-DiT's ``modulate(rms_norm(x), shift, scale)``, fused with int8 quantization per token."""

    op = "rmsnorm_modulate_quantize_int8"

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        weight = self.weight
        if shift.dtype == scale.dtype == x.dtype and weight.dtype == x.dtype:
            # The fused op has no gradient: only where nothing would flow back to the norm's weight.
            no_grad = not (torch.is_grad_enabled() and weight.requires_grad)
            if no_grad and self.consumers_take_codes(x):
                codes = ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, self.plain.eps)
                return ops.Int8Tokens(*codes, x.dtype)
        return self.plain(x, shift, scale)


class GELUQuantize(FusedProducer):
    """GELU (tanh) fused with int8 quantization per token: one pass over a DiT block's widest activation."""

    op = "gelu_quantize_int8"

    @classmethod
    def fits(cls, plain: nn.Module) -> bool:
        return plain.approximate == "tanh"

    def forward(self, x: torch.Tensor):
        if self.consumers_take_codes(x):
            return ops.Int8Tokens(*ops.gelu_quantize_int8(x), x.dtype)
        return self.plain(x)


class SwiGLUQuantize(FusedProducer):
    """SwiGLU's ``silu(gate) * up`` fused with int8 quantization per token."""

    op = "swiglu_quantize_int8"

    def forward(self, gate: torch.Tensor, up: torch.Tensor):
        if gate.dtype == up.dtype and self.consumers_take_codes(gate):
            return ops.Int8Tokens(*ops.swiglu_quantize_int8(gate, up), gate.dtype)
        return self.plain(gate, up)


@dataclass(frozen=True)
class Fusion:
    """A producer of a known block and the linears that read its output."""

    block: str  # the block's class, "module.QualName"
    producer: str  # its attribute in the block
    plain: str  # the producer's class, "module.QualName"
    fused: type[FusedProducer]
    consumers: tuple[str, ...]  # paths in the block


FUSIONS = (
    Fusion(
        "ditq.models.dit.DiTBlock",
        "norm1",
        "ditq.models.layers.ModulatedLayerNorm",
        LayerNormModulateQuantize,
        ("attn.qkv",),
    ),
    Fusion(
        "ditq.models.dit.DiTBlock",
        "norm2",
        "ditq.models.layers.ModulatedLayerNorm",
        LayerNormModulateQuantize,
        ("mlp.fc1",),
    ),
    Fusion("ditq.models.layers.Mlp", "act", "torch.nn.modules.activation.GELU", GELUQuantize, ("fc2",)),
    Fusion(
        "ditq.models.large_dit.TransformerBlock",
        "attention_norm",
        "ditq.models.layers.ModulatedRMSNorm",
        RMSNormModulateQuantize,
        ("attention.wq", "attention.wk", "attention.wv"),
    ),
    Fusion(
        "ditq.models.large_dit.TransformerBlock",
        "ffn_norm",
        "ditq.models.layers.ModulatedRMSNorm",
        RMSNormModulateQuantize,
        ("feed_forward.w1", "feed_forward.w3"),
    ),
    Fusion(
        "ditq.models.large_dit.FeedForward",
        "act",
        "ditq.models.layers.SwiGLU",
        SwiGLUQuantize,
        ("w2",),
    ),
)
"""The producers :func:`fuse_` knows, found by class (``ditq.quant`` never imports ``ditq.models``)."""


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _takes_codes(module: nn.Module | None) -> bool:
    """Whether ``module`` is a ditq integer layer, which may take int8 codes (asked at each call)."""
    return callable(getattr(module, "takes_int8_tokens", None))


def _producers(model: nn.Module):
    """``(block, fusion, plain)`` for each known producer of ``model``, fused or not."""
    for block in model.modules():
        name = _class_name(block)
        for fusion in FUSIONS:
            if fusion.block != name:
                continue
            producer = getattr(block, fusion.producer, None)
            plain = producer.plain if isinstance(producer, FusedProducer) else producer
            if isinstance(plain, nn.Module) and _class_name(plain) == fusion.plain:
                if fusion.fused.fits(plain):
                    yield block, fusion, plain


def fuse_(model: nn.Module) -> nn.Module:
    """Swap every known producer whose consumers are all ditq integer layers for its fused module (see
    the module doc), in place, and put back the plain one where they no longer are; returns ``model``.

    Outputs do not change where the fused ops do not run; where they run, by what
    the op's implementation rounds (nothing under the ``"reference"`` backend).
    The state dict keeps its keys. A model without such producers is left as it is.
    """
    for block, fusion, plain in list(_producers(model)):
        consumers = [_consumer(block, path) for path in fusion.consumers]
        current = getattr(block, fusion.producer)
        if all(_takes_codes(c) for c in consumers):
            if not (isinstance(current, FusedProducer) and current.block is block):
                setattr(block, fusion.producer, fusion.fused(plain, block, fusion.consumers))
        elif current is not plain:
            setattr(block, fusion.producer, plain)
    return model


def unfuse_(model: nn.Module) -> nn.Module:
    """Put the plain producers back in place of the fused ones :func:`fuse_` swapped in; returns ``model``."""
    for block, fusion, plain in list(_producers(model)):
        if getattr(block, fusion.producer) is not plain:
            setattr(block, fusion.producer, plain)
    return model


def fused_producers(model: nn.Module) -> dict[str, FusedProducer]:
    """``{name: fused module}`` in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedProducer)}


def _consumer(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


__all__ = [
    "FUSIONS",
    "FusedProducer",
    "Fusion",
    "GELUQuantize",
    "LayerNormModulateQuantize",
    "RMSNormModulateQuantize",
    "SwiGLUQuantize",
    "fuse_",
    "fused_producers",
    "unfuse_",
]
