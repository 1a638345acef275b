"""Host side of the Triton kernels: one function per ditq op, with the op's signature.

Each function takes the op's arguments (already checked by :mod:`ditq.kernels.ops`),
allocates the output, picks launch parameters and runs a kernel of
:mod:`ditq.kernels.triton.quantize`, :mod:`~ditq.kernels.triton.producers` or
:mod:`~ditq.kernels.triton.gemm`; or returns ``NotImplemented`` for a call the
kernels do not handle (a dtype, such as float64 for the fused producer
quantizers; a device, an empty tensor, or a w4a8 group layout whose
constant-scale segment is not a multiple of 32 inputs), and the reference runs
instead. Tensors must be on one CUDA device, or on the CPU when Triton's
interpreter is on (``TRITON_INTERPRET=1`` at import; how the tests run), or on
the ``meta`` device inside :func:`recording` (launches collected, not run).

This module imports Triton: import it only when :func:`ditq.kernels.triton.available`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import triton

from ditq.kernels.triton import common, gemm, producers, quantize

FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Output dtypes the integer GEMMs store (the float32 epilogue is cast once, at the store)."""

DOT_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
"""Activation dtypes of the weight-only kernels (``tl.dot`` operand types)."""

QUANT_ONE_CHUNK_MAX = 8192
"""Longest row the row quantizers keep in registers; longer rows are read again (twice, three times for
:func:`rmsnorm_modulate_quantize_int8`, four for :func:`layernorm_modulate_quantize_int8`)."""

PRODUCER_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
"""Activation dtypes of the fused producer + quantizer kernels (float64: the reference runs)."""

_QUANT_TILE = 4096  # elements per program in the row quantizers (rows x columns)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer; the kernels write every element (tests poison buffers through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the host code made it: what :func:`recording` collects instead of running it.

    ``kernel`` is the ``@triton.jit`` function or its autotuner, ``grid`` the
    launch grid (a tuple, or a function of the chosen config's parameters),
    ``args`` and ``kwargs`` the call's arguments (tensors on the ``meta`` device).
    """

    kernel: object
    grid: object
    args: tuple
    kwargs: dict


_recorded: list[Launch] | None = None  # not None inside recording(): launches are collected, not run


@contextlib.contextmanager
def recording():
    """Within this block the op functions take ``meta`` tensors and collect their launches in the
    yielded list instead of running them (outputs are returned as ``meta`` tensors).

    This is how :mod:`ditq.kernels.triton.aot` compiles exactly what a real call
    would launch (arguments, dtypes, alignment, launch options) for a GPU the
    machine does not have.
    """
    global _recorded
    if _recorded is not None:
        raise RuntimeError("recording() blocks do not nest")
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or collect it inside :func:`recording`."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def _device_of(*tensors) -> torch.device | None:
    """The one device of ``tensors`` (Nones skipped) if the kernels can run there, else None."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return None
    (device,) = devices
    if device.type == "cuda" or (common.INTERPRET and device.type == "cpu"):
        return device
    if _recorded is not None and device.type == "meta":
        return device
    return None


def _on(device: torch.device):
    """Launch on ``device``'s GPU (Triton launches on the current one), nothing for the interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


def _m_key(m: int) -> int:
    """M rounded up to a power of two: autotuning keys on it, so a new batch size rarely re-tunes."""
    return triton.next_power_of_2(m)


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _is_float(t: torch.Tensor | None) -> bool:
    return t is None or t.dtype in FLOAT_OUT


def _allow_tf32() -> bool:
    """Whether float32 matmuls may use TF32 (PyTorch's switch, so that we round as F.linear does)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


def _quantize_rows(kernel, x: torch.Tensor, group: int, code_dtype: torch.dtype, n_params: int, *extra):
    """Launch a row-quantization kernel (``x``, codes, ``n_params`` per-row outputs, rows, G, ``extra``)
    over the rows of ``group`` inputs of ``x``: codes ``code_dtype [..., K]``, float32 ``[..., K/G]``
    parameters; NotImplemented where the kernels do not run."""
    device = _device_of(x)
    k = x.shape[-1]
    g = k if group == 0 else group
    if device is None or x.dtype not in FLOAT_OUT or x.numel() == 0 or g <= 0 or k % g:
        return NotImplemented
    rows = x.numel() // g
    xf = x.contiguous()
    q = _alloc(x.shape, code_dtype, device)
    params = [_alloc((*x.shape[:-1], k // g), torch.float32, device) for _ in range(n_params)]
    one_chunk = g <= QUANT_ONE_CHUNK_MAX
    block_g = max(16, triton.next_power_of_2(g)) if one_chunk else _QUANT_TILE
    block_r = max(1, min(triton.next_power_of_2(rows), _QUANT_TILE // block_g))
    with _on(device):
        _launch(
            kernel,
            (triton.cdiv(rows, block_r),),
            xf,
            q,
            *params,
            rows,
            g,
            *extra,
            BLOCK_R=block_r,
            BLOCK_G=block_g,
            ONE_CHUNK=one_chunk,
            USE_RINT=not common.INTERPRET,
            num_warps=8 if block_r * block_g >= _QUANT_TILE else 4,
            enable_fp_fusion=False,  # x * inv or x / scale must be rounded before rounding to an integer
        )
    return (q, *params)


def quantize_per_token_int8(x: torch.Tensor, group: int):
    """Triton implementation of :func:`ditq.kernels.ops.quantize_per_token_int8`: bit-exact codes, scales."""
    return _quantize_rows(quantize.quantize_rows_kernel, x, group, torch.int8, 1)


def quantize_per_token_asym(x: torch.Tensor, bits: int, group: int):
    """Triton implementation of :func:`ditq.kernels.ops.quantize_per_token_asym`: bit-exact codes,
    scales and zero points."""
    return _quantize_rows(quantize.quantize_asym_rows_kernel, x, group, torch.uint8, 2, float(2**bits - 1))


# ----------------------------------------------------------------------------
# layernorm_modulate_quantize_int8, gelu_quantize_int8, rmsnorm_modulate_quantize_int8,
# swiglu_quantize_int8
# ----------------------------------------------------------------------------


def layernorm_modulate_quantize_int8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """Triton implementation of :func:`ditq.kernels.ops.layernorm_modulate_quantize_int8` (16- and 32-bit
    float ``x``; ``shift`` and ``scale`` in its dtype): codes within one of the reference's at rounding
    boundaries, scales to float32 rounding."""
    if _device_of(x, shift, scale) is None or x.dtype not in PRODUCER_FLOAT or x.dim() != 3:
        return NotImplemented
    b, t, k = x.shape
    if shift.dtype != x.dtype or scale.dtype != x.dtype or shift.shape != (b, k) or scale.shape != (b, k):
        return NotImplemented
    args = (shift.contiguous(), scale.contiguous(), t, float(eps))
    return _quantize_rows(producers.layernorm_modulate_quantize_kernel, x, 0, torch.int8, 1, *args)


def gelu_quantize_int8(x: torch.Tensor):
    """Triton implementation of :func:`ditq.kernels.ops.gelu_quantize_int8` (16- and 32-bit float ``x``):
    codes within one of the reference's at rounding boundaries, scales to float32 rounding."""
    if x.dtype not in PRODUCER_FLOAT:
        return NotImplemented
    return _quantize_rows(producers.gelu_quantize_rows_kernel, x, 0, torch.int8, 1)


def rmsnorm_modulate_quantize_int8(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
):
    """Triton implementation of :func:`ditq.kernels.ops.rmsnorm_modulate_quantize_int8` (16- and 32-bit
    float ``x``; ``weight``, ``shift`` and ``scale`` in its dtype): codes within one of the reference's
    at rounding boundaries, scales to float32 rounding."""
    if _device_of(x, weight, shift, scale) is None or x.dtype not in PRODUCER_FLOAT or x.dim() != 3:
        return NotImplemented
    b, t, k = x.shape
    if any(p.dtype != x.dtype for p in (weight, shift, scale)) or weight.shape != (k,):
        return NotImplemented
    if shift.shape != (b, k) or scale.shape != (b, k):
        return NotImplemented
    args = (weight.contiguous(), shift.contiguous(), scale.contiguous(), t, float(eps))
    return _quantize_rows(producers.rmsnorm_modulate_quantize_kernel, x, 0, torch.int8, 1, *args)


def swiglu_quantize_int8(gate: torch.Tensor, up: torch.Tensor):
    """Triton implementation of :func:`ditq.kernels.ops.swiglu_quantize_int8` (16- and 32-bit float
    ``gate``; ``up`` of its shape and dtype): codes within one of the reference's at rounding
    boundaries, scales to float32 rounding."""
    if _device_of(gate, up) is None or gate.dtype not in PRODUCER_FLOAT:
        return NotImplemented
    if up.dtype != gate.dtype or up.shape != gate.shape:
        return NotImplemented
    return _quantize_rows(producers.swiglu_quantize_rows_kernel, gate, 0, torch.int8, 1, up.contiguous())


# ----------------------------------------------------------------------------
# w8a8_linear, w158a8_linear
# ----------------------------------------------------------------------------


def _int8_gemm(xq, xs, w, ws, bias, out_dtype, n: int, ternary: bool, device):
    k = xq.shape[-1]
    m = xq.numel() // k
    if m == 0 or n == 0 or xs.numel() != m or ws.numel() not in (1, n) or out_dtype not in FLOAT_OUT:
        return NotImplemented
    if not (_is_float(xs) and _is_float(ws) and _is_float(bias)):
        return NotImplemented
    x2 = xq.reshape(m, k).contiguous()
    xs1, ws1 = _flat(xs), _flat(ws)
    b1 = _flat(bias) if bias is not None else xs1  # a placeholder pointer when there is no bias
    out = _alloc((m, n), out_dtype, device)
    with _on(device):
        _launch(
            gemm.int8_gemm_kernel,
            _grid(m, n),
            x2,
            xs1,
            w.contiguous(),
            ws1,
            0 if ws1.numel() == 1 else 1,
            b1,
            out,
            m,
            n,
            k,
            _m_key(m),
            W_TERNARY=ternary,
            HAS_BIAS=bias is not None,
            enable_fp_fusion=False,  # the epilogue rounds as the reference's: (acc * xs) * ws, then + bias
        )
    return out.reshape(*xq.shape[:-1], n)


def w8a8_linear(xq, xs, wq, ws, bias, out_dtype):
    """Triton implementation of :func:`ditq.kernels.ops.w8a8_linear` (int8 ``tl.dot``, fused epilogue)."""
    device = _device_of(xq, xs, wq, ws, bias)
    if device is None or xq.dtype != torch.int8 or wq.dtype != torch.int8 or wq.dim() != 2:
        return NotImplemented
    if wq.shape[1] != xq.shape[-1]:
        return NotImplemented
    return _int8_gemm(xq, xs, wq, ws, bias, out_dtype, wq.shape[0], False, device)


def w158a8_linear(xq, xs, w_packed, w_scale, bias, out_dtype):
    """Triton implementation of :func:`ditq.kernels.ops.w158a8_linear` (2-bit codes unpacked in registers)."""
    device = _device_of(xq, xs, w_packed, w_scale, bias)
    k = xq.shape[-1]
    if device is None or xq.dtype != torch.int8 or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        return NotImplemented
    if k % 4 or w_packed.shape[1] * 4 != k:
        return NotImplemented
    return _int8_gemm(xq, xs, w_packed, w_scale, bias, out_dtype, w_packed.shape[0], True, device)


# ----------------------------------------------------------------------------
# w4a8_linear
# ----------------------------------------------------------------------------


def w4a8_linear(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype):
    """Triton implementation of :func:`ditq.kernels.ops.w4a8_linear` (exact zero points, per-segment rescale).

    Declines (``NotImplemented``) when ``gcd(activation group, weight group)``
    is not a multiple of 32 inputs: an int8 dot product needs K tiles of 32 at
    least, and a tile must not straddle two scales.
    """
    device = _device_of(xq, xs, x_zero, w_packed, w_scale, w_zero, bias)
    if device is None or out_dtype not in FLOAT_OUT or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        return NotImplemented
    asym = x_zero is not None
    if xq.dtype != (torch.uint8 if asym else torch.int8):
        return NotImplemented
    k, n = xq.shape[-1], w_packed.shape[0]
    m = xq.numel() // k
    if m == 0 or n == 0 or k % 2 or w_packed.shape[1] * 2 != k:
        return NotImplemented
    # Activation groups per token, read as the reference does ([..., G], or [...] for one per token).
    n_ga = 1 if tuple(xs.shape) == tuple(xq.shape[:-1]) else xs.shape[-1]
    if xs.numel() != m * n_ga or k % n_ga or (asym and x_zero.numel() != xs.numel()):
        return NotImplemented
    if w_scale.dim() != 2 or w_scale.shape != w_zero.shape or w_scale.shape[0] != n or k % w_scale.shape[1]:
        return NotImplemented
    if not all(_is_float(t) for t in (xs, x_zero, w_scale, w_zero, bias)):
        return NotImplemented
    ga, gw = k // n_ga, k // w_scale.shape[1]
    seg = math.gcd(ga, gw)
    if seg % gemm.MIN_BLOCK_K_INT8:
        return NotImplemented
    x2 = xq.reshape(m, k).contiguous()
    xs1 = _flat(xs)
    xz1 = _flat(x_zero) if asym else xs1  # placeholder pointer when symmetric
    b1 = _flat(bias) if bias is not None else xs1
    out = _alloc((m, n), out_dtype, device)
    with _on(device):
        _launch(
            gemm.w4a8_gemm_kernel,
            _grid(m, n),
            x2,
            xs1,
            xz1,
            w_packed.contiguous(),
            w_scale.contiguous(),
            w_zero.contiguous(),
            b1,
            out,
            m,
            n,
            k,
            _m_key(m),
            seg,
            ga,
            gw,
            HAS_XZERO=asym,
            HAS_BIAS=bias is not None,
            enable_fp_fusion=False,  # segments are scaled and summed as the reference does
        )
    return out.reshape(*xq.shape[:-1], n)


# ----------------------------------------------------------------------------
# ternary_linear, int4_linear
# ----------------------------------------------------------------------------


def _pow2_divisor(g: int, cap: int = 1024) -> int:
    """The largest power of two dividing ``g``, at most ``cap`` (a compile-time constant of the kernels)."""
    return min(g & -g, cap)


def _weight_only(x, w_packed, scale, zero, bias, n: int, int4: bool, device):
    k = x.shape[-1]
    m = x.numel() // k
    # Scales and bias are rounded to x's dtype in the kernel: 16/32-bit sources only (no float64 casts).
    if m == 0 or n == 0 or scale.dtype not in DOT_FLOAT or (bias is not None and bias.dtype not in DOT_FLOAT):
        return NotImplemented
    x2 = x.reshape(m, k).contiguous()
    out = _alloc((m, n), x.dtype, device)
    # float32: IEEE products unless PyTorch allows TF32; 16-bit: the backend's default (None).
    precision = ("tf32" if _allow_tf32() else "ieee") if x.dtype == torch.float32 else None
    s = scale.contiguous() if int4 else _flat(scale)
    b1 = _flat(bias) if bias is not None else s
    with _on(device):
        _launch(
            gemm.weight_only_gemm_kernel,
            _grid(m, n),
            x2,
            w_packed.contiguous(),
            s,
            0 if s.numel() == 1 else 1,
            zero.contiguous() if int4 else s,  # placeholder pointer for ternary
            b1,
            out,
            m,
            n,
            k,
            _m_key(m),
            k // scale.shape[1] if int4 else k,
            W_INT4=int4,
            GW_ALIGN=_pow2_divisor(k // scale.shape[1]) if int4 else 1,
            PER_BYTE=2 if int4 else 4,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=precision,
            # Triton 3.9's interpreter: bf16 dots are wrong
            UPCAST=common.INTERPRET and x.dtype == torch.bfloat16,
        )
    return out.reshape(*x.shape[:-1], n)


def ternary_linear(x, w_packed, scale, bias):
    """Triton implementation of :func:`ditq.kernels.ops.ternary_linear` (16- and 32-bit float activations)."""
    device = _device_of(x, w_packed, scale, bias)
    k = x.shape[-1]
    if device is None or x.dtype not in DOT_FLOAT or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        return NotImplemented
    n = w_packed.shape[0]
    if k % 4 or w_packed.shape[1] * 4 != k or scale.numel() not in (1, n):
        return NotImplemented
    return _weight_only(x, w_packed, scale, None, bias, n, False, device)


def int4_linear(x, w_packed, w_scale, w_zero, bias):
    """Triton implementation of :func:`ditq.kernels.ops.int4_linear` (any group size dividing K).

    Scales and zero points must share one dtype among float16, bfloat16 and
    float32 (the weight is dequantized in it, as the reference does).
    """
    device = _device_of(x, w_packed, w_scale, w_zero, bias)
    k = x.shape[-1]
    if device is None or x.dtype not in DOT_FLOAT or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        return NotImplemented
    n = w_packed.shape[0]
    if k % 2 or w_packed.shape[1] * 2 != k:
        return NotImplemented
    if w_scale.dim() != 2 or w_scale.shape != w_zero.shape or w_scale.shape[0] != n or k % w_scale.shape[1]:
        return NotImplemented
    if w_scale.dtype not in DOT_FLOAT or w_zero.dtype != w_scale.dtype:
        return NotImplemented
    return _weight_only(x, w_packed, w_scale, w_zero, bias, n, True, device)
