"""The fake-quant Q-DiT layer: integer weight codes and group scales, a fake-quantized input.

A :class:`QuantLinear` stores what a low-bit kernel reads: integer weight
codes ``qweight`` and one ``(w_scale, w_zero)`` per output row and group of
``w_group`` input channels. Codes are kept one per byte (``[out, in]``, uint8
asymmetric / int8 symmetric), or, for layers of at most 4 bits, *packed*
two per byte (``[out, in/2]`` uint8, the ``int4`` layout of
:mod:`ditq.kernels.packing`, symmetric codes stored as ``q + 8``): see
:meth:`QuantLinear.pack_` and ``packed=True``. Loaded checkpoints are packed.

**Forward**: the reference, always: the input is fake-quantized with
:class:`~ditq.quant.act_quant.ActQuantizer`, the weight dequantized and
``F.linear`` called; its numbers are those of :mod:`ditq.quant.primitives`,
bit for bit. This is the layer calibration, GPTQ and the search work on.
Deployment converts it (:func:`ditq.quant.deployed.convert_`) into a
:class:`~ditq.quant.deployed.DeployedQuantLinear` that runs the integer op its
settings fit (:attr:`QuantLinear.kernel_op`); ``quantize_`` and the loaders do
that for you.

State-dict keys, beside the layer's original ``bias``::

    qweight   uint8/int8 [out, in]          integer codes (one per byte), or
              uint8 [out, in/2]             int4-packed codes (layers of <= 4 bits)
    w_scale   float      [out, in // g]     (g = in when w_group = 0)
    w_zero    float      [out, in // g]     integer-valued; all 0 when symmetric
    act_quant.lo, act_quant.hi  float [n]   static activation ranges only

A layer loads either form of ``qweight`` and converts it to its own storage
(codes are checked against its bit width on the way in). Bits and group
sizes are not in the state dict; they come from the
:class:`~ditq.quant.config.QDiTConfig` saved beside it (see
:func:`ditq.quant.state.load_quantized_state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.kernels import ops
from ditq.kernels.packing import pack_int4, unpack_int4
from ditq.quant.act_quant import ActQuantizer
from ditq.quant.config import (
    PER_TENSOR,
    LayerQuant,
    QDiTConfig,
    check_w_bits,
    check_w_group,
)
from ditq.quant.granularity import (
    num_groups,
    weight_granularity,
)
from ditq.quant.primitives import (
    as_clip,
    code_dtype,
    dequantize,
    qrange,
    quant_params,
    quantize,
)

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


INT4_SYM_OFFSET = 8
"""Packed symmetric codes are stored as ``q + 8`` (offset binary, 0..15); kernels get zero point 8."""

KERNEL_OPS = ("w4a8_linear", "int4_linear", "w8a8_linear")
"""The :mod:`ditq.kernels` ops a :class:`QuantLinear` may run (see :func:`kernel_op_for`)."""


def packable(w_bits: int, in_features: int) -> bool:
    """Whether a layer's codes can be packed two per byte (int4 layout): at most 4 bits, ``in`` even."""
    return w_bits <= 4 and in_features % 2 == 0


def kernel_op_for(cfg: LayerQuant, in_features: int) -> str | None:
    """The :mod:`ditq.kernels` op a layer with settings ``cfg`` runs in eval mode, or None (fake quant).

    See the module doc for the table; the integer ops accumulate in int32, so
    layers of more than :data:`ditq.kernels.ops.MAX_K` inputs take the float path.
    """
    if cfg.a_bits is None:
        return "int4_linear" if packable(cfg.w_bits, in_features) else None
    if not cfg.dynamic or in_features > ops.MAX_K:
        return None
    if packable(cfg.w_bits, in_features):
        return "w4a8_linear"
    if cfg.w_sym and cfg.w_group in (0, in_features) and cfg.a_sym and cfg.a_group in (0, PER_TENSOR):
        return "w8a8_linear"
    return None


def _to_nibbles(codes: torch.Tensor, sym: bool) -> torch.Tensor:
    """Codes one per byte -> uint8 nibble values 0..15 (symmetric codes offset by 8)."""
    if sym:
        return (codes.to(torch.int16) + INT4_SYM_OFFSET).to(torch.uint8)
    return codes.to(torch.uint8)


def _from_nibbles(nibbles: torch.Tensor, sym: bool) -> torch.Tensor:
    """uint8 nibble values -> codes one per byte in :func:`code_dtype` (inverse of :func:`_to_nibbles`)."""
    if sym:
        return (nibbles.to(torch.int16) - INT4_SYM_OFFSET).to(torch.int8)
    return nibbles


class QuantLinear(nn.Module):
    """A linear layer with integer weight codes, group-wise (scale, zero), and quantized inputs.

    Its forward is fake quantization (see the module doc); :attr:`kernel_op` is the integer op of
    :mod:`ditq.kernels` its settings fit, which :func:`~ditq.quant.deployed.convert_` makes it run.
    ``packed=True`` stores the codes of a layer of at most 4 bits two per byte
    (the kernels' int4 layout; no float weight is ever kept for such a layer).
    On the fake-quant path the dequantized weight is cached on first use and
    reused until a weight buffer changes (in-place writes such as
    ``load_state_dict``, or ``.to()``) or :meth:`invalidate_cache` is called;
    ``cache_weight = False`` turns the cache off (packed layers start with it
    off).
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
        packed: bool = False,
        layer: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits = check_w_bits(w_bits, "")
        self.w_group = check_w_group(w_group, "")
        self.w_sym = w_sym
        self.layer = layer
        n = num_groups(weight_granularity(w_group), in_features, layer=layer)
        dtype = dtype or torch.get_default_dtype()
        self.packed = bool(packed) and packable(self.w_bits, in_features)
        if self.packed:  # code 0 everywhere, as the unpacked zeros below
            fill = (INT4_SYM_OFFSET | INT4_SYM_OFFSET << 4) if w_sym else 0
            qweight = torch.full((out_features, in_features // 2), fill, dtype=torch.uint8, device=device)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=code_dtype(w_sym), device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", torch.ones(out_features, n, dtype=dtype, device=device))
        self.register_buffer("w_zero", torch.zeros(out_features, n, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.act_quant = ActQuantizer(
            a_bits, a_group, a_sym, dynamic, in_features, layer=layer, device=device
        )
        self.cache_weight = not self.packed
        self._cache: torch.Tensor | None = None
        self._cache_key = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        linear: nn.Linear,
        cfg: LayerQuant | QDiTConfig,
        *,
        layer: str | None = None,
        packed: bool = False,
    ) -> QuantLinear:
        """An unfilled QuantLinear shaped for ``linear`` under ``cfg`` (a skeleton to load into; on the
        meta device when ``linear`` is)."""
        if isinstance(cfg, QDiTConfig):
            cfg = cfg.for_layer(layer)
        if not isinstance(cfg, LayerQuant):
            raise InvalidArgumentError(
                f"layer settings must be a LayerQuant or QDiTConfig, got {type(cfg).__name__}"
            )
        w = linear.weight
        q = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            w_bits=cfg.w_bits, w_group=cfg.w_group, w_sym=cfg.w_sym,
            a_bits=cfg.a_bits, a_group=cfg.a_group, a_sym=cfg.a_sym, dynamic=cfg.dynamic,
            packed=packed, layer=layer, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        # The mode of the layer it stands in for: a new Module starts in training mode, and an eval
        # model must not get layers that skip the integer kernels.
        return q.train(linear.training)

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
        they must fit the layer's shape, bits and group size. The codes are kept
        one per byte (:meth:`pack_` packs them).
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
        return q

    def _check_override(self, codes, scale, zero):
        where = f" for layer {self.layer!r}" if self.layer else ""
        for name, t in (("codes", codes), ("scale", scale), ("zero", zero)):
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(
                    f"weight override {name}{where} must be a tensor, got {type(t).__name__}"
                )
        shape, dtype = (self.out_features, self.in_features), code_dtype(self.w_sym)
        if tuple(codes.shape) != shape or codes.dtype != dtype:
            raise InvalidArgumentError(
                f"weight override codes{where} must be {dtype} {shape} "
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

    # -- storage: codes one per byte, or int4-packed -----------------------------------------------

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Shape of int4-packed ``qweight``: ``[out, in/2]``."""
        return self.out_features, self.in_features // 2

    def codes(self) -> torch.Tensor:
        """The integer codes ``[out, in]`` (uint8 asymmetric / int8 symmetric), unpacked if need be."""
        if self.packed:
            return _from_nibbles(unpack_int4(self.qweight), self.w_sym)
        return self.qweight

    @torch.no_grad()
    def packed_codes(self) -> torch.Tensor:
        """The codes int4-packed, uint8 ``[out, in/2]`` (symmetric ones as ``q + 8``): what a checkpoint
        stores for a layer of at most 4 bits with an even number of inputs."""
        if self.packed:
            return self.qweight
        if not packable(self.w_bits, self.in_features):
            raise InvalidArgumentError(
                f"codes of {self.w_bits} bits for {self.in_features} inputs do not pack two per byte"
            )
        return pack_int4(_to_nibbles(self.qweight, self.w_sym))

    @torch.no_grad()
    def pack_(self) -> QuantLinear:
        """Store the codes two per byte (int4 layout) if the layer has at most 4 bits and an even
        number of inputs (else nothing changes); turns the float-weight cache off. Returns ``self``."""
        if not self.packed and packable(self.w_bits, self.in_features):
            self.qweight = self.packed_codes()
            self.packed, self.cache_weight = True, False
            self.invalidate_cache()
        return self

    @torch.no_grad()
    def unpack_(self) -> QuantLinear:
        """Store the codes one per byte again (the inverse of :meth:`pack_`). Returns ``self``."""
        if self.packed:
            self.qweight = self.codes()
            self.packed, self.cache_weight = False, True
            self.invalidate_cache()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "qweight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor):
            state_dict[key] = self._as_stored(w, self.layer or prefix.rstrip(".") or "qweight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _as_stored(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """``qweight`` from a state dict (either layout) in this layer's storage layout, codes checked."""
        shape = (self.out_features, self.in_features)
        unpacked = tuple(w.shape) == shape and w.dtype == code_dtype(self.w_sym)
        is_packed = (
            packable(self.w_bits, self.in_features)
            and tuple(w.shape) == self.packed_shape
            and w.dtype == torch.uint8
        )
        if not (unpacked or is_packed):
            return w  # left to load_state_dict's own shape/dtype error
        if w.is_meta:
            return w if is_packed == self.packed else torch.empty_like(self.qweight, device="meta")
        if is_packed and (self.w_bits < 4 or not self.packed):
            codes = _from_nibbles(unpack_int4(w), self.w_sym)
            self._check_codes(codes, name)
            return w if self.packed else codes
        if unpacked:
            self._check_codes(w, name)
            return pack_int4(_to_nibbles(w, self.w_sym)) if self.packed else w
        return w  # packed 4-bit codes into a packed layer: every nibble is a valid code

    def _check_codes(self, codes: torch.Tensor, name: str) -> None:
        q_min, q_max = qrange(self.w_bits, self.w_sym)
        if codes.numel() == 0:
            return
        lo, hi = int(codes.min()), int(codes.max())
        if lo < q_min or hi > q_max:
            raise CheckpointError(
                f"layer {name!r}: qweight holds codes from {lo} to {hi}, outside the {self.w_bits}-bit "
                f"range [{q_min}, {q_max}] of its quantization config; the checkpoint's tensors and "
                "metadata disagree"
            )

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
        """Drop the cached dequantized weight (needed only after writes that bypass the buffers'
        versions)."""
        self._cache = self._cache_key = None

    def dequantized_weight(self) -> torch.Tensor:
        """``(codes - w_zero) * w_scale`` [out, in], in the scale's dtype (cached; see the class doc)."""
        key = self._key() if self.cache_weight else None
        if key is not None and self._cache is not None and key == self._cache_key:
            return self._cache
        w = dequantize(self.codes(), self.w_scale, self.w_zero)
        if key is not None:
            self._cache, self._cache_key = w, key
        else:
            self._cache = self._cache_key = None
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view for code that inspects ``layer.weight``)."""
        return self.dequantized_weight()

    # -- forward -----------------------------------------------------------------------------------

    @property
    def settings(self) -> LayerQuant:
        """This layer's settings (clipping is not recorded: it shaped the codes only)."""
        aq = self.act_quant
        return LayerQuant(
            w_bits=self.w_bits, w_group=self.w_group, w_sym=self.w_sym, a_bits=aq.bits,
            a_group=aq.group, a_sym=aq.sym, dynamic=aq.dynamic,
        )  # fmt: skip

    @property
    def kernel_op(self) -> str | None:
        """The :mod:`ditq.kernels` op this layer's settings fit (see :func:`kernel_op_for`), or None:
        what :func:`~ditq.quant.deployed.convert_` makes it run."""
        return kernel_op_for(self.settings, self.in_features)

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
            + (", packed=int4" if self.packed else "")
        )
