"""The CPU op implementations against the references: fresh random inputs, poisoned outputs, odd
shapes, every instruction-set path this machine has, and the calls they decline."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import ops, pack_int4, pack_ternary, reference
from ditq.kernels.cpu import levels
from ditq.kernels.cpu import ops as cpu_ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


ODD = [(1, 4, 1), (3, 36, 5), (17, 260, 70), (6, 1152, 130), (13, 1000, 64), (100, 68, 3)]


# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,group", [((1, 1), 0), ((3, 17), 0), ((2, 5, 1152), 0), ((7, 96), 32), ((4, 40), 8)]
)
def test_quantize_fast_equals_reference(isa, poisoned, shape, group):
    for seed in range(2):
        x = torch.randn(shape, generator=_gen(seed)) * torch.rand(shape[:-1] + (1,), generator=_gen(9)) * 10
        q, s = ops.quantize_per_token_int8(x, group)
        qr, sr = reference.ref_quantize_per_token_int8(x, group)
        assert torch.equal(q, qr) and torch.equal(s, sr)
    x16 = torch.randn(3, 64, generator=_gen(3)).to(torch.bfloat16)
    assert all(map(torch.equal, ops.quantize_per_token_int8(x16), reference.ref_quantize_per_token_int8(x16)))


@pytest.mark.parametrize(
    "shape,group,bits",
    [((1, 1), 0, 8), ((3, 17), 0, 8), ((2, 5, 1152), 0, 8), ((7, 96), 32, 4), ((4, 40), 8, 6)]
    + [((9, 33), 11, 2)],
)
def test_quantize_asym_fast_equals_reference(isa, poisoned, shape, group, bits):
    spread = torch.rand(*shape[:-1], 1, generator=_gen(4)) * 20 + 0.01
    x = torch.randn(shape, generator=_gen(3)) * spread + 0.5
    x.view(-1, shape[-1])[0] = 3.0  # a constant row: the 1e-5 floor on max - min, a zero point clamped
    q, s, z = cpu_ops.quantize_per_token_asym(x, bits, group)
    qr, sr, zr = reference.ref_quantize_per_token_asym(x, bits, group)
    assert torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(z, zr)
    q, s, z = cpu_ops.quantize_per_token_asym(x.bfloat16(), bits, group)  # computed in float32
    assert torch.equal(q, reference.ref_quantize_per_token_asym(x.bfloat16(), bits, group)[0])


def _on_two_threads(fn):
    """``fn()`` with two torch threads (the session runs single-threaded, see conftest), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------
# Producers fused with int8 quantization: LayerNorm-modulate, GELU, RMSNorm-modulate, SwiGLU
# ----------------------------------------------------------------------------


def _codes_agree(q, s, qr, sr, s_rtol=1e-6):
    """Codes equal but for rare off-by-ones at rounding boundaries; scales to float32 rounding."""
    d = (q.int() - qr.int()).abs()
    assert d.max() <= 1 and (d > 0).sum() <= max(2, q.numel() // 2000), f"{(d > 0).sum()} codes differ"
    torch.testing.assert_close(s, sr, rtol=s_rtol, atol=0)


LN_SHAPES = [(1, 1, 1), (2, 3, 7), (3, 5, 100), (2, 17, 128), (1, 4, 1152), (2, 2, 4609)]


@pytest.mark.parametrize("b,t,k", LN_SHAPES)
def test_layernorm_modulate_quantize_fast_matches_reference(isa, poisoned, b, t, k):
    g = _gen(k)
    x = torch.randn(b, t, k, generator=g) * 4 + 2
    shift, scale = torch.randn(b, k, generator=g), torch.randn(b, k, generator=g)
    x[0, 0] = 5.0  # a constant row: variance 0, normalized to 0, codes from shift alone
    for eps in (1e-6, 1e-2):
        q, s = cpu_ops.layernorm_modulate_quantize_int8(x, shift, scale, eps)
        _codes_agree(q, s, *reference.ref_layernorm_modulate_quantize_int8(x, shift, scale, eps))
    x16, shift16, scale16 = x.bfloat16(), shift.bfloat16(), scale.bfloat16()
    assert cpu_ops.layernorm_modulate_quantize_int8(x16, shift16, scale16, 1e-6) is NotImplemented


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 100), (4, 512), (2, 3, 4608)])
def test_gelu_quantize_fast_matches_reference(isa, poisoned, shape):
    x = torch.randn(shape, generator=_gen(shape[-1])) * torch.rand(*shape[:-1], 1, generator=_gen(2)) * 6
    x.view(-1, shape[-1])[0] = 0.0  # an all-zero row: the 1e-5 floor
    q, s = cpu_ops.gelu_quantize_int8(x)
    qr, sr = reference.ref_gelu_quantize_int8(x)
    # PyTorch's 0.5 x (1 + tanh u) cancels for negative x; ours (x * sigmoid 2u) does not: the scales of
    # rows whose GELU outputs are all tiny differ (the float64 value decides for ours, below).
    big = sr > 1e-3
    _codes_agree(q, s * big, qr, sr * big)
    xd = x.double()
    exact = 0.5 * xd * (1 + torch.tanh(0.7978845608028654 * (xd + 0.044715 * xd**3)))
    amax = exact.abs().amax(-1, keepdim=True).clamp(min=1e-5).float() / 127
    assert ((s - amax).abs() <= (sr - amax).abs() + 1e-6 * amax).all()
    assert cpu_ops.gelu_quantize_int8(x.bfloat16()) is NotImplemented


# RMSNorm rows: random, a zero row (r = 1 / sqrt(eps): codes from shift alone), huge and tiny rows
RMS_SHAPES = [(1, 1, 1), (2, 3, 7), (3, 5, 100), (1, 4, 1152), (2, 2, 1001), (1, 3, 3072)]


def _rms_args(b, t, k, seed):
    g = _gen(seed)
    x = torch.randn(b, t, k, generator=g) * 3 + 1
    weight = torch.randn(k, generator=g) * 0.5 + 1
    shift, scale = torch.randn(b, k, generator=g), torch.randn(b, k, generator=g)
    x[-1, -1] *= 1e6
    x[0, -1] *= 1e-4  # mean of squares ~1e-7: eps matters
    x[0, 0] = 0.0
    return x, weight, shift, scale


@pytest.mark.parametrize("b,t,k", RMS_SHAPES)
def test_rmsnorm_modulate_quantize_fast_matches_reference(isa, poisoned, b, t, k):
    x, weight, shift, scale = _rms_args(b, t, k, seed=k + 1)
    for eps in (1e-6, 1e-2):
        q, s = cpu_ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps)
        _codes_agree(q, s, *reference.ref_rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps))
    assert all(map(torch.equal, (q, s), ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps)))
    for dtype in (torch.bfloat16, torch.float64):  # declined: the reference, which rounds to dtype
        args = (x.to(dtype), weight.to(dtype), shift.to(dtype), scale.to(dtype), 1e-6)
        assert cpu_ops.rmsnorm_modulate_quantize_int8(*args) is NotImplemented
        out, ref = (
            ops.rmsnorm_modulate_quantize_int8(*args),
            reference.ref_rmsnorm_modulate_quantize_int8(*args),
        )
        assert all(map(torch.equal, out, ref))


def test_rmsnorm_float64_sum_is_closer_than_pytorch(isa):
    """Where our scales differ from PyTorch's (its float32 mean of float32 squares moves r by an ulp),
    ours are mostly the closer ones to float64 math. Unit weight, no modulation: the scale is
    fl(fl(max|x| * r) / 127), so it follows r."""
    b, t, k, eps = 4, 1000, 1152, 1e-6
    x = torch.randn(b, t, k, generator=_gen(17)) * 3 + 1
    args = (x, torch.ones(k), torch.zeros(b, k), torch.zeros(b, k), eps)
    _, s = cpu_ops.rmsnorm_modulate_quantize_int8(*args)
    _, sr = reference.ref_rmsnorm_modulate_quantize_int8(*args)
    xd = x.double()
    exact = xd.abs().amax(-1, keepdim=True) / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) / 127
    differ = s != sr
    ours, theirs = (s.double() - exact).abs()[differ], (sr.double() - exact).abs()[differ]
    assert differ.sum() >= 100  # about a fifth of the rows
    assert (ours < theirs).sum() > 1.5 * (theirs < ours).sum()
    assert ours.sum() < 0.85 * theirs.sum()


SWIGLU_SHAPES = [(1, 1), (3, 7), (2, 5, 100), (4, 1152), (3, 1001), (2, 3072), (1, 8192)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_quantize_fast_matches_reference(isa, poisoned, shape):
    g = _gen(shape[-1] + 2)
    gate = torch.randn(shape, generator=g) * 4
    up = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 6
    gate.view(-1, shape[-1])[0] = 0.0  # silu(0) = 0: an all-zero row, the 1e-5 floor
    q, s = cpu_ops.swiglu_quantize_int8(gate, up)
    _codes_agree(q, s, *reference.ref_swiglu_quantize_int8(gate, up))
    assert all(map(torch.equal, (q, s), ops.swiglu_quantize_int8(gate, up)))
    # our exp is Cephes' (PyTorch's silu: SLEEF's), each about an ulp: both near the float64 value
    gd = gate.double()
    exact = (gd / (1 + torch.exp(-gd)) * up.double()).abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
    torch.testing.assert_close(s.double(), exact, rtol=4e-7, atol=0)
    for dtype in (torch.bfloat16, torch.float64):
        args = (gate.to(dtype), up.to(dtype))
        assert cpu_ops.swiglu_quantize_int8(*args) is NotImplemented
        assert all(
            map(torch.equal, ops.swiglu_quantize_int8(*args), reference.ref_swiglu_quantize_int8(*args))
        )


def test_swiglu_quantize_extreme_gates(isa, poisoned):
    # around exp's overflow (PyTorch: g / inf = -0; the vector paths clamp exp and store 0) and
    # its underflow (1 + exp(-g) = 1): no NaN, the reference's codes
    edge = [-1e30, -100.0, -88.8, -88.72, -88.5, -88.3, -87.5, -87.3, -20.0, -1e-30, 0.0, 1e-30]
    edge = torch.tensor(edge + [20.0, 87.3, 88.3, 88.8, 100.0, 1e30])
    k = 37  # vector body and tail
    gate = edge[torch.randint(len(edge), (8, k), generator=_gen(5))]
    gate[1, : len(edge)] = edge
    up = torch.randn(8, k, generator=_gen(6)) * 3
    gate[0] = -100.0  # only overflowing exps: silu -0, the 1e-5 floor
    gate[2] = -gate[2].abs().clamp(min=50)  # all large negative
    gate[3] = torch.linspace(-3e-30, 3e-30, k)  # tiny: below the floor
    q, s = cpu_ops.swiglu_quantize_int8(gate, up)
    qr, sr = reference.ref_swiglu_quantize_int8(gate, up)
    assert not s.isnan().any() and torch.equal(q, qr) and torch.equal(s, sr)
    assert (q[[0, 2, 3]] == 0).all() and (s[[0, 2, 3]] == torch.tensor(1e-5) / 127).all()


def test_fused_producers_two_threads_split_the_work_the_same(built, poisoned):
    x, weight, shift, scale = _rms_args(3, 70, 260, seed=25)
    gate, up = torch.randn(2, 150, 520, generator=_gen(26)), torch.randn(2, 150, 520, generator=_gen(27))

    def run():
        return (
            *cpu_ops.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, 1e-6),
            *cpu_ops.swiglu_quantize_int8(gate, up),
        )

    assert all(map(torch.equal, run(), _on_two_threads(run)))


# ----------------------------------------------------------------------------
# W8A8 and W1.58A8
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", ODD + [(5, 1, 9), (2, 33, 7), (3, 1001, 65)])
def test_w8a8_fast_equals_reference(isa, poisoned, m, k, n):
    xq, wq = _int8((m, k), 1), _int8((n, k), 2)
    # integer part: unit scales and no bias give the int32 sums themselves (|acc| < 2^24 here)
    out = ops.w8a8_linear(xq, torch.ones(m, 1), wq, torch.ones(1))
    assert torch.equal(out, reference.ref_w8a8_linear(xq, torch.ones(m, 1), wq, torch.ones(1)))
    xs, ws = torch.rand(m, 1, generator=_gen(3)) + 0.01, torch.rand(n, generator=_gen(4)) + 0.01
    bias = torch.randn(n, generator=_gen(5))
    for scale, b in ((ws, bias), (ws[:1], None)):
        out, ref = ops.w8a8_linear(xq, xs, wq, scale, b), reference.ref_w8a8_linear(xq, xs, wq, scale, b)
        assert not out.isnan().any()
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("m,k,n", ODD + [(2, 16, 1), (9, 20, 200)])
def test_w158a8_fast_equals_reference(isa, poisoned, m, k, n):
    xq = _int8((m, k), 11)
    wp = pack_ternary(torch.randint(-1, 2, (n, k), generator=_gen(12)))
    out = ops.w158a8_linear(xq, torch.ones(m, 1), wp, torch.ones(1))
    assert torch.equal(out, reference.ref_w158a8_linear(xq, torch.ones(m, 1), wp, torch.ones(1)))
    xs, ws = torch.rand(m, 1, generator=_gen(13)) + 0.01, torch.rand(n, generator=_gen(14)) + 0.01
    bias = torch.randn(n, generator=_gen(15))
    for scale, b, dtype in ((ws, bias, torch.float32), (ws[:1], None, torch.bfloat16)):
        out = ops.w158a8_linear(xq, xs, wp, scale, b, dtype)
        ref = reference.ref_w158a8_linear(xq, xs, wp, scale, b, dtype)
        assert out.dtype == dtype and not out.isnan().any()
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 1e-3


def test_extreme_codes_and_leading_axes(isa, poisoned):
    k = 4096  # all -128: sums of 2^26, exact in int32 (the offset trick must not overflow)
    xq = torch.full((2, 3, k), -128, dtype=torch.int8)
    wq = torch.full((5, k), -128, dtype=torch.int8)
    out = ops.w8a8_linear(xq, torch.ones(2, 3, 1), wq, torch.ones(5))
    assert out.shape == (2, 3, 5) and (out == 2.0**26).all()
    out = ops.w8a8_linear(xq, torch.ones(2, 3, 1), torch.full_like(wq, 127), torch.ones(5))
    assert (out == -128.0 * 127 * k).all()  # the largest negative sums: no saturation anywhere
    for sign in (-1, 1):  # ternary codes 0 and 2 (AVX2 keeps 60 steps of pairs of +-512 in int16)
        wp = pack_ternary(torch.full((5, k), float(sign)))
        out = ops.w158a8_linear(xq, torch.ones(2, 3, 1), wp, torch.ones(1))
        assert (out == -128.0 * sign * k).all()
        out = ops.w158a8_linear(torch.full_like(xq, 127), torch.ones(2, 3, 1), wp, torch.ones(1))
        assert (out == 127.0 * sign * k).all()


def test_two_threads_split_the_work_the_same(built, poisoned):
    # the test session runs single-threaded (conftest); the kernels parallelize over tokens x columns
    xq, wq = _int8((200, 520), 21), _int8((300, 520), 22)
    wp = pack_ternary(torch.randint(-1, 2, (300, 520), generator=_gen(23)))
    xs, ws = torch.rand(200, 1) + 0.1, torch.rand(300) + 0.1
    a, b, (q, s) = _on_two_threads(
        lambda: (
            ops.w8a8_linear(xq, xs, wq, ws),
            ops.w158a8_linear(xq, xs, wp, ws),
            ops.quantize_per_token_int8(torch.randn(300, 64, generator=_gen(24))),
        )
    )
    assert torch.equal(a, reference.ref_w8a8_linear(xq, xs, wq, ws))
    assert torch.equal(b, reference.ref_w158a8_linear(xq, xs, wp, ws))
    assert torch.equal(q, reference.ref_quantize_per_token_int8(torch.randn(300, 64, generator=_gen(24)))[0])


# ----------------------------------------------------------------------------
# W4A8 (Q-DiT: int4 group-wise weights, per-token int8 / uint8 activations)
# ----------------------------------------------------------------------------


def _w4a8_args(m, n, k, gw, asym, seed, lead=(), ga=None):
    g, groups = _gen(seed), k // (ga or k)
    wp = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    ws = torch.rand(n, k // gw, generator=g) + 0.01
    wz = torch.randint(0, 16, (n, k // gw), generator=g).float()
    if asym:
        xq = torch.randint(0, 256, (*lead, m, k), generator=g, dtype=torch.uint8)
        xz = torch.randint(0, 256, (*lead, m, groups), generator=g).float()
    else:
        xq, xz = torch.randint(-128, 128, (*lead, m, k), generator=g, dtype=torch.int8), None
    xs = torch.rand(*lead, m, groups, generator=g) + 0.01
    return xq, xs, xz, wp, ws, wz


def _rel(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("asym", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize(
    "k,gw,ga",  # ga None: one activation scale per token, else per token and group of ga inputs
    [(128, 128, None), (256, 128, None), (256, 256, None), (384, 128, None), (384, 384, None)]
    + [(384, 128, 48), (256, 256, 64), (384, 96, 128)],
)
@pytest.mark.parametrize("m", [1, 7, 37])
def test_w4a8_fast_equals_reference(isa, poisoned, m, k, gw, ga, asym):
    for n in (20, 64, 136):
        xq, xs, xz, wp, ws, wz = _w4a8_args(m, n, k, gw, asym, seed=m * n + k + gw, ga=ga)
        fast = cpu_ops.w4a8_linear(xq, xs, xz, wp, ws, wz, None, torch.float32)
        assert (fast is NotImplemented) == (isa == "scalar")  # the AVX2 and AVX-512 VNNI paths
        # integer part: unit scales, one weight group, no bias: the exact integer sums (< 2^24)
        ones = (torch.ones_like(xs), xz, wp, torch.ones(n, 1), wz[:, :1])
        assert torch.equal(ops.w4a8_linear(xq, *ones), reference.ref_w4a8_linear(xq, *ones))
        bias = torch.randn(n, generator=_gen(n))
        for b, dtype in ((bias, torch.float32), (None, torch.float32), (bias, torch.bfloat16)):
            out = ops.w4a8_linear(xq, xs, xz, wp, ws, wz, b, dtype)
            ref = reference.ref_w4a8_linear(xq, xs, xz, wp, ws, wz, b, dtype)
            assert out.dtype == dtype and out.shape == (m, n) and not out.isnan().any()
            # same order of float operations as the reference (no FMA contraction): equal in float32
            assert _rel(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-3)


def test_w4a8_extremes_leading_axes_and_two_threads(isa, poisoned):
    k = 4096  # per group 255 * 15 * 128, all codes at their largest; sums below 2^24 stay exact
    xq = torch.full((2, 3, k), 255, dtype=torch.uint8)
    wp = pack_int4(torch.full((70, k), 15, dtype=torch.uint8))
    ones = torch.ones(2, 3, 1)
    out = ops.w4a8_linear(xq, ones, torch.zeros(2, 3, 1), wp, torch.ones(70, 32), torch.zeros(70, 32))
    assert out.shape == (2, 3, 70) and (out == 255.0 * 15 * k).all()
    out = ops.w4a8_linear(
        torch.full((2, 3, k), -128, dtype=torch.int8),
        ones,
        None,
        wp,
        torch.ones(70, 1),
        torch.full((70, 1), 15.0),
    )
    assert (out == 0).all()  # 15 - z_w = 0
    args = _w4a8_args(200, 300, 512, 128, True, seed=51, lead=(2,))
    a = _on_two_threads(lambda: ops.w4a8_linear(*args))
    assert torch.equal(a, reference.ref_w4a8_linear(*args))


def test_w4a8_declines_what_it_does_not_handle(built, poisoned):
    # the kernel needs both scales constant over whole blocks of 8 inputs: gcd(ga, gw) % 8 == 0
    xq, xs, xz, wp, ws, wz = _w4a8_args(5, 24, 120, 120, True, seed=61)
    xs24, xz24 = xs.repeat(1, 5), xz.repeat(1, 5)  # activation groups of 24 inputs
    cases = [
        (xq, xs, xz, wp, ws.repeat(1, 30), wz.repeat(1, 30)),  # weight groups of 4 inputs
        (xq, xs24, xz24, wp, ws.repeat(1, 4), wz.repeat(1, 4)),  # gcd(24, 30) = 6
    ]
    for args in cases:
        assert cpu_ops.w4a8_linear(*args, None, torch.float32) is NotImplemented
        assert torch.equal(ops.w4a8_linear(*args), reference.ref_w4a8_linear(*args))
    handled = (xq, xs24, xz24, wp, ws.repeat(1, 3), wz.repeat(1, 3))  # gcd(24, 40) = 8
    out = cpu_ops.w4a8_linear(*handled, None, torch.float32)
    assert (out is NotImplemented) == (built < levels.AVX2)
    if out is not NotImplemented:
        assert torch.equal(out, reference.ref_w4a8_linear(*handled))
    levels.set_isa("scalar")
    try:
        assert cpu_ops.w4a8_linear(xq, xs, xz, wp, ws, wz, None, torch.float32) is NotImplemented
    finally:
        levels.set_isa(None)


# ----------------------------------------------------------------------------
# Weight-only ternary and int4 (float activations)
# ----------------------------------------------------------------------------

WO_SHAPES = [(1, 4, 1), (3, 36, 5), (17, 260, 70), (6, 1152, 130), (70, 1000, 64), (1, 16, 33)]


@pytest.mark.parametrize("m,k,n", WO_SHAPES)
def test_ternary_weight_only_fast_equals_reference(isa, poisoned, m, k, n):
    g = _gen(m * 1000 + k + n)
    x = torch.randn(2, m, k, generator=g)  # a leading axis: tokens are 2 * m
    wp = pack_ternary(torch.randint(-1, 2, (n, k), generator=g))
    bias = torch.randn(n, generator=g)
    for scale in (torch.rand(1, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1):
        for b in (bias, None):
            fast = cpu_ops.ternary_linear(x, wp, scale, b)
            assert (fast is NotImplemented) == (isa == "scalar")  # the scalar level keeps the reference
            out, ref = ops.ternary_linear(x, wp, scale, b), reference.ref_ternary_linear(x, wp, scale, b)
            assert out.shape == (2, m, n) and not out.isnan().any()
            # the same dequantized weights, another summation order than BLAS
            assert _rel(out, ref) <= 1e-5
    # the weights are exactly +-s and 0: with integer activations every sum is exact
    xi = torch.randint(-8, 9, (m, k), generator=g).float()
    one = torch.ones(1)
    assert torch.equal(ops.ternary_linear(xi, wp, one), reference.ref_ternary_linear(xi, wp, one))


@pytest.mark.parametrize("m,k,n", WO_SHAPES)
def test_int4_weight_only_fast_equals_reference(isa, poisoned, m, k, n):
    g = _gen(m * 1000 + k + n + 1)
    x = torch.randn(m, k, generator=g)
    wp = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    # groups: the whole row, 4 inputs (no vector alignment: the scalar dequantization), 16 or 32
    groups = {k, 4, 16 if k % 16 == 0 else k, 32 if k % 32 == 0 else k}
    for gw in sorted(groups):
        ws = torch.rand(n, k // gw, generator=g) + 0.01
        wz = torch.randint(0, 16, (n, k // gw), generator=g).float()
        b = torch.randn(n, generator=g)
        fast = cpu_ops.int4_linear(x, wp, ws, wz, b)
        assert (fast is NotImplemented) == (isa == "scalar")
        out, ref = ops.int4_linear(x, wp, ws, wz, b), reference.ref_int4_linear(x, wp, ws, wz, b)
        assert out.shape == (m, n) and not out.isnan().any()
        assert _rel(out, ref) <= 1e-5, gw


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [4, 36, 1152, 1156])
def test_weight_only_few_tokens_fused_path_equals_buffered(isa, poisoned, monkeypatch, m, k):
    """Up to WEIGHT_ONLY_FUSED_MAX_M tokens AVX-512 decodes weights in registers, several columns
    at a time; each sum keeps the buffered path's order, so the numbers are the same bit for bit
    (K tails, N not a multiple of the columns done together, both scale layouts, int4 groups)."""
    if isa == "scalar":
        pytest.skip("the scalar level keeps the reference")
    g = _gen(m * 10_000 + k)
    n = 37
    x = torch.randn(m, k, generator=g)
    wt = pack_ternary(torch.randint(-1, 2, (n, k), generator=g))
    w4 = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    bias = torch.randn(n, generator=g)
    calls = []
    for scale in (torch.rand(1, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1):
        for b in (bias, None):
            calls.append(lambda scale=scale, b=b: cpu_ops.ternary_linear(x, wt, scale, b))
    for gw in (16, 32, 4) if k % 32 == 0 else (4, k):
        ws = torch.rand(n, k // gw, generator=g) + 0.01
        wz = torch.randint(0, 16, (n, k // gw), generator=g).float()
        calls.append(lambda ws=ws, wz=wz: cpu_ops.int4_linear(x, w4, ws, wz, bias))
    for call in calls:
        fused = call()
        monkeypatch.setattr(cpu_ops, "WEIGHT_ONLY_FUSED_MAX_M", 0)
        buffered = call()
        monkeypatch.setattr(cpu_ops, "WEIGHT_ONLY_FUSED_MAX_M", 4)
        assert fused.shape == (m, n) and torch.isfinite(fused).all()
        assert torch.equal(fused, buffered)


def test_weight_only_declines_what_it_does_not_handle(built, poisoned):
    g = _gen(71)
    k, n = 64, 24
    wp = pack_ternary(torch.randint(-1, 2, (n, k), generator=g))
    w4 = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    ws, wz = torch.rand(n, 2, generator=g) + 0.01, torch.randint(0, 16, (n, 2), generator=g).float()
    x = torch.randn(5, k, generator=g)
    args = (x.bfloat16(), wp, torch.ones(1), None)
    assert cpu_ops.ternary_linear(*args) is NotImplemented
    assert torch.equal(ops.ternary_linear(*args), reference.ref_ternary_linear(*args))
    for args in ((x.double(), w4, ws, wz, None), (x, w4, ws.bfloat16(), wz, None)):
        assert cpu_ops.int4_linear(*args) is NotImplemented
        assert torch.equal(ops.int4_linear(*args), reference.ref_int4_linear(*args))
    assert cpu_ops.ternary_linear(torch.randn(0, k), wp, torch.ones(1), None) is NotImplemented
    handled = cpu_ops.ternary_linear(x, wp, torch.ones(1, dtype=torch.bfloat16), None)  # +-1 exact in bf16
    assert (handled is NotImplemented) == (built == levels.SCALAR)


@pytest.mark.parametrize("block_bytes", [16 * 4 * 200, 1 << 30], ids=["blocks", "one-block"])
def test_weight_only_many_tokens_dequantize_blocks_for_blas(isa, poisoned, monkeypatch, block_bytes):
    # beyond WEIGHT_ONLY_DIRECT_MAX_M tokens: columns dequantized block by block (16 columns per
    # block here, the last one short), each block multiplied by BLAS
    monkeypatch.setattr(cpu_ops, "DEQUANT_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(cpu_ops, "DEQUANT_BLOCK_MIN_COLS", 16)
    g = _gen(72)
    m, k, n = cpu_ops.WEIGHT_ONLY_DIRECT_MAX_M + 7, 200, 70
    x = torch.randn(m, k, generator=g)
    wp = pack_ternary(torch.randint(-1, 2, (n, k), generator=g))
    w4 = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    ws, wz = torch.rand(n, 5, generator=g) + 0.01, torch.randint(0, 16, (n, 5), generator=g).float()
    s, b = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    for bias in (b, None):
        fast = cpu_ops.ternary_linear(x, wp, s, bias)
        assert (fast is NotImplemented) == (isa == "scalar")
        out, ref = ops.ternary_linear(x, wp, s, bias), reference.ref_ternary_linear(x, wp, s, bias)
        assert not out.isnan().any() and _rel(out, ref) <= 1e-5
        out, ref = ops.int4_linear(x, w4, ws, wz, bias), reference.ref_int4_linear(x, w4, ws, wz, bias)
        assert not out.isnan().any() and _rel(out, ref) <= 1e-5


def test_weight_only_two_threads_split_the_work_the_same(built, poisoned):
    g = _gen(81)
    x = torch.randn(150, 520, generator=g)  # 3 token blocks x 19 column blocks
    wp = pack_ternary(torch.randint(-1, 2, (300, 520), generator=g))
    w4 = pack_int4(torch.randint(0, 16, (300, 520), generator=g, dtype=torch.uint8))
    ws, wz = torch.rand(300, 13, generator=g) + 0.01, torch.randint(0, 16, (300, 13), generator=g).float()
    s = torch.rand(300, generator=g)

    def run():
        return ops.ternary_linear(x, wp, s), ops.int4_linear(x, w4, ws, wz)

    one, two = run(), _on_two_threads(run)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
