"""The Triton kernels against the ops' references: odd shapes, poisoned outputs, declined calls.

How this file runs. Triton chooses between compiling and interpreting a kernel
when ``@triton.jit`` decorates it, and its interpreter needs ``TRITON_INTERPRET=1``
before Triton itself is imported (Triton's own library functions are jit'd at
import). Setting the variable from a test would come too late if anything had
imported Triton already, and would leak into the rest of the session (on a GPU
machine it would turn every later Triton kernel into interpreted code). So:

* ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton.py``: the kernel tests
  run on CPU tensors in the interpreter, at small shapes;
* on a CUDA machine (variable unset): the same tests run compiled on the GPU,
  plus the ``gpu`` tests at DiT shapes;
* otherwise (a CPU-only run of the suite): ``test_kernels_in_the_interpreter``
  runs this file again in a subprocess with ``TRITON_INTERPRET=1``; a failure
  there shows that run's report.

Tiles under the interpreter are 16 x 16 (x 32 in K for int8; 16 for floats), so
these shapes have partial tiles in M, N and K and several K steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditq.kernels
from ditq.kernels import dispatch, ops, reference
from ditq.kernels.packing import pack_int4, pack_ternary

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"  # where the kernel tests put their tensors

needs_kernels = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or CUDA),
    reason="needs triton and a GPU, or TRITON_INTERPRET=1 (run by test_kernels_in_the_interpreter)",
)
needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and CUDA) or INTERPRET, reason="needs triton and CUDA (compiled kernels)"
)

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
"""Largest error allowed, relative to the reference's largest magnitude (one rounding in the output dtype)."""


@pytest.fixture
def launch():
    from ditq.kernels.triton import launch

    return launch


@pytest.fixture
def poisoned(launch, monkeypatch):
    """Kernel outputs start as values no kernel writes: NaN (floats), -128 (codes stay in [-127, 127])."""

    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -128
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_alloc", alloc)
    return launch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` has ``ref``'s shape and dtype, no NaN, and is within TOL of it (relative to max |ref|)."""
    out = out.cpu()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= TOL[ref.dtype] * max(scale, 1e-12), f"max error {err:.3g}, max |ref| {scale:.3g}"


def _same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Integer GEMM outputs: the epilogue's float32 operations are the reference's, in its order, so
    the interpreter (IEEE numpy) gives the same bits; compiled, within TOL (FMA fusion is off, but
    the GPU run is the place to find out)."""
    if INTERPRET:
        assert torch.equal(out, ref), f"max difference {(out.double() - ref.double()).abs().max().item():.3g}"
    _close(out, ref)


def _int8(shape, seed, lo=-127, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _ternary(n, k, seed):
    return pack_ternary(torch.randint(-1, 2, (n, k), generator=_gen(seed)))


def _int4(n, k, seed):
    return pack_int4(torch.randint(0, 16, (n, k), generator=_gen(seed), dtype=torch.uint8))


def _rand(shape, seed, lo=0.5, hi=1.5, dtype=torch.float32):
    return (lo + (hi - lo) * torch.rand(shape, generator=_gen(seed))).to(dtype)


# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize(
    "shape,group,dtype",
    [
        ((1, 8), 0, torch.float32),
        ((5, 24), 8, torch.float16),
        ((33, 136), 0, torch.float32),
        ((33, 136), 8, torch.float32),
        ((2, 3, 136), 17, torch.bfloat16),
        ((3, 8200), 0, torch.float32),  # rows longer than one chunk: read twice
        ((2, 16400), 8200, torch.float16),
    ],
)
def test_quantize_equals_reference(poisoned, shape, group, dtype):
    x = torch.randn(shape, generator=_gen(0)) * _rand((*shape[:-1], 1), 1, 0.01, 20)
    x.view(-1, shape[-1])[0] = 0  # an all-zero token: the 1e-5 floor on max |x|
    x = x.to(dtype)
    q, s = poisoned.quantize_per_token_int8(x.to(DEVICE), group)
    qr, sr = reference.ref_quantize_per_token_int8(x, group)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@needs_kernels
@pytest.mark.parametrize(
    "shape,group,bits,dtype",
    [
        ((1, 8), 0, 8, torch.float32),
        ((5, 24), 8, 4, torch.float16),
        ((33, 136), 0, 8, torch.float32),
        ((2, 3, 136), 17, 6, torch.bfloat16),
        ((3, 8200), 0, 8, torch.float32),  # rows longer than one chunk: read twice
    ],
)
def test_quantize_asym_equals_reference(poisoned, shape, group, bits, dtype):
    x = torch.randn(shape, generator=_gen(2)) * _rand((*shape[:-1], 1), 3, 0.01, 20) + 0.3
    x.view(-1, shape[-1])[0] = 7.0  # a constant token: the 1e-5 floor on max - min, a huge zero point
    x = x.to(dtype)
    q, s, z = poisoned.quantize_per_token_asym(x.to(DEVICE), bits, group)
    qr, sr, zr = reference.ref_quantize_per_token_asym(x, bits, group)
    assert q.dtype == torch.uint8 and s.dtype == z.dtype == torch.float32
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr) and torch.equal(z.cpu(), zr)


# ----------------------------------------------------------------------------
# the fused producers (layernorm_modulate, gelu, rmsnorm_modulate, swiglu; then quantize_per_token_int8)
# ----------------------------------------------------------------------------

PRODUCER_SCALE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
"""Scales: float32 rounding of the row's mean and rstd (float32; seen: 2.4e-7); one unit of the dtype
at max |m| (16-bit, where that value rounds the other way; seen: equal)."""

PRODUCER_CODE_MISMATCH = 1e-3
"""Most codes (a fraction) one off the reference's: values at a rounding boundary (seen: 1e-5 or less)."""


def _near_codes(out, ref, dtype) -> None:
    """Codes within one of the reference's, rarely off; scales within PRODUCER_SCALE_RTOL; no poison."""
    (q, s), (qr, sr) = [t.cpu() for t in out], [t.cpu() for t in ref]
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    assert (q != -128).all() and torch.isfinite(s).all(), "unwritten (poisoned) outputs"
    diff = (q.int() - qr.int()).abs()
    assert diff.max().item() <= 1, f"codes {diff.max().item()} apart"
    off = int((diff > 0).sum())
    assert off <= math.ceil(PRODUCER_CODE_MISMATCH * q.numel()), f"{off} of {q.numel()} codes off by one"
    torch.testing.assert_close(s, sr, rtol=PRODUCER_SCALE_RTOL[dtype], atol=0)


# (B, T, K, dtype, eps, magnitude)
LN_CASES = [
    (2, 3, 1152, torch.float32, 1e-6, 1.0),  # DiT's K: two tokens per program
    (1, 1, 7, torch.bfloat16, 1e-6, 1.0),  # one token
    (3, 1, 100, torch.float16, 1e-5, 1.0),
    (2, 5, 100, torch.bfloat16, 1e-5, 1e4),  # large magnitudes
    (3, 2, 7, torch.float32, 0.5, 1.0),  # eps as large as some variances
    (2, 2, 1, torch.float32, 1e-6, 1.0),  # K = 1: x - mean = 0, so m = shift
    (1, 2, 1152, torch.float16, 1e-6, 100.0),
    (1, 2, 8200, torch.bfloat16, 1e-6, 1.0),  # rows longer than one chunk: read four times
    (2, 1, 8200, torch.float32, 1e-5, 1.0),
]


@needs_kernels
@pytest.mark.parametrize("b,t,k,dtype,eps,mag", LN_CASES)
def test_layernorm_modulate_quantize_near_reference(poisoned, b, t, k, dtype, eps, mag):
    x = torch.randn(b, t, k, generator=_gen(30)) * _rand((b, t, 1), 31, 0.01, 20)
    x = (x + 3 * torch.randn(b, t, 1, generator=_gen(32))) * mag  # token means far from 0
    shift = 0.5 * torch.randn(b, k, generator=_gen(33))
    scale = 0.5 * torch.randn(b, k, generator=_gen(34))
    x[0, 0], shift[0] = 0, 0  # an all-zero token of a sample without shift: the 1e-5 floor on max |m|
    x, shift, scale = x.to(dtype), shift.to(dtype), scale.to(dtype)
    out = poisoned.layernorm_modulate_quantize_int8(*_dev(x, shift, scale), eps)
    ref = reference.ref_layernorm_modulate_quantize_int8(x, shift, scale, eps)
    _near_codes(out, ref, dtype)
    assert out[1].shape == (b, t, 1) and (out[0][0, 0] == 0).all()


# (shape, dtype, magnitude)
GELU_CASES = [
    ((2, 3, 1152), torch.float32, 1.0),
    ((1, 7), torch.bfloat16, 1.0),
    ((5, 100), torch.float16, 1.0),
    ((4, 1), torch.float32, 1.0),
    ((2, 2, 4608), torch.bfloat16, 1.0),  # DiT's fc2 input
    ((3, 100), torch.bfloat16, 1e3),  # large magnitudes: GELU(x) = x or -0
    ((2, 1152), torch.float16, 100.0),
    ((2, 8200), torch.float32, 1.0),  # rows longer than one chunk: read twice
    ((1, 2, 8200), torch.float16, 1.0),
]


@needs_kernels
@pytest.mark.parametrize("shape,dtype,mag", GELU_CASES)
def test_gelu_quantize_near_reference(poisoned, shape, dtype, mag):
    x = torch.randn(shape, generator=_gen(40)) * _rand((*shape[:-1], 1), 41, 0.01, 20) * mag
    x.view(-1, shape[-1])[0] = 0  # an all-zero token: the 1e-5 floor on max |GELU(x)|
    x = x.to(dtype)
    out = poisoned.gelu_quantize_int8(x.to(DEVICE))
    _near_codes(out, reference.ref_gelu_quantize_int8(x), dtype)
    assert out[1].shape == (*shape[:-1], 1)


# (B, T, K, dtype, eps, magnitude)
RMS_CASES = [
    (2, 3, 1152, torch.float32, 1e-5, 1.0),  # two tokens per program
    (1, 1, 7, torch.bfloat16, 1e-5, 1.0),  # one token
    (3, 1, 100, torch.float16, 1e-6, 1.0),
    (2, 5, 100, torch.bfloat16, 1e-5, 1e4),  # large magnitudes
    (3, 2, 7, torch.float32, 0.5, 1.0),  # eps as large as some means of squares
    (2, 2, 1, torch.float16, 1e-5, 1.0),  # K = 1
    (1, 2, 3072, torch.bfloat16, 1e-5, 1.0),  # TerDiT-4.2B's dim
    (1, 2, 1152, torch.float16, 1e-6, 100.0),
    (1, 2, 8200, torch.bfloat16, 1e-5, 1.0),  # rows longer than one chunk: read three times
    (2, 1, 8200, torch.float32, 1e-6, 1.0),
]


@needs_kernels
@pytest.mark.parametrize("b,t,k,dtype,eps,mag", RMS_CASES)
def test_rmsnorm_modulate_quantize_near_reference(poisoned, b, t, k, dtype, eps, mag):
    x = torch.randn(b, t, k, generator=_gen(60)) * _rand((b, t, 1), 61, 0.01, 20)
    x = (x + 3 * torch.randn(b, t, 1, generator=_gen(62))) * mag
    weight = torch.randn(k, generator=_gen(63))  # signed, some near 0: trained RMSNorm weights vary
    shift = 0.5 * torch.randn(b, k, generator=_gen(64))
    scale = 0.5 * torch.randn(b, k, generator=_gen(65))
    x[0, 0], shift[0] = 0, 0  # an all-zero token of a sample without shift: the 1e-5 floor on max |m|
    x, weight, shift, scale = x.to(dtype), weight.to(dtype), shift.to(dtype), scale.to(dtype)
    out = poisoned.rmsnorm_modulate_quantize_int8(*_dev(x, weight, shift, scale), eps)
    ref = reference.ref_rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps)
    _near_codes(out, ref, dtype)
    assert out[1].shape == (b, t, 1) and (out[0][0, 0] == 0).all()


# (shape, dtype, magnitude of gate)
SWIGLU_CASES = [
    ((2, 3, 1152), torch.float32, 1.0),
    ((1, 7), torch.bfloat16, 1.0),
    ((5, 100), torch.float16, 1.0),
    ((4, 1), torch.float32, 1.0),
    ((2, 2, 8192), torch.bfloat16, 1.0),  # TerDiT-4.2B's FFN hidden size: one chunk
    ((3, 100), torch.bfloat16, 1e2),  # gate in +-100s: silu(g) = g, or -0 where exp(-g) overflows
    ((2, 1152), torch.float16, 10.0),
    ((2, 100), torch.float32, 1e2),
    ((2, 8200), torch.float32, 1.0),  # rows longer than one chunk: read twice
    ((1, 2, 8200), torch.float16, 1.0),
]


@needs_kernels
@pytest.mark.parametrize("shape,dtype,mag", SWIGLU_CASES)
def test_swiglu_quantize_near_reference(poisoned, shape, dtype, mag):
    gate = torch.randn(shape, generator=_gen(70)) * _rand((*shape[:-1], 1), 71, 0.01, 20) * mag
    up = torch.randn(shape, generator=_gen(72)) * _rand((*shape[:-1], 1), 73, 0.1, 5)
    rows = gate.view(-1, shape[-1])
    rows[0] = 0  # silu(0) = 0: an all-zero token, the 1e-5 floor on max |m|
    if len(rows) > 1 and shape[-1] >= 4:  # exp(-gate) overflowing float32 (silu = -0); silu = gate
        rows[-1, :4] = torch.tensor([-100.0, -90.0, 100.0, 90.0])
    gate, up = gate.to(dtype), up.to(dtype)
    out = poisoned.swiglu_quantize_int8(*_dev(gate, up))
    _near_codes(out, reference.ref_swiglu_quantize_int8(gate, up), dtype)
    assert out[1].shape == (*shape[:-1], 1) and (out[0].reshape(-1, shape[-1])[0] == 0).all()


@needs_kernels
def test_producer_quantizers_decline_float64(launch):
    """float64 (and mixed dtypes) are declined, so the op runs its reference."""
    x = torch.randn(2, 3, 24, generator=_gen(50), dtype=torch.float64)
    shift, scale = torch.randn(2, 2, 24, generator=_gen(51), dtype=torch.float64)
    x, shift, scale = _dev(x, shift, scale)
    assert launch.layernorm_modulate_quantize_int8(x, shift, scale, 1e-6) is NotImplemented
    assert launch.gelu_quantize_int8(x) is NotImplemented
    x32, s16 = x.float(), shift.half()  # mixed dtypes (the op's checks refuse them first)
    assert launch.layernorm_modulate_quantize_int8(x32, s16, s16, 1e-6) is NotImplemented
    weight = _dev(torch.randn(24, generator=_gen(52), dtype=torch.float64))[0]
    assert launch.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(x, x) is NotImplemented
    w32 = weight.float()
    assert launch.rmsnorm_modulate_quantize_int8(x32, w32, s16, s16, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(x32, x.half()) is NotImplemented
    empty, s32 = x32[:, :0], shift.float()  # samples without tokens
    assert launch.rmsnorm_modulate_quantize_int8(empty, w32, s32, s32, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(empty, empty) is NotImplemented

    # Through the op, with the Triton functions as the implementations of the tensors' device
    # (on CPU tensors, the interpreter's): the reference's numbers.
    calls = {
        "layernorm_modulate_quantize_int8": (x, shift, scale, 1e-6),
        "gelu_quantize_int8": (x,),
        "rmsnorm_modulate_quantize_int8": (x, weight, shift, scale, 1e-5),
        "swiglu_quantize_int8": (x, 2 * x),
    }
    dev = x.device.type
    before = {name: ops.registered_impl(name, dev) for name in calls}
    try:
        for name in calls:
            ops.register_impl(name, dev, getattr(launch, name))
        with ops.use_backend("auto"):
            for name, args in calls.items():
                out, ref = getattr(ops, name)(*args), reference.REFERENCE[name](*args)
                assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True)), name
    finally:
        for name, fn in before.items():
            ops.register_impl(name, dev, fn)


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


def _w4a8_inputs(m, n, k, ga, gw, asym, layout, seed):
    if asym:
        xq = torch.randint(0, 256, (m, k), generator=_gen(seed), dtype=torch.uint8)
    else:
        xq = _int8((m, k), seed)
    xs = _rand((m, k // ga), seed + 1)
    if layout == "token":
        xs = xs.reshape(m)
    xz = torch.randint(0, 256, xs.shape, generator=_gen(seed + 2)).float() if asym else None
    w = _int4(n, k, seed + 3)
    w_scale = _rand((n, k // gw), seed + 4, 0.01, 0.1)
    w_zero = torch.randint(0, 16, (n, k // gw), generator=_gen(seed + 5)).float()
    return xq, xs, xz, w, w_scale, w_zero


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
# Declined calls, registration, importing without Triton
# ----------------------------------------------------------------------------


@needs_kernels
def test_unsupported_calls_return_not_implemented(launch):
    # w4a8 with weight groups of 8: constant-scale segments shorter than an int8 K tile.
    xq, xs, xz, w, w_scale, w_zero = _w4a8_inputs(5, 20, 64, 64, 8, False, "groups", 0)
    assert launch.w4a8_linear(*_dev(xq, xs, xz, w, w_scale, w_zero, None), torch.float32) is NotImplemented
    # uint8 activations without zero points
    xu = xq.view(torch.uint8)
    assert launch.w4a8_linear(*_dev(xu, xs, None, w, w_scale, w_zero, None), torch.float32) is NotImplemented
    # float64 activations (no float64 tl.dot), K not a multiple of 4 for ternary
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert launch.ternary_linear(*_dev(x64, _ternary(4, 8, 0), torch.ones(1), None)) is NotImplemented
    x = torch.randn(3, 10)
    packed = torch.zeros(4, 2, dtype=torch.uint8)
    assert launch.ternary_linear(*_dev(x, packed, torch.ones(1), None)) is NotImplemented
    # int4 with scales and zero points of different dtypes; K not a multiple of the group
    x = torch.randn(3, 24)
    w4 = _int4(4, 24, 0)
    s32, z16 = torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.float16)
    assert launch.int4_linear(*_dev(x, w4, s32, z16, None)) is NotImplemented
    assert launch.int4_linear(*_dev(x, w4, torch.ones(4, 5), torch.zeros(4, 5), None)) is NotImplemented
    # empty inputs; tensors on two devices
    assert launch.quantize_per_token_int8(torch.empty(0, 8, device=DEVICE), 0) is NotImplemented
    args = _dev(_int8((3, 8), 0), torch.ones(3, 1), _int8((4, 8), 1), torch.ones(1))
    assert launch.w8a8_linear(*args, torch.zeros(4, device="meta"), torch.float32) is NotImplemented


@needs_kernels
def test_register_makes_the_kernels_the_cuda_implementations(launch):
    import ditq.kernels.triton as tk

    before = {op: ops.registered_impl(op, "cuda") for op in ops.OPS}
    try:
        assert tk.available()
        assert tk.register()
        for op in ops.OPS:
            assert ops.registered_impl(op, "cuda") is getattr(launch, op)
            assert getattr(tk, op) is getattr(launch, op)
        tk.unregister()
        assert all(ops.registered_impl(op, "cuda") is None for op in ops.OPS)
    finally:
        for op, fn in before.items():
            ops.register_impl(op, "cuda", fn)


@needs_kernels
@pytest.mark.parametrize("kind", ["w8a8", "ternary-a8"])
def test_dit_with_the_fused_producer_kernels_matches_the_unfused_one(launch, monkeypatch, kind):
    """A tiny deployed DiT whose blocks hand the Triton producers' int8 codes to their integer linears."""
    from ditq import quant
    from ditq.models import DiT, DiTConfig

    fused_ops = ("layernorm_modulate_quantize_int8", "gelu_quantize_int8")
    calls = dict.fromkeys(fused_ops, 0)
    for name in fused_ops:
        kernel = getattr(launch, name)

        def counted(*args, _fn=kernel, _name=name):
            calls[_name] += 1
            return _fn(*args)

        # CPU tensors in the interpreter: the Triton kernels stand in for the CPU implementations
        monkeypatch.setitem(dispatch._IMPLS[name], "cpu" if INTERPRET else "cuda", counted)
    if INTERPRET:
        monkeypatch.setattr(dispatch, "has_fast_impl", lambda *a, **k: True)
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=8, in_channels=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    if kind == "w8a8":
        quant.quantize_(model, quant.QDiTConfig(w_bits=8, a_bits=8, w_group=0, w_sym=True, a_sym=True))
    else:
        quant.quantize_(model, quant.TernaryQATConfig(act_bits=8))
        quant.quantize_(model, quant.TernaryQATConfig(act_bits=8, step="convert"))
    model = model.eval().to(DEVICE)
    x = torch.randn(2, 1, 8, 8, generator=_gen(0)).to(DEVICE)
    t, y = torch.tensor([10.0, 900.0], device=DEVICE), torch.tensor([1, 1000], device=DEVICE)
    with torch.no_grad():
        out = model(x, t, y)
        with ops.use_fusion(False):
            expected = model(x, t, y)
    assert calls == {"layernorm_modulate_quantize_int8": 4, "gelu_quantize_int8": 2}
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_import_without_triton_never_fails(monkeypatch):
    """With Triton missing, the package imports, registers nothing and says why it is unavailable."""
    for name in [
        m for m in sys.modules if m == "ditq.kernels.triton" or m.startswith("ditq.kernels.triton.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ditq.kernels, "triton", None, raising=False)  # restored (or removed) afterwards
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that available() gets as far as importing it
    before = {op: ops.registered_impl(op, "cuda") for op in ops.OPS}
    tk = importlib.import_module("ditq.kernels.triton")
    assert not tk.available() and not tk.register()
    assert "not importable" in tk.unavailable_reason()
    assert {op: ops.registered_impl(op, "cuda") for op in ops.OPS} == before


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET or CUDA, reason="the kernel tests run in this process")
def test_kernels_in_the_interpreter():
    """This file's kernel tests, in a fresh process with TRITON_INTERPRET=1 (see the module docstring)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    cmd += ["-k", "not test_kernels_in_the_interpreter", "-m", "not gpu"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, report


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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [0, 128])
def test_gpu_quantize_at_dit_shapes(dtype, group):
    x = (torch.randn(32, 256, 1152, generator=_gen(0)) * 3).to(dtype).cuda()
    q, s = ops.quantize_per_token_int8(x, group)
    qr, sr = reference.ref_quantize_per_token_int8(x, group)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    q, s, z = ops.quantize_per_token_asym(x, 8, group)
    ref = reference.ref_quantize_per_token_asym(x, 8, group)
    assert all(torch.equal(a, b) for a, b in zip((q, s, z), ref, strict=True))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_producer_quantizers_at_dit_shapes(launch, dtype):
    """DiT-XL/2 at batch 64: the norm before qkv / fc1 (K = 1152) and the GELU before fc2 (K = 4608),
    against PyTorch eager on the GPU (CUDA's LayerNorm and GELU kernels)."""
    assert ops.registered_impl("gelu_quantize_int8", "cuda") is launch.gelu_quantize_int8
    b, t, k = 64, 256, 1152
    x = (torch.randn(b, t, k, generator=_gen(0)) * 3 + 1).to(dtype).cuda()
    shift = (0.5 * torch.randn(b, k, generator=_gen(1))).to(dtype).cuda()
    scale = (0.5 * torch.randn(b, k, generator=_gen(2))).to(dtype).cuda()
    out = ops.layernorm_modulate_quantize_int8(x, shift, scale, 1e-6)
    _near_codes(out, reference.ref_layernorm_modulate_quantize_int8(x, shift, scale, 1e-6), dtype)
    h = (torch.randn(b, t, 4 * k, generator=_gen(3)) * 2).to(dtype).cuda()
    _near_codes(ops.gelu_quantize_int8(h), reference.ref_gelu_quantize_int8(h), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large_dit_producer_quantizers_at_terdit_shapes(launch, dtype):
    """TerDiT-4.2B at batch 16: the RMSNorm before the attention and w1 / w3 (K = 3072) and the
    SwiGLU before w2 (K = 8192), against PyTorch eager on the GPU (its rsqrt and exp)."""
    assert ops.registered_impl("swiglu_quantize_int8", "cuda") is launch.swiglu_quantize_int8
    b, t, k, hidden = 16, 256, 3072, 8192
    x = (torch.randn(b, t, k, generator=_gen(0)) * 3 + 1).to(dtype).cuda()
    weight = (1 + 0.2 * torch.randn(k, generator=_gen(1))).to(dtype).cuda()
    shift = (0.5 * torch.randn(b, k, generator=_gen(2))).to(dtype).cuda()
    scale = (0.5 * torch.randn(b, k, generator=_gen(3))).to(dtype).cuda()
    out = ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, 1e-5)
    _near_codes(out, reference.ref_rmsnorm_modulate_quantize_int8(x, weight, shift, scale, 1e-5), dtype)
    gate = (torch.randn(b, t, hidden, generator=_gen(4)) * 3).to(dtype).cuda()
    up = torch.randn(b, t, hidden, generator=_gen(5)).to(dtype).cuda()
    _near_codes(ops.swiglu_quantize_int8(gate, up), reference.ref_swiglu_quantize_int8(gate, up), dtype)


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
