"""The ops' argument checks: a call they cannot take is one KernelError line that names the op and
says what was wrong (shapes and dtypes only, so fake tensors fail the same way)."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import KernelError, ops, pack_ternary


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


# ----------------------------------------------------------------------------
# Argument errors: one line, saying what was wrong
# ----------------------------------------------------------------------------


def _bad_calls():
    xq, xs = _int8((3, 16), 80), torch.ones(3, 1)
    w8, ws = _int8((5, 16), 81), torch.ones(5)
    w2 = pack_ternary(torch.zeros(5, 16))
    x = torch.randn(3, 16)
    x3 = x.reshape(1, 3, 16)
    sw, zw = torch.ones(5, 2), torch.zeros(5, 2)
    w4 = torch.zeros(5, 8, dtype=torch.uint8)
    return [
        ("quantize_per_token_int8", (xq, 0), "x must be a floating-point tensor"),
        ("quantize_per_token_int8", (x, 5), "group must be 0"),
        ("quantize_per_token_int8", (torch.randn(3, 0), 0), "K >= 1"),
        ("quantize_per_token_asym", (xq, 8, 0), "x must be a floating-point tensor"),
        ("quantize_per_token_asym", (x, 9, 0), "bits must be an integer in 2..8"),
        ("quantize_per_token_asym", (x, 8, 5), "group must be 0"),
        ("layernorm_modulate_quantize_int8", (x, x, x, 1e-6), "x must be 3-D"),
        ("layernorm_modulate_quantize_int8", (x3, x[:2], x[:1], 1e-6), "shift must be"),
        ("layernorm_modulate_quantize_int8", (x3, x[:1], x[:1], 0.0), "eps must be a positive"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0, :5], x[:1], x[:1], 1e-5), "weight must be"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0].double(), x[:1], x[:1], 1e-5), "weight must be"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0], x[:1], x[:1].T, 1e-5), "scale must be"),
        ("swiglu_quantize_int8", (x, x[:2]), "up must have gate's shape"),
        ("swiglu_quantize_int8", (x, x.double()), "up must be"),
        ("swiglu_quantize_int8", (xq, xq), "gate must be a floating-point tensor"),
        ("w8a8_linear", (xq.float(), xs, w8, ws), "xq must be torch.int8"),
        ("w8a8_linear", (xq, xs, _int8((5, 17), 82), ws), "K = 16"),
        ("w8a8_linear", (xq, torch.ones(3, 2), w8, ws), "one scale per token"),
        ("w8a8_linear", (xq, torch.ones(4, 1), w8, ws), "leading shape"),
        ("w8a8_linear", (xq, xs, w8, torch.ones(3)), "per output channel"),
        ("w8a8_linear", (xq, xs, w8, ws, torch.ones(4)), "bias must be"),
        ("w8a8_linear", (xq, xs, w8, ws, None, torch.int32), "out_dtype"),
        ("w8a8_linear", (_int8((1, 70000), 83), torch.ones(1, 1), _int8((1, 70000), 84), ws[:1]), "exceeds"),
        ("w158a8_linear", (_int8((3, 18), 85), xs, w2, ws[:1]), "multiple of 4"),
        ("w158a8_linear", (xq, xs, w8, ws[:1]), "w_packed must be torch.uint8"),
        ("w4a8_linear", (xq, xs, torch.zeros(3, 1), w4, sw, zw), "int8 codes without x_zero"),
        ("w4a8_linear", (xq.to(torch.uint8), xs, None, w4, sw, zw), "uint8 codes with x_zero"),
        ("w4a8_linear", (xq, xs, None, w4, torch.ones(5, 3), torch.zeros(5, 3)), "g dividing"),
        ("w4a8_linear", (xq, xs, None, w4[:, :7], sw, zw), "K/2"),
        ("ternary_linear", (x, w2[:, :3], ws), "K/4"),
        ("int4_linear", (x, w4, sw, zw[:, :1]), "w_scale and w_zero"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_one_line_errors(name, args, match):
    with pytest.raises(KernelError, match=match) as info:
        getattr(ops, name)(*args)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(name)
