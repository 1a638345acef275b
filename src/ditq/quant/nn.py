"""The quantized linear layer and its activation quantizer (plain-PyTorch reference path).

A :class:`QuantLinear` stores what a low-bit kernel reads: integer weight
codes ``qweight[out, in]`` (uint8 asymmetric / int8 symmetric, one code per
byte; packing several codes per byte belongs to ``ditq.kernels``) and one
``(w_scale, w_zero)`` per output row and group of ``w_group`` input channels.
Its forward fake-quantizes the input with :class:`ActQuantizer`, dequantizes
the weight and calls ``F.linear``; the numbers are those of
:mod:`ditq.quant.primitives`, bit for bit. It is for inference: nothing here
passes gradients (quantization-aware training has its own modules).

State-dict keys, beside the layer's original ``bias``::

    qweight   uint8/int8 [out, in]          integer codes
    w_scale   float      [out, in // g]     (g = in when w_group = 0)
    w_zero    float      [out, in // g]     integer-valued; all 0 when symmetric
    act_quant.lo, act_quant.hi  float [n]   static activation ranges only

Bits and group sizes are not in the state dict; they come from the
:class:`~ditq.quant.config.QDiTConfig` saved beside it (see
:func:`ditq.quant.api.load_quantized_state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.quant.config import PER_TENSOR, LayerQuant, QDiTConfig, _a_bits, _a_group, _w_bits, _w_group
from ditq.quant.granularity import (
    PerTensor,
    PerToken,
    act_granularity,
    group_length,
    num_groups,
    weight_granularity,
)
from ditq.quant.primitives import (
    as_clip,
    code_dtype,
    dequantize,
    fake_quantize,
    qrange,
    quant_params,
    quantize,
)

# ----------------------------------------------------------------------------
# Activation quantizer
# ----------------------------------------------------------------------------


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer input: dynamic (per token / token group, every call) or static (calibrated).

    ``bits=None`` is the identity. Dynamic parameters depend on the input only,
    so each sample and timestep gets its own; there is no state. Static ranges
    are shared by all tokens: one for the whole tensor (``group`` 0 or -1) or
    one per block of ``group`` channels; they are recorded as a running
    min/max while ``calibrating`` is True (the input passes through unchanged
    then) and fixed afterwards (see :func:`ditq.quant.api.calibrate`).
    """

    def __init__(
        self,
        bits: int | None = 8,
        group: int = 0,
        sym: bool = False,
        dynamic: bool = True,
        channels: int | None = None,
        *,
        layer: str | None = None,
        device=None,
    ):
        super().__init__()
        self.bits = _a_bits(bits, "activation ")
        self.group = _a_group(group, "activation ")
        self.sym = sym
        self.dynamic = dynamic
        self.channels = channels
        self.layer = layer  # for error messages only
        self.calibrating = False
        self._observed = False
        if self.bits is not None and channels is not None:
            num_groups(self._granularity(), channels, layer=layer)  # one-line error if g does not divide
        if self.bits is not None and not dynamic:
            if channels is None:
                raise InvalidArgumentError("a static activation quantizer needs the number of input channels")
            n = self.n_static_groups
            self.register_buffer("lo", torch.full((n,), float("inf"), device=device))
            self.register_buffer("hi", torch.full((n,), float("-inf"), device=device))

    def _granularity(self):
        if self.group == PER_TENSOR or (not self.dynamic and self.group == 0):
            return PerTensor()
        return act_granularity(self.group)

    @property
    def n_static_groups(self) -> int:
        g = group_length(self._granularity(), self.channels, layer=self.layer)
        return 1 if g is None else self.channels // g

    @property
    def calibrated(self) -> bool:
        """A static quantizer that has seen data (or loaded ranges); dynamic ones always are."""
        return self.dynamic or self.bits is None or self._observed

    def reset(self) -> None:
        """Forget the recorded static ranges."""
        if hasattr(self, "lo"):
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))
        self._observed = False

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the static ranges to cover ``x``."""
        n = self.n_static_groups
        xg = x.detach().reshape(-1, n, x.shape[-1] // n).to(self.lo.dtype)
        self.lo.copy_(torch.minimum(self.lo, xg.amin(dim=(0, 2))))
        self.hi.copy_(torch.maximum(self.hi, xg.amax(dim=(0, 2))))
        self._observed = True

    def _static_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._observed:
            where = f" of layer {self.layer!r}" if self.layer else ""
            raise InvalidArgumentError(
                f"the static activation quantizer{where} has no calibrated range; run calibration data "
                f"through the model inside `with ditq.quant.calibrate(model):` first"
            )
        # Q-DiT's rule on the recorded (min, max) of each group: rows [lo, hi] give the same
        # scale/zero as the min-max of the data they summarize.
        ends = torch.stack([self.lo, self.hi], dim=-1).to(x.dtype)  # [n, 2]
        scale, zero = quant_params(ends, self.bits, PerToken(), self.sym, check_finite=False)  # [n, 1]
        shape = (1,) * (x.dim() - 1) + (-1,)
        return scale.reshape(shape), zero.reshape(shape)

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero) this quantizer applies to ``x`` (shaped as in :mod:`ditq.quant.primitives`)."""
        if self.bits is None:
            raise InvalidArgumentError(
                "this activation quantizer is the identity (bits=None): it has no parameters"
            )
        if self.dynamic:
            return quant_params(x, self.bits, self._granularity(), self.sym, check_finite=False)
        return self._static_params(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if not self.dynamic:
            if self.calibrating:
                self.observe(x)
                return x
            scale, zero = self._static_params(x)
            return dequantize(quantize(x, scale, zero, self.bits, self.sym), scale, zero)
        # check_finite=False: the NaN/inf check is a device sync per layer and call.
        return fake_quantize(x, self.bits, self._granularity(), self.sym, check_finite=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "lo") and prefix + "lo" in state_dict:
            # Loaded ranges count as calibrated when they hold data (one sync, at load time only).
            self._observed = bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())

    def extra_repr(self) -> str:
        if self.bits is None:
            return "bits=None (float)"
        mode = "dynamic" if self.dynamic else "static" + (", calibrating" if self.calibrating else "")
        return f"bits={self.bits}, {self._granularity()}, sym={self.sym}, {mode}"


# ----------------------------------------------------------------------------
# Quantized linear
# ----------------------------------------------------------------------------


def _weight_parts(override):
    """(codes, scale, zero) from a GPTQResult-like object, a dict or a tuple."""
    if isinstance(override, (tuple, list)) and len(override) == 3:
        return tuple(override)
    if isinstance(override, dict) and {"codes", "scale", "zero"} <= set(override):
        return override["codes"], override["scale"], override["zero"]
    if all(hasattr(override, a) for a in ("codes", "scale", "zero")):
        return override.codes, override.scale, override.zero
    raise InvalidArgumentError(
        f"a weight override is a GPTQResult or (codes, scale, zero), got {type(override).__name__}"
    )


class QuantLinear(nn.Module):
    """A linear layer with integer weight codes, group-wise (scale, zero), and quantized inputs.

    The dequantized weight is cached on first use and reused until a weight
    buffer changes (in-place writes such as ``load_state_dict``, or ``.to()``)
    or :meth:`invalidate_cache` is called; ``cache_weight = False`` turns the
    cache off (it holds a float copy of the weight: the memory savings come
    with the packed kernels, not with this reference path).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 4,
        w_group: int = 128,
        w_sym: bool = False,
        a_bits: int | None = 8,
        a_group: int = 0,
        a_sym: bool = False,
        dynamic: bool = True,
        layer: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits = _w_bits(w_bits, "")
        self.w_group = _w_group(w_group, "")
        self.w_sym = w_sym
        self.layer = layer
        n = num_groups(weight_granularity(w_group), in_features, layer=layer)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=code_dtype(w_sym), device=device)
        )
        self.register_buffer("w_scale", torch.ones(out_features, n, dtype=dtype, device=device))
        self.register_buffer("w_zero", torch.zeros(out_features, n, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.act_quant = ActQuantizer(
            a_bits, a_group, a_sym, dynamic, in_features, layer=layer, device=device
        )
        self.cache_weight = True
        self._cache: torch.Tensor | None = None
        self._cache_key = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def empty(
        cls, linear: nn.Linear, cfg: LayerQuant | QDiTConfig, *, layer: str | None = None
    ) -> QuantLinear:
        """An unfilled QuantLinear shaped for ``linear`` under ``cfg`` (a skeleton to load into)."""
        if isinstance(cfg, QDiTConfig):
            cfg = cfg.for_layer(layer)
        if not isinstance(cfg, LayerQuant):
            raise InvalidArgumentError(
                f"layer settings must be a LayerQuant or QDiTConfig, got {type(cfg).__name__}"
            )
        w = linear.weight
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            w_bits=cfg.w_bits, w_group=cfg.w_group, w_sym=cfg.w_sym,
            a_bits=cfg.a_bits, a_group=cfg.a_group, a_sym=cfg.a_sym, dynamic=cfg.dynamic,
            layer=layer, device=w.device, dtype=w.dtype,
        )  # fmt: skip

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        linear: nn.Linear,
        cfg: LayerQuant | QDiTConfig,
        weight_override=None,
        *,
        layer: str | None = None,
    ) -> QuantLinear:
        """Quantize ``linear``'s weight round-to-nearest under ``cfg`` (min-max, MSE or percentile clip).

        ``weight_override`` replaces that with given codes and group parameters,
        e.g. a :class:`~ditq.quant.gptq.GPTQResult` or ``(codes, scale, zero)``;
        they must fit the layer's shape, bits and group size.
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"from_float takes an nn.Linear, got {type(linear).__name__}")
        q = cls.empty(linear, cfg, layer=layer)
        cfg = cfg.for_layer(layer) if isinstance(cfg, QDiTConfig) else cfg
        w = linear.weight.detach()
        if weight_override is None:
            gran = weight_granularity(cfg.w_group)
            scale, zero = quant_params(w, cfg.w_bits, gran, cfg.w_sym, as_clip(cfg.w_clip))
            codes = quantize(w, scale, zero, cfg.w_bits, cfg.w_sym)
        else:
            codes, scale, zero = q._check_override(*_weight_parts(weight_override))
        q.qweight.copy_(codes)
        q.w_scale.copy_(scale)
        q.w_zero.copy_(zero)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        q.train(linear.training)
        return q

    def _check_override(self, codes, scale, zero):
        where = f" for layer {self.layer!r}" if self.layer else ""
        for name, t in (("codes", codes), ("scale", scale), ("zero", zero)):
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(
                    f"weight override {name}{where} must be a tensor, got {type(t).__name__}"
                )
        if tuple(codes.shape) != tuple(self.qweight.shape) or codes.dtype != self.qweight.dtype:
            raise InvalidArgumentError(
                f"weight override codes{where} must be {self.qweight.dtype} {tuple(self.qweight.shape)} "
                f"(w_sym={self.w_sym}), got {codes.dtype} {tuple(codes.shape)}"
            )
        if tuple(scale.shape) != tuple(self.w_scale.shape) or tuple(zero.shape) != tuple(self.w_scale.shape):
            raise InvalidArgumentError(
                f"weight override scale/zero{where} must be {tuple(self.w_scale.shape)} "
                f"(w_group={self.w_group}), got {tuple(scale.shape)} and {tuple(zero.shape)}"
            )
        q_min, q_max = qrange(self.w_bits, self.w_sym)
        if codes.numel() and (int(codes.min()) < q_min or int(codes.max()) > q_max):
            raise InvalidArgumentError(
                f"weight override codes{where} leave the {self.w_bits}-bit range [{q_min}, {q_max}]"
            )
        return codes, scale, zero

    # -- weights -----------------------------------------------------------------------------------

    def _key(self):
        try:
            return tuple(
                (t._version, t.data_ptr(), t.dtype, t.device)
                for t in (self.qweight, self.w_scale, self.w_zero)
            )
        except RuntimeError:  # inference-mode tensors have no version counter: do not cache
            return None

    def invalidate_cache(self) -> None:
        """Drop the cached dequantized weight (needed only after writes that bypass the buffers' versions)."""
        self._cache = self._cache_key = None

    def dequantized_weight(self) -> torch.Tensor:
        """``(qweight - w_zero) * w_scale`` [out, in], in the scale's dtype (cached; see the class doc)."""
        key = self._key() if self.cache_weight else None
        if key is not None and self._cache is not None and key == self._cache_key:
            return self._cache
        w = dequantize(self.qweight, self.w_scale, self.w_zero)
        if key is not None:
            self._cache, self._cache_key = w, key
        else:
            self.invalidate_cache()
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view for code that inspects ``layer.weight``)."""
        return self.dequantized_weight()

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_quant(x)  # [..., in], fake-quantized
        w = self.dequantized_weight()  # [out, in]
        b = self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)  # [..., out]

    def extra_repr(self) -> str:
        group = "channel" if self.w_group == 0 else f"group{self.w_group}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, w_bits={self.w_bits}, w_{group}, w_sym={self.w_sym}"
        )
