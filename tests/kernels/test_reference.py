"""The ops' plain-PyTorch references against independent float64 math.

The reference implementations are what every fast implementation is tested
against (tests/kernels/cpu/, tests/kernels/test_triton.py), so here each is
checked against a direct float64 computation from dequantized tensors: integer
parts exactly, outputs to float32 rounding. These tests call the ``ref_*``
functions directly; the ops themselves may run a fast CPU backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditq.kernels import pack_int4, pack_ternary, reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _rel(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((5, 64), 0), ((2, 3, 96), 32), ((1, 7), 0), ((4, 1), 1)])
def test_quantize_reference_follows_the_absmax_rule(shape, group):
    x = torch.randn(shape, generator=_gen(1)) * 3
    q, s = reference.ref_quantize_per_token_int8(x, group)
    k = shape[-1]
    g = k if group == 0 else group
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], k // g)
    xg = x.double().reshape(*shape[:-1], k // g, g)
    amax = xg.abs().amax(-1)
    torch.testing.assert_close(s.double(), amax / 127, rtol=1e-6, atol=0)
    qg = q.reshape(xg.shape).double()
    # every code is the nearest level; the largest |x| of a group lands on +-127
    assert (qg.abs() <= 127).all()
    assert ((xg - qg * s.double().unsqueeze(-1)).abs() <= s.double().unsqueeze(-1) * (0.5 + 1e-5)).all()
    assert (qg.abs().amax(-1) == 127).all()


def test_quantize_reference_equals_bitnet_fake_quantization_bit_for_bit():
    from ditq.quant.ternary import fake_quant_act_int8

    x = torch.randn(64, 200, generator=_gen(2)) * torch.logspace(-3, 2, 64).unsqueeze(1)
    q, _ = reference.ref_quantize_per_token_int8(x)
    inv = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    assert torch.equal(fake_quant_act_int8(x), q.float() / inv)


def test_quantize_rounds_half_to_even_and_handles_zero_rows():
    # max 127 -> scale 1: x * 127/127 = x exactly, so .5 ties are visible
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0] * 6])
    q, s = reference.ref_quantize_per_token_int8(x)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2]
    assert q[1].tolist() == [0] * 6 and s[1].item() == pytest.approx(1e-5 / 127)


def test_quantize_asym_reference_equals_qdit_quantizer_bit_for_bit():
    from ditq.quant.granularity import act_granularity
    from ditq.quant.primitives import quant_params, quantize

    x = torch.randn(64, 96, generator=_gen(5)) * torch.logspace(-3, 2, 64).unsqueeze(1) + 0.2
    x[3] = 1.0  # constant row: the range floor
    for bits, group in ((8, 0), (4, 32), (6, 8), (2, 0)):
        q, s, z = reference.ref_quantize_per_token_asym(x, bits, group)
        s2, z2 = quant_params(x, bits, act_granularity(group), sym=False)
        assert torch.equal(q, quantize(x, s2, z2, bits, sym=False))
        assert torch.equal(s, s2.reshape(s.shape)) and torch.equal(z, z2.reshape(z.shape))


def test_quantize_accepts_half_precision_inputs():
    x = torch.randn(3, 40, generator=_gen(3))
    q16, s16 = reference.ref_quantize_per_token_int8(x.to(torch.bfloat16))
    q32, s32 = reference.ref_quantize_per_token_int8(x.to(torch.bfloat16).float())
    assert torch.equal(q16, q32) and torch.equal(s16, s32)


# ----------------------------------------------------------------------------
# Integer linears against float64
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 33, 5), (17, 130, 9)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_w8a8_reference_vs_float64(m, k, n, per_channel):
    xq, wq = _int8((2, m, k), 10), _int8((n, k), 11)
    xs = torch.rand(2, m, 1, generator=_gen(12)) + 0.1
    ws = torch.rand(n if per_channel else 1, generator=_gen(13)) + 0.1
    bias = torch.randn(n, generator=_gen(14))
    out = reference.ref_w8a8_linear(xq, xs, wq, ws, bias)
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    acc = xq.double() @ wq.double().T
    expected = acc * xs.double() * ws.double() + bias.double()
    assert _rel(out, expected) <= 1e-6
    # the integer part alone is exact (unit scales, no bias, |acc| < 2^24)
    exact = reference.ref_w8a8_linear(xq, torch.ones_like(xs), wq, torch.ones(1))
    assert torch.equal(exact, (xq.long() @ wq.long().T).float())


def test_w8a8_reference_extreme_codes_stay_exact_in_int32():
    k = 4096  # -128 * -128 * 4096 = 2^26: beyond float32's exact integers, within int32
    xq = torch.full((2, k), -128, dtype=torch.int8)
    wq = torch.full((3, k), -128, dtype=torch.int8)
    acc = reference._int_matmul(xq.reshape(-1, k), wq)
    assert acc.dtype == torch.int32 and (acc == 2**26).all()


def test_w8a8_out_dtype():
    xq, wq = _int8((4, 16), 20), _int8((6, 16), 21)
    out = reference.ref_w8a8_linear(xq, torch.ones(4, 1), wq, torch.ones(6), None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (xq.float() @ wq.float().T).to(torch.bfloat16))


@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 36, 5), (17, 1000, 7)])
def test_w158a8_reference_vs_float64(m, k, n):
    xq = _int8((m, k), 30)
    w = torch.randint(-1, 2, (n, k), generator=_gen(31))
    xs = torch.rand(m, 1, generator=_gen(32)) + 0.1
    ws = torch.rand(n, generator=_gen(33)) + 0.1
    bias = torch.randn(n, generator=_gen(34))
    for scale in (ws, ws[:1]):
        out = reference.ref_w158a8_linear(xq, xs, pack_ternary(w), scale, bias)
        expected = (xq.double() @ w.double().T) * xs.double() * scale.double() + bias.double()
        assert _rel(out, expected) <= 1e-6
    exact = reference.ref_w158a8_linear(xq, torch.ones(m, 1), pack_ternary(w), torch.ones(1))
    assert torch.equal(exact, (xq.long() @ w.long().T).float())


def _w4a8_case(m, k, n, ga, gw, asym, seed=40):
    """Random Q-DiT-format inputs and their float64 dequantized result."""
    g = _gen(seed)
    qw = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zw = torch.randint(0, 16, (n, k // gw), generator=g).float()
    sw = torch.rand(n, k // gw, generator=g) * 0.1 + 0.01
    if asym:
        xq = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
        zx = torch.randint(0, 256, (m, k // ga), generator=g).float()
    else:
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        zx = None
    sx = torch.rand(m, k // ga, generator=g) * 0.05 + 0.01
    bias = torch.randn(n, generator=g)
    wd = (qw.double() - zw.double().repeat_interleave(gw, 1)) * sw.double().repeat_interleave(gw, 1)
    zxd = zx.double().repeat_interleave(ga, 1) if asym else 0.0
    xd = (xq.double() - zxd) * sx.double().repeat_interleave(ga, 1)
    expected = xd @ wd.T + bias.double()
    return (xq, sx, zx, pack_int4(qw), sw, zw, bias), expected


@pytest.mark.parametrize(
    "k,ga,gw",
    [(64, 64, 64), (128, 128, 32), (128, 32, 64), (192, 48, 32), (8, 2, 4)],
    ids=["per-token/per-channel", "per-token/g32", "a32/w64", "a48/w32 (gcd 16)", "tiny"],
)
@pytest.mark.parametrize("asym", [True, False], ids=["uint8+zero", "int8"])
def test_w4a8_reference_vs_float64(k, ga, gw, asym):
    args, expected = _w4a8_case(5, k, 7, ga, gw, asym)
    out = reference.ref_w4a8_linear(*args)
    assert out.shape == (5, 7)
    assert _rel(out, expected) <= 1e-5


def test_w4a8_integer_part_is_exact_with_zero_points():
    # unit scales: each segment's (q_w - z_w)(q_x - z_x) sum is an exact integer
    (xq, sx, zx, wp, sw, zw, _), _ = _w4a8_case(3, 64, 4, 32, 16, asym=True)
    out = reference.ref_w4a8_linear(xq, torch.ones_like(sx), zx, wp, torch.ones_like(sw), zw)
    from ditq.kernels import unpack_int4

    a = xq.long() - zx.long().repeat_interleave(32, 1)
    b = unpack_int4(wp).long() - zw.long().repeat_interleave(16, 1)
    assert torch.equal(out, (a @ b.T).float())


# ----------------------------------------------------------------------------
# Weight-only linears
# ----------------------------------------------------------------------------


def test_ternary_linear_reference_vs_float64_and_ternarylinear():
    from ditq.quant.ternary import TernaryLinear

    n, k = 12, 40
    w = torch.randint(-1, 2, (n, k), generator=_gen(50))
    layer = TernaryLinear(k, n, bias=True)
    with torch.no_grad():
        layer.weight.copy_(pack_ternary(w))
        layer.alphas.fill_(0.37)
        layer.bias.normal_()
    x = torch.randn(3, 4, k, generator=_gen(51))
    out = reference.ref_ternary_linear(x, layer.weight, layer.alphas, layer.bias)
    assert torch.equal(out, layer(x))  # bit for bit: same operations
    expected = x.double() @ (0.37 * w.double()).T + layer.bias.double()
    assert _rel(out, expected) <= 1e-5
    # per-output-channel scales, bf16 activations
    s = torch.rand(n, generator=_gen(52)) + 0.5
    out = reference.ref_ternary_linear(x.bfloat16(), pack_ternary(w), s, None)
    assert out.dtype == torch.bfloat16
    assert _rel(out, x.double() @ (s.double()[:, None] * w.double()).T) <= 2e-2


def test_int4_linear_reference_vs_float64_and_quantlinear_weight():
    from ditq.quant import QDiTConfig
    from ditq.quant.nn import QuantLinear

    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 10)
    layer = QuantLinear.from_float(linear, QDiTConfig(w_bits=4, a_bits=None, w_group=32))
    x = torch.randn(7, 96)
    out = reference.ref_int4_linear(
        x, pack_int4(layer.qweight), layer.w_scale, layer.w_zero, layer.bias.detach()
    )
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(), layer.bias))
    zero = layer.w_zero.double().repeat_interleave(32, 1)
    wd = (layer.qweight.double() - zero) * layer.w_scale.double().repeat_interleave(32, 1)
    assert _rel(out, x.double() @ wd.T + layer.bias.double()) <= 1e-5
