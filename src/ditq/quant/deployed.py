"""The deployed Q-DiT layer: a :class:`~ditq.quant.nn.QuantLinear` converted to run one integer op.

``QuantLinear`` is the fake-quant layer that calibration, GPTQ and the search
work on: its forward is always the reference (fake-quantized input,
dequantized weight, ``F.linear``). :func:`convert_` turns every one whose
settings fit an op of :mod:`ditq.kernels` into a :class:`DeployedQuantLinear`,
as ``TernaryQATLinear`` becomes ``TernaryLinear``. The op is fixed then, once
(:attr:`DeployedQuantLinear.op`)::

    weights                         activations                      op
    <= 4 bits, any group, sym/asym  dynamic, <= 8 bits, any group,    w4a8_linear
    (K even)                        sym (int8) or asym (uint8 + zero)
    <= 4 bits (K even)              float (a_bits None)              int4_linear
    5-8 bits, symmetric, per        dynamic, <= 8 bits, symmetric,    w8a8_linear
    output channel                  per token (or per tensor)

Other settings (static activation ranges, asymmetric or group-wise weights of
5-8 bits, 8-bit weights with asymmetric activations) stay fake-quant layers.
(Asymmetric 8-bit weights would need 9-bit ``q - z``; folding zero points into
int8 works only up to 7 bits, and w8a8_linear takes neither per-group scales
nor activation zero points.)

A deployed layer keeps the fake-quant forward for what its op cannot do: training
mode and outputs that need gradients (the ops have no autograd formula),
``use_kernels = False``, and, under the ``"auto"`` kernel backend, a device
where the op has only its reference (e.g. ``w4a8_linear`` without the C++
kernels, whose reference emulates integer math in float64): there the float
path is faster and gives the fake-quant numbers. The integer path computes the
same quantized values with integer accumulation and a float32 epilogue: it
matches the fake-quant path to float rounding (about 1e-6 relative), not bit for
bit. The state dict is the ``QuantLinear``'s, key for key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.kernels import ops
from ditq.quant.config import PER_TENSOR
from ditq.quant.nn import INT4_SYM_OFFSET, QuantLinear
from ditq.quant.presets import set_module
from ditq.quant.primitives import quantize


class DeployedQuantLinear(QuantLinear):
    """A :class:`QuantLinear` that runs the integer op :attr:`op` in eval mode (see the module doc)."""

    op: str

    @classmethod
    def from_quant(cls, q: QuantLinear) -> DeployedQuantLinear:
        """``q`` converted: the same buffers and parameters (shared, not copied), its op fixed."""
        op = q.kernel_op
        if op is None:
            raise InvalidArgumentError(
                f"layer {q.layer or ''!r} ({q.settings}) fits no integer op; it stays a fake-quant "
                "QuantLinear"
            )
        d = cls.__new__(cls)
        d.__dict__.update(q.__dict__)
        for slot in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            setattr(d, slot, type(getattr(q, slot))(getattr(q, slot)))
        d.op = op
        d.use_kernels = True
        d._int4 = None  # (packed codes, the kernels' zero points), made on first use
        return d

    # -- when the op runs ----------------------------------------------------------------------------

    def kernel_implementation(self, device: torch.device | str, *, build: bool = True) -> str:
        """What :attr:`op` runs on ``device`` under the backend in force (see
        :func:`ditq.kernels.ops.implementation`): e.g. ``"cpp-avx2"``, or ``"reference"``."""
        k = self.in_features
        ga = k if self.act_quant.group in (0, PER_TENSOR) else self.act_quant.group
        segment = math.gcd(ga, self.w_group or k)  # W4A8: where both scales are constant
        return ops.implementation(self.op, device, build=build, w4a8_segment=segment)

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """:attr:`op` if ``forward(x)`` runs it now, or None for the fake-quant path (see the module doc)."""
        if not self.use_kernels or self.training:
            return None
        wants_grad = x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if wants_grad and torch.is_grad_enabled():
            return None
        if ops.get_backend() == "auto" and self.kernel_implementation(x.device) == "reference":
            return None
        return self.op

    def takes_int8_tokens(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` would quantize ``x`` with :func:`ditq.kernels.ops.quantize_per_token_int8`
        (8-bit symmetric per token) and run an integer op: then ``forward`` also takes
        :class:`~ditq.kernels.ops.Int8Tokens` made by a producer fused with that quantization."""
        return self._int8_token_inputs() and self.kernel_for(x) in ("w8a8_linear", "w4a8_linear")

    def _int8_token_inputs(self) -> bool:
        """Whether the integer ops quantize this layer's input by quantize_per_token_int8's rule."""
        aq = self.act_quant
        return aq.sym and aq.bits == 8 and aq.group == 0

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor | ops.Int8Tokens) -> torch.Tensor:
        if isinstance(x, ops.Int8Tokens):
            return self._int8_tokens_forward(x)
        op = self.kernel_for(x)
        if op is None:
            return super().forward(x)  # the fake-quant reference
        if op == "int4_linear":
            wp, zero = self._int4_weight()
            return ops.int4_linear(x, wp, self.w_scale, zero, self._bias())  # [..., out], x.dtype
        xq, xs, xz = self._quantize_input(x)  # integer codes [..., in], scales (and zeros) [..., G]
        return self._integer_linear(op, xq, xs, xz, x.dtype)

    def _int8_tokens_forward(self, x: ops.Int8Tokens) -> torch.Tensor:
        aq = self.act_quant
        if self.op not in ("w8a8_linear", "w4a8_linear") or not self._int8_token_inputs():
            raise InvalidArgumentError(
                f"this layer ({self.w_bits}-bit weights, {aq.bits}-bit activations, group {aq.group}, "
                f"sym={aq.sym}) does not take int8 per-token codes; pass floats"
            )
        return self._integer_linear(self.op, x.q, x.scale, None, x.dtype)

    def _integer_linear(self, op: str, xq, xs, xz, out_dtype: torch.dtype) -> torch.Tensor:
        """The integer op ``op`` on input codes ``xq`` with scales ``xs`` (zero points ``xz`` or None)."""
        if op == "w8a8_linear":
            return ops.w8a8_linear(xq, xs, self.qweight, self.w_scale, self._bias(), out_dtype)
        wp, zero = self._int4_weight()
        return ops.w4a8_linear(xq, xs, xz, wp, self.w_scale, zero, self._bias(), out_dtype)

    def _int4_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int4-packed codes ``[out, in/2]``, the kernels' zero points ``[out, in/g]``), made once; an
        unpacked layer keeps this packed copy beside its codes (integers, half their bytes)."""
        if self._int4 is None:
            zero = self.w_zero + INT4_SYM_OFFSET if self.w_sym else self.w_zero
            self._int4 = (self.qweight if self.packed else self.packed_codes(), zero)
        return self._int4

    def _bias(self) -> torch.Tensor | None:
        return self.bias.detach() if self.bias is not None else None

    def _quantize_input(self, x: torch.Tensor):
        """The input's integer codes with its scales and zero points (None when symmetric), per token
        or token group: the values the activation quantizer fake-quantizes to."""
        aq = self.act_quant
        if self._int8_token_inputs():
            xq, xs = ops.quantize_per_token_int8(x)  # the same rule; a fast kernel on CPU
            return xq, xs, None
        if not aq.sym and aq.dynamic and aq.group >= 0 and x.dtype == torch.float32:
            return ops.quantize_per_token_asym(x, aq.bits, aq.group)  # Q-DiT's rule, one fused kernel
        scale, zero = aq.params(x)  # [..., G], or all ones for one range per tensor
        q = quantize(x, scale, zero, aq.bits, aq.sym)
        lead = (*x.shape[:-1], scale.shape[-1])
        xs = scale.expand(lead).contiguous()
        return q, xs, None if aq.sym else zero.expand(lead).contiguous()

    # -- the prepared weight follows the buffers -----------------------------------------------------

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        self._int4 = None

    def _apply(self, fn, recurse: bool = True):
        self._int4 = None  # .to(), .half(), ...: the buffers are new tensors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._int4 = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", op={self.op}"


def convert_(model: nn.Module) -> nn.Module:
    """Turn every fake-quant :class:`QuantLinear` of ``model`` whose settings fit an integer op into a
    :class:`DeployedQuantLinear`, in place (buffers shared, nothing copied); returns ``model``.

    Layers whose settings fit no op stay as they are. ``quantize_`` for a ``QDiTConfig`` or a
    ``GPTQConfig`` and every loader of quantized checkpoints call this; call it yourself after
    building or editing ``QuantLinear`` layers by hand.
    """
    targets = [
        (name, m) for name, m in model.named_modules() if type(m) is QuantLinear and m.kernel_op is not None
    ]
    for name, q in targets:
        d = DeployedQuantLinear.from_quant(q)
        if name:
            set_module(model, name, d)
        else:  # the model is the layer itself
            raise InvalidArgumentError("convert_ takes a model holding QuantLinear layers, not a layer")
    return model
