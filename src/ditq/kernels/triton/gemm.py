"""Triton kernels of the linears: the integer GEMMs (``w8a8_linear``, ``w158a8_linear``,
``w4a8_linear``) and the weight-only ones (``ternary_linear``, ``int4_linear``), with their
autotuning configs.

The package docstring (:mod:`ditq.kernels.triton`) explains the kernels as a whole,
and the host code that launches them is in :mod:`ditq.kernels.triton.launch`.

This module imports Triton at the top: import it only when Triton is importable
(:mod:`ditq.kernels.triton` checks). No ``from __future__ import annotations`` here:
Triton reads the ``tl.constexpr`` annotations of kernel arguments as objects.
"""

import triton
import triton.language as tl

from ditq.kernels.triton.common import INTERPRET, cast

MIN_BLOCK_K_INT8 = 32
"""Smallest K tile of an int8 ``tl.dot`` (Triton's NVIDIA backend asks K >= 32 for 8-bit operands)."""


def _cfg(bm: int, bn: int, bk: int, group_m: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# One config under the interpreter: tiles smaller than the test shapes, so that
# several programs, partial tiles and several K iterations are all exercised.
_INTERPRET_INT = [_cfg(16, 16, 32, 2, 4, 1)]
_INTERPRET_FLOAT = [_cfg(16, 16, 16, 2, 4, 1)]

# Integer GEMMs (int8 operands: a K tile of 128 is 128 bytes, like 64 fp16 inputs).
# Large tiles for M in the thousands (DiT-XL/2 at 256 tokens x batch 32 = 8192),
# BLOCK_M = 16/32 tiles with narrow N tiles for a few tokens, where the grid must
# still cover the GPU's SMs and the weights' bytes dominate.
_GPU_INT = [
    _cfg(128, 256, 128, 8, 8, 3),
    _cfg(256, 128, 128, 8, 8, 3),
    _cfg(128, 128, 128, 8, 8, 4),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(128, 64, 128, 8, 4, 4),
    _cfg(64, 64, 128, 8, 4, 4),
    _cfg(32, 64, 256, 4, 4, 4),
    _cfg(32, 128, 128, 4, 4, 4),
    _cfg(16, 64, 256, 1, 4, 4),
    _cfg(16, 32, 256, 1, 4, 4),
    _cfg(16, 16, 128, 1, 4, 4),  # a few tokens: 16-wide N tiles, twice the programs of 32
    _cfg(16, 128, 128, 1, 4, 4),
]
# w4a8: the K tile must divide the segment where both scales are constant, so
# tile shapes come with K tiles of 32, 64 and 128 (pruned per call). The kernel
# holds two accumulators (the segment's int32 sum and the float32 total): tiles
# of 128 x 128, and 64 x 128 on 4 warps with K tiles of 128, spill registers on
# sm_90 (benchmarks/triton_compile.py), so the large tiles run on 8 warps.
_GPU_W4A8 = [
    _cfg(bm, bn, bk, gm, w, s)
    for (bm, bn, gm, w, s, bks) in [
        (128, 64, 8, 8, 4, (32, 64, 128)),
        (64, 128, 8, 8, 4, (32, 64, 128)),
        (64, 256, 8, 8, 3, (32, 64)),
        (64, 128, 8, 4, 4, (32, 64)),
        (64, 64, 8, 4, 4, (32, 64, 128)),
        (32, 64, 4, 4, 4, (32, 64, 128)),
        (16, 64, 1, 4, 4, (32, 64, 128)),
        (16, 32, 1, 4, 4, (32, 64, 128)),
    ]
    for bk in bks
]
# Weight-only float kernels: made for small M (memory-bound on the packed weights).
# With a few tokens a 16 x 32 tile gives only N/32 programs (144 for N = 4608, about
# one per SM); K tiles of 256-512 keep more weight bytes in flight per program.
_GPU_FLOAT = [
    _cfg(16, 16, 512, 1, 4, 3),
    _cfg(16, 32, 512, 1, 8, 3),
    _cfg(16, 32, 256, 1, 4, 4),
    _cfg(16, 16, 128, 1, 4, 4),  # int4 in groups of 128 keeps K tiles <= 128 (_prune_weight_only)
    _cfg(16, 32, 128, 1, 4, 4),
    _cfg(16, 64, 128, 1, 4, 4),
    _cfg(16, 64, 64, 1, 4, 4),
    _cfg(16, 128, 64, 1, 4, 3),
    _cfg(32, 64, 64, 4, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 3),
    _cfg(128, 128, 32, 8, 8, 3),
]

INT_CONFIGS = _INTERPRET_INT if INTERPRET else _GPU_INT
W4A8_CONFIGS = _INTERPRET_INT if INTERPRET else _GPU_W4A8
FLOAT_CONFIGS = _INTERPRET_FLOAT if INTERPRET else _GPU_FLOAT


def _prune_m(configs, named_args, **kwargs):
    """Drop configs whose M tile is far above M (they only waste tuning time), keeping at least one."""
    m = named_args["M"]
    cap = max(16, triton.next_power_of_2(m))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _prune_weight_only(configs, named_args, **kwargs):
    """For int4 weights whose groups hold whole K tiles of some configs, keep only those (the
    others gather a scale per element: several times the shared memory); then as :func:`_prune_m`."""
    if kwargs.get("W_INT4"):
        aligned = [c for c in configs if kwargs["GW_ALIGN"] % c.kwargs["BLOCK_K"] == 0]
        configs = aligned or configs
    return _prune_m(configs, named_args, **kwargs)


def _prune_w4a8(configs, named_args, **kwargs):
    """Keep the configs whose K tile divides the constant-scale segment (then as :func:`_prune_m`)."""
    seg = named_args["SEG"]
    return _prune_m([c for c in configs if seg % c.kwargs["BLOCK_K"] == 0], named_args, **kwargs)


# ----------------------------------------------------------------------------
# Shared pieces (inlined into the kernels)
# ----------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in groups of GROUP_M row tiles so that neighbouring
    programs share weight tiles in L2 (the ordering of Triton's matmul tutorial)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _unpack_k4(packed):
    """uint8 ``[BN, BK/4]`` bytes in the "k4" layout -> 2-bit codes ``[BN, BK]`` in K order.

    Byte j holds inputs 4j..4j+3 in bits 1-0, 3-2, 5-4, 7-6. Interleaving (c0, c2)
    and (c1, c3), then the two results, puts code t of byte j at 4j + t. Loading
    the packed bytes as a plain [BN, BK/4] tile keeps the loads contiguous (and
    asynchronous-copy friendly); the unpacking is register shuffles.
    """
    c0 = packed & 3
    c1 = (packed >> 2) & 3
    c2 = (packed >> 4) & 3
    c3 = (packed >> 6) & 3
    return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))


@triton.jit
def _store_tile(out_ptr, y, offs_m, offs_n, mask_m, mask_n, N):
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, cast(y, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------
# w8a8_linear and w158a8_linear: int8 x (int8 | ternary) -> int32, fused epilogue
# ----------------------------------------------------------------------------


@triton.autotune(
    configs=INT_CONFIGS, key=["M_KEY", "N", "K"], prune_configs_by={"early_config_prune": _prune_m}
)
@triton.jit
def int8_gemm_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    ws_stride,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_KEY,
    W_TERNARY: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = float(xq @ w.T) * xs * ws + bias`` for int8 ``xq [M, K]`` and int8 ``w [N, K]``
    (``W_TERNARY``: ternary "k4" bytes ``[N, K/4]``, codes w + 1).

    The int32 accumulator is exact (|K| <= 2^16); the epilogue runs in float32 in the
    reference's order. ``ws_stride`` is 0 for one weight scale, 1 for one per output.
    ``M_KEY`` (M rounded up to a power of two) only keys the autotuning cache.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    if W_TERNARY:
        offs_kb = tl.arange(0, BLOCK_K // 4)
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 4) + offs_kb[None, :]
    else:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        # Masked inputs read as 0 in x, so whatever the weight tile holds there adds nothing.
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0)
        if W_TERNARY:
            packed = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_kb[None, :] < (K - k0) // 4), other=0)
            w = (_unpack_k4(packed).to(tl.int8) - 1).to(tl.int8)  # [BN, BK] in {-1, 0, 1}
            w_ptrs += BLOCK_K // 4
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K - k0), other=0)
            w_ptrs += BLOCK_K
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + offs_n * ws_stride, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_tile(out_ptr, y, offs_m, offs_n, mask_m, mask_n, N)


# ----------------------------------------------------------------------------
# w4a8_linear: Q-DiT group-wise int4 weights x 8-bit activations, exact zero points
# ----------------------------------------------------------------------------


@triton.autotune(
    configs=W4A8_CONFIGS,
    key=["M_KEY", "N", "K", "SEG", "GA", "GW"],
    prune_configs_by={"early_config_prune": _prune_w4a8},
)
@triton.jit
def w4a8_gemm_kernel(
    x_ptr,
    xs_ptr,
    xz_ptr,
    w_ptr,
    wsc_ptr,
    wz_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_KEY,
    SEG,
    GA,
    GW,
    HAS_XZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = Σ_segments float(Σ (q_x − z_x)(q_w − z_w)) · s_x · s_w + bias`` (see ``ops.w4a8_linear``).

    Segments are SEG = gcd(GA, GW) inputs long, so both scales are constant in
    each; BLOCK_K divides SEG, which divides K (no K masks). Within a segment the
    integer sum is expanded so that the dot product sees int8 operands only::

        Σ (a' − z')(q_w − z_w) = Σ a' q_w − z_w Σ a' − z' Σ q_w + SEG z' z_w

    with a' = q_x, z' = 0 (symmetric int8 codes) or a' = q_x − 128, z' = z_x − 128
    (uint8 codes with zero points: shifted into int8's range). Σ a' and Σ q_w are
    row and column sums of the tiles already in registers. At each segment's end
    the exact int32 sum is scaled in float32 and added, in the reference's order.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n_ga = K // GA  # activation groups per token
    n_gw = K // GW  # weight groups per output row
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + offs_kb[None, :]
    xs_row = xs_ptr + offs_m.to(tl.int64) * n_ga
    xz_row = xz_ptr + offs_m.to(tl.int64) * n_ga
    w_row = offs_n.to(tl.int64) * n_gw

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    sum_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
    sum_w = tl.zeros((BLOCK_N,), dtype=tl.int32)
    blocks_per_seg = SEG // BLOCK_K
    for kb in range(0, K // BLOCK_K):
        a = tl.load(x_ptrs, mask=mask_m[:, None], other=0)
        if HAS_XZERO:
            a = (a.to(tl.int32) - 128).to(tl.int8)
        packed = tl.load(w_ptrs, mask=mask_n[:, None], other=0)  # [BN, BK/2]
        lo = packed & 0xF
        hi = packed >> 4
        w = tl.interleave(lo, hi).to(tl.int8)  # [BN, BK]: byte j holds inputs 2j (low) and 2j+1
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        sum_a += tl.sum(a.to(tl.int32), axis=1)
        if HAS_XZERO:
            sum_w += tl.sum(lo.to(tl.int32) + hi.to(tl.int32), axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2

        if (kb + 1) % blocks_per_seg == 0:  # end of a segment: scale its exact sum and add it
            k_start = (kb + 1) * BLOCK_K - SEG
            ga_idx = k_start // GA
            gw_idx = k_start // GW
            # Zero points are integers held as floats; the reference truncates them to int32 too.
            zw = tl.load(wz_ptr + w_row + gw_idx, mask=mask_n, other=0.0).to(tl.int32)
            sw = tl.load(wsc_ptr + w_row + gw_idx, mask=mask_n, other=0.0).to(tl.float32)
            sx = tl.load(xs_row + ga_idx, mask=mask_m, other=0.0).to(tl.float32)
            seg = acc - sum_a[:, None] * zw[None, :]
            if HAS_XZERO:
                zx = tl.load(xz_row + ga_idx, mask=mask_m, other=0.0).to(tl.int32) - 128
                seg = seg - zx[:, None] * sum_w[None, :] + SEG * (zx[:, None] * zw[None, :])
            y += seg.to(tl.float32) * sx[:, None] * sw[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            sum_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
            sum_w = tl.zeros((BLOCK_N,), dtype=tl.int32)

    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_tile(out_ptr, y, offs_m, offs_n, mask_m, mask_n, N)


# ----------------------------------------------------------------------------
# ternary_linear and int4_linear: weight-only, float activations
# ----------------------------------------------------------------------------


@triton.autotune(
    configs=FLOAT_CONFIGS,
    key=["M_KEY", "N", "K", "GW"],
    prune_configs_by={"early_config_prune": _prune_weight_only},
)
@triton.jit
def weight_only_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s_stride,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_KEY,
    GW,
    W_INT4: tl.constexpr,
    GW_ALIGN: tl.constexpr,
    PER_BYTE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = x @ W.T + bias`` in x's dtype with float32 accumulation, W unpacked in registers.

    ``PER_BYTE`` is 2 with ``W_INT4``, else 4. Ternary (not ``W_INT4``): "k4"
    bytes ``[N, K/4]``; the codes − 1 are exact in any float dtype, so the dot runs
    on them and the per-output scale (rounded to x's dtype, as the reference's
    weight is) multiplies the float32 sums once. ``s_stride`` is 0 for one scale,
    1 for one per output. ``UPCAST`` (interpreter only) multiplies in float32.

    Int4 (``W_INT4``): bytes ``[N, K/2]`` with per-(row, group of GW) scale and
    zero ``[N, K/GW]``; each weight is dequantized as the reference does,
    ``(code − zero) · scale`` in the scale's dtype (zero points are integers, as
    Q-DiT's are), then cast to x's dtype. ``GW_ALIGN`` is the largest power of
    two (up to 1024) dividing GW: when BLOCK_K divides it, each K tile lies in one
    group and reads one scale and zero per row (decided per config, at compile
    time); otherwise they are gathered per element,
    so any group size works (at the cost of [BN, BK] scale and zero tiles: on
    sm_90 those take 3-4x the shared memory and spill registers).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K // PER_BYTE)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // PER_BYTE) + offs_kb[None, :]
    x_dtype = x_ptr.dtype.element_ty
    n_gw = K // GW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        packed = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_kb[None, :] < (K - k0) // PER_BYTE), other=0)
        if W_INT4:
            codes = tl.interleave(packed & 0xF, packed >> 4)  # [BN, BK]
            if GW_ALIGN % BLOCK_K == 0:  # each K tile within one group
                g_off = offs_n.to(tl.int64) * n_gw + k0 // GW
                scale = tl.load(s_ptr + g_off, mask=mask_n, other=0.0)[:, None]
                zero = tl.load(z_ptr + g_off, mask=mask_n, other=0.0)[:, None]
            else:
                kmask = mask_n[:, None] & (offs_k[None, :] < K - k0)
                g_off = offs_n.to(tl.int64)[:, None] * n_gw + ((k0 + offs_k) // GW)[None, :]
                scale = tl.load(s_ptr + g_off, mask=kmask, other=0.0)
                zero = tl.load(z_ptr + g_off, mask=kmask, other=0.0)
            # The reference's (code - zero) * scale in the scale's dtype, each step done in float32
            # and rounded to that dtype: exact differences (integer zero points), exact float32
            # products of 16-bit numbers, so the same numbers; and Triton's interpreter, which
            # gets 16-bit float arithmetic and uint8 -> bfloat16 conversions wrong, agrees too.
            s_dtype = scale.dtype
            diff = cast(codes.to(tl.float32) - zero.to(tl.float32), s_dtype).to(tl.float32)
            w = cast(cast(diff * scale.to(tl.float32), s_dtype), x_dtype)
        else:
            # Through float32 (exact for -1, 0, 1): the interpreter converts int8 -> bfloat16 wrongly.
            w = (_unpack_k4(packed).to(tl.int8) - 1).to(tl.float32).to(x_dtype)
        if UPCAST:  # the interpreter's bfloat16 dot is wrong; float32 products of bfloat16 are exact
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // PER_BYTE

    if not W_INT4:
        s = cast(tl.load(s_ptr + offs_n * s_stride, mask=mask_n, other=0.0), x_dtype).to(tl.float32)
        acc = acc * s[None, :]
    if HAS_BIAS:
        bias = cast(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0), x_dtype).to(tl.float32)
        acc = acc + bias[None, :]
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, N)
