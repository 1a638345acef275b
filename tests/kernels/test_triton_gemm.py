"""The Triton linears (ditq.kernels.triton.gemm) against the references: the integer GEMMs (w8a8,
w1.58a8, w4a8) and the weight-only ones (ternary, int4) at odd shapes; and on a GPU at DiT shapes.
How these tests run (the interpreter, in a subprocess, on a CPU-only machine) is told in test_triton.py."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import (
    _close,
    _dev,
    _gen,
    _int4,
    _int8,
    _rand,
    _same,
    _ternary,
    _w4a8_inputs,
    needs_gpu,
    needs_kernels,
)

from ditq.kernels import ops, reference

# ----------------------------------------------------------------------------
# w8a8_linear, w158a8_linear
# ----------------------------------------------------------------------------

INT_SHAPES = [(1, 4, 8), (5, 20, 24), (33, 36, 136), (33, 4, 24), (5, 36, 136)]


OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _int_case(m, n, k, i):
    """Inputs of case ``i``: token scales, per-channel or per-tensor weight scales, bias or not."""
    xs = _rand((m, 1), 10 + i, 0.005, 0.02)  # scales of real activations and weights: no float16 overflow
    ws = _rand((n,) if i % 2 else (1,), 11 + i, 0.005, 0.02)
    bias = torch.randn(n, generator=_gen(12 + i)) if i % 3 != 1 else None
    return xs, ws, bias, OUT_DTYPES[i % 3]


@needs_kernels
@pytest.mark.parametrize("ternary", [False, True], ids=["w8a8", "w158a8"])
@pytest.mark.parametrize("i,shape", list(enumerate(INT_SHAPES)))
def test_int8_gemms_equal_reference(poisoned, ternary, i, shape):
    m, n, k = shape
    xq = _int8((m, k), i)
    w = _ternary(n, k, 100 + i) if ternary else _int8((n, k), 100 + i)
    fast = poisoned.w158a8_linear if ternary else poisoned.w8a8_linear
    ref = reference.ref_w158a8_linear if ternary else reference.ref_w8a8_linear

    # Unit scales, no bias: the outputs are the int32 sums (exact in float32 below 2^24).
    ones_x, ones_w = torch.ones(m, 1), torch.ones(1)
    out = fast(*_dev(xq, ones_x, w, ones_w, None), torch.float32)
    assert torch.equal(out.cpu(), ref(xq, ones_x, w, ones_w, None, torch.float32))

    xs, ws, bias, out_dtype = _int_case(m, n, k, i)
    x3 = xq.reshape(1, m, k) if i == 2 else xq  # leading axes are flattened and restored
    xs3 = xs.reshape(1, m, 1) if i == 2 else xs
    out = fast(*_dev(x3, xs3, w, ws, bias), out_dtype)
    _same(out.cpu(), ref(x3, xs3, w, ws, bias, out_dtype))


# ----------------------------------------------------------------------------
# w4a8_linear
# ----------------------------------------------------------------------------

# (M, N, K, activation group, weight group, asymmetric activations, xs layout)
W4A8_CASES = [
    (5, 20, 64, 64, 32, False, "token"),  # xs [M]: one scale per token, no group axis
    (33, 36, 96, 96, 32, True, "token1"),  # xs [M, 1]
    (1, 4, 128, 64, 32, True, "groups"),
    (33, 20, 128, 64, 128, False, "groups"),  # segments of 64: two K tiles each
    (5, 36, 192, 96, 64, True, "groups"),  # gcd(96, 64) = 32
]


@needs_kernels
@pytest.mark.parametrize("i,case", list(enumerate(W4A8_CASES)))
def test_w4a8_equals_reference(poisoned, i, case):
    xq, xs, xz, w, w_scale, w_zero = _w4a8_inputs(*case, seed=20 * i)
    n = w.shape[0]

    # Unit scales: the outputs are the exact integer sums of (q_x - z_x)(q_w - z_w).
    one_x, one_w = torch.ones_like(xs), torch.ones_like(w_scale)
    out = poisoned.w4a8_linear(*_dev(xq, one_x, xz, w, one_w, w_zero, None), torch.float32)
    assert torch.equal(
        out.cpu(), reference.ref_w4a8_linear(xq, one_x, xz, w, one_w, w_zero, None, torch.float32)
    )

    bias = torch.randn(n, generator=_gen(i)) if i % 2 else None
    out_dtype = OUT_DTYPES[i % 3]
    out = poisoned.w4a8_linear(*_dev(xq, xs, xz, w, w_scale, w_zero, bias), out_dtype)
    _same(out.cpu(), reference.ref_w4a8_linear(xq, xs, xz, w, w_scale, w_zero, bias, out_dtype))


# ----------------------------------------------------------------------------
# ternary_linear, int4_linear (weight-only)
# ----------------------------------------------------------------------------

# (M, N, K, activation dtype, per-channel scale / group size, bias)
TERNARY_CASES = [
    (1, 4, 8, torch.float32, False, False),
    (5, 20, 24, torch.float16, True, True),
    (33, 36, 136, torch.float32, True, True),
    (33, 20, 136, torch.bfloat16, False, True),
    (5, 36, 24, torch.float32, True, False),
]


@needs_kernels
@pytest.mark.parametrize("m,n,k,dtype,per_channel,with_bias", TERNARY_CASES)
def test_ternary_linear_equals_reference(poisoned, m, n, k, dtype, per_channel, with_bias):
    x = torch.randn(m, k, generator=_gen(m + k)).to(dtype)
    w = _ternary(n, k, n)
    scale = _rand((n,) if per_channel else (), 3, 0.01, 0.1)
    bias = torch.randn(n, generator=_gen(4)) if with_bias else None
    out = poisoned.ternary_linear(*_dev(x, w, scale, bias))
    _close(out, reference.ref_ternary_linear(x, w, scale, bias))


INT4_CASES = [
    (1, 4, 8, 8, torch.float32, torch.float32),
    (5, 20, 24, 8, torch.float16, torch.float16),
    (33, 36, 136, 8, torch.float32, torch.float32),
    (33, 20, 136, 17, torch.bfloat16, torch.float32),  # odd group size
    (5, 36, 136, 136, torch.float32, torch.float16),  # one group per row
    (5, 20, 24, 8, torch.float32, torch.bfloat16),
    # Groups a multiple of the largest K tile: one scale per row and tile (GROUP_PER_TILE)
    (33, 36, 160, 32, torch.float32, torch.float32),
    (5, 20, 48, 16, torch.float16, torch.float16),
    (3, 20, 96, 96, torch.bfloat16, torch.bfloat16),
]


@needs_kernels
@pytest.mark.parametrize("m,n,k,g,dtype,sdtype", INT4_CASES)
def test_int4_linear_equals_reference(poisoned, m, n, k, g, dtype, sdtype):
    # Both ways of reading scales: one per row and K tile (the interpreter's K tile, 16, divides
    # the group), or gathered per element.
    assert (g % 16 == 0) == (g in (16, 32, 96))
    x = torch.randn(2, m, k, generator=_gen(m + k)).to(dtype)
    w = _int4(n, k, n)
    w_scale = _rand((n, k // g), 5, 0.01, 0.1, sdtype)
    w_zero = torch.randint(0, 16, (n, k // g), generator=_gen(6)).to(sdtype)
    bias = torch.randn(n, generator=_gen(7)) if m > 1 else None
    out = poisoned.int4_linear(*_dev(x, w, w_scale, w_zero, bias))
    _close(out, reference.ref_int4_linear(x, w, w_scale, w_zero, bias))


# ----------------------------------------------------------------------------
# GPU, DiT shapes (compiled kernels; each shape class is autotuned on its first call)
# ----------------------------------------------------------------------------

DIT_SHAPES = [(8192, 4608, 1152), (8192, 1152, 4608), (8192, 3456, 1152), (1, 1152, 1152), (77, 4608, 1152)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m,n,k", DIT_SHAPES)
@pytest.mark.parametrize("ternary", [False, True], ids=["w8a8", "w158a8"])
def test_gpu_int8_gemms_at_dit_shapes(launch, m, n, k, ternary):
    assert ops.registered_impl("w8a8_linear", "cuda") is launch.w8a8_linear  # ops dispatch to Triton
    x = torch.randn(m, k, generator=_gen(0)).cuda()
    xq, xs = ops.quantize_per_token_int8(x)
    qr, sr = reference.ref_quantize_per_token_int8(x)
    assert torch.equal(xq, qr) and torch.equal(xs, sr)
    w = (_ternary(n, k, 1) if ternary else _int8((n, k), 1)).cuda()
    ws = _rand((n,), 2, 0.01, 0.1).cuda()
    bias = torch.randn(n, generator=_gen(3)).cuda()
    fast = ops.w158a8_linear if ternary else ops.w8a8_linear
    ref = reference.ref_w158a8_linear if ternary else reference.ref_w8a8_linear
    for out_dtype in (torch.float32, torch.bfloat16):
        _close(fast(xq, xs, w, ws, bias, out_dtype), ref(xq, xs, w, ws, bias, out_dtype).cpu())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 8192])
@pytest.mark.parametrize("asym,ga", [(False, 1152), (True, 128)])
def test_gpu_w4a8_at_dit_shapes(m, asym, ga):
    n, k, gw = 3456, 1152, 128
    args = [t if t is None else t.cuda() for t in _w4a8_inputs(m, n, k, ga, gw, asym, "groups", 0)]
    bias = torch.randn(n, generator=_gen(1)).cuda()
    out = ops.w4a8_linear(*args, bias, torch.float16)
    _close(out, reference.ref_w4a8_linear(*args, bias, torch.float16).cpu())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_weight_only_at_dit_shapes(m, dtype):
    n, k, g = 4608, 1152, 128
    x = torch.randn(m, k, generator=_gen(0)).to(dtype).cuda()
    bias = torch.randn(n, generator=_gen(1)).cuda()
    wt, scale = _ternary(n, k, 2).cuda(), torch.tensor(0.05).cuda()
    _close(ops.ternary_linear(x, wt, scale, bias), reference.ref_ternary_linear(x, wt, scale, bias).cpu())
    w4 = _int4(n, k, 3).cuda()
    w_scale = _rand((n, k // g), 4, 0.01, 0.1, dtype).cuda()
    w_zero = torch.randint(0, 16, (n, k // g), generator=_gen(5)).to(dtype).cuda()
    out = ops.int4_linear(x, w4, w_scale, w_zero, bias)
    _close(out, reference.ref_int4_linear(x, w4, w_scale, w_zero, bias).cpu())
