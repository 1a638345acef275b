"""Shared by the Triton kernel tests (test_triton*.py): where the kernels run (the interpreter on CPU
tensors, or compiled on a GPU), the tolerances, seeded inputs and the comparisons with the references."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

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
