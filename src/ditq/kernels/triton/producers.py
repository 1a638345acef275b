"""Triton kernels of the producers fused with int8 quantization: LayerNorm + adaLN modulation, GELU
(tanh), RMSNorm + adaLN modulation and SwiGLU, each then ``quantize_per_token_int8``'s rule, in one pass.

The quantizing steps are those of :mod:`ditq.kernels.triton.quantize`; the package
docstring (:mod:`ditq.kernels.triton`) explains the kernels as a whole, and the host
code that launches them is in :mod:`ditq.kernels.triton.launch`.

This module imports Triton at the top: import it only when Triton is importable
(:mod:`ditq.kernels.triton` checks). No ``from __future__ import annotations`` here:
Triton reads the ``tl.constexpr`` annotations of kernel arguments as objects.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice  # Triton >= 3.0: resolved to CUDA's or HIP's when compiling

from ditq.kernels.triton.common import cast
from ditq.kernels.triton.quantize import absmax_inv, int8_codes

# ----------------------------------------------------------------------------
# layernorm_modulate_quantize_int8, gelu_quantize_int8, rmsnorm_modulate_quantize_int8,
# swiglu_quantize_int8: a producer, then quantize_per_token_int8's rule, in one pass
# ----------------------------------------------------------------------------

GELU_BETA = tl.constexpr(1.41421356237309504880 * 1.12837916709551257390 * 0.5)
"""PyTorch's ``kBeta = M_SQRT2 * M_2_SQRTPI * 0.5`` (sqrt(2 / pi)), rounded to float32 where used."""

GELU_KAPPA = tl.constexpr(0.044715)
"""PyTorch's ``kKappa`` of the tanh GELU, rounded to float32 where used."""


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """float32 ``y`` rounded to ``dtype`` (nearest even) and kept as float32: what storing a step's
    result in ``dtype`` does in PyTorch eager. Nothing for float32.

    Compiled, LLVM turns a rounded float32 sum or product of two 16-bit values into one 16-bit
    instruction (``add.rn.bf16x2``, ``mul.rn.bf16x2``): the same numbers, as float32 holds more
    than twice their precision plus two bits (so rounding twice equals rounding once)."""
    if dtype != tl.float32:
        y = cast(y, dtype).to(tl.float32)
    return y


@triton.jit
def _adaln(n, mask, scale, shift, dtype: tl.constexpr):
    """``n * (1 + scale) + shift`` of a normalized float32 [rows, cols] tile (values of ``dtype``) as
    PyTorch eager computes it in ``dtype``: each of the three steps rounded to ``dtype``. Zero where
    ``mask`` is off (so that it never counts in max |m|)."""
    m = _round_to(n * _round_to(1.0 + scale, dtype), dtype)
    m = _round_to(m + shift, dtype)
    return tl.where(mask, m, 0.0)


@triton.jit
def _load_f32(ptr, offs, mask):
    """The tile at ``ptr + offs`` in float32, 0 where ``mask`` is off."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _modulate(x, mask, mean, rstd, scale_ptr, shift_ptr, poffs, dtype: tl.constexpr):
    """``layer_norm(x) * (1 + scale) + shift`` of a float32 [rows, cols] tile as PyTorch eager computes
    it in ``dtype``: ``(x - mean) * rstd`` in float32 rounded to ``dtype``, then :func:`_adaln` with
    the sample's ``scale`` and ``shift`` read at ``poffs``."""
    n = _round_to((x - mean[:, None]) * rstd[:, None], dtype)
    sc, sh = _load_f32(scale_ptr, poffs, mask), _load_f32(shift_ptr, poffs, mask)
    return _adaln(n, mask, sc, sh, dtype)


@triton.jit
def layernorm_modulate_quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    ROWS,
    G,
    shift_ptr,
    scale_ptr,
    T,
    EPS,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    """DiT's LayerNorm (no affine) + adaLN modulation + absmax int8 of ``ROWS`` tokens of ``G`` inputs.

    Token r belongs to sample r // T, whose ``shift`` and ``scale`` rows (``[B, G]``,
    x's dtype) it reads. Mean, then biased variance of the deviations (two
    passes, float32), ``rstd = 1 / sqrt(var + EPS)`` with IEEE-rounded square root
    and division. A row that fits one BLOCK_G chunk stays in registers; a longer
    one is read four times (sum, squared deviations, max |m|, codes).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    pbase = (rows // T).to(tl.int64)[:, None] * G  # the sample's shift / scale row
    cols = tl.arange(0, BLOCK_G)
    dtype = x_ptr.dtype.element_ty
    n_in = tl.full((BLOCK_R,), 1.0, tl.float32) * G
    if ONE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < G)
        x = _load_f32(x_ptr, base + cols[None, :], mask)
        mean = tl.math.div_rn(tl.sum(x, axis=1), n_in)
        d = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.math.div_rn(tl.sum(d * d, axis=1), n_in)
    else:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            acc += tl.sum(_load_f32(x_ptr, base + c0 + cols[None, :], mask), 1)
        mean = tl.math.div_rn(acc, n_in)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            d = tl.where(mask, x - mean[:, None], 0.0)
            acc += tl.sum(d * d, axis=1)
        var = tl.math.div_rn(acc, n_in)
    rstd = tl.math.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), tl.math.sqrt_rn(var + EPS))
    if ONE_CHUNK:
        m = _modulate(x, mask, mean, rstd, scale_ptr, shift_ptr, pbase + cols[None, :], dtype)
        amax = tl.max(tl.abs(m), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            m = _modulate(x, mask, mean, rstd, scale_ptr, shift_ptr, pbase + c0 + cols[None, :], dtype)
            amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    inv = absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R)  # then quantize_rows_kernel's numbers
    if ONE_CHUNK:
        tl.store(q_ptr + base + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            m = _modulate(x, mask, mean, rstd, scale_ptr, shift_ptr, pbase + c0 + cols[None, :], dtype)
            tl.store(q_ptr + base + c0 + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)


@triton.jit
def _tanh_f64(z):
    """tanh of float32 ``z``, computed in float64 and rounded to float32: the interpreter's stand-in
    for libdevice's. ``tanh(a) = e / (e + 2)`` with ``e = expm1(2a)``, ``a = min(|z|, 20)``, and
    ``expm1(y) = (u - 1) * y / log(u)`` for ``u = exp(y) != 1`` (Kahan's; ``y`` where u rounds to 1),
    accurate to a few float64 units: correctly rounded float32 but for a vanishing fraction of ``z``."""
    a = tl.minimum(tl.abs(z.to(tl.float64)), 20.0)
    y = 2.0 * a
    u = tl.exp(y)
    one = u == 1.0
    e = tl.where(one, y, (u - 1.0) * y / tl.where(one, 1.0, tl.log(u)))
    t = e / (e + 2.0)
    return tl.where(z < 0, -t, t).to(tl.float32)


@triton.jit
def _gelu_tanh(x, USE_RINT: tl.constexpr):
    """PyTorch's ``gelu(x, approximate="tanh")`` in float32:
    ``0.5 * x * (1 + tanh(kBeta * (x + kKappa * x^3)))`` in its order, with the FMA
    ``kKappa * x^3 + x`` that CUDA's compiler (and PyTorch's vectorized CPU code)
    makes of it; tanh is libdevice's (CUDA's ``tanhf``, as eager's) when compiled."""
    inner = GELU_BETA * tl.fma(x * x * x, GELU_KAPPA, x)
    if USE_RINT:
        t = libdevice.tanh(inner)
    else:
        t = _tanh_f64(inner)
    return (0.5 * x) * (1.0 + t)


@triton.jit
def _gelu_chunk(x_ptr, offs, mask, USE_RINT: tl.constexpr, dtype: tl.constexpr):
    """GELU (tanh) of the tile at ``x_ptr + offs``, rounded to ``dtype``."""
    return _round_to(_gelu_tanh(_load_f32(x_ptr, offs, mask), USE_RINT), dtype)


@triton.jit
def gelu_quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    ROWS,
    G,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    """GELU (tanh) rounded to x's dtype, then absmax int8, of ``ROWS`` rows of ``G`` inputs.

    As :func:`quantize_rows_kernel`: BLOCK_R rows per program, a row in registers
    when it fits one BLOCK_G chunk, else read twice (GELU computed twice).
    ``USE_RINT``: compiled, so libdevice's ``rint`` and ``tanh``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    cols = tl.arange(0, BLOCK_G)
    dtype = x_ptr.dtype.element_ty
    if ONE_CHUNK:  # masked inputs read as 0, whose GELU is 0
        mask = row_mask[:, None] & (cols[None, :] < G)
        m = _gelu_chunk(x_ptr, base + cols[None, :], mask, USE_RINT, dtype)
        amax = tl.max(tl.abs(m), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            m = _gelu_chunk(x_ptr, base + c0 + cols[None, :], mask, USE_RINT, dtype)
            amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    inv = absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R)  # then quantize_rows_kernel's numbers
    if ONE_CHUNK:
        tl.store(q_ptr + base + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            m = _gelu_chunk(x_ptr, base + c0 + cols[None, :], mask, USE_RINT, dtype)
            tl.store(q_ptr + base + c0 + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)


@triton.jit
def _rms_modulate(x, mask, r, w_ptr, woffs, scale_ptr, shift_ptr, poffs, dtype: tl.constexpr):
    """``(weight * (x * r).to(dtype)) * (1 + scale) + shift`` of a float32 [rows, cols] tile as PyTorch
    eager computes it (``reference.ref_rmsnorm_modulate_quantize_int8``): ``x * r`` in float32 rounded to
    ``dtype``, the weight's product rounded (the weight read at ``woffs``), then :func:`_adaln` with
    the sample's ``scale`` and ``shift`` read at ``poffs``."""
    n = _round_to(x * r[:, None], dtype)
    n = _round_to(_load_f32(w_ptr, woffs, mask) * n, dtype)
    sc, sh = _load_f32(scale_ptr, poffs, mask), _load_f32(shift_ptr, poffs, mask)
    return _adaln(n, mask, sc, sh, dtype)


@triton.jit
def rmsnorm_modulate_quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    ROWS,
    G,
    w_ptr,
    shift_ptr,
    scale_ptr,
    T,
    EPS,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    """Large-DiT's RMSNorm (with its weight ``[G]``) + adaLN modulation + absmax int8 of ``ROWS`` tokens.

    As :func:`layernorm_modulate_quantize_kernel` (token r reads sample r // T's
    ``shift`` and ``scale`` rows; all in x's dtype): the mean of squares in float32,
    ``r = 1 / sqrt(mean + EPS)`` with IEEE-rounded square root and division. A row
    that fits one BLOCK_G chunk stays in registers; a longer one is read three
    times (sum of squares, max |m|, codes).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    pbase = (rows // T).to(tl.int64)[:, None] * G  # the sample's shift / scale row
    cols = tl.arange(0, BLOCK_G)
    # The weight read as a [rows, cols] tile (once per row, from cache): a [cols] one would be moved
    # through shared memory into x's layout.
    wcols = tl.broadcast_to(cols[None, :], (BLOCK_R, BLOCK_G))
    dtype = x_ptr.dtype.element_ty
    n_in = tl.full((BLOCK_R,), 1.0, tl.float32) * G
    if ONE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < G)
        x = _load_f32(x_ptr, base + cols[None, :], mask)
        ms = tl.math.div_rn(tl.sum(x * x, axis=1), n_in)
    else:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            acc += tl.sum(x * x, axis=1)
        ms = tl.math.div_rn(acc, n_in)
    r = tl.math.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), tl.math.sqrt_rn(ms + EPS))
    if ONE_CHUNK:
        m = _rms_modulate(x, mask, r, w_ptr, wcols, scale_ptr, shift_ptr, pbase + cols[None, :], dtype)
        amax = tl.max(tl.abs(m), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            m = _rms_modulate(
                x, mask, r, w_ptr, c0 + wcols, scale_ptr, shift_ptr, pbase + c0 + cols[None, :], dtype
            )
            amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    inv = absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R)  # then quantize_rows_kernel's numbers
    if ONE_CHUNK:
        tl.store(q_ptr + base + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = _load_f32(x_ptr, base + c0 + cols[None, :], mask)
            m = _rms_modulate(
                x, mask, r, w_ptr, c0 + wcols, scale_ptr, shift_ptr, pbase + c0 + cols[None, :], dtype
            )
            tl.store(q_ptr + base + c0 + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)


@triton.jit
def _exp_f64(a):
    """exp of float32 ``a`` in float64, rounded to float32 (the interpreter's stand-in for libdevice's).
    Results float32 rounds to inf are made inf explicitly: numpy warns on an overflowing cast."""
    e = tl.exp(tl.minimum(a.to(tl.float64), 89.0))
    big = e >= 3.4028235677973366e38  # 2^128 - 2^103, halfway from float32's largest to 2^128: rounds to inf
    e = tl.where(big, 0.0, e).to(tl.float32)
    return tl.where(big, float("inf"), e)


@triton.jit
def _swiglu(g, u, USE_RINT: tl.constexpr, dtype: tl.constexpr):
    """``silu(g) * u`` of float32 tiles (values of ``dtype``) as PyTorch eager computes it: silu in
    float32 as ``g / (1 + exp(-g))`` with an IEEE division, rounded to ``dtype``, then the product
    rounded. ``exp`` is libdevice's (CUDA's ``expf``, as eager's) when compiled; the interpreter's is
    float64's rounded to float32 (numpy's float32 one is less accurate)."""
    if USE_RINT:
        e = libdevice.exp(-g)
    else:
        e = _exp_f64(-g)
    s = _round_to(tl.math.div_rn(g, 1.0 + e), dtype)
    return _round_to(s * u, dtype)


@triton.jit
def _swiglu_chunk(g_ptr, u_ptr, offs, mask, USE_RINT: tl.constexpr, dtype: tl.constexpr):
    """:func:`_swiglu` of the tiles at ``g_ptr + offs`` and ``u_ptr + offs``."""
    return _swiglu(_load_f32(g_ptr, offs, mask), _load_f32(u_ptr, offs, mask), USE_RINT, dtype)


@triton.jit
def swiglu_quantize_rows_kernel(
    g_ptr,
    q_ptr,
    s_ptr,
    ROWS,
    G,
    u_ptr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    """``silu(gate) * up`` in gate's dtype, then absmax int8, of ``ROWS`` rows of ``G`` inputs.

    As :func:`gelu_quantize_rows_kernel`: BLOCK_R rows per program, a row in
    registers when it fits one BLOCK_G chunk, else both inputs read twice (the
    product computed twice). ``USE_RINT``: compiled, so libdevice's ``rint`` and ``exp``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    cols = tl.arange(0, BLOCK_G)
    dtype = g_ptr.dtype.element_ty
    if ONE_CHUNK:  # masked inputs read as 0, whose product is 0
        mask = row_mask[:, None] & (cols[None, :] < G)
        m = _swiglu_chunk(g_ptr, u_ptr, base + cols[None, :], mask, USE_RINT, dtype)
        amax = tl.max(tl.abs(m), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            m = _swiglu_chunk(g_ptr, u_ptr, base + c0 + cols[None, :], mask, USE_RINT, dtype)
            amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    inv = absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R)  # then quantize_rows_kernel's numbers
    if ONE_CHUNK:
        tl.store(q_ptr + base + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            m = _swiglu_chunk(g_ptr, u_ptr, base + c0 + cols[None, :], mask, USE_RINT, dtype)
            tl.store(q_ptr + base + c0 + cols[None, :], int8_codes(m, inv, USE_RINT), mask=mask)
