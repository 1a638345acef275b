"""The low-bit operators, ``torch.library`` custom ops of namespace ``ditq``: the module to call them through.

Every op is one operator with three parts: its definition here (argument checks
with one-line :class:`KernelError` messages, and a fake (meta) implementation,
so that it traces under ``torch.compile`` and ``torch.export``); a plain-PyTorch
reference, the definition of what it computes (:mod:`ditq.kernels.reference`);
and fast implementations that register beside it and are tested against the
reference (:mod:`ditq.kernels.dispatch` chooses among them). This module also
re-exports the backend choice and the fusion policy of :mod:`ditq.kernels.dispatch`
(:func:`set_backend`, :func:`use_backend`, :func:`implementation`,
:func:`should_fuse`, :class:`Int8Tokens`, ...), so that ``ops`` is the one module
callers need.

Ops (call them as ``torch.ops.ditq.<name>`` or through the Python functions of
the same name below)::

    quantize_per_token_int8(x, group=0)              -> (q int8, scale float32)
    quantize_per_token_asym(x, bits, group=0)        -> (q uint8, scale float32, zero float32), Q-DiT's rule
    layernorm_modulate_quantize_int8(x, shift, scale, eps)
                                                     -> (q int8, scale float32): DiT's norm + adaLN
                                                     modulation, then quantize_per_token_int8, one pass
    gelu_quantize_int8(x)                            -> (q int8, scale float32): GELU (tanh), then
                                                     quantize_per_token_int8, one pass
    rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps)
                                                     -> (q int8, scale float32): Large-DiT's RMSNorm +
                                                     adaLN modulation, then quantize_per_token_int8
    swiglu_quantize_int8(gate, up)                   -> (q int8, scale float32): silu(gate) * up, then
                                                     quantize_per_token_int8, one pass
    w8a8_linear(xq, xs, wq, ws, bias, out_dtype)     int8 activations x int8 weights
    w158a8_linear(xq, xs, w_packed, w_scale, bias, out_dtype)
                                                     int8 activations x ternary (2-bit "k4") weights
    w4a8_linear(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
                                                     Q-DiT group-wise: int4 weights, 8-bit activations
    ternary_linear(x, w_packed, scale, bias)         weight-only ternary, float activations
    int4_linear(x, w_packed, w_scale, w_zero, bias)  weight-only group-wise int4, float activations

Shapes: activations are ``[..., K]`` (any leading axes, M = their product),
weights ``[N, K]`` before packing (N output features), outputs ``[..., N]``.
Packed layouts are those of :mod:`ditq.kernels.packing` (int4: two codes per
byte along K; ternary: ``"k4"``, codes ``w + 1``). The ops are for inference:
they have no autograd formula.

Accumulation is int32, so K is at most :data:`MAX_K` for the integer ops.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ditq.kernels import dispatch
from ditq.kernels.checks import (
    MAX_K,
    KernelError,
    check_acts,
    check_bias,
    check_group_params,
    check_int4_weight,
    check_out_dtype,
    check_out_scale,
    check_tensor,
    check_ternary_weight,
    check_token_params,
    fail,
)
from ditq.kernels.dispatch import (
    BACKENDS,
    OPS,
    Int8Tokens,
    available_backends,
    check_backend,
    get_backend,
    has_fast_impl,
    implementation,
    register_impl,
    registered_impl,
    resolve_backend,
    set_backend,
    set_fusion,
    should_fuse,
    use_backend,
    use_fusion,
)

__all__ = [
    "BACKENDS",
    "MAX_K",
    "NAMESPACE",
    "OPS",
    "Int8Tokens",
    "KernelError",
    "available_backends",
    "check_backend",
    "get_backend",
    "has_fast_impl",
    "implementation",
    "register_impl",
    "registered_impl",
    "resolve_backend",
    "set_backend",
    "set_fusion",
    "should_fuse",
    "use_backend",
    "use_fusion",
    *OPS,
]

NAMESPACE = "ditq"


def _plain(v) -> bool:
    """Whether ``v`` is no tensor, or an eager tensor that needs no gradient (not a fake, meta or
    subclass tensor, as tracing and ``torch.compile`` pass)."""
    if not isinstance(v, Tensor):
        return True
    return type(v) is Tensor and v.device.type != "meta" and not (v.requires_grad and torch.is_grad_enabled())


def _op(name: str):
    """Define ``fn`` as the custom op ``torch.ops.ditq.<name>`` and return a function that runs ``fn``
    directly on plain eager tensors, and the custom op everywhere else.

    The custom op makes the ops traceable (fake implementations, ``torch.compile``,
    ``torch.export``) and refuses inputs that want gradients; on eager tensors its dispatch
    (autograd wrapper, dynamo guard, redispatch) costs as much as the GEMM itself for a small
    layer at a few tokens (``docs/benchmarks.md``, "Numbers formerly in kernel docstrings"), and
    nothing it does changes the result there. The returned function keeps ``register_fake`` and
    ``custom_op`` (the op definition).
    """

    def define(fn):
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling() or not all(map(_plain, (*args, *kwargs.values()))):
                return custom(*args, **kwargs)
            return fn(*args, **kwargs)

        call.register_fake = custom.register_fake
        call.custom_op = custom
        return call

    return define


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------


def _check_quantize(x: Tensor, group: int) -> int:
    op = "quantize_per_token_int8"
    k = check_acts(op, x, "x", "float", max_k=False)
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or (group and k % group):
        fail(op, f"group must be 0 (per token) or a size dividing K = {k}, got {group!r}")
    return k


@_op("quantize_per_token_int8")
def quantize_per_token_int8(x: Tensor, group: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization per token (``group=0``) or per token and group of ``group`` inputs.

    ``x``: float ``[..., K]`` (any float dtype; computed in float32). Returns
    ``q`` int8 ``[..., K]`` and ``scale`` float32 ``[..., G]`` (G = 1 per token,
    else K / group), with ``x ≈ q * scale`` group by group. The rule is BitNet
    b1.58's: ``a = max(max|x|, 1e-5)``, ``q = clamp(round(x * (127 / a)), -128, 127)``,
    ``scale = a / 127``, where ``127 / a`` is computed as ``(1 / a) * 127`` (what
    ``127.0 / a`` does in PyTorch) and ``round`` is round-half-to-even (as
    ``torch.round``): the codes equal ``ditq.quant.ternary``'s activation fake
    quantization bit for bit. Codes stay in [-127, 127] (|x * 127 / a| <= 127).
    """
    _check_quantize(x, group)
    return dispatch.run("quantize_per_token_int8", x.device, x, group)


@quantize_per_token_int8.register_fake
def _(x, group=0):
    k = _check_quantize(x, group)
    g = k if group == 0 else group
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], k // g), dtype=torch.float32)


def _check_quantize_asym(x: Tensor, bits: int, group: int) -> int:
    op = "quantize_per_token_asym"
    k = check_acts(op, x, "x", "float", max_k=False)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        fail(op, f"bits must be an integer in 2..8 (uint8 codes), got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or (group and k % group):
        fail(op, f"group must be 0 (per token) or a size dividing K = {k}, got {group!r}")
    return k


@_op("quantize_per_token_asym")
def quantize_per_token_asym(x: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max quantization to ``bits``-bit unsigned codes per token (``group=0``) or per
    token and group of ``group`` inputs: Q-DiT's dynamic activation quantizer.

    ``x``: float ``[..., K]`` (any float dtype; computed in float32). Returns
    ``q`` uint8 ``[..., K]``, ``scale`` and ``zero`` float32 ``[..., G]`` (G = 1
    per token, else K / group), with ``x ≈ (q - zero) * scale`` group by group.
    The rule is ``ditq.quant.primitives.quant_params`` / ``quantize`` with
    ``sym=False``: ``scale = max(max - min, 1e-5) / (2^bits - 1)``,
    ``zero = clamp(round(-min / scale), 0, 2^bits - 1)``,
    ``q = clamp(round(x / scale) + zero, 0, 2^bits - 1)``, with IEEE divisions
    and round-half-to-even (as ``torch.round``): for float32 ``x`` the codes,
    scales and zero points equal :class:`ditq.quant.ActQuantizer`'s bit for bit.
    Non-finite inputs give unspecified codes.
    """
    _check_quantize_asym(x, bits, group)
    return dispatch.run("quantize_per_token_asym", x.device, x, bits, group)


@quantize_per_token_asym.register_fake
def _(x, bits, group=0):
    k = _check_quantize_asym(x, bits, group)
    g = k if group == 0 else group
    lead = (*x.shape[:-1], k // g)
    f32 = torch.float32
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(lead, dtype=f32), x.new_empty(lead, dtype=f32)


_PRODUCER_NOTE = """
    A fast implementation computes the producer in float32 with its own rounding
    (the order of a sum, a library's ``tanh``), so a value one unit in the last
    place away from the reference's can move its code by one where it lies at a
    rounding boundary: codes agree with the reference's except for such rare
    off-by-ones, the scales to float32 rounding. Rounding to ``x``'s dtype
    between steps is kept, so bfloat16 inputs give bfloat16 eager's numbers.
"""


def _check_layernorm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, op: str = "layernorm_modulate_quantize_int8"
) -> int:
    check_tensor(op, "x", x, "float", dim=3)
    b, _, k = x.shape
    if k == 0:
        fail(op, f"x must be [B, T, K] with K >= 1, got shape {tuple(x.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(op, name, t, (x.dtype,), dim=2)
        if tuple(t.shape) != (b, k):
            fail(op, f"{name} must be [B, K] = [{b}, {k}] (one row per sample), got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        fail(op, f"eps must be a positive finite number, got {eps!r}")
    return k


@_op("layernorm_modulate_quantize_int8")
def layernorm_modulate_quantize_int8(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """DiT's pre-linear activation in one pass: LayerNorm (no affine), adaLN modulation, int8 per token.

    ``x``: float ``[B, T, K]``; ``shift``, ``scale``: ``[B, K]`` in ``x``'s dtype
    (one row per sample, broadcast over its T tokens). Computes
    ``quantize_per_token_int8(layer_norm(x, eps) * (1 + scale) + shift)``: ``q``
    int8 ``[B, T, K]`` and ``scale`` float32 ``[B, T, 1]``, without writing the
    normalized or modulated activations (two thirds of the bytes such a block
    moves before its ``qkv`` and ``fc1`` linears on a GPU).
    """
    _check_layernorm_modulate(x, shift, scale, eps)
    return dispatch.run("layernorm_modulate_quantize_int8", x.device, x, shift, scale, eps)


layernorm_modulate_quantize_int8.__doc__ += _PRODUCER_NOTE


@layernorm_modulate_quantize_int8.register_fake
def _(x, shift, scale, eps):
    _check_layernorm_modulate(x, shift, scale, eps)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_gelu_quantize(x: Tensor) -> int:
    return check_acts("gelu_quantize_int8", x, "x", "float", max_k=False)


@_op("gelu_quantize_int8")
def gelu_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """The MLP's hidden activation in one pass: GELU (tanh approximation), then int8 per token.

    ``x``: float ``[..., K]`` (the ``fc1`` output). Computes
    ``quantize_per_token_int8(gelu(x, approximate="tanh"))``: ``q`` int8
    ``[..., K]`` and ``scale`` float32 ``[..., 1]``, without writing the GELU
    output (the largest activation of a DiT block: 4x the hidden size).
    """
    _check_gelu_quantize(x)
    return dispatch.run("gelu_quantize_int8", x.device, x)


gelu_quantize_int8.__doc__ += _PRODUCER_NOTE


@gelu_quantize_int8.register_fake
def _(x):
    _check_gelu_quantize(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_rmsnorm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float) -> int:
    op = "rmsnorm_modulate_quantize_int8"
    k = _check_layernorm_modulate(x, shift, scale, eps, op)
    check_tensor(op, "weight", weight, (x.dtype,), dim=1)
    if weight.shape[0] != k:
        fail(op, f"weight must be [K] = [{k}], got {tuple(weight.shape)}")
    return k


@_op("rmsnorm_modulate_quantize_int8")
def rmsnorm_modulate_quantize_int8(
    x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Large-DiT's (TerDiT's) pre-linear activation in one pass: RMSNorm with its weight, adaLN
    modulation, int8 per token.

    ``x``: float ``[B, T, K]``; ``weight``: ``[K]``; ``shift``, ``scale``:
    ``[B, K]``; all in ``x``'s dtype. Computes
    ``quantize_per_token_int8(weight * x * rsqrt(mean(x², -1) + eps) * (1 + scale) + shift)``
    with :class:`ditq.models.layers.RMSNorm`'s roundings: ``q`` int8 ``[B, T, K]``
    and ``scale`` float32 ``[B, T, 1]``. One call feeds all the linears that read
    the block's normalized input (``wq``, ``wk``, ``wv``; ``w1``, ``w3``).
    """
    _check_rmsnorm_modulate(x, weight, shift, scale, eps)
    return dispatch.run("rmsnorm_modulate_quantize_int8", x.device, x, weight, shift, scale, eps)


rmsnorm_modulate_quantize_int8.__doc__ += _PRODUCER_NOTE


@rmsnorm_modulate_quantize_int8.register_fake
def _(x, weight, shift, scale, eps):
    _check_rmsnorm_modulate(x, weight, shift, scale, eps)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_swiglu_quantize(gate: Tensor, up: Tensor) -> int:
    op = "swiglu_quantize_int8"
    k = check_acts(op, gate, "gate", "float", max_k=False)
    check_tensor(op, "up", up, (gate.dtype,))
    if up.shape != gate.shape:
        fail(op, f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    return k


@_op("swiglu_quantize_int8")
def swiglu_quantize_int8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """SwiGLU's hidden activation in one pass: ``silu(gate) * up``, then int8 per token.

    ``gate``, ``up``: float ``[..., K]``, same shape and dtype (the ``w1`` and
    ``w3`` outputs of a Large-DiT feed-forward). Computes
    ``quantize_per_token_int8(silu(gate) * up)``: ``q`` int8 ``[..., K]`` and
    ``scale`` float32 ``[..., 1]``, without writing the product (the input of ``w2``).
    """
    _check_swiglu_quantize(gate, up)
    return dispatch.run("swiglu_quantize_int8", gate.device, gate, up)


swiglu_quantize_int8.__doc__ += _PRODUCER_NOTE


@swiglu_quantize_int8.register_fake
def _(gate, up):
    _check_swiglu_quantize(gate, up)
    scales = gate.new_empty((*gate.shape[:-1], 1), dtype=torch.float32)
    return gate.new_empty(gate.shape, dtype=torch.int8), scales


def _check_w8a8(xq, xs, wq, ws, bias, out_dtype) -> int:
    op = "w8a8_linear"
    k = check_acts(op, xq, "xq", (torch.int8,))
    if check_token_params(op, "xs", xs, xq) != 1:
        fail(op, "xs must hold one scale per token ([..., 1]); per-group activations need w4a8_linear")
    check_tensor(op, "wq", wq, (torch.int8,), dim=2)
    if wq.shape[1] != k:
        fail(op, f"wq must be int8 [N, K] with K = {k} (the inputs' last axis), got {tuple(wq.shape)}")
    n = wq.shape[0]
    check_out_scale(op, "ws", ws, n)
    check_bias(op, bias, n)
    check_out_dtype(op, out_dtype)
    return n


@_op("w8a8_linear")
def w8a8_linear(
    xq: Tensor,
    xs: Tensor,
    wq: Tensor,
    ws: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``y = (xq @ wq.T) * xs * ws + bias``: int8 x int8 with int32 accumulation, then a float32 epilogue.

    ``xq`` int8 ``[..., K]`` with ``xs`` float ``[..., 1]`` (one scale per token,
    e.g. from :func:`quantize_per_token_int8`); ``wq`` int8 ``[N, K]`` (symmetric
    codes) with ``ws`` float, 1 value (per tensor) or N (per output channel, any
    shape holding N such as ``[N]`` or ``[N, 1]``); ``bias`` float ``[N]`` or None.
    Returns ``out_dtype [..., N]``; the epilogue is ``float(acc) * xs * ws + bias``
    in float32, in that order.
    """
    _check_w8a8(xq, xs, wq, ws, bias, out_dtype)
    return dispatch.run("w8a8_linear", xq.device, xq, xs, wq, ws, bias, out_dtype)


@w8a8_linear.register_fake
def _(xq, xs, wq, ws, bias=None, out_dtype=torch.float32):
    n = _check_w8a8(xq, xs, wq, ws, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype) -> int:
    op = "w158a8_linear"
    k = check_acts(op, xq, "xq", (torch.int8,))
    if check_token_params(op, "xs", xs, xq) != 1:
        fail(op, "xs must hold one scale per token ([..., 1])")
    n = check_ternary_weight(op, w_packed, k)
    check_out_scale(op, "w_scale", w_scale, n)
    check_bias(op, bias, n)
    check_out_dtype(op, out_dtype)
    return n


@_op("w158a8_linear")
def w158a8_linear(
    xq: Tensor,
    xs: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W1.58A8: ``y = (xq @ W̃.T) * xs * w_scale + bias`` with ternary ``W̃`` packed 2 bits per weight.

    ``xq`` int8 ``[..., K]``, ``xs`` float ``[..., 1]`` (per token); ``w_packed``
    uint8 ``[N, K/4]`` in the ``"k4"`` layout (codes ``W̃ + 1``; K a multiple of
    4); ``w_scale`` float, 1 value (TerDiT's α or BitNet's γ) or N (per output
    channel); ``bias`` float ``[N]`` or None. Returns ``out_dtype [..., N]``;
    exact int32 accumulation, then ``float(acc) * xs * w_scale + bias``.
    """
    _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype)
    return dispatch.run("w158a8_linear", xq.device, xq, xs, w_packed, w_scale, bias, out_dtype)


@w158a8_linear.register_fake
def _(xq, xs, w_packed, w_scale, bias=None, out_dtype=torch.float32):
    n = _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype) -> int:
    op = "w4a8_linear"
    k = check_acts(op, xq, "xq", (torch.int8, torch.uint8))
    if (xq.dtype == torch.uint8) != (x_zero is not None):
        fail(
            op,
            "activations are int8 codes without x_zero (symmetric) or uint8 codes with x_zero "
            f"(asymmetric); got {xq.dtype} with x_zero {'given' if x_zero is not None else 'None'}",
        )
    check_token_params(op, "xs", xs, xq)
    if x_zero is not None:
        check_token_params(op, "x_zero", x_zero, xq)
        if x_zero.shape != xs.shape:
            fail(op, f"x_zero must have the shape of xs {tuple(xs.shape)}, got {tuple(x_zero.shape)}")
    n = check_int4_weight(op, w_packed, k)
    check_group_params(op, w_scale, w_zero, n, k)
    check_bias(op, bias, n)
    check_out_dtype(op, out_dtype)
    return n


@_op("w4a8_linear")
def w4a8_linear(
    xq: Tensor,
    xs: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Q-DiT's group-wise W4A8 linear: ``y = Σ_k (q_w − z_w)·s_w · (q_x − z_x)·s_x + bias``.

    Weights: ``w_packed`` uint8 ``[N, K/2]``, int4 codes two per byte
    (:func:`ditq.kernels.packing.pack_int4` of :class:`ditq.quant.QuantLinear`'s
    ``qweight``), ``w_scale`` and ``w_zero`` float ``[N, K/gw]``: one (scale,
    integer zero point) per output row and group of ``gw`` inputs (symmetric
    4-bit codes are stored as ``q + 8`` with zero point 8).

    Activations: ``xq [..., K]`` with ``xs [..., K/ga]`` (one scale per token,
    or per token and group of ``ga`` inputs) and either int8 codes with
    ``x_zero=None`` (symmetric, e.g. :func:`quantize_per_token_int8`) or uint8
    codes with integer zero points ``x_zero`` shaped like ``xs`` (Q-DiT's
    asymmetric dynamic quantizer).

    Zero points are handled exactly: within each segment of ``gcd(ga, gw)``
    inputs both scales are constant, and the integer sum
    ``Σ (q_w − z_w)(q_x − z_x) = Σ q_w q_x − z_w Σ q_x − z_x Σ q_w + L z_w z_x``
    is exact in int32; segments are then scaled and summed in float32.
    Returns ``out_dtype [..., N]``.
    """
    _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
    return dispatch.run("w4a8_linear", xq.device, xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)


@w4a8_linear.register_fake
def _(xq, xs, x_zero, w_packed, w_scale, w_zero, bias=None, out_dtype=torch.float32):
    n = _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_ternary(x, w_packed, scale, bias) -> int:
    op = "ternary_linear"
    k = check_acts(op, x, "x", "float", max_k=False)
    n = check_ternary_weight(op, w_packed, k)
    check_out_scale(op, "scale", scale, n)
    check_bias(op, bias, n)
    return n


@_op("ternary_linear")
def ternary_linear(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Weight-only ternary linear: ``y = x @ (scale · W̃).T + bias`` with float activations.

    ``x`` float ``[..., K]``; ``w_packed`` uint8 ``[N, K/4]`` ("k4", codes
    ``W̃ + 1``); ``scale`` float, 1 value or N (per output channel); ``bias``
    ``[N]`` or None. The weight ``scale · W̃`` is formed in the scale's dtype and
    cast to ``x.dtype``; returns ``x.dtype [..., N]`` — the numbers of
    :class:`ditq.quant.TernaryLinear` with ``act_bits=None``. For small batches,
    where reading the weights dominates.
    """
    _check_ternary(x, w_packed, scale, bias)
    return dispatch.run("ternary_linear", x.device, x, w_packed, scale, bias)


@ternary_linear.register_fake
def _(x, w_packed, scale, bias=None):
    n = _check_ternary(x, w_packed, scale, bias)
    return x.new_empty((*x.shape[:-1], n))


def _check_int4(x, w_packed, w_scale, w_zero, bias) -> int:
    op = "int4_linear"
    k = check_acts(op, x, "x", "float", max_k=False)
    n = check_int4_weight(op, w_packed, k)
    check_group_params(op, w_scale, w_zero, n, k)
    check_bias(op, bias, n)
    return n


@_op("int4_linear")
def int4_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Weight-only group-wise int4 linear: ``y = x @ ((q − z) · s).T + bias`` with float activations.

    ``x`` float ``[..., K]``; ``w_packed`` uint8 ``[N, K/2]`` (int4, two per
    byte); ``w_scale``, ``w_zero`` float ``[N, K/g]`` (the group size g is
    ``K / w_scale.shape[1]``). The weight is dequantized in the scale's dtype
    (as :func:`ditq.quant.primitives.dequantize`) and cast to ``x.dtype``;
    returns ``x.dtype [..., N]``. For small batches. Zero points are integers
    (Q-DiT rounds them): the fast implementations rely on ``q − z`` being exact.
    """
    _check_int4(x, w_packed, w_scale, w_zero, bias)
    return dispatch.run("int4_linear", x.device, x, w_packed, w_scale, w_zero, bias)


@int4_linear.register_fake
def _(x, w_packed, w_scale, w_zero, bias=None):
    n = _check_int4(x, w_packed, w_scale, w_zero, bias)
    return x.new_empty((*x.shape[:-1], n))
