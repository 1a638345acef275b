"""The Triton per-token quantizers (ditq.kernels.triton.quantize) against the references: bit for bit,
odd shapes, rows longer than one chunk; and on a GPU at DiT shapes. How these tests run (the
interpreter, in a subprocess, on a CPU-only machine) is told in test_triton.py."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, _gen, _rand, needs_gpu, needs_kernels

from ditq.kernels import ops, reference


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
# GPU, DiT shapes (compiled kernels)
# ----------------------------------------------------------------------------


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
