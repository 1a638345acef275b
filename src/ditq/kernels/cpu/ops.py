"""The CPU implementations of the ditq ops, registered with :mod:`ditq.kernels.dispatch`.

Each takes the op's arguments, already checked by :mod:`ditq.kernels.ops`, and either
returns the op's result from ditq's C++ kernels (:mod:`ditq.kernels.cpu.extension`; for
``w8a8_linear`` below AVX2, ``torch._int_mm`` where it is fast), or ``NotImplemented``
for a call they do not take: tensors on another device, a dtype or a
group layout the kernels do not handle, an instruction set below what the rule table
(:mod:`ditq.kernels.cpu.rules`) runs them on; the reference runs then. Outputs are
allocated here and written whole by the kernels. The weight-only ops choose their path
by token count (the thresholds below).
"""

from __future__ import annotations

import math

import torch

from ditq.kernels import dispatch
from ditq.kernels.cpu import extension, levels, prepack
from ditq.kernels.cpu.extension import check, isa
from ditq.kernels.cpu.levels import AVX2, SCALAR

# Weight-only ops: up to this many tokens ditq's GEMM (dequantized weights in a per-thread buffer);
# beyond, blocks of columns dequantized into a buffer of DEQUANT_BLOCK_BYTES and multiplied by BLAS.
WEIGHT_ONLY_DIRECT_MAX_M = 32
# Up to this many tokens (at most 4), the packed weights are decoded in registers (AVX2, AVX-512) and
# multiplied at once, without the buffer (the same numbers); 0 turns that path off.
WEIGHT_ONLY_FUSED_MAX_M = 4
DEQUANT_BLOCK_BYTES = 16 << 20
DEQUANT_BLOCK_MIN_COLS = 256


def _alloc(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer for a kernel, which writes every element (tests poison buffers through this hook)."""
    return torch.empty(shape, dtype=dtype)


def _all_cpu(*ts) -> bool:
    return all(t is None or t.device.type == "cpu" for t in ts)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t  # the kernels read it flat
    return t.reshape(-1).to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _quantize_rows(fn: str, x: torch.Tensor, group: int, code_dtype: torch.dtype, n_params: int, *extra):
    """Run the library's row quantizer ``fn(x, q, *params, rows, group, *extra, isa)`` over the rows of
    ``group`` inputs (0: whole tokens): codes ``code_dtype [..., K]``, ``n_params`` float32
    ``[..., K/group]``; NotImplemented without the library or for an empty ``x``."""
    if extension.lib() is None or x.numel() == 0:
        return NotImplemented
    k = x.shape[-1]
    g = k if group == 0 else group
    xf = x.to(torch.float32).contiguous()
    q = _alloc(x.shape, code_dtype)
    params = [_alloc((*x.shape[:-1], k // g), torch.float32) for _ in range(n_params)]
    ptrs = (xf.data_ptr(), q.data_ptr(), *(p.data_ptr() for p in params))
    check(getattr(extension.state.lib, fn)(*ptrs, xf.numel() // g, g, *extra, isa()))
    return (q, *params)


def quantize_per_token_int8(x: torch.Tensor, group: int):
    return _quantize_rows("ditq_quantize_per_token", x, group, torch.int8, 1)


def quantize_per_token_asym(x: torch.Tensor, bits: int, group: int):
    return _quantize_rows("ditq_quantize_asym", x, group, torch.uint8, 2, bits)


def gelu_quantize_int8(x: torch.Tensor):
    # float32 only: other dtypes round between the steps (the reference runs for them)
    if x.dtype != torch.float32:
        return NotImplemented
    return _quantize_rows("ditq_gelu_quantize", x, 0, torch.int8, 1)


def layernorm_modulate_quantize_int8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    if extension.lib() is None or x.numel() == 0 or x.dtype != torch.float32:
        return NotImplemented
    b, t, k = x.shape
    xf, sh, sc = x.contiguous(), shift.contiguous(), scale.contiguous()
    q, s = _alloc(x.shape, torch.int8), _alloc((b, t, 1), torch.float32)
    ptrs = (xf.data_ptr(), sh.data_ptr(), sc.data_ptr(), q.data_ptr(), s.data_ptr())
    check(extension.state.lib.ditq_layernorm_modulate_quantize(*ptrs, b, t, k, float(eps), isa()))
    return q, s


def rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps: float):
    """RMSNorm (float64 sum of squares) * weight, adaLN modulation, int8 per token: float32 only."""
    if (
        extension.lib() is None
        or x.numel() == 0
        or x.dtype != torch.float32
        or not _all_cpu(x, weight, shift, scale)
    ):
        return NotImplemented
    b, t, k = x.shape
    args = (x.contiguous(), weight.contiguous(), shift.contiguous(), scale.contiguous())
    q, s = _alloc(x.shape, torch.int8), _alloc((b, t, 1), torch.float32)
    ptrs = (*(a.data_ptr() for a in args), q.data_ptr(), s.data_ptr())
    check(extension.state.lib.ditq_rmsnorm_modulate_quantize(*ptrs, b, t, k, float(eps), isa()))
    return q, s


def swiglu_quantize_int8(gate, up):
    """``silu(gate) * up`` quantized per token, one pass: float32 only."""
    if extension.lib() is None or gate.numel() == 0 or gate.dtype != torch.float32 or not _all_cpu(gate, up):
        return NotImplemented
    k = gate.shape[-1]
    g, u = gate.contiguous(), up.contiguous()
    q, s = _alloc(gate.shape, torch.int8), _alloc((*gate.shape[:-1], 1), torch.float32)
    ptrs = (g.data_ptr(), u.data_ptr(), q.data_ptr(), s.data_ptr())
    check(extension.state.lib.ditq_swiglu_quantize(*ptrs, g.numel() // k, k, isa()))
    return q, s


def _int_mm_w8a8(x2, xs32, wq, ws32, b32):
    """torch._int_mm (oneDNN) + the reference epilogue; None when this torch/CPU cannot run it."""
    if x2.shape[1] < 2:  # torch 2.13's CPU _int_mm returns wrong sums for K = 1 (found by our tests)
        return None
    try:
        acc = torch._int_mm(x2, wq.t())
    except (RuntimeError, AttributeError):
        return None
    y = acc.float() * xs32.reshape(-1, 1) * ws32.reshape(1, -1)
    return y + b32 if b32 is not None else y


def _gemm(fn, x2, xs32, w, wpre, ws32, b32, n: int, level: int) -> torch.Tensor:
    """One call of the library's W8A8 / W1.58A8 GEMM: float32 ``[M, N]``."""
    m, k = x2.shape
    wc = w.contiguous()
    out = _alloc((m, n), torch.float32)
    per_row = int(ws32.numel() != 1)
    args = (x2, xs32, wc, wpre, ws32)
    check(fn(*(_ptr(t) for t in args), per_row, _ptr(b32), out.data_ptr(), m, n, k, level))
    return out


def w8a8_linear(xq, xs, wq, ws, bias, out_dtype):
    if not _all_cpu(xs, wq, ws, bias):
        return NotImplemented
    k, n = xq.shape[-1], wq.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    xs32, ws32, b32 = _f32(xs), _f32(ws), _f32(bias)
    level = isa() if extension.lib() is not None else SCALAR
    if level >= AVX2:
        out = _gemm(
            extension.state.lib.ditq_w8a8_gemm, x2, xs32, wq, prepack.cache.get(wq, 8), ws32, b32, n, level
        )
    elif levels.int_mm_is_fast():
        out = _int_mm_w8a8(x2, xs32, wq, ws32, b32)
        if out is None:
            return NotImplemented
    else:
        return NotImplemented
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def w158a8_linear(xq, xs, w_packed, w_scale, bias, out_dtype):
    if not _all_cpu(xs, w_packed, w_scale, bias) or extension.lib() is None:
        return NotImplemented
    level = isa()
    if level < AVX2:
        return NotImplemented  # the scalar C loop is slower than the reference's BLAS
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    xs32, ws32, b32 = _f32(xs), _f32(w_scale), _f32(bias)
    wpre = prepack.cache.get(w_packed, 2)
    out = _gemm(extension.state.lib.ditq_w2a8_gemm, x2, xs32, w_packed, wpre, ws32, b32, n, level)
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def w4a8_linear(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype):
    """AVX2 or AVX-512 VNNI, where both scales are constant over segments of a multiple of 8 inputs
    (``gcd(ga, gw) % 8 == 0``); anything else goes to the reference."""
    if not _all_cpu(xq, xs, x_zero, w_packed, w_scale, w_zero, bias) or extension.lib() is None:
        return NotImplemented
    level = isa()
    if level < AVX2:
        return NotImplemented
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    ga = k // (xs.numel() // m)  # activation group: K (per token) or a divisor of K
    gw = k // w_scale.shape[1]
    seg = math.gcd(ga, gw)
    if seg % 8:
        return NotImplemented
    x2 = x2.contiguous()
    xs32, b32 = _f32(xs), _f32(bias)
    xz = None if x_zero is None else x_zero.reshape(-1).to(torch.int32).contiguous()
    ws_t = prepack.cache.get(w_scale, ("t", torch.float32))  # [K/gw, N]
    wz_t = prepack.cache.get(w_zero, ("t", torch.int32))
    wpre = prepack.cache.get(w_packed, ("int4", seg))
    out = _alloc((m, n), torch.float32)
    unsigned = int(xq.dtype == torch.uint8)
    args = (_ptr(x2), unsigned, _ptr(xs32), _ptr(xz), _ptr(wpre), _ptr(ws_t), _ptr(wz_t), _ptr(b32))
    check(extension.state.lib.ditq_w4a8_gemm(*args, out.data_ptr(), m, n, k, gw, ga, level))
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _weight_only_ready(x, *params) -> bool:
    """Whether the weight-only kernels take this call: float32 CPU tensors on a SIMD CPU."""
    if not _all_cpu(x, *params) or x.dtype != torch.float32 or extension.lib() is None:
        return False
    return isa() >= AVX2 and x.numel() > 0


def _weight_only(x, n: int, direct, dequant, bias) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: up to :data:`WEIGHT_ONLY_DIRECT_MAX_M` tokens ``direct(x2, out)``
    (the C++ GEMM); beyond, blocks of output columns dequantized by ``dequant(n0, n1, buf)`` into a
    buffer of :data:`DEQUANT_BLOCK_BYTES` (at least :data:`DEQUANT_BLOCK_MIN_COLS` columns) and
    multiplied by BLAS (``torch.addmm``)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = _alloc((m, n), torch.float32)
    if m <= WEIGHT_ONLY_DIRECT_MAX_M:
        direct(x2, out)
    else:
        # BLAS wants wide blocks
        cols = max(DEQUANT_BLOCK_MIN_COLS, DEQUANT_BLOCK_BYTES // (4 * k) // 16 * 16)
        buf = torch.empty(min(cols, n), k, dtype=torch.float32)
        for n0 in range(0, n, cols):
            n1 = min(n, n0 + cols)
            w = buf[: n1 - n0]
            dequant(n0, n1, w)
            out[:, n0:n1] = x2 @ w.t() if bias is None else torch.addmm(bias[n0:n1], x2, w.t())
    return out.reshape(*x.shape[:-1], n)


def ternary_linear(x, w_packed, scale, bias):
    """Float32 activations only (other dtypes: the reference)."""
    if not _weight_only_ready(x, w_packed, scale, bias) or w_packed.shape[0] == 0:
        return NotImplemented
    k, n, level, lib = x.shape[-1], w_packed.shape[0], isa(), extension.state.lib
    wc = w_packed.contiguous()
    s32, b32 = _f32(scale), _f32(bias)  # ±s and 0 are exact in any float dtype: the same weights
    per_row = int(s32.numel() != 1)

    def direct(x2, out):
        args = (x2.data_ptr(), wc.data_ptr(), s32.data_ptr(), per_row, _ptr(b32), out.data_ptr())
        check(lib.ditq_ternary_wo_gemm(*args, x2.shape[0], n, k, level, WEIGHT_ONLY_FUSED_MAX_M))

    def dequant(n0, n1, buf):
        args = (wc.data_ptr(), s32.data_ptr(), per_row, n, k, n0, n1, buf.data_ptr())
        check(lib.ditq_ternary_dequant(*args, level))

    return _weight_only(x, n, direct, dequant, b32)


def int4_linear(x, w_packed, w_scale, w_zero, bias):
    """Float32 activations and float32 scales/zero points only (the reference dequantizes in the
    scale's dtype)."""
    if not _weight_only_ready(x, w_packed, w_scale, w_zero, bias) or w_packed.shape[0] == 0:
        return NotImplemented
    if w_scale.dtype != torch.float32 or w_zero.dtype != torch.float32:
        return NotImplemented
    k, n, level, lib = x.shape[-1], w_packed.shape[0], isa(), extension.state.lib
    wc, sc, zc = w_packed.contiguous(), w_scale.contiguous(), w_zero.contiguous()
    group, b32 = k // w_scale.shape[1], _f32(bias)

    def direct(x2, out):
        args = (x2.data_ptr(), wc.data_ptr(), sc.data_ptr(), zc.data_ptr(), group, _ptr(b32), out.data_ptr())
        check(lib.ditq_int4_wo_gemm(*args, x2.shape[0], n, k, level, WEIGHT_ONLY_FUSED_MAX_M))

    def dequant(n0, n1, buf):
        args = (wc.data_ptr(), sc.data_ptr(), zc.data_ptr(), group, n, k, n0, n1, buf.data_ptr())
        check(lib.ditq_int4_dequant(*args, level))

    return _weight_only(x, n, direct, dequant, b32)


dispatch.register_impl("quantize_per_token_int8", "cpu", quantize_per_token_int8)
dispatch.register_impl("quantize_per_token_asym", "cpu", quantize_per_token_asym)
dispatch.register_impl("layernorm_modulate_quantize_int8", "cpu", layernorm_modulate_quantize_int8)
dispatch.register_impl("gelu_quantize_int8", "cpu", gelu_quantize_int8)
dispatch.register_impl("rmsnorm_modulate_quantize_int8", "cpu", rmsnorm_modulate_quantize_int8)
dispatch.register_impl("swiglu_quantize_int8", "cpu", swiglu_quantize_int8)
dispatch.register_impl("ternary_linear", "cpu", ternary_linear)
dispatch.register_impl("int4_linear", "cpu", int4_linear)
dispatch.register_impl("w4a8_linear", "cpu", w4a8_linear)
dispatch.register_impl("w8a8_linear", "cpu", w8a8_linear)
dispatch.register_impl("w158a8_linear", "cpu", w158a8_linear)
