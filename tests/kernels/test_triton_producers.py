"""The Triton producers fused with int8 quantization (ditq.kernels.triton.producers) against the
references: LayerNorm and RMSNorm with adaLN modulation, GELU and SwiGLU, at odd shapes and magnitudes;
a tiny DiT through them; and on a GPU at DiT and TerDiT shapes. How these tests run (the interpreter,
in a subprocess, on a CPU-only machine) is told in test_triton.py."""

from __future__ import annotations

import math

import pytest
import torch
from triton_helpers import DEVICE, INTERPRET, _dev, _gen, _rand, needs_gpu, needs_kernels

from ditq.kernels import dispatch, ops, reference

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


# ----------------------------------------------------------------------------
# GPU, DiT and TerDiT shapes (compiled kernels)
# ----------------------------------------------------------------------------


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
