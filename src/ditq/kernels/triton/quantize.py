"""Triton kernels of the per-token quantizers: absmax int8 (``quantize_per_token_int8``) and
Q-DiT's asymmetric min/max (``quantize_per_token_asym``), bit for bit the references.

One program per block of rows (a row is a token, or one of its groups); the package
docstring (:mod:`ditq.kernels.triton`) explains the kernels as a whole, and the host
code that launches them is in :mod:`ditq.kernels.triton.launch`.

This module imports Triton at the top: import it only when Triton is importable
(:mod:`ditq.kernels.triton` checks). No ``from __future__ import annotations`` here:
Triton reads the ``tl.constexpr`` annotations of kernel arguments as objects.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice  # Triton >= 3.0: resolved to CUDA's or HIP's when compiling

# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


@triton.jit
def absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R: tl.constexpr):
    """Store each row's scale ``a / 127`` (``a = max(max|x|, 1e-5)``, reference.ACT_EPS) and return
    ``127 / a``, the reference's numbers exactly: ``(1 / a) * 127`` with IEEE-rounded divisions
    (Triton's plain "/" is an approximate one on NVIDIA GPUs)."""
    amax = tl.maximum(amax, 1e-5)
    tl.store(s_ptr + rows, tl.math.div_rn(amax, tl.full((BLOCK_R,), 127.0, tl.float32)), mask=row_mask)
    return tl.math.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), amax) * 127.0


@triton.jit
def int8_codes(m, inv, USE_RINT: tl.constexpr):
    """int8 ``clamp(round(m * inv), -128, 127)`` of a [rows, cols] tile (``inv = 127 / a`` per row),
    rounding half to even as ``torch.round``. The interpreter has no libdevice: adding and removing
    1.5 * 2^23 rounds half to even in float32 for |v| < 2^22 (here |v| <= 127); the launch turns FMA
    fusion off, so v is rounded before the addition."""
    v = m * inv[:, None]
    if USE_RINT:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)


@triton.jit
def quantize_rows_kernel(
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
    """Absmax int8 quantization of ``ROWS`` rows of ``G`` inputs (a row = a token or one of its groups).

    Each program takes BLOCK_R rows. A row that fits one BLOCK_G chunk stays in
    registers; a longer one is read twice (max, then quantize), the second time
    mostly from L2.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    cols = tl.arange(0, BLOCK_G)
    if ONE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < G)
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    inv = absmax_inv(amax, s_ptr, rows, row_mask, BLOCK_R)
    if ONE_CHUNK:
        tl.store(q_ptr + base + cols[None, :], int8_codes(x, inv, USE_RINT), mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + base + c0 + cols[None, :], int8_codes(x, inv, USE_RINT), mask=mask)


# ----------------------------------------------------------------------------
# quantize_per_token_asym
# ----------------------------------------------------------------------------


@triton.jit
def _round_half_even(v, USE_RINT: tl.constexpr):
    """``torch.round`` of float32 ``v``. The interpreter has no libdevice: adding and removing 2^23
    rounds |v| < 2^23 half to even (FMA fusion is off at launch); larger floats are integers."""
    if USE_RINT:
        return libdevice.rint(v)
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)
    return tl.where(v < 0, -r, r)


@triton.jit
def _asym_codes(x, scale, zero, qmax, USE_RINT: tl.constexpr):
    """uint8 ``clamp(round(x / scale) + zero, 0, qmax)`` of a [rows, cols] tile (per-row parameters)."""
    r = _round_half_even(tl.math.div_rn(x, scale[:, None]), USE_RINT) + zero[:, None]
    return tl.minimum(tl.maximum(r, 0.0), qmax[:, None]).to(tl.uint8)


@triton.jit
def quantize_asym_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    ROWS,
    G,
    QMAX,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    """Q-DiT's asymmetric min/max quantization of ``ROWS`` rows of ``G`` inputs to codes 0..QMAX.

    As :func:`quantize_rows_kernel`: BLOCK_R rows per program, a row in registers
    when it fits one BLOCK_G chunk, else read twice. IEEE divisions (``div_rn``)
    and round-half-to-even give the reference's numbers bit for bit.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * G
    cols = tl.arange(0, BLOCK_G)
    if ONE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < G)
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hi = tl.max(tl.where(mask, x, -float("inf")), axis=1)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
    else:
        hi = tl.full((BLOCK_R,), -float("inf"), tl.float32)
        lo = tl.full((BLOCK_R,), float("inf"), tl.float32)
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, -float("inf")), axis=1))
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=1))
    qmax = tl.full((BLOCK_R,), 1.0, tl.float32) * QMAX
    scale = tl.math.div_rn(tl.maximum(hi - lo, 1e-5), qmax)  # reference.RANGE_EPS
    scale = tl.where(row_mask, scale, 1.0)  # rows past the end: keep the arithmetic finite
    zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, scale), USE_RINT), 0.0), qmax)
    zero = tl.where(row_mask, zero, 0.0)
    tl.store(s_ptr + rows, scale, mask=row_mask)
    tl.store(z_ptr + rows, zero, mask=row_mask)
    if ONE_CHUNK:
        q = _asym_codes(x, scale, zero, qmax, USE_RINT)
        tl.store(q_ptr + base + cols[None, :], q, mask=mask)
    else:
        for c0 in range(0, G, BLOCK_G):
            mask = row_mask[:, None] & (cols[None, :] < G - c0)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _asym_codes(x, scale, zero, qmax, USE_RINT)
            tl.store(q_ptr + base + c0 + cols[None, :], q, mask=mask)
