"""Plain-PyTorch references of the ditq ops: the definition of what each op computes.

Every fast implementation (``ditq.kernels.cpu``, ``ditq.kernels.triton``) is tested
against these, and they run wherever no fast implementation is registered or one
declines a call (:mod:`ditq.kernels.dispatch`). Integer parts are exact: products
of integer codes are summed exactly (in float64, which holds every integer below
2^53; the sums here stay below 2^31) and converted to int32, as an int32
accumulator would hold them; then a float32 epilogue applies the scales.

``ref_<op>`` is the reference of ``ditq.kernels.ops.<op>``, whose docstring is the
op's contract; the arguments were checked there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ditq.kernels.packing import unpack_2bit, unpack_int4

ACT_EPS = 1e-5
"""Floor on a token's max |x| in ``quantize_per_token_int8`` (BitNet b1.58's; keeps scales finite)."""

RANGE_EPS = 1e-5
"""Floor on a row's max - min in ``quantize_per_token_asym`` (``ditq.quant.primitives.RANGE_EPS``)."""


# ----------------------------------------------------------------------------
# Reference helpers
# ----------------------------------------------------------------------------


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` of integer-valued tensors ``a [M, K]``, ``b [N, K]`` as int32 ``[M, N]``.

    Summed in float64, exact for every integer below 2^53 (the sums here are below 2^31): the
    int32 accumulator of a kernel holds the same numbers.
    """
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def _per_token(xs: Tensor, m: int) -> Tensor:
    return xs.reshape(m, 1).float()


def _per_out(s: Tensor, n: int) -> Tensor:
    return s.reshape(1, -1).float().expand(1, n)


def _epilogue(acc: Tensor, xs: Tensor, ws: Tensor, bias: Tensor | None) -> Tensor:
    """``float(acc) * xs * ws + bias`` in float32, in this order (the kernels' order too)."""
    y = acc.float() * xs * ws
    return y + bias.float() if bias is not None else y


# ----------------------------------------------------------------------------
# Reference implementations
# ----------------------------------------------------------------------------


def ref_quantize_per_token_int8(x: Tensor, group: int = 0) -> tuple[Tensor, Tensor]:
    """Reference of :func:`quantize_per_token_int8`."""
    k = x.shape[-1]
    g = k if group == 0 else group
    rows = x.float().reshape(*x.shape[:-1], k // g, g)
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    inv = amax.reciprocal() * 127.0  # = `127.0 / amax` in PyTorch, BitNet's (and ditq.quant.ternary's) scale
    q = torch.clamp(torch.round(rows * inv), -128, 127).to(torch.int8).reshape(x.shape)
    return q, (amax / 127.0).squeeze(-1)


def ref_quantize_per_token_asym(x: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`quantize_per_token_asym`."""
    k = x.shape[-1]
    g = k if group == 0 else group
    rows = x.float().reshape(*x.shape[:-1], k // g, g)
    q_max = float(2**bits - 1)
    hi, lo = rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True)
    scale = (hi - lo).clamp(min=RANGE_EPS) / q_max
    zero = torch.round(-lo / scale).clamp(0.0, q_max)
    q = torch.clamp(torch.round(rows / scale) + zero, 0.0, q_max).to(torch.uint8).reshape(x.shape)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def ref_layernorm_modulate_quantize_int8(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`layernorm_modulate_quantize_int8`: the unfused composition, in ``x``'s dtype."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    modulated = normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return ref_quantize_per_token_int8(modulated)


def ref_gelu_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of :func:`gelu_quantize_int8`: the unfused composition, in ``x``'s dtype."""
    return ref_quantize_per_token_int8(F.gelu(x, approximate="tanh"))


def ref_rmsnorm_modulate_quantize_int8(
    x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`rmsnorm_modulate_quantize_int8`: the unfused composition, in ``x``'s dtype
    (Large-DiT's RMSNorm: the mean of squares in float32, the normalized value rounded to ``x``'s
    dtype before the weight multiplies it)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = weight * (x * torch.rsqrt(variance + eps)).to(x.dtype)
    modulated = normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return ref_quantize_per_token_int8(modulated)


def ref_swiglu_quantize_int8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of :func:`swiglu_quantize_int8`: the unfused composition, in the inputs' dtype."""
    return ref_quantize_per_token_int8(F.silu(gate) * up)


def ref_w8a8_linear(
    xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, bias: Tensor | None = None, out_dtype=torch.float32
) -> Tensor:
    """Reference of :func:`w8a8_linear`."""
    k, n = xq.shape[-1], wq.shape[0]
    x2 = xq.reshape(-1, k)
    acc = _int_matmul(x2, wq)
    y = _epilogue(acc, _per_token(xs, x2.shape[0]), _per_out(ws, n), bias)
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_w158a8_linear(
    xq: Tensor,
    xs: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype=torch.float32,
) -> Tensor:
    """Reference of :func:`w158a8_linear`."""
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k)
    w = unpack_2bit(w_packed, "k4").to(torch.int8) - 1  # codes w + 1 -> {-1, 0, +1}
    acc = _int_matmul(x2, w)
    y = _epilogue(acc, _per_token(xs, x2.shape[0]), _per_out(w_scale, n), bias)
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_w4a8_linear(
    xq: Tensor,
    xs: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    bias: Tensor | None = None,
    out_dtype=torch.float32,
) -> Tensor:
    """Reference of :func:`w4a8_linear`."""
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k).to(torch.int32)
    m = x2.shape[0]
    ga = k // (1 if tuple(xs.shape) == tuple(xq.shape[:-1]) else xs.shape[-1])  # activation group
    gw = k // w_scale.shape[1]  # weight group
    sx = xs.reshape(m, -1).float()
    zx = (
        x_zero.reshape(m, -1).to(torch.int32)
        if x_zero is not None
        else torch.zeros_like(sx, dtype=torch.int32)
    )
    qw = unpack_int4(w_packed).to(torch.int32)
    zw = w_zero.to(torch.int32)
    # Exact integer codes minus zero points (zero points are integers), then one exact integer
    # dot product per segment of L = gcd(ga, gw) inputs, where both scales are constant.
    a = x2 - zx.repeat_interleave(ga, dim=1)  # [M, K]
    b = qw - zw.repeat_interleave(gw, dim=1)  # [N, K]
    seg = math.gcd(ga, gw)
    y = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for s in range(k // seg):
        lo = s * seg
        acc = _int_matmul(a[:, lo : lo + seg], b[:, lo : lo + seg])
        y += acc.float() * sx[:, lo // ga, None] * w_scale[None, :, lo // gw].float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_ternary_linear(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of :func:`ternary_linear` (the numbers of :class:`ditq.quant.TernaryLinear`, bit for bit)."""
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1)
    w = s * (unpack_2bit(w_packed, "k4").to(s.dtype) - 1)  # [N, K] in the scale's dtype
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def ref_int4_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Reference of :func:`int4_linear` (the numbers of Q-DiT's dequantized weight)."""
    n, ng = w_scale.shape
    codes = unpack_int4(w_packed).reshape(n, ng, -1)
    w = ((codes.to(w_scale.dtype) - w_zero.unsqueeze(-1)) * w_scale.unsqueeze(-1)).reshape(n, -1)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


REFERENCE: dict[str, Callable] = {
    "quantize_per_token_int8": ref_quantize_per_token_int8,
    "quantize_per_token_asym": ref_quantize_per_token_asym,
    "layernorm_modulate_quantize_int8": ref_layernorm_modulate_quantize_int8,
    "gelu_quantize_int8": ref_gelu_quantize_int8,
    "rmsnorm_modulate_quantize_int8": ref_rmsnorm_modulate_quantize_int8,
    "swiglu_quantize_int8": ref_swiglu_quantize_int8,
    "w8a8_linear": ref_w8a8_linear,
    "w158a8_linear": ref_w158a8_linear,
    "w4a8_linear": ref_w4a8_linear,
    "ternary_linear": ref_ternary_linear,
    "int4_linear": ref_int4_linear,
}
"""Op name -> its plain-PyTorch reference implementation."""
